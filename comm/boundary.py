"""Boundary frames: one micro-batch's activations (forward) or activation gradients (backward)
between two neighbouring pipeline stages.

Why a codec of its own: a boundary crosses a slow link hundreds of times per step, so its framing
must be a few bytes, not a msgpack header; and, like every frame, it is validated before use —
a neighbour's bug or a corrupted link must stop the step with a one-line reason, never train on
garbage. Token ids are not sent: every stage of a pipeline reads the same micro-batches.

Layout (little-endian), ``FRAME_BYTES`` = 40 bytes of framing per message::

    magic      4s   b"DTBD"
    version    u8   2
    direction  u8   0 forward (activations), 1 backward (activation gradients)
    format     u8   1 bf16, 2 fp32, 3 fp64 (exactness tests), 4 int8, 5 int4 (per-token scaled)
    reserved   u8   0
    step       u64  inner step of the pipeline replica
    micro      u32  micro-batch index within the step
    batch      u32  sequences in the micro-batch
    seq        u32  positions per sequence
    width      u32  numbers per token: k (subspace coordinates) or d (uncompressed activations)
    basis      u32  fingerprint of the sender's subspace basis U (0: no subspace)
    crc32      u32  zlib.crc32 of the 36 bytes above + payload
    payload    bf16/fp32/fp64: batch·seq·width values, row-major (batch, seq, width);
               int8/int4: one fp16 scale per token, then the values as signed codes (int4: two per
               byte, low nibble first) — each token's values are ``code · scale``

So a bf16 message is exactly ``40 + batch·seq·width·2`` bytes (2k bytes per token per direction with
a subspace), an int8 one ``40 + batch·seq·(width + 2)``, an int4 one ``40 + batch·seq·2 +
ceil(batch·seq·width / 2)``. The quantised formats let an *unconstrained* stage send less: a token's
values are rounded to ``max|x| / 127`` (int8) or ``max|x| / 7`` (int4) of that token, an error of
at most half that step per value (``QUANT_LEVELS``).

``decode_boundary`` checks cheapest-first and allocates only after the size and checksum are
right: prefix length, magic, version/reserved/known codes, exact total size, crc32, then the
fields against what the receiver expects (shape, format, direction, step, micro-batch, basis), then
the values' finiteness. Each failure raises its own ``distrain.comm.errors.FrameError`` subclass.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from distrain.comm.errors import (
    BadMagicError,
    BasisMismatchError,
    ChecksumError,
    CodecMismatchError,
    FutureFrameError,
    MagnitudeError,
    NonFiniteError,
    SchemaError,
    ShapeMismatchError,
    StaleFrameError,
    TrailingBytesError,
    TruncatedFrameError,
    UnsupportedVersionError,
)

MAGIC = b"DTBD"
VERSION = 2
FORWARD, BACKWARD = 0, 1
DIRECTIONS = {FORWARD: "forward", BACKWARD: "backward"}
_PREFIX = struct.Struct("<4sBBBBQIIIII")
_CRC = struct.Struct("<I")
FRAME_BYTES = _PREFIX.size + _CRC.size  # 40
MAX_DIM = 1 << 31  # per shape field; the expected shape bounds the real size anyway

# wire name -> (code, torch dtype, little-endian numpy dtype of the raw bits) of the plain formats
_DTYPES: dict[str, tuple[int, torch.dtype, str]] = {
    "bf16": (1, torch.bfloat16, "<u2"),
    "fp32": (2, torch.float32, "<f4"),
    "fp64": (3, torch.float64, "<f8"),
}
# quantised formats: wire name -> (code, largest code magnitude)
QUANT_LEVELS: dict[str, tuple[int, int]] = {"int8": (4, 127), "int4": (5, 7)}
_BY_CODE = {**{code: name for name, (code, _, _) in _DTYPES.items()},
            **{code: name for name, (code, _) in QUANT_LEVELS.items()}}


def wire_dtypes() -> tuple[str, ...]:
    return (*_DTYPES, *QUANT_LEVELS)


def itemsize(dtype: str) -> int:
    """Bytes per value of a plain format (quantised ones: ``payload_bytes``)."""
    return np.dtype(_check_dtype(dtype)[2]).itemsize


def payload_bytes(batch: int, seq: int, width: int, dtype: str = "bf16") -> int:
    """Exact payload size of one message of ``dtype``."""
    if dtype in QUANT_LEVELS:
        n = batch * seq * width
        return 2 * batch * seq + (n if dtype == "int8" else (n + 1) // 2)
    return batch * seq * width * itemsize(dtype)


def message_bytes(batch: int, seq: int, width: int, dtype: str = "bf16") -> int:
    """Exact size of one boundary message: framing + payload."""
    return FRAME_BYTES + payload_bytes(batch, seq, width, dtype)


def bytes_per_token(width: int, dtype: str) -> float:
    """Payload bytes per token and direction (framing aside)."""
    return payload_bytes(1, 1, width, dtype)


def _check_dtype(dtype: str) -> tuple[int, torch.dtype, str]:
    if dtype not in _DTYPES:
        raise ValueError(f"boundary dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _code(dtype: str) -> int:
    if dtype in QUANT_LEVELS:
        return QUANT_LEVELS[dtype][0]
    return _check_dtype(dtype)[0]


def _check_direction(direction: int) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"boundary direction must be FORWARD (0) or BACKWARD (1), got {direction!r}")


@dataclass(frozen=True)
class BoundaryExpect:
    """What the receiver knows before a frame arrives (it reads the same micro-batches)."""

    direction: int
    step: int
    micro: int
    shape: tuple[int, int, int]  # (batch, seq, width)
    dtype: str = "bf16"
    basis: int = 0  # fingerprint of the receiver's subspace basis (0: none)


def _quantise(t: torch.Tensor, dtype: str) -> bytes:
    """Per-token symmetric quantisation: fp16 scales, then the codes (int4 packed two per byte)."""
    top = QUANT_LEVELS[dtype][1]
    x = t.detach().to(device="cpu", dtype=torch.float32).reshape(-1, t.shape[-1])
    scale = (x.abs().amax(dim=1) / top).to(torch.float16)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    codes = torch.clamp(torch.round(x / safe[:, None]), -top, top).to(torch.int8).reshape(-1).numpy()
    if dtype == "int4":
        nib = (codes.astype(np.int16) & 0xF).astype(np.uint8)
        if nib.size % 2:
            nib = np.append(nib, np.uint8(0))
        codes = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)
    return scale.numpy().astype("<f2").tobytes() + codes.tobytes()


def _dequantise(payload: memoryview, shape: tuple[int, int, int], dtype: str) -> torch.Tensor:
    b, s, w = shape
    tokens, n = b * s, b * s * w
    scale = np.frombuffer(payload, dtype="<f2", count=tokens).astype(np.float32)
    raw = np.frombuffer(payload, dtype=np.uint8 if dtype == "int4" else np.int8, offset=2 * tokens)
    if dtype == "int4":
        low = (raw & 0xF).astype(np.int8)
        high = (raw >> 4).astype(np.int8)
        codes = np.empty(raw.size * 2, dtype=np.int8)
        codes[0::2], codes[1::2] = low, high
        codes = np.where(codes > 7, codes - 16, codes)[:n]  # two's complement nibbles
    else:
        codes = raw[:n]
    top = QUANT_LEVELS[dtype][1]
    if np.abs(codes).max(initial=0) > top:
        raise SchemaError(f"{dtype} boundary frame holds a code beyond ±{top}")
    values = codes.astype(np.float32).reshape(tokens, w) * scale[:, None]
    return torch.from_numpy(values).reshape(b, s, w)


def encode_boundary(tensor: torch.Tensor, *, direction: int, step: int, micro: int, dtype: str = "bf16",
                    basis: int = 0) -> bytes:
    """Frame a (batch, seq, width) tensor in ``dtype`` (bf16: rounded to nearest even; int8/int4:
    quantised per token); ``basis``: the fingerprint of the sender's subspace basis (0: none)."""
    code = _code(dtype)
    _check_direction(direction)
    if tensor.dim() != 3:
        raise ValueError(f"a boundary tensor is (batch, seq, width), got shape {tuple(tensor.shape)}")
    if not 0 <= step < 1 << 64 or not 0 <= micro < 1 << 32 or not 0 <= basis < 1 << 32:
        raise ValueError(f"step {step} / micro-batch {micro} / basis {basis} out of the frame's range")
    b, s, w = (int(n) for n in tensor.shape)
    if max(b, s, w) >= MAX_DIM:
        raise ValueError(f"boundary shape {(b, s, w)} too large for a frame")
    if dtype in QUANT_LEVELS:
        payload = _quantise(tensor, dtype)
    else:
        _, tdtype, npdtype = _DTYPES[dtype]
        t = tensor.detach().to(device="cpu", dtype=tdtype).contiguous()
        raw = (t.view(torch.int16) if tdtype == torch.bfloat16 else t).numpy()
        payload = raw.astype(npdtype, copy=False).tobytes()
    head = _PREFIX.pack(MAGIC, VERSION, direction, code, 0, step, micro, b, s, w, basis)
    return head + _CRC.pack(zlib.crc32(payload, zlib.crc32(head))) + payload


