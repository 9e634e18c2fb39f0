"""The C++ (and, with a GPU, CUDA) SparseLoCo kernels equal the PyTorch reference bit for bit."""

from __future__ import annotations

import functools
import logging
import shutil

import numpy as np
import pytest
import torch

from distrain.comm import kernels
from distrain.comm.codecs.base import EncodedTensor
from distrain.comm.codecs.sparseloco import SparseLoCoCodec, encode_, sparseloco_encode_
from distrain.comm.errors import IndexRangeError, SchemaError
from distrain.comm.kernels import _lib, build

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module", autouse=True)
def cpu_library():
    """Build the CPU library if it is missing or stale (g++ is required on this project's CI)."""
    if build.cxx_compiler() is None:
        pytest.skip("no C++ compiler: the CPU kernels cannot be built here")
    build.build_cpu()
    kernels.set_mode("auto")
    assert kernels.backend("cpu") == "cpp", kernels.status()
    yield
    kernels.set_mode(None)


def assert_same_encoding(a: EncodedTensor, b: EncodedTensor) -> None:
    assert a.shape == b.shape and a.meta == b.meta
    assert set(a.buffers) == set(b.buffers)
    for name in a.buffers:
        x, y = a.buffers[name], b.buffers[name]
        assert x.dtype == y.dtype, name
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), f"buffer {name!r} differs"


def encode_both(shape, kw, rounds=2, scale=1.0, gen=None, delta_fn=None):
    """Run reference and kernel encode for a few rounds from the same state; compare everything."""
    gen = gen or torch.Generator().manual_seed(0)
    ef_ref = torch.randn(shape, generator=gen) * 0.1
    ef_ker = ef_ref.clone()
    for _ in range(rounds):
        delta = delta_fn(gen) if delta_fn else torch.randn(shape, generator=gen) * scale
        a = sparseloco_encode_(ef_ref, delta, **kw)
        b = encode_(ef_ker, delta, **kw)
        assert_same_encoding(a, b)
        assert torch.equal(ef_ref, ef_ker), "error-feedback buffers differ"
    return a


SHAPES = [
    (128, 192),  # multiples of 64
    (100, 300),  # blocks 50 x 60
    (97, 89),  # primes: 1 x 1 blocks, k = 1, 0-bit indices
    (1000,),  # 1-D with a short last chunk
    (4097,),
    (3,),
    (1,),
    (1, 1),
    (7, 3, 5),  # flattened
    (64, 1280),  # one block row, many chunks
]


QUANTIZERS = [("reference", "fp16", "packed"), ("symmetric", "fp16", "gaps"),
              ("none", "fp16", "packed"), ("none", "fp32", "gaps"), ("reference", "fp16", "gaps")]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("quantizer,value_dtype,index_coding", QUANTIZERS)
def test_encode_matches_reference(shape, quantizer, value_dtype, index_coding):
    kw = dict(beta=0.95, topk=64, chunk=64, quantizer=quantizer, value_dtype=value_dtype,
              index_coding=index_coding)
    encode_both(shape, kw)


@pytest.mark.parametrize("topk,chunk,beta", [(1, 64, 0.9), (200, 64, 0.0), (4096, 64, 1.0),
                                             (64, 8, 0.95), (64, 100, 0.5), (7, 33, 0.95),
                                             (64, 512, 0.95)])  # one 96 x 130 block: 14-bit fields
def test_encode_parameters(topk, chunk, beta):
    for shape in [(96, 130), (517,)]:
        for coding in ("packed", "gaps"):
            encode_both(shape, dict(beta=beta, topk=topk, chunk=chunk, quantizer="reference",
                                    index_coding=coding))


def test_encode_large():
    encode_both((1536, 1024), dict(beta=0.95, topk=64, chunk=64, quantizer="reference"), rounds=1)


