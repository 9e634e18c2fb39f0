"""Boundary frames: one micro-batch's activations (forward) or activation gradients (backward)
between two neighbouring pipeline stages.

Why a codec of its own: a boundary crosses a slow link hundreds of times per step, so its framing
must be a few bytes, not a msgpack header; and, like every frame, it is validated before use —
a neighbour's bug or a corrupted link must stop the step with a one-line reason, never train on
garbage. Token ids are not sent: every stage of a pipeline reads the same micro-batches.

Layout (little-endian), ``FRAME_BYTES`` = 36 bytes of framing per message::

    magic      4s   b"DTBD"
    version    u8   1
    direction  u8   0 forward (activations), 1 backward (activation gradients)
    dtype      u8   1 bf16, 2 fp32, 3 fp64 (fp64 for exactness tests)
    reserved   u8   0
    step       u64  inner step of the pipeline replica
    micro      u32  micro-batch index within the step
    batch      u32  sequences in the micro-batch
    seq        u32  positions per sequence
    width      u32  numbers per token: k (subspace coordinates) or d (uncompressed activations)
    crc32      u32  zlib.crc32 of the 32 bytes above + payload
    payload    batch·seq·width values of dtype, row-major (batch, seq, width)

So a message is exactly ``36 + batch·seq·width·itemsize`` bytes: 2k bytes per token per direction
in bf16 plus 36 bytes per micro-batch message.

``decode_boundary`` checks cheapest-first and allocates only after the size and checksum are
right: prefix length, magic, version/reserved/known codes, exact total size, crc32, then the
fields against what the receiver expects (shape, dtype, direction, step, micro-batch), then the
values' finiteness. Each failure raises its own ``distrain.comm.errors.FrameError`` subclass.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import math
from dataclasses import field

import numpy as np
import torch

from distrain.comm.errors import (
    BadMagicError,
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
VERSION = 1
FORWARD, BACKWARD = 0, 1
DIRECTIONS = {FORWARD: "forward", BACKWARD: "backward"}
_PREFIX = struct.Struct("<4sBBBBQIIII")
_CRC = struct.Struct("<I")
FRAME_BYTES = _PREFIX.size + _CRC.size  # 36
MAX_DIM = 1 << 31  # per shape field; the expected shape bounds the real size anyway

# wire name -> (code, torch dtype, little-endian numpy dtype of the raw bits)
_DTYPES: dict[str, tuple[int, torch.dtype, str]] = {
    "bf16": (1, torch.bfloat16, "<u2"),
    "fp32": (2, torch.float32, "<f4"),
    "fp64": (3, torch.float64, "<f8"),
}
_BY_CODE = {code: name for name, (code, _, _) in _DTYPES.items()}


def wire_dtypes() -> tuple[str, ...]:
    return tuple(_DTYPES)


def itemsize(dtype: str) -> int:
    return np.dtype(_check_dtype(dtype)[2]).itemsize


def message_bytes(batch: int, seq: int, width: int, dtype: str = "bf16") -> int:
    """Exact size of one boundary message: framing + payload."""
    return FRAME_BYTES + batch * seq * width * itemsize(dtype)


def _check_dtype(dtype: str) -> tuple[int, torch.dtype, str]:
    if dtype not in _DTYPES:
        raise ValueError(f"boundary dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


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


def encode_boundary(tensor: torch.Tensor, *, direction: int, step: int, micro: int, dtype: str = "bf16") -> bytes:
    """Frame a (batch, seq, width) tensor; it is rounded to ``dtype`` (bf16: round to nearest even)."""
    code, tdtype, npdtype = _check_dtype(dtype)
    _check_direction(direction)
    if tensor.dim() != 3:
        raise ValueError(f"a boundary tensor is (batch, seq, width), got shape {tuple(tensor.shape)}")
    if not 0 <= step < 1 << 64 or not 0 <= micro < 1 << 32:
        raise ValueError(f"step {step} / micro-batch {micro} out of the frame's range")
    b, s, w = (int(n) for n in tensor.shape)
    if max(b, s, w) >= MAX_DIM:
        raise ValueError(f"boundary shape {(b, s, w)} too large for a frame")
    t = tensor.detach().to(device="cpu", dtype=tdtype).contiguous()
    raw = (t.view(torch.int16) if tdtype == torch.bfloat16 else t).numpy()
    payload = raw.astype(npdtype, copy=False).tobytes()
    head = _PREFIX.pack(MAGIC, VERSION, direction, code, 0, step, micro, b, s, w)
    return head + _CRC.pack(zlib.crc32(payload, zlib.crc32(head))) + payload


def decode_boundary(data: bytes | bytearray | memoryview, expect: BoundaryExpect) -> torch.Tensor:
    """Validate a frame against ``expect`` and return its tensor (CPU, in the wire dtype)."""
    view = memoryview(data).cast("B")
    n = len(view)
    if n < FRAME_BYTES:
        raise TruncatedFrameError(f"boundary frame of {n} bytes is shorter than its {FRAME_BYTES}-byte framing")
    magic, version, direction, code, reserved, step, micro, b, s, w = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise BadMagicError(f"boundary frame starts with {bytes(magic)!r}, not {MAGIC!r}")
    if version != VERSION or reserved != 0:
        raise UnsupportedVersionError(f"boundary frame version {version} (reserved {reserved}); this build reads "
                                      f"version {VERSION} with reserved 0")
    if code not in _BY_CODE or direction not in DIRECTIONS:
        raise UnsupportedVersionError(f"boundary frame has unknown dtype code {code} or direction {direction}")
    name = _BY_CODE[code]
    want = FRAME_BYTES + b * s * w * itemsize(name)
    if n < want:
        raise TruncatedFrameError(f"boundary frame of {n} bytes, its shape {(b, s, w)} {name} needs {want}")
    if n > want:
        raise TrailingBytesError(f"boundary frame of {n} bytes, its shape {(b, s, w)} {name} needs {want}")
    (crc,) = _CRC.unpack_from(view, _PREFIX.size)
    payload = view[FRAME_BYTES:]
    if zlib.crc32(payload, zlib.crc32(view[: _PREFIX.size])) != crc:
        raise ChecksumError(f"boundary frame (step {step}, micro-batch {micro}) fails its crc32")
    _check_against(expect, direction, name, (b, s, w), step, micro)
    _, tdtype, npdtype = _DTYPES[name]
    arr = np.frombuffer(payload, dtype=npdtype).astype(npdtype[1:], copy=True).reshape(b, s, w)
    t = torch.from_numpy(arr)
    if tdtype == torch.bfloat16:
        t = t.view(torch.int16).view(torch.bfloat16)
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{DIRECTIONS[direction]} boundary frame (step {step}, micro-batch {micro}) "
                             "holds NaN or infinite values")
    return t


def frame_header(data: bytes) -> tuple[int, str, int, int, tuple[int, int, int]] | None:
    """(direction, dtype, step, micro-batch, shape) of a boundary frame, None when ``data`` is not one
    (a cheap look at its prefix: fault injection and logs, not validation)."""
    if len(data) < FRAME_BYTES or bytes(data[:4]) != MAGIC:
        return None
    _, _, direction, code, _, step, micro, b, s, w = _PREFIX.unpack_from(data, 0)
    if code not in _BY_CODE or direction not in DIRECTIONS:
        return None
    return direction, _BY_CODE[code], step, micro, (b, s, w)


def _check_against(expect: BoundaryExpect, direction: int, name: str, shape: tuple[int, int, int],
                   step: int, micro: int) -> None:
    _check_direction(expect.direction)
    if shape != tuple(expect.shape):
        raise ShapeMismatchError(f"boundary frame has shape {shape}, this stage expects {tuple(expect.shape)}")
    if name != expect.dtype:
        raise CodecMismatchError(f"boundary frame is {name}, this stage expects {expect.dtype}")
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