def decode_boundary(data: bytes | bytearray | memoryview, expect: BoundaryExpect) -> torch.Tensor:
    """Validate a frame against ``expect`` and return its tensor (CPU, in the wire dtype)."""
    view = memoryview(data).cast("B")
    n = len(view)
    if n < FRAME_BYTES:
        raise TruncatedFrameError(f"boundary frame of {n} bytes is shorter than its {FRAME_BYTES}-byte framing")
    magic, version, direction, code, reserved, step, micro, b, s, w, basis = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise BadMagicError(f"boundary frame starts with {bytes(magic)!r}, not {MAGIC!r}")
    if version != VERSION or reserved != 0:
        raise UnsupportedVersionError(f"boundary frame version {version} (reserved {reserved}); this build reads "
                                      f"version {VERSION} with reserved 0")
    if code not in _BY_CODE or direction not in DIRECTIONS:
        raise UnsupportedVersionError(f"boundary frame has unknown dtype code {code} or direction {direction}")
    name = _BY_CODE[code]
    want = FRAME_BYTES + payload_bytes(b, s, w, name)
    if n < want:
        raise TruncatedFrameError(f"boundary frame of {n} bytes, its shape {(b, s, w)} {name} needs {want}")
    if n > want:
        raise TrailingBytesError(f"boundary frame of {n} bytes, its shape {(b, s, w)} {name} needs {want}")
    (crc,) = _CRC.unpack_from(view, _PREFIX.size)
    payload = view[FRAME_BYTES:]
    if zlib.crc32(payload, zlib.crc32(view[: _PREFIX.size])) != crc:
        raise ChecksumError(f"boundary frame (step {step}, micro-batch {micro}) fails its crc32")
    _check_against(expect, direction, name, (b, s, w), step, micro, basis)
    if name in QUANT_LEVELS:
        t = _dequantise(payload, (b, s, w), name)
    else:
        _, tdtype, npdtype = _DTYPES[name]
        arr = np.frombuffer(payload, dtype=npdtype).astype(npdtype[1:], copy=True).reshape(b, s, w)
        t = torch.from_numpy(arr)
        if tdtype == torch.bfloat16:
            t = t.view(torch.int16).view(torch.bfloat16)
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{DIRECTIONS[direction]} boundary frame (step {step}, micro-batch {micro}) "
                             "holds NaN or infinite values")
    return t