def test_encode_thread_count_does_not_change_results():
    kw = dict(beta=0.95, topk=64, chunk=64, quantizer="reference")
    delta = torch.randn(640, 384, generator=torch.Generator().manual_seed(1))
    outs = []
    n = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            ef = torch.zeros_like(delta)
            outs.append((encode_(ef, delta, **kw), ef))
    finally:
        torch.set_num_threads(n)
    assert_same_encoding(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("quantizer", ["reference", "symmetric", "none"])
def test_encode_ties(quantizer):
    """Small integers: many equal magnitudes, so the lower-index tie rule decides the selection."""
    kw = dict(beta=1.0, topk=64, chunk=64, quantizer=quantizer, value_dtype="fp32")
    encode_both((130, 192), kw, rounds=3,
                delta_fn=lambda g: torch.randint(-2, 3, (130, 192), generator=g).float())


def _adversarial(kind: str, shape, g: torch.Generator) -> torch.Tensor:
    n = int(np.prod(shape))
    if kind == "one_hot_segment":  # every large value in one row segment of each block
        x = torch.randn(shape, generator=g).reshape(-1) * 1e-3
        hot = (torch.arange(n) % 4096) < 32  # the first half of the first row of a 64-wide block
        x[hot] = torch.randn(int(hot.sum()), generator=g) * 10
        return x.reshape(shape)
    if kind == "ramp":  # strictly increasing magnitudes: the top k are the last elements
        return torch.arange(n, dtype=torch.float32).reshape(shape) * 1e-3
    if kind == "equal_signs":  # one magnitude everywhere: the k lowest indices win
        return torch.where(torch.rand(shape, generator=g) < 0.5, -1.5, 1.5)
    if kind == "exponent_spread":  # magnitudes over 2^-40 .. 2^40
        e = torch.randint(-40, 40, shape, generator=g).float()
        return torch.randn(shape, generator=g).sign() * torch.exp2(e)
    if kind == "few_levels":  # heavy ties at the threshold, straddling segment maxima
        return torch.randint(-3, 4, shape, generator=g).float() * 0.25
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["one_hot_segment", "ramp", "equal_signs", "exponent_spread",
                                  "few_levels"])
@pytest.mark.parametrize("shape,topk,chunk", [((256, 192), 64, 64), ((128, 4096), 7, 64),
                                              ((96, 130), 300, 100), ((5000,), 64, 64),
                                              ((64, 64), 4096, 64), ((200, 64), 1, 64)])
def test_encode_adversarial_distributions(kind, shape, topk, chunk):
    """The threshold-filter selection must equal the reference on data built to defeat it."""
    kw = dict(beta=0.5, topk=topk, chunk=chunk, quantizer="reference", index_coding="packed")
    encode_both(shape, kw, rounds=2, delta_fn=lambda g: _adversarial(kind, shape, g))


def test_encode_all_zero():
    """Every |v| ties at 0: the lowest indices are kept, σ = 0 falls back to scale 1."""
    kw = dict(beta=0.95, topk=64, chunk=64, quantizer="reference")
    a = encode_both((128, 128), kw, rounds=1, delta_fn=lambda g: torch.zeros(128, 128))
    assert a.meta["nnz"] == 4 * 64


def test_encode_signed_zeros_and_subnormals():
    def delta_fn(g):
        x = torch.randn(4096, generator=g) * 1e-39  # fp32 subnormals
        x[::3] = -0.0
        x[1::7] = 0.0
        return x

    for q in ("reference", "symmetric"):
        encode_both((4096,), dict(beta=0.0, topk=4096, chunk=64, quantizer=q), rounds=1,
                    delta_fn=delta_fn)


def test_fp16_rounding_matches_torch():
    """Quantizer none/fp16 keeps every value when topk=4096: exercises f32->f16 rounding edges."""
    special = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 65504.0, 65519.0, 2.0**-24, 2.0**-25,
                            3 * 2.0**-25, 2.0**-14, 2.0**-14 - 2.0**-25, 6e-8, 1e-10, 0.0, -0.0,
                            -(1 + 2**-11), 1024.5, 2049.0, 2.0**-15 + 2.0**-26])
    gen = torch.Generator().manual_seed(3)
    rand = torch.randn(4096 * 4, generator=gen) * torch.exp2(torch.randint(-30, 16, (4096 * 4,),
                                                                            generator=gen).float())
    values = torch.cat([special, rand.clamp(-65000, 65000)])
    kw = dict(beta=0.0, topk=4096, chunk=64, quantizer="none", value_dtype="fp16")
    encode_both(tuple(values.shape), kw, rounds=1, delta_fn=lambda g: values)


