"""Wire frames: exact round trips and one specific error per kind of bad frame."""

from __future__ import annotations

import struct
import zlib

import msgpack
import numpy as np
import pytest
import torch
import zstandard

from distrain.comm.codecs import EncodedTensor, make_codec
from distrain.comm.codecs.bitpack import pack_bits, unpack_bits
from distrain.comm.errors import (
    BadMagicError,
    ChecksumError,
    CodecMismatchError,
    DecompressionError,
    FrameError,
    FutureFrameError,
    IndexRangeError,
    MalformedHeaderError,
    NonFiniteError,
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
from distrain.comm.wire import PREFIX_SIZE, VERSION, FrameLimits, FrameMeta, decode_frame, encode_frame

SHAPES = {"layers.0.w": (96, 64), "layers.0.norm": (64,), "head": (67, 100)}


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def make_frame(codec_kind: str = "sparseloco", round: int = 5, compress: bool = True, **params):
    codec = make_codec(codec_kind, **params)
    enc = {n: codec.encode(n, t, {}) for n, t in tensors().items()}
    frame = encode_frame(FrameMeta.for_codec("run-a", round, 2, codec), enc, compress=compress)
    return codec, enc, frame


def decode(frame: bytes, codec=None, round: int = 5, limits=None, expected=SHAPES):
    return decode_frame(frame, expected, "run-a", round, limits, codec=codec)


def forge(header: object | bytes, payload: bytes, flags: int = 1, version: int = VERSION, magic: bytes = b"DTRN") -> bytes:
    """A frame with a valid crc around arbitrary header/payload (the documented prefix layout)."""
    hb = header if isinstance(header, bytes) else msgpack.packb(header, use_bin_type=True)
    head = struct.pack("<4sBBHIQ", magic, version, flags, 0, len(hb), len(payload))
    crc = zlib.crc32(head + hb + payload)
    return head + struct.pack("<I", crc) + hb + payload


def split(frame: bytes) -> tuple[dict, bytes]:
    hlen, plen = struct.unpack_from("<IQ", frame, 8)
    header = msgpack.unpackb(frame[PREFIX_SIZE : PREFIX_SIZE + hlen], raw=False)
    raw = zstandard.ZstdDecompressor().decompress(frame[PREFIX_SIZE + hlen :])
    return header, raw


def reframe(header: dict, raw: bytes) -> bytes:
    return forge(header, zstandard.ZstdCompressor().compress(raw))


# ----- valid frames ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,params,compress",
    [
        ("sparseloco", {}, True),
        ("sparseloco", {"quantizer": "symmetric"}, True),
        ("sparseloco", {"quantizer": "none", "value_dtype": "fp16"}, False),
        ("dense", {"dtype": "fp32"}, True),
        ("dense", {"dtype": "bf16"}, False),
    ],
)
def test_valid_frames_round_trip_exactly(kind, params, compress):
    codec, enc, frame = make_frame(kind, compress=compress, **params)
    meta, got = decode(frame, codec)
    assert (meta.run_id, meta.round, meta.worker, meta.codec, meta.params) == ("run-a", 5, 2, kind, codec.params())
    assert list(got) == list(enc)
    for name, et in enc.items():
        assert got[name].shape == et.shape and got[name].meta == et.meta
        assert set(got[name].buffers) == set(et.buffers)
        for b in et.buffers:
            assert got[name].buffers[b].dtype == et.buffers[b].dtype
            assert np.array_equal(got[name].buffers[b], et.buffers[b])
        assert torch.equal(codec.decode_aggregate([got[name]], SHAPES[name]), codec.decode_aggregate([et], SHAPES[name]))


def test_codec_can_come_from_the_header():
    _, _, frame = make_frame(quantizer="symmetric", topk=32)
    meta, _ = decode(frame, codec=None)
    assert meta.params["topk"] == 32 and meta.params["quantizer"] == "symmetric"


def test_sparse_frame_is_small():
    codec, enc, frame = make_frame()
    raw = sum(et.nbytes() for et in enc.values())
    assert raw == sum(codec.payload_nbytes(s) for s in SHAPES.values())
    assert len(frame) < raw + 1024  # prefix + header overhead stays under 1 KiB here


# ----- prefix -----------------------------------------------------------------------------------


def test_truncated_frames():
    _, _, frame = make_frame()
    with pytest.raises(TruncatedFrameError, match="prefix"):
        decode(frame[:10])
    with pytest.raises(TruncatedFrameError, match="only"):
        decode(frame[:-1])


def test_trailing_bytes():
    _, _, frame = make_frame()
    with pytest.raises(TrailingBytesError):
        decode(frame + b"\x00")


@pytest.mark.parametrize("where", ["header", "payload", "crc"])
def test_bit_flip_fails_the_checksum(where):
    _, _, frame = make_frame()
    hlen = struct.unpack_from("<I", frame, 8)[0]
    pos = {"header": PREFIX_SIZE + 3, "payload": PREFIX_SIZE + hlen + 7, "crc": 21}[where]
    bad = bytearray(frame)
    bad[pos] ^= 0x10
    with pytest.raises(ChecksumError):
        decode(bytes(bad))


def test_bad_magic_version_flags():
    _, _, frame = make_frame()
    with pytest.raises(BadMagicError):
        decode(b"XXXX" + frame[4:])
    with pytest.raises(UnsupportedVersionError, match="version 9"):
        decode(frame[:4] + bytes([9]) + frame[5:])
    with pytest.raises(UnsupportedVersionError, match="flags"):
        decode(frame[:5] + bytes([0x81]) + frame[6:])