def frame_header(data: bytes) -> tuple[int, str, int, int, tuple[int, int, int], int] | None:
    """(direction, dtype, step, micro-batch, shape, basis) of a boundary frame, None when ``data`` is
    not one (a cheap look at its prefix: fault injection and logs, not validation)."""
    if len(data) < FRAME_BYTES or bytes(data[:4]) != MAGIC:
        return None
    _, _, direction, code, _, step, micro, b, s, w, basis = _PREFIX.unpack_from(data, 0)
    if code not in _BY_CODE or direction not in DIRECTIONS:
        return None
    return direction, _BY_CODE[code], step, micro, (b, s, w), basis


def _check_against(expect: BoundaryExpect, direction: int, name: str, shape: tuple[int, int, int],
                   step: int, micro: int, basis: int = 0) -> None:
    _check_direction(expect.direction)
    if shape != tuple(expect.shape):
        raise ShapeMismatchError(f"boundary frame has shape {shape}, this stage expects {tuple(expect.shape)}")
    if name != expect.dtype:
        raise CodecMismatchError(f"boundary frame is {name}, this stage expects {expect.dtype}")
    if basis != expect.basis:
        raise BasisMismatchError(f"boundary frame was built on subspace basis {basis:#010x}, this stage's is "
                                 f"{expect.basis:#010x}: the stages disagree on U (different seeds or LAPACK builds)")
    if direction != expect.direction:
        raise SchemaError(f"boundary frame is {DIRECTIONS[direction]}, this stage expects "
                          f"{DIRECTIONS[expect.direction]}")
    got, want = (step, micro), (expect.step, expect.micro)
    if got != want:
        cls = StaleFrameError if got < want else FutureFrameError
        raise cls(f"{DIRECTIONS[direction]} boundary frame for step {step} micro-batch {micro}, "
                  f"this stage expects step {expect.step} micro-batch {expect.micro}")