def test_nonfinite_delta_rejected_before_any_change():
    kw = dict(beta=0.95, topk=64, chunk=64, quantizer="reference")
    for bad in (float("nan"), float("inf"), float("-inf")):
        delta = torch.randn(70, 70)
        delta[13, 17] = bad
        ef = torch.randn(70, 70)
        before = ef.clone()
        with pytest.raises(ValueError, match="NaN or Inf"):
            sparseloco_encode_(ef.clone(), delta, **kw)
        with pytest.raises(ValueError, match="NaN or Inf"):
            encode_(ef, delta, **kw)
        assert torch.equal(ef, before)


def test_nonfinite_error_feedback_rejected():
    """beta·e + Δ overflowing fp32 is an error in the kernels (the reference has no defined result)."""
    ef = torch.full((64, 64), 3e38)
    with pytest.raises(ValueError, match="error-feedback buffer became NaN or Inf"):
        encode_(ef, torch.full((64, 64), 3e38), beta=1.0, topk=64, chunk=64,
                       quantizer="reference")


def test_fp16_saturates_like_reference():
    """Values beyond ±65504 are sent as ±65504 and error feedback keeps the remainder."""
    kw = dict(beta=1.0, topk=64, chunk=64, quantizer="none", value_dtype="fp16")
    delta = torch.randn(64, 64)
    delta[5, 5], delta[7, 9], delta[60, 1] = 1e6, -70000.0, 65519.0
    a = encode_both((64, 64), kw, rounds=1, delta_fn=lambda g: delta)
    assert 65504.0 in a.buffers["values"] and -65504.0 in a.buffers["values"]


def test_encode_argument_errors_match_reference():
    kw = dict(beta=0.95, topk=64, chunk=64, quantizer="reference")
    with pytest.raises(TypeError, match="float32"):
        encode_(torch.zeros(8, dtype=torch.float64), torch.zeros(8), **kw)
    with pytest.raises(TypeError, match="contiguous"):
        encode_(torch.zeros(8, 8).t(), torch.zeros(8, 8), **kw)
    with pytest.raises(ValueError, match="index coding"):
        encode_(torch.zeros(8), torch.zeros(8), **{**kw, "index_coding": "bogus"})
    with pytest.raises(ValueError, match="differs from buffer shape"):
        encode_(torch.zeros(8), torch.zeros(9), **kw)
    with pytest.raises(ValueError, match="unknown quantizer"):
        encode_(torch.zeros(8), torch.zeros(8), **{**kw, "quantizer": "bogus"})


def test_encode_accepts_bf16_and_noncontiguous_delta():
    kw = dict(beta=0.95, topk=64, chunk=64, quantizer="reference")
    delta = torch.randn(96, 80).t()  # non-contiguous
    for d in (delta, delta.to(torch.bfloat16)):
        ef_ref, ef_ker = torch.zeros(80, 96), torch.zeros(80, 96)
        assert_same_encoding(sparseloco_encode_(ef_ref, d, **kw), encode_(ef_ker, d, **kw))
        assert torch.equal(ef_ref, ef_ker)


# ---- decode-aggregate ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def cached_parts(shape, quantizer, value_dtype, index_coding, n_parts, overlap):
    """Encodings do not depend on the aggregation rule: share them between its test cases."""
    codec = SparseLoCoCodec(topk=64, chunk=64, quantizer=quantizer, value_dtype=value_dtype,
                            index_coding=index_coding)
    return tuple(make_parts(codec, shape, n_parts, seed=n_parts, overlap=overlap))


def reference_aggregate(codec: SparseLoCoCodec, parts, shape, device=None) -> torch.Tensor:
    """The PyTorch reference aggregate (the codec would otherwise dispatch to the kernel)."""
    with kernels.forced_mode("reference"):
        return codec.decode_aggregate(list(parts), shape, device=device)


