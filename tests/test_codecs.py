"""SparseLoCo reference codec, quantizers, bit packing and dense codecs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distrain.comm.codecs import DenseCodec, EncodedTensor, SparseLoCoCodec, make_codec
from distrain.comm.codecs.bitpack import pack_bits, packed_nbytes, unpack_bits
from distrain.comm.codecs.chunking import ChunkLayout, k_for, largest_divisor_at_most
from distrain.comm.codecs.quantizers import quantize_reference, quantize_symmetric
from distrain.comm.errors import IndexRangeError, NonFiniteError, SchemaError

AWKWARD = [(1,), (1, 1), (), (7,), (65,), (130,), (67, 100), (3, 5, 7), (1, 4097), (96, 40)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def chunk_list(x: torch.Tensor, chunk: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Independent chunking by loops: [(flat global indices, values)] per chunk, in chunk order."""
    if x.dim() == 2:
        rows, cols = x.shape
        cr, cc = largest_divisor_at_most(rows, chunk), largest_divisor_at_most(cols, chunk)
        gi = np.arange(rows * cols).reshape(rows, cols)
        out = []
        for bi in range(rows // cr):
            for bj in range(cols // cc):
                g = gi[bi * cr : (bi + 1) * cr, bj * cc : (bj + 1) * cc].reshape(-1)
                out.append((g, x.reshape(-1).numpy()[g]))
        return out
    flat = x.reshape(-1).numpy()
    return [(np.arange(s, min(s + chunk, flat.size)), flat[s : s + chunk]) for s in range(0, flat.size, chunk)]


def brute_topk(x: torch.Tensor, chunk: int, topk: int) -> set[int]:
    """Largest |v| first, ties to the lower local index, per chunk."""
    keep: set[int] = set()
    for g, v in chunk_list(x, chunk):
        order = sorted(range(len(v)), key=lambda i: (-abs(float(v[i])), i))
        keep.update(int(g[i]) for i in order[: k_for(len(v), topk)])
    return keep


# ----- chunking ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,n_full,k_full,nnz",
    [
        ((256, 128), 4096, 64, 8 * 64),  # 4096-aligned blocks
        ((1000,), 64, 1, 16),  # 15 full chunks + a 40-element one, k = 1 each
        ((130,), 64, 1, 3),
        ((67, 100), 50, 1, 134),  # 67 is prime: blocks of 1×50
        ((96, 40), 48 * 40, 30, 2 * 30),  # round(64·1920/4096) = 30
        ((1, 1), 1, 1, 1),
        ((), 1, 1, 1),
    ],
)
def test_chunk_layout_by_hand(shape, n_full, k_full, nnz):
    lay = ChunkLayout(shape, 64, 64)
    assert (lay.n_full, lay.k_full, lay.nnz) == (n_full, k_full, nnz)
    assert lay.index_bits == math.ceil(math.log2(n_full)) if n_full > 1 else lay.index_bits == 0


def test_k_rounds_half_up_and_is_capped():
    assert k_for(4096, 64) == 64
    assert k_for(64, 64) == 1  # DESIGN §1.1: 1-D chunks of 64 keep max(1, round(1)) = 1
    assert k_for(96, 64) == 2  # 1.5 rounds up
    assert k_for(10, 64) == 1
    assert k_for(3, 4096) == 3


# ----- codec round trip, top-k, EF -------------------------------------------------------------


@pytest.mark.parametrize("shape", AWKWARD + [(128, 192)])
def test_round_trip_exact_when_everything_is_sent(shape):
    codec = SparseLoCoCodec(topk=4096, beta=0.0, quantizer="none", value_dtype="fp32")
    x = torch.randn(shape, generator=gen(1))
    state: dict[str, torch.Tensor] = {}
    et = codec.encode("w", x, state)
    codec.validate(et)
    assert torch.equal(codec.decode_aggregate([et], shape), x)
    assert torch.count_nonzero(state["w"]) == 0


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape", [(128, 192), (1000,), (67, 100), (3, 5, 7), (96, 40)])
def test_topk_picks_largest_magnitudes_per_chunk(shape, ties):
    codec = SparseLoCoCodec(topk=64, beta=0.0, quantizer="none", value_dtype="fp32")
    x = torch.randn(shape, generator=gen(2))
    if ties:  # few distinct magnitudes: most chunks tie at the k-th place
        x = torch.randint(-3, 4, shape, generator=gen(2)).float()
    gidx, vals = codec.decode(codec.encode("w", x, {}))
    assert set(gidx.tolist()) == brute_topk(x, 64, 64)
    assert torch.equal(vals, x.reshape(-1)[gidx])


def test_ties_go_to_the_lower_index():
    # Every |v| equal: each 64-element 1-D chunk keeps k=1 → its first element.
    x = torch.tensor([(-1.0) ** i for i in range(200)])
    codec = SparseLoCoCodec(topk=64, beta=0.0, quantizer="none", value_dtype="fp32")
    gidx, _ = codec.decode(codec.encode("w", x, {}))
    assert gidx.tolist() == [0, 64, 128, 192]
    # A tie straddling the k-th place in a 2-D block: |v| = 5 beats, then the lowest-index 3s.
    y = torch.zeros(4, 4)
    y[3, 3] = 5.0
    y[0, 2], y[1, 0], y[2, 1] = 3.0, -3.0, 3.0
    codec2 = SparseLoCoCodec(topk=768, chunk=4, beta=0.0, quantizer="none", value_dtype="fp32")  # k = 3 of 16
    gidx2, _ = codec2.decode(codec2.encode("w", y, {}))
    assert gidx2.tolist() == [2, 4, 15]


@pytest.mark.parametrize("quantizer", ["reference", "symmetric", "none"])
@pytest.mark.parametrize("shape", [(128, 64), (130,), (67, 100)])
def test_error_feedback_invariant(quantizer, shape):
    codec = SparseLoCoCodec(topk=64, beta=0.9, quantizer=quantizer)
    state: dict[str, torch.Tensor] = {}
    for r in range(3):
        delta = torch.randn(shape, generator=gen(10 + r))
        before = state["w"].clone() if "w" in state else torch.zeros(shape)
        et = codec.encode("w", delta, state)
        sent = torch.zeros(math.prod(shape))
        gidx, vals = codec.decode(et)
        sent[gidx] = vals
        sent = sent.reshape(shape)
        folded = before * torch.tensor(0.9, dtype=torch.float32) + delta
        torch.testing.assert_close(state["w"] + sent, folded, rtol=0, atol=1e-6)
        unsent = torch.ones(math.prod(shape), dtype=torch.bool)
        unsent[gidx] = False
        assert torch.equal(state["w"].reshape(-1)[unsent], folded.reshape(-1)[unsent])


def test_non_contiguous_delta_encodes_like_its_contiguous_copy():
    codec = SparseLoCoCodec()
    x = torch.randn(128, 64, generator=gen(11)).t()
    a, b = codec.encode("w", x, {}), codec.encode("w", x.contiguous(), {})
    assert all(np.array_equal(a.buffers[k], b.buffers[k]) for k in a.buffers)


def test_encoding_is_deterministic():
    codec = SparseLoCoCodec()
    x = torch.randn(256, 128, generator=gen(3))
    a, b = codec.encode("w", x, {}), codec.encode("w", x, {})
    assert a.meta == b.meta and all(np.array_equal(a.buffers[k], b.buffers[k]) for k in a.buffers)


def test_rejects_non_finite_delta_and_bad_params():
    with pytest.raises(ValueError, match="NaN or Inf"):
        SparseLoCoCodec().encode("w", torch.tensor([1.0, float("nan")]), {})
    with pytest.raises(ValueError, match="unknown codec kind"):
        make_codec("gzip")
    with pytest.raises(ValueError, match="quantizer"):
        make_codec("sparseloco", quantizer="3bit")
    with pytest.raises(ValueError, match="topk"):
        make_codec("sparseloco", topk=True)
    with pytest.raises(ValueError, match="beta"):
        make_codec("sparseloco", beta=1.5)
    with pytest.raises(ValueError, match="unexpected keyword"):
        make_codec("dense", chunk=64)


# ----- bytes on the wire -----------------------------------------------------------------------


def test_payload_bytes_of_an_aligned_tensor_are_14_bits_per_nonzero_plus_centroids():
    codec = SparseLoCoCodec(topk=64)
    shape = (256, 128)  # 8 blocks of 64×64
    et = codec.encode("w", torch.randn(shape, generator=gen(4)), {})
    nnz = 8 * 64
    assert et.buffers["indices"].nbytes == math.ceil(nnz * 12 / 8)
    assert et.buffers["codes"].nbytes == math.ceil(nnz / 4)
    assert et.buffers["centroids"].nbytes == 16
    assert et.nbytes() == codec.payload_nbytes(shape) == nnz * 14 // 8 + 16
    assert 32 * math.prod(shape) / (et.nbytes() * 8) > 140  # ≈146× smaller than fp32, minus 16 B


@pytest.mark.parametrize("quantizer", ["reference", "symmetric", "none"])
@pytest.mark.parametrize("shape", AWKWARD)
def test_payload_nbytes_matches_real_buffers(quantizer, shape):
    codec = SparseLoCoCodec(quantizer=quantizer)
    et = codec.encode("w", torch.randn(shape, generator=gen(5)), {})
    assert et.nbytes() == codec.payload_nbytes(shape)
    codec.validate(et)


# ----- aggregation ----------------------------------------------------------------------------


def _two_replicas(aggregation: str) -> torch.Tensor:
    codec = SparseLoCoCodec(topk=2048, chunk=4, beta=0.0, quantizer="none", value_dtype="fp32", aggregation=aggregation)
    a = torch.tensor([4.0, 0.0, 3.0, 0.0, 0.0, -1.0, 0.0, 2.0])  # selects 0, 2 | 5, 7
    b = torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 6.0, -2.0])  # selects 0, 1 | 6, 7
    parts = [codec.encode("w", a, {}), codec.encode("w", b, {})]
    return codec.decode_aggregate(parts, (8,))


