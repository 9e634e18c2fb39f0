"""Boundary frames between pipeline stages: exact sizes, round trips, and every rejection."""

from __future__ import annotations

import struct

import pytest
import torch

from distrain.comm import boundary as bd
from distrain.comm.errors import (
    BadMagicError,
    BasisMismatchError,
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


def test_framing_is_40_bytes_and_payload_is_exactly_itemsize_per_number():
    assert bd.FRAME_BYTES == 40
    for dtype, size in (("bf16", 2), ("fp32", 4), ("fp64", 8)):
        _, data = frame(dtype=dtype)
        assert len(data) == 40 + B * T * K * size == bd.message_bytes(B, T, K, dtype)
    # quantised: an fp16 scale per token, then one byte (int8) or half a byte (int4) per number
    assert len(frame(dtype="int8")[1]) == 40 + B * T * (2 + K) == bd.message_bytes(B, T, K, "int8")
    assert len(frame(dtype="int4")[1]) == 40 + B * T * 2 + (B * T * K + 1) // 2 == bd.message_bytes(B, T, K, "int4")


@pytest.mark.parametrize("dtype,top", [("int8", 127), ("int4", 7)])
def test_quantised_frames_round_trip_within_half_a_step_of_each_tokens_scale(dtype, top):
    t = torch.randn(B, T, K, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.01, 50, K)
    t[0, 0] = 0.0  # an all-zero token decodes to zeros
    got = bd.decode_boundary(bd.encode_boundary(t, direction=bd.FORWARD, step=7, micro=3, dtype=dtype),
                             expect(dtype=dtype))
    scale = t.abs().amax(dim=-1, keepdim=True) / top
    err = (got - t).abs()
    assert torch.all(err <= scale * 0.5 * (1 + 2e-3) + 1e-12)  # half a step (the fp16 scale rounds a little)
    assert torch.equal(got[0, 0], torch.zeros(K))
    assert float(err.max()) > 0  # lossy, as stated


def test_a_frame_on_another_basis_is_rejected():
    _, data = frame()
    with pytest.raises(BasisMismatchError, match="disagree on U"):
        bd.decode_boundary(data, bd.BoundaryExpect(bd.FORWARD, 7, 3, (B, T, K), "bf16", basis=0x1234))
    on_basis = bd.encode_boundary(torch.ones(B, T, K), direction=bd.FORWARD, step=7, micro=3, basis=0x1234)
    assert bd.frame_header(on_basis)[-1] == 0x1234
    bd.decode_boundary(on_basis, bd.BoundaryExpect(bd.FORWARD, 7, 3, (B, T, K), "bf16", basis=0x1234))
    with pytest.raises(BasisMismatchError):
        bd.decode_boundary(on_basis, expect())


@pytest.mark.parametrize("dtype", ["bf16", "fp32", "fp64"])
def test_round_trip_equals_the_tensor_rounded_to_the_wire_dtype(dtype):
    t, data = frame(dtype=dtype)
    got = bd.decode_boundary(data, expect(dtype=dtype))
    want = t.to({"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[dtype])
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_backward_direction_and_large_step_round_trip():
    t, data = frame(direction=bd.BACKWARD, step=2**40 + 1, micro=0, dtype="fp64")
    assert torch.equal(bd.decode_boundary(data, expect(bd.BACKWARD, 2**40 + 1, 0, dtype="fp64")), t)


@pytest.mark.parametrize("cut", [0, 10, 39, 40, 40 + 2 * B * T * K - 1])
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
        bd.decode_boundary(data[:4] + bytes([1]) + data[5:], expect())
    with pytest.raises(UnsupportedVersionError):  # unknown dtype code
        bd.decode_boundary(data[:6] + bytes([9]) + data[7:], expect())


@pytest.mark.parametrize("pos", [8, 16, 40, 40 + B * T * K])  # step field, micro field, payload bytes
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


def test_the_boundary_format_follows_the_link():
    """compress = "auto": the least lossy unconstrained format whose transfers fit 10 % of the
    stage's compute — bf16 activations on a fast link, int8 / int4 on slower ones — and int4 when
    none fits: never a subspace, which constrains the stage (it stays a user's explicit choice)."""
    from distrain.parallel.pipeline.formats import choose_format

    fast, _ = choose_format(128, 1024, 4, compute_s=0.25, mbps=1000.0)
    mid, why = choose_format(128, 1024, 4, compute_s=0.25, mbps=50.0)
    for mbps in (5.0, 0.01):
        slow, why_slow = choose_format(128, 1024, 4, compute_s=0.25, mbps=mbps)
        assert (slow.name, slow.k, slow.wire_dtype) == ("int4", 0, "int4") and "none fits" in why_slow
        assert slow.share > 0.10  # said as it is: over the budget
    assert (fast.name, fast.k, fast.wire_dtype) == ("bf16", 0, "bf16")
    assert (mid.name, mid.wire_dtype) == ("int4", "int4") and "bf16 would take 34%" in why and mid.share <= 0.10
    between, _ = choose_format(128, 1024, 4, compute_s=0.25, mbps=120.0)
    assert (between.name, between.wire_dtype) == ("int8", "int8") and between.share <= 0.10


def test_auto_compression_is_resolved_in_the_topology_and_needs_a_step_time():
    from distrain.config import ConfigError, load_config
    from distrain.topology import resolve_topology

    pipe = "{kind='pipeline', stages=2, speed=0.5, compress='auto', up_mbps=%s, down_mbps=%s}"
    fast = resolve_topology(load_config("default", [f"--topology.replica=[{{}}, {pipe % (1000.0, 1000.0)}]"]))[1]
    slow = resolve_topology(load_config("default", [f"--topology.replica=[{{}}, {pipe % (5.0, 5.0)}]"]))[1]
    assert (fast.compress_k, fast.wire_dtype) == (0, "bf16") and fast.choice.startswith("boundary format bf16")
    assert (slow.compress_k, slow.wire_dtype) == (0, "int4") and slow.choice.startswith("boundary format int4")
    with pytest.raises(ConfigError, match="network.step_time_s"):
        load_config("default", ["--network.step_time_s=0", f"--topology.replica=[{{}}, {pipe % (5.0, 5.0)}]"])
