"""Boundary frames between pipeline stages: exact sizes, round trips, and every rejection."""

from __future__ import annotations

import struct

import pytest
import torch

from distrain.comm import boundary as bd
from distrain.comm.errors import (
    BadMagicError,
    ChecksumError,
    CodecMismatchError,
    FrameError,
    FutureFrameError,
    NonFiniteError,
    SchemaError,
    ShapeMismatchError,
    StaleFrameError,
    TrailingBytesError,
    TruncatedFrameError,
    UnsupportedVersionError,
)

B, T, K = 2, 5, 8


def frame(t=None, direction=bd.FORWARD, step=7, micro=3, dtype="bf16"):
    t = torch.randn(B, T, K, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) if t is None else t
    return t, bd.encode_boundary(t, direction=direction, step=step, micro=micro, dtype=dtype)


def expect(direction=bd.FORWARD, step=7, micro=3, shape=(B, T, K), dtype="bf16"):
    return bd.BoundaryExpect(direction, step, micro, shape, dtype)


def test_framing_is_36_bytes_and_payload_is_exactly_itemsize_per_number():
    assert bd.FRAME_BYTES == 36
    for dtype, size in (("bf16", 2), ("fp32", 4), ("fp64", 8)):
        _, data = frame(dtype=dtype)
        assert len(data) == 36 + B * T * K * size == bd.message_bytes(B, T, K, dtype)


@pytest.mark.parametrize("dtype", ["bf16", "fp32", "fp64"])
def test_round_trip_equals_the_tensor_rounded_to_the_wire_dtype(dtype):
    t, data = frame(dtype=dtype)
    got = bd.decode_boundary(data, expect(dtype=dtype))
    want = t.to({"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[dtype])
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_backward_direction_and_large_step_round_trip():
    t, data = frame(direction=bd.BACKWARD, step=2**40 + 1, micro=0, dtype="fp64")
    assert torch.equal(bd.decode_boundary(data, expect(bd.BACKWARD, 2**40 + 1, 0, dtype="fp64")), t)


@pytest.mark.parametrize("cut", [0, 10, 35, 36, 36 + 2 * B * T * K - 1])
def test_short_frames_are_truncated(cut):
    _, data = frame()
    with pytest.raises(TruncatedFrameError):
        bd.decode_boundary(data[:cut], expect())


def test_trailing_bytes_are_rejected():
    _, data = frame()
    with pytest.raises(TrailingBytesError):
        bd.decode_boundary(data + b"\0", expect())


def test_bad_magic_and_version():
    _, data = frame()
    with pytest.raises(BadMagicError):
        bd.decode_boundary(b"XXXX" + data[4:], expect())
    with pytest.raises(UnsupportedVersionError):
        bd.decode_boundary(data[:4] + bytes([2]) + data[5:], expect())
    with pytest.raises(UnsupportedVersionError):  # unknown dtype code
        bd.decode_boundary(data[:6] + bytes([9]) + data[7:], expect())


@pytest.mark.parametrize("pos", [8, 16, 36, 36 + B * T * K])  # step field, micro field, payload bytes
def test_a_flipped_bit_fails_the_checksum(pos):
    _, data = frame()
    bad = bytearray(data)
    bad[pos] ^= 0x10
    with pytest.raises(ChecksumError):
        bd.decode_boundary(bytes(bad), expect())


def test_shape_dtype_and_direction_must_match_the_receiver():
    _, data = frame()
    with pytest.raises(ShapeMismatchError):
        bd.decode_boundary(data, expect(shape=(B, T, K + 1)))
    with pytest.raises(ShapeMismatchError):
        bd.decode_boundary(data, expect(shape=(T, B, K)))
    with pytest.raises(CodecMismatchError):
        bd.decode_boundary(data, expect(dtype="fp32"))
    with pytest.raises(SchemaError):
        bd.decode_boundary(data, expect(direction=bd.BACKWARD))


def test_stale_and_future_step_or_micro_batch():
    _, data = frame(step=7, micro=3)
    with pytest.raises(StaleFrameError, match="step 7 micro-batch 3.*expects step 8 micro-batch 0"):
        bd.decode_boundary(data, expect(step=8, micro=0))
    with pytest.raises(StaleFrameError):
        bd.decode_boundary(data, expect(micro=4))
    with pytest.raises(FutureFrameError):
        bd.decode_boundary(data, expect(micro=2))
    with pytest.raises(FutureFrameError):
        bd.decode_boundary(data, expect(step=6, micro=9))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_non_finite_values_are_rejected(bad, dtype):
    t = torch.zeros(B, T, K)
    t[1, 2, 3] = bad
    _, data = frame(t, dtype=dtype)
    with pytest.raises(NonFiniteError):
        bd.decode_boundary(data, expect(dtype=dtype))


def test_errors_are_one_line_frame_errors():
    _, data = frame()
    for bad, exp in ((data[:5], expect()), (data, expect(micro=9)), (data, expect(shape=(1, 1, 1)))):
        with pytest.raises(FrameError) as err:
            bd.decode_boundary(bad, exp)
        assert "\n" not in str(err.value) and str(err.value)


def test_encode_rejects_bad_arguments():
    with pytest.raises(ValueError):
        bd.encode_boundary(torch.zeros(2, 3), direction=bd.FORWARD, step=0, micro=0)
    with pytest.raises(ValueError):
        bd.encode_boundary(torch.zeros(1, 2, 3), direction=5, step=0, micro=0)
    with pytest.raises(ValueError):
        bd.encode_boundary(torch.zeros(1, 2, 3), direction=0, step=0, micro=0, dtype="fp16")


def test_bf16_bits_are_little_endian_on_the_wire():
    t = torch.tensor([[[1.0, -2.0]]])
    data = bd.encode_boundary(t, direction=bd.FORWARD, step=0, micro=0)
    assert data[bd.FRAME_BYTES:] == struct.pack("<HH", 0x3F80, 0xC000)