def test_aggregate_mean_over_selectors():
    expect = torch.tensor([2.5, 2.0, 3.0, 0.0, 0.0, -1.0, 6.0, 0.0])
    assert torch.equal(_two_replicas("mean_selected"), expect)


def test_aggregate_sum_over_replicas():
    expect = torch.tensor([2.5, 1.0, 1.5, 0.0, 0.0, -0.5, 3.0, 0.0])
    assert torch.equal(_two_replicas("sum_over_r"), expect)


def test_aggregate_rejects_wrong_shape_and_empty():
    codec = SparseLoCoCodec()
    et = codec.encode("w", torch.randn(64, generator=gen(6)), {})
    with pytest.raises(ValueError, match="shape"):
        codec.decode_aggregate([et], (32, 2))
    with pytest.raises(ValueError, match="at least one"):
        codec.decode_aggregate([], (64,))


# ----- quantizers -------------------------------------------------------------------------------


def test_reference_quantizer_by_hand():
    v = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0, 10.0])
    codes, cents = quantize_reference(v)
    x = v.double().numpy()
    shift = np.float32(x.mean())
    sigma = np.sqrt(((x - float(shift)) ** 2).sum() / (len(x) - 1))
    scale = np.float32(1.5 * sigma)
    t = (v.numpy() - shift) / scale + np.float32(2)
    want = np.clip(np.round(t), 0, 3).astype(np.uint8)  # numpy rounds half to even too
    assert codes.tolist() == want.tolist() == [1, 2, 2, 2, 2, 3]
    assert cents[1].item() == -3.0  # the only member
    assert cents[2].item() == pytest.approx(0.5)  # mean of -1, 0, 1, 2
    assert cents[3].item() == 10.0
    assert cents[0].item() == pytest.approx(float(shift) - 2 * float(scale))  # empty: its bin centre
    decoded = cents[codes.long()]
    assert decoded.tolist() == pytest.approx([-3.0, 0.5, 0.5, 0.5, 0.5, 10.0])