def make_parts(codec: SparseLoCoCodec, shape, n_parts: int, seed: int, overlap: bool = False):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    parts = []
    for _ in range(n_parts):
        noise = torch.randn(shape, generator=gen)
        delta = base + 0.05 * noise if overlap else noise
        parts.append(codec.encode("w", delta, {}))
    return parts


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("aggregation", ["mean_selected", "sum_over_r"])
@pytest.mark.parametrize("quantizer,value_dtype,index_coding", QUANTIZERS)
def test_decode_aggregate_matches_reference(shape, aggregation, quantizer, value_dtype,
                                            index_coding):
    codec = SparseLoCoCodec(topk=64, chunk=64, quantizer=quantizer, aggregation=aggregation,
                            value_dtype=value_dtype, index_coding=index_coding)
    for n_parts, overlap in [(1, False), (3, True), (5, False)]:
        parts = list(cached_parts(shape, quantizer, value_dtype, index_coding, n_parts, overlap))
        ref = reference_aggregate(codec, parts, shape)
        out = codec.decode_aggregate(parts, shape)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert torch.equal(out, ref)


def test_decode_aggregate_overlap_counts():
    """Identical contributions: every selected coordinate is counted R times."""
    codec = SparseLoCoCodec(topk=64, chunk=64, aggregation="mean_selected")
    part = codec.encode("w", torch.randn(64, 128), {})
    single = codec.decode_aggregate([part], (64, 128))
    assert torch.equal(codec.decode_aggregate([part] * 2, (64, 128)), single)
    for aggregation in ("mean_selected", "sum_over_r"):  # (7x)/7 != x in fp32: as the reference
        params = {**codec.params(), "aggregation": aggregation}
        out = SparseLoCoCodec(**params).decode_aggregate([part] * 7, (64, 128))
        assert torch.equal(out, reference_aggregate(SparseLoCoCodec(**params), [part] * 7, (64, 128)))


def test_decode_aggregate_large():
    codec = SparseLoCoCodec(topk=64, chunk=64)
    shape = (1024, 1536)
    parts = make_parts(codec, shape, 4, seed=9)
    assert torch.equal(codec.decode_aggregate(parts, shape), reference_aggregate(codec, parts, shape))


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_decode_rejects_bad_input(path):
    codec = SparseLoCoCodec(topk=64, chunk=60)  # 60-element chunks: a 6-bit field can exceed 59
    part = codec.encode("w", torch.randn(600), {})
    agg = codec.decode_aggregate if path == "kernel" else functools.partial(reference_aggregate, codec)
    with pytest.raises(ValueError, match="at least one"):
        agg([], (600,))
    with pytest.raises(ValueError, match="shape"):
        agg([part], (601,))
    short = EncodedTensor(part.shape, part.meta, {**part.buffers, "codes": part.buffers["codes"][:-1]})
    with pytest.raises(SchemaError):
        agg([short], (600,))
    idx = part.buffers["indices"].copy()
    idx[:-1] = 0xFF  # the last byte holds padding bits, which must stay zero
    bad = EncodedTensor(part.shape, part.meta, {**part.buffers, "indices": idx})
    with pytest.raises(IndexRangeError, match="out of range"):
        agg([bad], (600,))
    idx = part.buffers["indices"].copy()
    idx[-1] |= 0x80
    bad = EncodedTensor(part.shape, part.meta, {**part.buffers, "indices": idx})
    with pytest.raises(SchemaError, match="padding"):
        agg([bad], (600,))


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_decode_rejects_bad_gaps(path):
    codec = SparseLoCoCodec(topk=64, chunk=64, index_coding="gaps")
    part = codec.encode("w", torch.randn(64, 128, generator=torch.Generator().manual_seed(5)), {})
    agg = codec.decode_aggregate if path == "kernel" else functools.partial(reference_aggregate, codec)
    nnz = part.meta["nnz"]
    idx = part.buffers["indices"].copy()
    idx[3] = idx[nnz + 3] = 0  # fourth entry of chunk 0: a zero gap
    zero_gap = EncodedTensor(part.shape, part.meta, {**part.buffers, "indices": idx})
    with pytest.raises(IndexRangeError, match="strictly increasing"):
        agg([zero_gap], (64, 128))
    idx = part.buffers["indices"].copy()
    idx[nnz - 1] = idx[2 * nnz - 1] = 0xFF  # last gap of chunk 1 (65535) pushes it past 4095
    past_end = EncodedTensor(part.shape, part.meta, {**part.buffers, "indices": idx})
    with pytest.raises(IndexRangeError, match="out of range"):
        agg([past_end], (64, 128))


