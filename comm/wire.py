"""Wire frames: a fixed binary prefix, a strict msgpack header, and a zstd payload of raw buffers.

Layout (all little-endian)::

    prefix  (24 bytes, struct "<4sBBHIQI")
        magic        4s   b"DTRN"
        version      u8   1
        flags        u8   bit 0: payload is one zstd frame (else raw); other bits must be 0
        reserved     u16  0
        header_len   u32  bytes of the msgpack header
        payload_len  u64  bytes of the (compressed) payload
        crc32        u32  zlib.crc32 of prefix[:20] + header + payload
    header  msgpack map, exactly these keys:
        run: str, round: int, worker: int, codec: str, params: {str: int|float|str},
        raw: int (decompressed payload bytes),
        tensors: [{name: str, shape: [int], meta: {str: int|float|str},
                   buffers: [[name: str, dtype: "u1"|"u2"|"f2"|"f4", offset: int, nbytes: int]]}]
    payload the buffers' bytes back to back, in header order (offsets contiguous from 0)

``decode_frame`` checks cheapest-first and allocates nothing larger than the local, expected
payload size: prefix length, magic, version/flags, declared lengths against the limits and against
the bytes received, crc32, strict msgpack, schema (run, round, codec, tensor names, shapes, exact
buffer sizes derived from the local shapes), bounded zstd decompression, then buffer contents
(index ranges, finite values) through the codec. Each failure has its own ``FrameError`` subclass.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import msgpack
import numpy as np
import zstandard

from distrain.comm.codecs import Codec, EncodedTensor, make_codec
from distrain.comm.codecs.base import WIRE_DTYPES, MetaValue, wire_dtype_name
from distrain.comm.errors import (
    BadMagicError,
    ChecksumError,
    CodecMismatchError,
    DecompressionError,
    FutureFrameError,
    MalformedHeaderError,
    OversizedFrameError,
    RunMismatchError,
    SchemaError,
    ShapeMismatchError,
    StaleFrameError,
    TrailingBytesError,
    TruncatedFrameError,
    UnknownTensorError,
    UnsupportedVersionError,
)

MAGIC = b"DTRN"
VERSION = 2  # 2: the header carries the sender's work in the round (inner steps, tokens)
FLAG_ZSTD = 0x01
KNOWN_FLAGS = FLAG_ZSTD
PREFIX = struct.Struct("<4sBBHIQI")
PREFIX_SIZE = PREFIX.size  # 24
_CRC_OFFSET = PREFIX_SIZE - 4

_TOP_KEYS = {"run", "round", "worker", "codec", "params", "work", "raw", "tensors"}
MAX_STEPS = 1 << 31  # inner steps one replica may claim for one round
MAX_TOKENS = 1 << 53  # tokens likewise (exact in a float64)
_TENSOR_KEYS = {"name", "shape", "meta", "buffers"}


@dataclass(frozen=True)
class FrameLimits:
    """Receiver-side caps, checked before anything of that size is allocated."""

    max_header_bytes: int = 4 << 20
    max_payload_bytes: int = 1 << 30
    max_raw_bytes: int = 2 << 30
    max_tensors: int = 65536
    max_name_len: int = 512
    max_ndim: int = 8
    # The header's budget follows from the tensors the receiver expects (see ``header_budget``):
    # bytes and msgpack objects (containers + their entries) for the envelope, plus per tensor.
    header_base_bytes: int = 2048
    header_bytes_per_tensor: int = 512
    header_base_objects: int = 64
    header_objects_per_tensor: int = 64
    max_map_len: int = 64


@dataclass(frozen=True)
class FrameMeta:
    """Who sent a frame, for which run and round, with which codec, after how much work: the inner
    steps and tokens behind a pseudo-gradient, which a merge of unequal contributions weighs."""

    run_id: str
    round: int
    worker: int
    codec: str
    params: dict[str, MetaValue] = field(default_factory=dict)
    steps: int = 0
    tokens: int = 0

    @classmethod
    def for_codec(cls, run_id: str, round: int, worker: int, codec: Codec, steps: int = 0,
                  tokens: int = 0) -> "FrameMeta":
        return cls(run_id=run_id, round=round, worker=worker, codec=codec.kind, params=codec.params(), steps=steps,
                   tokens=tokens)


def encode_frame(
    meta: FrameMeta, tensors: Mapping[str, EncodedTensor], *, compress: bool = True, level: int = 3
) -> bytes:
    """Serialise ``tensors`` (name → encoding) with ``meta`` into one self-checking frame."""
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    offset = 0
    for name, et in tensors.items():
        bufs = []
        for bname, arr in et.buffers.items():
            if arr.ndim != 1:
                raise ValueError(f"tensor {name!r} buffer {bname!r} must be 1-D, got ndim {arr.ndim}")
            dname = wire_dtype_name(arr.dtype)
            data = np.ascontiguousarray(arr, dtype=WIRE_DTYPES[dname]).tobytes()
            bufs.append([bname, dname, offset, len(data)])
            chunks.append(data)
            offset += len(data)
        entries.append({"name": name, "shape": list(et.shape), "meta": dict(et.meta), "buffers": bufs})
    header = msgpack.packb(
        {
            "run": meta.run_id,
            "round": int(meta.round),
            "worker": int(meta.worker),
            "codec": meta.codec,
            "params": dict(meta.params),
            "work": [int(meta.steps), int(meta.tokens)],
            "raw": offset,
            "tensors": entries,
        },
        use_bin_type=True,
    )
    raw = b"".join(chunks)
    payload = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw) if compress else raw
    flags = FLAG_ZSTD if compress else 0
    head = PREFIX.pack(MAGIC, VERSION, flags, 0, len(header), len(payload), 0)[:_CRC_OFFSET]
    crc = zlib.crc32(payload, zlib.crc32(header, zlib.crc32(head)))
    return head + struct.pack("<I", crc) + header + payload


def decode_frame(
    data: bytes,
    expected: Mapping[str, tuple[int, ...]],
    run_id: str,
    round: int,
    limits: FrameLimits | None = None,
    *,
    codec: Codec | None = None,
    worker: int | None = None,
) -> tuple[FrameMeta, dict[str, EncodedTensor]]:
    """Validate and decode a frame for the current ``round`` of ``run_id``.

    ``expected`` maps every tensor name the receiver owns to its local shape; the frame must carry
    exactly those. ``codec``: the receiver's codec; when given, the frame's codec kind and
    parameters must equal it. ``worker``: when given, the sender id the frame must name.
    Raises a ``FrameError`` subclass naming the first problem found.
    """
    limits = limits or FrameLimits()
    view = memoryview(data)
    head, header_bytes, payload, flags = _split(view, limits)
    max_bytes, max_objects = header_budget(expected, run_id, limits)
    if len(header_bytes) > max_bytes:
        raise OversizedFrameError(f"header of {len(header_bytes)} bytes exceeds the {max_bytes} bytes that "
                                  f"{len(expected)} expected tensors can need")
    crc = zlib.crc32(payload, zlib.crc32(header_bytes, zlib.crc32(head[:_CRC_OFFSET])))
    (declared,) = struct.unpack_from("<I", head, _CRC_OFFSET)
    if crc != declared:
        raise ChecksumError(f"crc32 {crc:#010x} does not match the declared {declared:#010x}")
    header = _unpack_header(header_bytes, limits, max_objects, len(expected))
    meta, local_codec = _check_envelope(header, run_id, round, codec, worker)
    plan, raw_len = _check_tensors(header, expected, local_codec, limits)
    raw = _decompress(payload, flags, raw_len)
    out: dict[str, EncodedTensor] = {}
    for name, shape, tmeta, bufs in plan:
        buffers = {b: np.frombuffer(raw, dtype=WIRE_DTYPES[dt], count=n // WIRE_DTYPES[dt].itemsize, offset=off) for b, dt, off, n in bufs}
        et = EncodedTensor(shape=shape, meta=tmeta, buffers=buffers)
        local_codec.validate(et)
        out[name] = et
    return meta, out


def _split(view: memoryview, limits: FrameLimits) -> tuple[bytes, memoryview, memoryview, int]:
    """Prefix checks: (prefix bytes, header view, payload view, flags)."""
    if len(view) < PREFIX_SIZE:
        raise TruncatedFrameError(f"frame of {len(view)} bytes is shorter than the {PREFIX_SIZE}-byte prefix")
    head = bytes(view[:PREFIX_SIZE])
    magic, version, flags, reserved, header_len, payload_len, _ = PREFIX.unpack(head)
    if magic != MAGIC:
        raise BadMagicError(f"magic {magic!r} is not {MAGIC!r}")
    if version != VERSION:
        raise UnsupportedVersionError(f"wire version {version} is not supported (this build speaks {VERSION})")
    if flags & ~KNOWN_FLAGS or reserved != 0:
        raise UnsupportedVersionError(f"unknown flags {flags:#04x} or non-zero reserved field {reserved}")
    if header_len > limits.max_header_bytes:
        raise OversizedFrameError(f"header of {header_len} bytes exceeds the limit of {limits.max_header_bytes}")
    if payload_len > limits.max_payload_bytes:
        raise OversizedFrameError(f"payload of {payload_len} bytes exceeds the limit of {limits.max_payload_bytes}")
    total = PREFIX_SIZE + header_len + payload_len
    if len(view) < total:
        raise TruncatedFrameError(f"frame declares {total} bytes but only {len(view)} arrived")
    if len(view) > total:
        raise TrailingBytesError(f"{len(view) - total} bytes after the declared end of the frame")
    header = view[PREFIX_SIZE : PREFIX_SIZE + header_len]
    return head, header, view[PREFIX_SIZE + header_len : total], flags


def _reject_ext(code: int, data: bytes) -> Any:
    raise MalformedHeaderError(f"msgpack ext type {code} is not allowed in a frame header")


def header_budget(expected: Mapping[str, tuple[int, ...]], run_id: str, limits: FrameLimits) -> tuple[int, int]:
    """(max header bytes, max msgpack objects) a frame for ``expected`` can need.

    A valid header holds the envelope (run id, codec params) and, per tensor, its name, shape, a
    few meta scalars and at most a handful of buffer entries, so its size is known from what the
    receiver expects before a byte of it is parsed; anything larger is rejected in O(1). The
    object budget bounds what msgpack may build: a 4 MiB header of empty maps would otherwise
    become millions of Python dicts (~300 MB) before the schema check sees it.
    """
    n = len(expected)
    nbytes = limits.header_base_bytes + 2 * len(run_id.encode()) + sum(
        len(name.encode()) + 9 * len(shape) + limits.header_bytes_per_tensor for name, shape in expected.items())
    return min(limits.max_header_bytes, nbytes), limits.header_base_objects + limits.header_objects_per_tensor * n


class _ObjectBudget:
    """msgpack object/list hook: counts containers and their entries, stops at the budget.

    Hooks run as each container completes, so at most the budget plus the entries of the
    containers still open (≤ 1024 levels, msgpack's stack limit, × the length caps) is ever built.
    """

    def __init__(self, limit: int) -> None:
        self.left = limit

    def __call__(self, obj: Any) -> Any:
        self.left -= 1 + len(obj)
        if self.left < 0:
            raise OversizedFrameError("header holds more msgpack objects than its tensors can need")
        return obj


def _unpack_header(header_bytes: memoryview, limits: FrameLimits, max_objects: int, n_expected: int) -> dict[str, Any]:
    """Strict msgpack: str keys, no bin/ext, bounded container sizes and object count, one object."""
    budget = _ObjectBudget(max_objects)
    try:
        header = msgpack.unpackb(
            header_bytes,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_reject_ext,
            object_hook=budget,
            list_hook=budget,
            max_bin_len=0,
            max_ext_len=0,
            max_str_len=limits.max_name_len,
            max_array_len=max(64, min(limits.max_tensors, 2 * n_expected)),
            max_map_len=limits.max_map_len,
        )
    except (MalformedHeaderError, OversizedFrameError):
        raise
    except (ValueError, TypeError, msgpack.exceptions.UnpackException) as exc:
        raise MalformedHeaderError(f"header is not valid msgpack: {type(exc).__name__} {exc}") from None
    if not isinstance(header, dict):
        raise MalformedHeaderError(f"header must be a map, got {type(header).__name__}")
    return header


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_scalars(where: str, d: Any) -> dict[str, MetaValue]:
    if not isinstance(d, dict) or not all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in d.values()):
        raise SchemaError(f"{where} must map names to int/float/str, got {d!r}")
    return d


def _check_envelope(
    header: dict[str, Any], run_id: str, round: int, codec: Codec | None, worker: int | None
) -> tuple[FrameMeta, Codec]:
    if set(header) != _TOP_KEYS:
        raise SchemaError(f"header keys {sorted(header)} differ from {sorted(_TOP_KEYS)}")
    if not isinstance(header["run"], str) or not _is_int(header["round"]) or not _is_int(header["worker"]):
        raise SchemaError("run must be a str, round and worker ints")
    if header["worker"] < 0:
        raise SchemaError(f"worker id {header['worker']} is negative")
    if header["run"] != run_id:
        raise RunMismatchError(f"frame is for run {header['run']!r}, not {run_id!r}")
    if header["round"] < round:
        raise StaleFrameError(f"frame is for round {header['round']}, current round is {round}")
    if header["round"] > round:
        raise FutureFrameError(f"frame is for round {header['round']}, current round is {round}")
    if worker is not None and header["worker"] != worker:
        raise SchemaError(f"frame names worker {header['worker']}, expected {worker}")
    if not isinstance(header["codec"], str):
        raise SchemaError("codec must be a str")
    params = _check_scalars("params", header["params"])
    work = header["work"]
    if not (isinstance(work, list) and len(work) == 2 and all(_is_int(w) for w in work)
            and 0 <= work[0] <= MAX_STEPS and 0 <= work[1] <= MAX_TOKENS):
        raise SchemaError(f"work must be [steps, tokens], non-negative ints within [{MAX_STEPS}, {MAX_TOKENS}]")
    if codec is not None:
        if (header["codec"], params) != (codec.kind, codec.params()):
            raise CodecMismatchError(
                f"frame codec {header['codec']}{params} differs from local {codec.kind}{codec.params()}"
            )
        local = codec
    else:
        try:
            local = make_codec(header["codec"], **params)
        except ValueError as exc:
            raise CodecMismatchError(f"frame codec is unusable: {exc}") from None
    meta = FrameMeta(run_id=header["run"], round=header["round"], worker=header["worker"], codec=local.kind,
                     params=local.params(), steps=work[0], tokens=work[1])
    return meta, local


Plan = list[tuple[str, tuple[int, ...], dict[str, MetaValue], list[tuple[str, str, int, int]]]]


def _check_tensors(
    header: dict[str, Any], expected: Mapping[str, tuple[int, ...]], codec: Codec, limits: FrameLimits
) -> tuple[Plan, int]:
    """Schema of the tensor list against the local shapes; returns the buffer plan and raw size."""
    entries = header["tensors"]
    if not isinstance(entries, list) or len(entries) > limits.max_tensors:
        raise SchemaError(f"tensors must be a list of at most {limits.max_tensors} entries")
    plan: Plan = []
    seen: set[str] = set()
    cursor = 0
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) != _TENSOR_KEYS:
            raise SchemaError(f"tensor entry must have keys {sorted(_TENSOR_KEYS)}")
        name = entry["name"]
        if not isinstance(name, str):
            raise SchemaError("tensor name must be a str")
        if name not in expected:
            raise UnknownTensorError(f"frame carries unknown tensor {name!r}")
        if name in seen:
            raise SchemaError(f"tensor {name!r} appears twice")
        seen.add(name)
        shape = entry["shape"]
        if not isinstance(shape, list) or len(shape) > limits.max_ndim or not all(_is_int(s) for s in shape):
            raise SchemaError(f"tensor {name!r}: shape must be a list of at most {limits.max_ndim} ints")
        local_shape = tuple(int(s) for s in expected[name])
        if tuple(shape) != local_shape:
            raise ShapeMismatchError(f"tensor {name!r} has shape {tuple(shape)}, local shape is {local_shape}")
        tmeta = _check_scalars(f"tensor {name!r} meta", entry["meta"])
        want_meta = codec.expected_meta(local_shape)
        if tmeta != want_meta:
            raise SchemaError(f"tensor {name!r}: metadata {tmeta} differs from expected {want_meta}")
        layout = codec.buffer_layout(local_shape)
        bufs = entry["buffers"]
        if not isinstance(bufs, list) or len(bufs) != len(layout):
            raise SchemaError(f"tensor {name!r}: expected buffers {sorted(layout)}")
        checked = []
        for buf in bufs:
            if not (isinstance(buf, list) and len(buf) == 4 and isinstance(buf[0], str) and isinstance(buf[1], str)
                    and _is_int(buf[2]) and _is_int(buf[3])):
                raise SchemaError(f"tensor {name!r}: buffer entries are [name, dtype, offset, nbytes]")
            bname, dtype, off, nbytes = buf
            spec = layout.get(bname)
            if spec is None or dtype != spec.dtype or nbytes != spec.nbytes:
                want = f"{spec.dtype}[{spec.nbytes} bytes]" if spec else "no such buffer"
                raise SchemaError(f"tensor {name!r} buffer {bname!r}: got {dtype}[{nbytes} bytes], expected {want}")
            if off != cursor:
                raise SchemaError(f"tensor {name!r} buffer {bname!r}: offset {off}, expected {cursor} (contiguous)")
            cursor += nbytes
            checked.append((bname, dtype, off, nbytes))
        if {b[0] for b in checked} != set(layout):
            raise SchemaError(f"tensor {name!r}: buffers {sorted(b[0] for b in checked)} differ from {sorted(layout)}")
        plan.append((name, local_shape, tmeta, checked))
    missing = sorted(set(expected) - seen)
    if missing:
        raise UnknownTensorError(f"frame lacks tensors {missing}")
    if not _is_int(header["raw"]) or header["raw"] != cursor:
        raise SchemaError(f"declared raw size {header['raw']!r} differs from the buffers' {cursor} bytes")
    if cursor > limits.max_raw_bytes:
        raise OversizedFrameError(f"raw payload of {cursor} bytes exceeds the limit of {limits.max_raw_bytes}")
    return plan, cursor


def _decompress(payload: memoryview, flags: int, raw_len: int) -> bytes:
    """Exactly ``raw_len`` bytes, never allocating more (content size checked first)."""
    if not flags & FLAG_ZSTD:
        if len(payload) != raw_len:
            raise DecompressionError(f"uncompressed payload of {len(payload)} bytes, header says {raw_len}")
        return bytes(payload)
    try:
        size = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as exc:
        raise DecompressionError(f"payload is not a zstd frame: {exc}") from None
    if size != raw_len:
        raise DecompressionError(f"zstd frame declares {size} bytes (-1 = unknown), header says {raw_len}")
    dobj = zstandard.ZstdDecompressor().decompressobj()
    try:
        raw = dobj.decompress(payload)
    except zstandard.ZstdError as exc:
        raise DecompressionError(f"corrupt zstd payload: {exc}") from None
    if not dobj.eof or len(raw) != raw_len:
        raise DecompressionError(f"zstd payload decompressed to {len(raw)} of {raw_len} bytes")
    if dobj.unused_data:
        raise TrailingBytesError(f"{len(dobj.unused_data)} bytes after the zstd frame")
    return raw