@pytest.mark.parametrize("values", [[0.7], [0.25, 0.25, 0.25], [0.0, 0.0]])
def test_reference_quantizer_degenerate_inputs_decode_exactly(values):
    v = torch.tensor(values)
    codes, cents = quantize_reference(v)
    assert torch.isfinite(cents).all()
    assert torch.equal(cents[codes.long()], v)


def test_symmetric_quantizer_by_hand():
    v = torch.tensor([-4.0, -1.0, 0.5, 1.5, 5.0, -0.0])
    codes, cents = quantize_symmetric(v)
    # mean |v| = 2.0: big = {-4, 5}; small = {-1, 0.5, 1.5, -0.0} with mean magnitude 0.75
    assert codes.tolist() == [0, 1, 2, 2, 3, 2]
    assert cents.tolist() == [-4.5, -0.75, 0.75, 4.5]
    assert torch.equal(cents, -cents.flip(0))
    assert (torch.sign(cents[codes.long()]) * torch.sign(v) >= 0).all()  # sign is kept


def test_symmetric_quantizer_all_equal_magnitudes():
    v = torch.tensor([2.0, -2.0, 2.0])
    codes, cents = quantize_symmetric(v)
    assert torch.equal(cents[codes.long()], v)


# ----- validation of received encodings ------------------------------------------------------