def test_oversized_lengths_are_rejected_before_reading():
    _, _, frame = make_frame()
    with pytest.raises(OversizedFrameError, match="header"):
        decode(frame, limits=FrameLimits(max_header_bytes=16))
    with pytest.raises(OversizedFrameError, match="payload"):
        decode(frame, limits=FrameLimits(max_payload_bytes=16))
    # A 24-byte prefix that claims a 1 TB payload: rejected by the cap, never "waited for".
    claim = struct.pack("<4sBBHIQI", b"DTRN", VERSION, 1, 0, 10, 1 << 40, 0)
    with pytest.raises(OversizedFrameError):
        decode(claim)


# ----- header and schema --------------------------------------------------------------------------


def test_malformed_header():
    with pytest.raises(MalformedHeaderError):
        decode(forge(b"\xc1\xc1", b""))  # 0xc1 is never valid msgpack
    with pytest.raises(MalformedHeaderError, match="map"):
        decode(forge([1, 2, 3], b""))
    with pytest.raises(MalformedHeaderError):
        decode(forge({"run": b"binary"}, b""))  # bin type is refused
    with pytest.raises(MalformedHeaderError):
        decode(forge(msgpack.packb({"x": msgpack.ExtType(1, b"abc")}), b""))


def test_header_schema_errors():
    _, _, frame = make_frame()
    header, raw = split(frame)
    with pytest.raises(SchemaError, match="header keys"):
        decode(reframe({**header, "extra": 1}, raw))
    with pytest.raises(SchemaError, match="raw size"):
        decode(reframe({**header, "raw": header["raw"] + 1}, raw))
    moved = {**header, "tensors": [dict(t) for t in header["tensors"]]}
    moved["tensors"][0]["buffers"] = [list(b) for b in moved["tensors"][0]["buffers"]]
    moved["tensors"][0]["buffers"][1][2] += 1
    with pytest.raises(SchemaError, match="offset"):
        decode(reframe(moved, raw))


def test_run_round_and_codec_checks():
    codec, _, frame = make_frame(round=5)
    with pytest.raises(StaleFrameError, match="round 5"):
        decode(frame, codec, round=6)
    with pytest.raises(FutureFrameError):
        decode(frame, codec, round=4)
    with pytest.raises(RunMismatchError):
        decode_frame(frame, SHAPES, "run-b", 5, codec=codec)
    with pytest.raises(CodecMismatchError, match="topk"):
        decode(frame, make_codec("sparseloco", topk=32))
    header, raw = split(frame)
    with pytest.raises(CodecMismatchError, match="unusable"):
        decode(reframe({**header, "params": {**header["params"], "quantizer": "9bit"}}, raw))


def test_wrong_shape_unknown_and_missing_tensors():
    codec, _, frame = make_frame()
    with pytest.raises(ShapeMismatchError, match="head"):
        decode(frame, codec, expected={**SHAPES, "head": (100, 67)})
    with pytest.raises(UnknownTensorError, match="unknown tensor 'head'"):
        decode(frame, codec, expected={k: v for k, v in SHAPES.items() if k != "head"})
    with pytest.raises(UnknownTensorError, match="lacks"):
        decode(frame, codec, expected={**SHAPES, "extra": (4,)})


def test_zstd_payload_bounds():
    _, _, frame = make_frame()
    header, raw = split(frame)
    with pytest.raises(DecompressionError, match="declares"):  # content size larger than declared raw
        decode(forge(header, zstandard.ZstdCompressor().compress(raw + b"\x00" * 4096)))
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    with pytest.raises(DecompressionError, match="unknown"):
        decode(forge(header, no_size))
    with pytest.raises(TrailingBytesError, match="zstd"):
        decode(forge(header, zstandard.ZstdCompressor().compress(raw) + b"junk"))
    with pytest.raises(DecompressionError):
        decode(forge(header, b"\x28\xb5\x2f\xfd" + b"\x00" * 20))


# ----- buffer contents ----------------------------------------------------------------------------


def test_out_of_range_index_is_rejected():
    codec = make_codec("sparseloco")
    enc = {n: codec.encode(n, t, {}) for n, t in tensors().items()}
    head = enc["head"]  # 67×100: chunks of 1×50, 6-bit index fields
    local = unpack_bits(head.buffers["indices"], 134, 6)
    local[7] = 60
    enc["head"] = EncodedTensor(head.shape, head.meta, {**head.buffers, "indices": pack_bits(local, 6)})
    frame = encode_frame(FrameMeta.for_codec("run-a", 5, 2, codec), enc)
    with pytest.raises(IndexRangeError, match="index 60"):
        decode(frame, codec)


def test_nan_value_is_rejected():
    codec = make_codec("sparseloco", quantizer="none", value_dtype="fp16")
    enc = {n: codec.encode(n, t, {}) for n, t in tensors().items()}
    vals = enc["layers.0.w"].buffers["values"].copy()
    vals[3] = np.nan
    et = enc["layers.0.w"]
    enc["layers.0.w"] = EncodedTensor(et.shape, et.meta, {**et.buffers, "values": vals})
    with pytest.raises(NonFiniteError):
        decode(encode_frame(FrameMeta.for_codec("run-a", 5, 2, codec), enc), codec)


def test_every_error_is_a_frame_error():
    for err in (TruncatedFrameError, ChecksumError, StaleFrameError, IndexRangeError, UnknownTensorError):
        assert issubclass(err, FrameError)


def test_no_unpickling_in_comm():
    import pathlib
    import re

    import distrain.comm

    pattern = re.compile(r"import pickle|from pickle|pickle\.loads?\(|torch\.load\(|allow_pickle=True")
    sources = pathlib.Path(distrain.comm.__file__).parent.rglob("*.py")
    assert not [str(p) for p in sources if pattern.search(p.read_text())]