# ---- dispatch, fallback, build ------------------------------------------------------------------
def test_torch_ops_registered_and_dispatch_to_cpp():
    assert hasattr(torch.ops.distrain, "sparseloco_encode")
    assert hasattr(torch.ops.distrain, "sparseloco_decode_aggregate")
    ef, delta = torch.zeros(64, 64), torch.randn(64, 64)
    torch.library.opcheck(torch.ops.distrain.sparseloco_encode.default,
                          (ef, delta, 0.95, 64, 64, "reference", "fp16", "packed"),
                          test_utils=("test_schema", "test_faketensor"))
    # Called directly, the op still refuses buffers the library would overrun.
    u8 = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="indices is torch.uint8\\[3\\]"):
        torch.ops.distrain.sparseloco_decode_aggregate(
            [u8], [u8], [torch.zeros(4)], [64, 64], 64, 64, "reference", "mean_selected", "fp16",
            "packed")


def test_reference_mode_runs_reference_and_agrees():
    kw = dict(beta=0.95, topk=64, chunk=64, quantizer="symmetric")
    delta = torch.randn(100, 100)
    ef1, ef2 = torch.zeros(100, 100), torch.zeros(100, 100)
    fast = encode_(ef1, delta, **kw)
    with kernels.forced_mode("reference"):
        assert kernels.backend("cpu") == "reference"
        slow = encode_(ef2, delta, **kw)
    assert kernels.backend("cpu") == "cpp"
    assert_same_encoding(fast, slow)
    assert torch.equal(ef1, ef2)


def test_missing_library_falls_back_and_logs_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DISTRAIN_KERNELS_DIR", str(tmp_path))
    _lib._warned.discard("load-cpu")
    kernels.set_mode("auto")
    try:
        with caplog.at_level(logging.INFO, logger="distrain.comm.kernels"):
            assert kernels.backend("cpu") == "reference"
            ef1, ef2, delta = torch.zeros(50), torch.zeros(50), torch.randn(50)
            a = encode_(ef1, delta, beta=0.9, topk=64, chunk=64, quantizer="reference")
            encode_(torch.zeros(50), delta, beta=0.9, topk=64, chunk=64, quantizer="reference")
        assert_same_encoding(a, sparseloco_encode_(ef2, delta, beta=0.9, topk=64, chunk=64,
                                                   quantizer="reference"))
        msgs = [r.getMessage() for r in caplog.records if "cpu kernels unavailable" in r.getMessage()]
        assert len(msgs) == 1 and "not found" in msgs[0]
    finally:
        monkeypatch.undo()
        kernels.set_mode("auto")
    assert kernels.backend("cpu") == "cpp"


def test_stale_library_is_not_loaded(tmp_path, monkeypatch):
    src = build.lib_dir()
    shutil.copy(src / build.CPU_LIB, tmp_path / build.CPU_LIB)
    (tmp_path / (build.CPU_LIB + ".stamp")).write_text("0" * 64 + "\nx\n")
    monkeypatch.setenv("DISTRAIN_KERNELS_DIR", str(tmp_path))
    kernels.set_mode("auto")
    try:
        assert kernels.backend("cpu") == "reference"
        assert "stale" in _lib.unavailable_reason("cpu")
    finally:
        monkeypatch.undo()
        kernels.set_mode("auto")


def test_unknown_mode_is_reference(monkeypatch):
    monkeypatch.setenv("DISTRAIN_KERNELS", "fastest-please")
    kernels.set_mode(None)
    try:
        assert kernels.backend("cpu") == "reference"
    finally:
        monkeypatch.undo()
        kernels.set_mode("auto")