def test_validate_rejects_out_of_range_and_repeated_indices():
    codec = SparseLoCoCodec(topk=64, quantizer="none", value_dtype="fp32")
    shape = (67, 100)  # 50-element chunks, 6-bit index fields: 50..63 representable but invalid
    et = codec.encode("w", torch.randn(shape, generator=gen(7)), {})
    local = unpack_bits(et.buffers["indices"], 134, 6)
    bad = local.copy()
    bad[5] = 63
    forged = EncodedTensor(et.shape, et.meta, {**et.buffers, "indices": pack_bits(bad, 6)})
    with pytest.raises(IndexRangeError, match="out of range"):
        codec.validate(forged)
    codec3 = SparseLoCoCodec(topk=192, chunk=64, quantizer="none", value_dtype="fp32")  # k = 3 per 64
    et3 = codec3.encode("w", torch.randn(128, generator=gen(8)), {})
    local3 = unpack_bits(et3.buffers["indices"], 6, 6)
    local3[1] = local3[0]
    with pytest.raises(IndexRangeError, match="strictly increasing"):
        codec3.validate(EncodedTensor(et3.shape, et3.meta, {**et3.buffers, "indices": pack_bits(local3, 6)}))


def test_validate_rejects_non_finite_and_wrong_buffers():
    codec = SparseLoCoCodec()
    et = codec.encode("w", torch.randn(64, 64, generator=gen(9)), {})
    cents = et.buffers["centroids"].copy()
    cents[2] = np.inf
    with pytest.raises(NonFiniteError):
        codec.validate(EncodedTensor(et.shape, et.meta, {**et.buffers, "centroids": cents}))
    with pytest.raises(SchemaError, match="codes"):
        codec.validate(EncodedTensor(et.shape, et.meta, {**et.buffers, "codes": et.buffers["codes"][:-1]}))


# ----- decode once, device of the aggregate, the kernel seam ------------------------------------


@pytest.fixture
def reference_only():
    """Run the PyTorch reference even where the kernel library is built."""
    from distrain.comm import kernels

    with kernels.forced_mode("reference"):
        yield


def _count_index_decodes(monkeypatch) -> list[int]:
    import distrain.comm.codecs.sparseloco as sl

    calls = [0]
    real = sl.decode_indices

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(sl, "decode_indices", counting)
    return calls


@pytest.mark.parametrize("coding", ["packed", "gaps"])
def test_validated_indices_are_decoded_once(reference_only, monkeypatch, coding):
    codec = SparseLoCoCodec(index_coding=coding)
    parts = [codec.encode("w", torch.randn(128, 192, generator=gen(40 + r)), {}) for r in range(3)]
    calls = _count_index_decodes(monkeypatch)
    for p in parts:
        codec.validate(p)
    assert calls[0] == 3
    agg = codec.decode_aggregate(parts, (128, 192))
    assert calls[0] == 3  # decode_aggregate reused what validate decoded
    fresh = [EncodedTensor(p.shape, dict(p.meta), dict(p.buffers)) for p in parts]  # no cache
    assert torch.equal(codec.decode_aggregate(fresh, (128, 192)), agg)
    assert calls[0] == 6  # unvalidated parts are validated (and decoded) exactly once


def test_decode_aggregate_validates_what_it_did_not_see_validated(reference_only):
    """The cache never weakens a check: new or replaced buffers are validated again."""
    codec = SparseLoCoCodec(topk=192, chunk=64, quantizer="none", value_dtype="fp32")  # k = 3 per 64
    et = codec.encode("w", torch.randn(128, generator=gen(41)), {})
    codec.validate(et)
    local = unpack_bits(et.buffers["indices"], 6, 6)
    local[1] = local[0]  # a repeated index: index_add_ would silently count it twice
    et.buffers["indices"] = pack_bits(local, 6)
    with pytest.raises(IndexRangeError, match="strictly increasing"):
        codec.decode_aggregate([et], (128,))
    other = SparseLoCoCodec(topk=64, chunk=64, quantizer="none", value_dtype="fp32")
    with pytest.raises(SchemaError):  # validated by a codec of another geometry: not reused
        other.decode_aggregate([et], (128,))