@dataclass
class BoundaryBounds:
    """Magnitude bounds of the boundary frames one stage receives, per link and direction.

    A frame that decodes (valid, finite) can still carry 1e30s: forward it would swamp the next
    stage's activations, backward it would blow the replica's clip norm up so that clipping wastes
    every stage's step. Every frame must stay under ``abs_cap`` in absolute value and, once the link
    has carried ``warmup`` frames that way, its RMS under ``ratio`` × that link's running RMS (an
    average over the frames it accepted). Honest activations and their gradients drift slowly;
    three orders of magnitude between neighbouring frames is not drift.
    """

    ratio: float = 1e3
    abs_cap: float = 1e6
    warmup: int = 4
    keep: float = 0.9  # weight of the running scale against a new frame's
    scales: dict[tuple[int, int], tuple[float, int]] = field(default_factory=dict)  # (src, direction) → (rms, frames)

    def check(self, t: torch.Tensor, src: int, direction: int, step: int, micro: int) -> None:
        """Raise ``MagnitudeError`` for a frame out of bounds; otherwise fold it into the link's scale."""
        where = f"{DIRECTIONS[direction]} boundary frame from rank {src} (step {step}, micro-batch {micro})"
        values = t.detach().float()
        peak = float(values.abs().max()) if values.numel() else 0.0
        if peak > self.abs_cap:
            raise MagnitudeError(f"{where}: a value of magnitude {peak:.3g} exceeds the absolute cap {self.abs_cap:g}")
        rms = float(values.pow(2).mean().sqrt()) if values.numel() else 0.0
        scale, seen = self.scales.get((src, direction), (0.0, 0))
        if seen >= self.warmup and scale > 0 and rms > self.ratio * scale:
            raise MagnitudeError(f"{where}: its RMS {rms:.3g} is {rms / scale:.3g}x the link's running scale "
                                 f"{scale:.3g} (bound {self.ratio:g}x)")
        if math.isfinite(rms):
            self.scales[(src, direction)] = (rms if seen == 0 else self.keep * scale + (1 - self.keep) * rms, seen + 1)