def test_invalid_geometry_rejected_by_library():
    """The C API validates its arguments instead of trusting the caller."""
    lib = _lib.library("cpu")
    bad = _lib.Geometry(10, 10, 3, 5, 1, 1, 4, 0)  # rows % cr != 0
    assert lib.dl_nnz(bad) == -1
    good = _lib.Geometry(10, 10, 5, 5, 2, 2, 5, 0)
    assert lib.dl_nnz(good) == 4 * 2
    buf = torch.zeros(100)
    args = (buf.data_ptr(), buf.data_ptr(), buf.data_ptr(), 1)
    assert lib.dl_cpu_sparseloco_encode(buf.data_ptr(), buf.data_ptr(), 0.5, bad, 0, 0, 0,
                                        *args) == _lib.ERR_INVALID
    assert lib.dl_cpu_sparseloco_encode(buf.data_ptr(), buf.data_ptr(), 0.5, good, 0, 0, 7,
                                        *args) == _lib.ERR_INVALID  # unknown index coding


# ---- CUDA --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cuda_library():
    if build.nvcc_compiler() is None:
        pytest.skip("nvcc not found: cannot build the CUDA kernels")
    build.build_cuda()
    kernels.set_mode("auto")
    assert kernels.backend("cuda") == "cuda", kernels.status()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("shape", SHAPES + [(2048, 1536)], ids=str)
@pytest.mark.parametrize("quantizer,value_dtype,index_coding", QUANTIZERS)
def test_cuda_encode_matches_reference(cuda_library, shape, quantizer, value_dtype, index_coding):
    kw = dict(beta=0.95, topk=64, chunk=64, quantizer=quantizer, value_dtype=value_dtype,
              index_coding=index_coding)
    gen = torch.Generator().manual_seed(0)
    ef_ref = torch.randn(shape, generator=gen) * 0.1
    ef_gpu = ef_ref.cuda()
    for _ in range(2):
        delta = torch.randn(shape, generator=gen)
        a = sparseloco_encode_(ef_ref, delta, **kw)
        b = encode_(ef_gpu, delta.cuda(), **kw)
        assert_same_encoding(a, b)
        assert torch.equal(ef_ref, ef_gpu.cpu())


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_encode_ties_and_errors(cuda_library):
    kw = dict(beta=1.0, topk=64, chunk=64, quantizer="reference")
    delta = torch.randint(-2, 3, (130, 192), generator=torch.Generator().manual_seed(1)).float()
    ef_ref, ef_gpu = torch.zeros(130, 192), torch.zeros(130, 192, device="cuda")
    assert_same_encoding(sparseloco_encode_(ef_ref, delta, **kw),
                         encode_(ef_gpu, delta.cuda(), **kw))
    assert torch.equal(ef_ref, ef_gpu.cpu())
    bad = delta.clone()
    bad[3, 4] = float("nan")
    before = ef_gpu.clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        encode_(ef_gpu, bad.cuda(), **kw)
    assert torch.equal(ef_gpu, before)
    big = torch.randn(64, 64)
    big[1, 1] = 1e6
    kw16 = {**kw, "quantizer": "none", "value_dtype": "fp16"}
    ef_ref, ef_gpu = torch.zeros(64, 64), torch.zeros(64, 64, device="cuda")
    assert_same_encoding(sparseloco_encode_(ef_ref, big, **kw16),
                         encode_(ef_gpu, big.cuda(), **kw16))
    assert torch.equal(ef_ref, ef_gpu.cpu())


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("shape", SHAPES + [(2048, 1536)], ids=str)
@pytest.mark.parametrize("aggregation", ["mean_selected", "sum_over_r"])
@pytest.mark.parametrize("quantizer,value_dtype,index_coding", QUANTIZERS)
def test_cuda_decode_aggregate_matches_reference(cuda_library, shape, aggregation, quantizer,
                                                 value_dtype, index_coding):
    codec = SparseLoCoCodec(topk=64, chunk=64, quantizer=quantizer, aggregation=aggregation,
                            value_dtype=value_dtype, index_coding=index_coding)
    parts = make_parts(codec, shape, 5, seed=2, overlap=True)
    ref = reference_aggregate(codec, parts, shape)
    out = codec.decode_aggregate(parts, shape, device="cuda")
    assert out.is_cuda and torch.equal(out.cpu(), ref)