@pytest.mark.parametrize("kernel", [False, True], ids=["reference", "kernel-if-built"])
def test_decode_aggregate_device_cpu_is_the_default(kernel):
    from distrain.comm import kernels

    codec = SparseLoCoCodec()
    parts = [codec.encode("w", torch.randn(64, 128, generator=gen(42 + r)), {}) for r in range(2)]
    with kernels.forced_mode("auto" if kernel else "reference"):
        a = codec.decode_aggregate(parts, (64, 128))
        b = codec.decode_aggregate(parts, (64, 128), device="cpu")
    assert a.device.type == b.device.type == "cpu" and torch.equal(a, b)
    dense = DenseCodec()
    d = [dense.encode("w", torch.randn(5, 7, generator=gen(43 + r)), {}) for r in range(2)]
    assert dense.decode_aggregate(d, (5, 7), device=torch.device("cpu")).device.type == "cpu"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["reference", "auto"])
@pytest.mark.parametrize("kind", ["sparseloco", "dense"])
def test_decode_aggregate_lands_on_cuda_with_the_same_bits(mode, kind):
    from distrain.comm import kernels

    codec = make_codec(kind, **({"aggregation": "mean_selected"} if kind == "sparseloco" else {}))
    parts = [codec.encode("w", torch.randn(192, 256, generator=gen(44 + r)), {}) for r in range(4)]
    with kernels.forced_mode("reference"):
        want = codec.decode_aggregate(parts, (192, 256))
    with kernels.forced_mode(mode):
        got = codec.decode_aggregate(parts, (192, 256), device="cuda")
    assert got.is_cuda and got.dtype == torch.float32 and torch.equal(got.cpu(), want)


def test_kernels_import_no_codec():
    """distrain.comm.kernels sits below distrain.comm.codecs: importing it (and calling the geometry) loads no codec."""
    import subprocess
    import sys

    code = ("import sys, distrain.comm.kernels, distrain.comm.kernels.geometry as g; "
            "assert g.chunk_layout((64, 64), 64, 64).nnz == 64; "
            "print(sorted(m for m in sys.modules if m.startswith('distrain.comm.codecs')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_op_without_library_runs_the_registered_reference(reference_only):
    """The codec hands its reference to the ops: with no library the op equals the codec."""
    ef1, ef2, delta = torch.zeros(70, 70), torch.zeros(70, 70), torch.randn(70, 70, generator=gen(45))
    want = SparseLoCoCodec().encode("w", delta, {"w": ef1})
    idx, codes, cents = torch.ops.distrain.sparseloco_encode(ef2, delta, 0.95, 64, 64, "reference",
                                                             "fp16", "packed")
    assert np.array_equal(idx.numpy(), want.buffers["indices"])
    assert np.array_equal(codes.numpy(), want.buffers["codes"])
    assert np.array_equal(cents.numpy(), want.buffers["centroids"]) and torch.equal(ef1, ef2)
    out = torch.ops.distrain.sparseloco_decode_aggregate(
        [idx], [codes], [cents], [70, 70], 64, 64, "reference", "mean_selected", "fp16", "packed")
    assert torch.equal(out, SparseLoCoCodec().decode_aggregate([want], (70, 70)))


# ----- bit packing ----------------------------------------------------------------------------


def test_bitpack_layout_by_hand():
    assert pack_bits(np.array([1, 2, 3]), 2).tolist() == [0b00111001]
    # 12-bit fields 0xABC, 0x123 → stream bytes BC, 3A, 12
    assert pack_bits(np.array([0xABC, 0x123]), 12).tolist() == [0xBC, 0x3A, 0x12]


@pytest.mark.parametrize("bits", [1, 2, 3, 6, 7, 12, 13, 24, 25])
def test_bitpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    vals = rng.integers(0, 1 << bits, size=1001)
    packed = pack_bits(vals, bits)
    assert packed.size == packed_nbytes(1001, bits)
    assert np.array_equal(unpack_bits(packed, 1001, bits), vals)


def test_bitpack_rejects_values_too_wide():
    with pytest.raises(ValueError, match="cannot be packed"):
        pack_bits(np.array([4]), 2)


# ----- dense --------------------------------------------------------------------------------------


def test_dense_fp32_mean_is_exact_and_bf16_rounds_like_torch():
    xs = [torch.randn(5, 7, generator=gen(20 + r)) for r in range(3)]
    fp32 = DenseCodec("fp32")
    parts = [fp32.encode("w", x, {}) for x in xs]
    assert torch.equal(fp32.decode_aggregate(parts, (5, 7)), (xs[0] + xs[1] + xs[2]) / 3.0)
    assert parts[0].nbytes() == fp32.payload_nbytes((5, 7)) == 35 * 4
    bf16 = make_codec("dense", dtype="bf16")
    parts16 = [bf16.encode("w", x, {}) for x in xs]
    want = sum(x.to(torch.bfloat16).float() for x in xs) / 3.0
    assert torch.equal(bf16.decode_aggregate(parts16, (5, 7)), want)
    assert parts16[0].nbytes() == 35 * 2
    bf16.validate(parts16[0])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("quantizer", ["reference", "symmetric", "none"])
def test_cuda_reference_matches_cpu(quantizer):
    codec = SparseLoCoCodec(quantizer=quantizer)
    x = torch.randn(256, 192, generator=gen(30))
    cpu_state: dict[str, torch.Tensor] = {}
    gpu_state: dict[str, torch.Tensor] = {}
    a = codec.encode("w", x, cpu_state)
    b = codec.encode("w", x.cuda(), gpu_state)
    assert all(np.array_equal(a.buffers[k], b.buffers[k]) for k in a.buffers)
    assert torch.equal(cpu_state["w"], gpu_state["w"].cpu())


def test_fp16_values_saturate_and_error_feedback_keeps_the_rest():
    codec = SparseLoCoCodec(topk=4096, beta=1.0, quantizer="none", value_dtype="fp16")
    state: dict[str, torch.Tensor] = {}
    x = torch.tensor([1e5, -2.0])
    gidx, vals = codec.decode(codec.encode("w", x, state))
    assert vals.tolist() == [65504.0, -2.0]
    assert state["w"].tolist() == [1e5 - 65504.0, 0.0]


# --- index coding: gaps (lossless, smaller after zstd) -------------------------------------------


@pytest.mark.parametrize("shape", [(256, 192), (100,), (64, 64), (3, 1000), (1, 1)])
def test_gap_index_coding_decodes_to_the_same_contribution(shape):
    from distrain.comm.codecs import make_codec

    g = torch.Generator().manual_seed(7)
    delta = torch.randn(shape, generator=g)
    packed = make_codec("sparseloco", index_coding="packed")
    gaps = make_codec("sparseloco", index_coding="gaps")
    et_p = packed.encode("t", delta, {})
    et_g = gaps.encode("t", delta, {})
    gaps.validate(et_g)
    ip, vp = packed.decode(et_p)
    ig, vg = gaps.decode(et_g)
    assert torch.equal(ip, ig) and torch.equal(vp, vg)
    assert et_g.buffers["indices"].nbytes == 2 * et_g.meta["nnz"]


def test_gap_coded_frames_are_smaller_after_zstd():
    from distrain.comm.codecs import make_codec
    from distrain.comm.wire import FrameMeta, encode_frame

    delta = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(3))
    sizes = {}
    for coding in ("packed", "gaps"):
        codec = make_codec("sparseloco", index_coding=coding)
        frame = encode_frame(FrameMeta.for_codec("r", 0, 0, codec), {"w": codec.encode("w", delta, {})})
        sizes[coding] = len(frame)
    nnz = 1024 * 1024 * 64 // 4096
    assert sizes["packed"] * 8 / nnz > 13.0  # 12-bit indices + 2-bit codes (zstd gains little)
    assert sizes["gaps"] * 8 / nnz < 10.5  # ~7.6-bit indices after zstd
    

@pytest.mark.parametrize("corrupt,error", [("zero_gap", "IndexRangeError"), ("overflow", "IndexRangeError"),
                                           ("short", "SchemaError")])
def test_gap_coded_bad_indices_are_rejected(corrupt, error):

    from distrain.comm import errors
    from distrain.comm.codecs import EncodedTensor, make_codec

    codec = make_codec("sparseloco", index_coding="gaps")
    et = codec.encode("t", torch.randn(128, 128, generator=torch.Generator().manual_seed(1)), {})
    buf = et.buffers["indices"].copy()
    nnz = et.meta["nnz"]
    if corrupt == "zero_gap":
        buf[1] = 0
        buf[nnz + 1] = 0
    elif corrupt == "overflow":
        buf[nnz + 3] = 0x20  # a gap of 8192+ inside a 4096-element chunk
    else:
        buf = buf[:-1]
    bad = EncodedTensor(shape=et.shape, meta=et.meta, buffers={**et.buffers, "indices": buf})
    with pytest.raises(getattr(errors, error)):
        codec.validate(bad)
