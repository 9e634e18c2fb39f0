"""SeCO must equal full back-propagation; SpaCO must be unbiased where the module doc says it is."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import distrain.model as dm
from distrain.config import ChunkwiseConfig, ModelConfig
from distrain.model import Transformer
from distrain.parallel.chunkwise import chunkwise_backward, factors, plan_chunks, select_chunks
from distrain.parallel.chunkwise_attention import (
    _PrefixCausal,
    prefix_causal_attention,
)

V = 61


def model_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine 2-thread small ops spin-wait
    (this file took 20x longer that way); the previous setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fp64_norm():
    """Kept for the fp64 tests' signatures: distrain.model.RMSNorm now computes fp64 inputs in fp64."""
    assert dm.RMSNorm(4, 1e-5)(torch.ones(1, 4, dtype=torch.float64)).dtype == torch.float64


def ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def reference(model, x, y) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = ce(model(x), y)
    loss.backward()
    out = grads(model)
    model.zero_grad(set_to_none=True)
    return loss.item(), out


def max_rel_err(got: dict, want: dict) -> float:
    """Per tensor: max |got - want| / max |want|; the worst tensor."""
    assert got.keys() == want.keys()
    return max(((got[k] - want[k]).abs().max() / want[k].abs().max()).item() for k in want)


def run(model, x, y, **cfg_kw):
    model.zero_grad(set_to_none=True)
    res = chunkwise_backward(model, x, y, ChunkwiseConfig(**cfg_kw))
    return res, grads(model)


def data(T: int, B: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


# --------------------------------------------------------------------------------------------
# SeCO: exact


@pytest.mark.parametrize("n_kv_heads", [2, 4])  # GQA and plain multi-head
@pytest.mark.parametrize("chunk_len", [48, 24, 12, 6])
def test_seco_equals_full_backprop_fp64(fp64_norm, n_kv_heads, chunk_len):
    torch.manual_seed(0)
    m = Transformer(model_cfg(n_kv_heads=n_kv_heads)).double()
    x, y = data(48)
    ref_loss, ref = reference(m, x, y)
    res, got = run(m, x, y, mode="seco", chunk_len=chunk_len)
    assert res.n_chunks == 48 // chunk_len and res.chunks == tuple(range(res.n_chunks))
    assert res.input_grad is None
    assert res.loss == pytest.approx(ref_loss, rel=1e-12)
    assert max_rel_err(got, ref) <= 1e-10


@pytest.mark.parametrize("chunk_len", [16, 8])
def test_seco_equals_full_backprop_fp32(chunk_len):
    torch.manual_seed(1)
    m = Transformer(model_cfg())
    x, y = data(64)
    ref_loss, ref = reference(m, x, y)
    res, got = run(m, x, y, mode="seco", chunk_len=chunk_len)
    assert res.loss == pytest.approx(ref_loss, rel=1e-5)
    assert max_rel_err(got, ref) <= 1e-5


def test_tied_embeddings_fp64(fp64_norm):
    torch.manual_seed(9)
    m = Transformer(model_cfg(tie_embeddings=True)).double()
    x, y = data(24)
    _, ref = reference(m, x, y)
    _, got = run(m, x, y, mode="seco", chunk_len=6)
    assert max_rel_err(got, ref) <= 1e-10


def test_mode_off_is_plain_backprop(fp64_norm):
    torch.manual_seed(2)
    m = Transformer(model_cfg()).double()
    x, y = data(20)
    ref_loss, ref = reference(m, x, y)
    res, got = run(m, x, y, mode="off")
    assert res.n_chunks == 1 and res.loss == pytest.approx(ref_loss, rel=1e-12)
    assert max_rel_err(got, ref) <= 1e-12


def split_stages(whole: Transformer, bounds):
    stages = [Transformer(whole.cfg, a, b).double() for a, b in bounds]
    sd = whole.state_dict()
    for s in stages:
        s.load_state_dict({k: sd[k] for k in s.state_dict()})
    return stages


def run_pipeline(stages, x, y, cfg, **kw):
    hs = [x]
    with torch.no_grad():
        for s in stages[:-1]:
            hs.append(s(hs[-1]))
    results, g = [], None
    for s, h in zip(reversed(stages), reversed(hs)):
        for p in s.parameters():
            p.grad = None
        if s.is_last:
            r = chunkwise_backward(s, h, y, cfg, **kw)
        else:
            r = chunkwise_backward(s, h, None, cfg, grad_output=g, **kw)
        results.append(r)
        g = r.input_grad
    return list(reversed(results)), hs


def stage_grads(stages) -> dict[str, torch.Tensor]:
    out = {}
    for s in stages:
        out.update(grads(s))
    return out


def test_seco_pipeline_stages_fp64(fp64_norm):
    torch.manual_seed(3)
    whole = Transformer(model_cfg()).double()
    stages = split_stages(whole, [(0, 1), (1, 3), (3, 4)])
    x, y = data(40)
    ref_loss, ref = reference(whole, x, y)
    # reference activation gradients at the stage boundaries
    h1 = stages[0](x).detach().requires_grad_(True)
    h2 = stages[1](h1)
    h2.retain_grad()
    ce(stages[2](h2), y).backward()
    ref_g1, ref_g2 = h1.grad.clone(), h2.grad.clone()

    results, _ = run_pipeline(stages, x, y, ChunkwiseConfig(mode="seco", chunk_len=8))
    assert results[2].loss == pytest.approx(ref_loss, rel=1e-12)
    assert results[0].loss is None and results[1].loss is None and results[0].input_grad is None
    torch.testing.assert_close(results[2].input_grad, ref_g2, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(results[1].input_grad, ref_g1, rtol=1e-10, atol=1e-14)
    assert max_rel_err(stage_grads(stages), ref) <= 1e-10


def test_gradient_accumulation_and_padding_and_ignored_targets(fp64_norm):
    torch.manual_seed(4)
    m = Transformer(model_cfg()).double()
    (x1, y1), (x2, y2) = data(30, seed=1), data(30, seed=2)
    y1[0, :5] = -100  # ignored targets count neither in the sum nor in the mean
    m.zero_grad(set_to_none=True)
    (0.5 * ce(m(x1), y1) + 0.5 * ce(m(x2), y2)).backward()
    ref = grads(m)
    m.zero_grad(set_to_none=True)
    cfg = ChunkwiseConfig(mode="seco", chunk_len=8, pad=True)  # 30 = 3·8 + 6: padded to 32
    r1 = chunkwise_backward(m, x1, y1, cfg, loss_scale=0.5)
    r2 = chunkwise_backward(m, x2, y2, cfg, loss_scale=0.5)
    assert r1.n_chunks == r2.n_chunks == 4
    with torch.no_grad():
        assert r1.loss == pytest.approx(ce(m(x1), y1).item(), rel=1e-12)
    assert max_rel_err(grads(m), ref) <= 1e-10


# --------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(mode="seco", chunk_len=7), r"sequence length 32 .*chunk_len 7"),
        (dict(mode="seco", chunk_len=0), r"chunk_len must be a positive integer"),
        (dict(mode="spaco", chunk_len=8, sparse_chunks=0), r"sparse_chunks \(t\) must be in \[1, 4\]"),
        (dict(mode="spaco", chunk_len=8, sparse_chunks=5), r"sparse_chunks \(t\) must be in \[1, 4\]"),
        (dict(mode="spaco", chunk_len=8, sparse_chunks=2, cap=0.5), r"cap must be 0 \(no cap\) or >= 1"),
        (dict(mode="sparse", chunk_len=8), r"mode 'sparse' is not one of off, seco, spaco"),
    ],
)
def test_config_errors(kw, match):
    m = Transformer(model_cfg())
    x, y = data(32)
    with pytest.raises(ValueError, match=match):
        chunkwise_backward(m, x, y, ChunkwiseConfig(**kw))


def test_stage_io_errors():
    cfg = model_cfg()
    first, last = Transformer(cfg, 0, 2), Transformer(cfg, 2, 4)
    x, y = data(16)
    h = torch.zeros(2, 16, cfg.dim)
    c = ChunkwiseConfig(mode="seco", chunk_len=8)
    with pytest.raises(ValueError, match="needs grad_output"):
        chunkwise_backward(first, x, None, c)
    with pytest.raises(ValueError, match="only the last stage takes targets"):
        chunkwise_backward(first, x, y, c, grad_output=h)
    with pytest.raises(ValueError, match="needs loss_scale=1.0"):
        chunkwise_backward(first, x, None, c, loss_scale=0.5, grad_output=h)
    with pytest.raises(ValueError, match="needs targets"):
        chunkwise_backward(last, h, None, c)
    with pytest.raises(ValueError, match="takes hidden states"):
        chunkwise_backward(last, x, y, c)
    with pytest.raises(ValueError, match="takes token ids"):
        chunkwise_backward(first, h, None, c, grad_output=h)
    with pytest.raises(ValueError, match="picks SpaCO chunks"):
        chunkwise_backward(last, h, y, c, chunks=[0])
    with pytest.raises(ValueError, match="no loss to back-propagate"):
        chunkwise_backward(last, h, torch.full_like(y, -100), c)
    with pytest.raises(ValueError, match="exceed model.max_seq_len"):
        chunkwise_backward(last, torch.zeros(1, 136, cfg.dim), torch.zeros(1, 136, dtype=torch.long),
                           ChunkwiseConfig(mode="seco", chunk_len=8))


# --------------------------------------------------------------------------------------------
# SpaCO


def test_select_chunks():
    spaco = ChunkwiseConfig(mode="spaco", chunk_len=8, sparse_chunks=3)
    picks = [select_chunks(16, spaco, torch.Generator().manual_seed(s), "uniform") for s in range(50)]
    assert all(len(p) == 3 and len(set(p)) == 3 and list(p) == sorted(p) and all(0 <= i < 16 for i in p) for p in picks)
    assert len(set(picks)) > 40  # random, not a fixed set
    assert select_chunks(16, spaco, torch.Generator().manual_seed(7)) == select_chunks(16, spaco, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(0)
    counts = [len(select_chunks(16, spaco, g)) for _ in range(2000)]  # bernoulli: Binomial(16, 3/16)
    mean, sd = sum(counts) / len(counts), math.sqrt(16 * (3 / 16) * (13 / 16) / len(counts))
    assert abs(mean - 3) < 5 * sd
    assert select_chunks(4, ChunkwiseConfig(mode="seco", chunk_len=8)) == (0, 1, 2, 3)
    assert factors(16, spaco) == (16 / 3, 16 / 3)
    assert factors(16, ChunkwiseConfig(mode="spaco", chunk_len=8, sparse_chunks=4, cap=2.0)) == (4.0, 2.0)
    assert plan_chunks(30, ChunkwiseConfig(mode="seco", chunk_len=8, pad=True)).padded_len == 32


@pytest.mark.parametrize("sampling", ["bernoulli", "uniform"])
def test_spaco_with_every_chunk_is_exact(fp64_norm, sampling):
    torch.manual_seed(5)
    m = Transformer(model_cfg()).double()
    x, y = data(32)
    _, ref = reference(m, x, y)
    m.zero_grad(set_to_none=True)
    res = chunkwise_backward(m, x, y, ChunkwiseConfig(mode="spaco", chunk_len=8, sparse_chunks=4),
                             generator=torch.Generator().manual_seed(0), sampling=sampling)
    assert res.chunks == (0, 1, 2, 3)
    assert max_rel_err(grads(m), ref) <= 1e-10


def spaco_estimate(m, x, y, cfg, chunks) -> dict[str, torch.Tensor]:
    m.zero_grad(set_to_none=True)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    res = chunkwise_backward(m, x, y, cfg, chunks=chunks)
    assert res.chunks == tuple(chunks)
    return grads(m)


def tiny():
    torch.manual_seed(6)
    return Transformer(model_cfg(dim=16, n_layers=2, n_heads=2, n_kv_heads=1)).double()


def test_spaco_bernoulli_expectation_is_exact_gradient(fp64_norm):
    """Exact expectation over all 2^n chunk sets, weighted by their Bernoulli(t/n) probability."""
    m = tiny()
    x, y = data(16)
    _, ref = reference(m, x, y)
    n, t = 4, 1
    cfg = ChunkwiseConfig(mode="spaco", chunk_len=4, sparse_chunks=t)
    p = t / n
    mean = {k: torch.zeros_like(v) for k, v in ref.items()}
    for r in range(n + 1):
        for S in itertools.combinations(range(n), r):
            est = spaco_estimate(m, x, y, cfg, S)
            w = p ** len(S) * (1 - p) ** (n - len(S))
            for k in mean:
                mean[k] += w * est[k]
    assert max_rel_err(mean, ref) <= 1e-10
    # A capped hop factor is biased (documented): its expectation misses multi-chunk paths.
    capped = ChunkwiseConfig(mode="spaco", chunk_len=4, sparse_chunks=t, cap=2.0)
    mean_c = {k: torch.zeros_like(v) for k, v in ref.items()}
    for r in range(n + 1):
        for S in itertools.combinations(range(n), r):
            est = spaco_estimate(m, x, y, capped, S)
            for k in mean_c:
                mean_c[k] += p ** len(S) * (1 - p) ** (n - len(S)) * est[k]
    assert max_rel_err(mean_c, ref) > 1e-3


def direct_terms(m, x, y, chunk_len) -> dict[str, torch.Tensor]:
    """Gradient with every chunk's prefix K/V held constant: only single-chunk paths."""
    m.zero_grad(set_to_none=True)
    count = y.numel()
    T = x.shape[1]
    for i in range(T // chunk_len):
        s, e = i * chunk_len, (i + 1) * chunk_len
        prefixes = None
        if i:
            with torch.no_grad():
                prefixes = []
                h = m.embed(x[:, :s])
                cos, sin = m.rope(0, s)
                for layer in m.layers.values():
                    k, v = layer.attention.project_kv(layer.attention_norm(h), cos, sin)
                    prefixes.append(dm.KVPrefix(k, v))
                    h = layer(h, cos, sin)
        logits = m(x[:, s:e], start_pos=s, prefixes=prefixes)
        (F.cross_entropy(logits.reshape(-1, V), y[:, s:e].reshape(-1), reduction="sum") / count).backward()
    return grads(m)


def test_spaco_uniform_expectation_keeps_only_single_chunk_paths(fp64_norm):
    """n=2, t=1 without replacement: E[estimate] = direct terms; the K/V hop term is lost."""
    m = tiny()
    x, y = data(16)
    _, ref = reference(m, x, y)
    cfg = ChunkwiseConfig(mode="spaco", chunk_len=8, sparse_chunks=1)
    ests = [spaco_estimate(m, x, y, cfg, S) for S in [(0,), (1,)]]
    mean = {k: (ests[0][k] + ests[1][k]) / 2 for k in ref}
    assert max_rel_err(mean, direct_terms(m, x, y, 8)) <= 1e-10
    assert max_rel_err(mean, ref) > 1e-3  # so uniform sampling is biased for the hop term


def test_spaco_monte_carlo_mean_converges_to_exact(fp64_norm):
    """The sampler + estimator end to end: the mean of N draws is within 4 standard errors of the
    exact gradient along fixed random directions (deterministic: seeded generators)."""
    m = tiny()
    x, y = data(16)
    _, ref = reference(m, x, y)
    keys = sorted(ref)
    flat_ref = torch.cat([ref[k].flatten() for k in keys])
    dirs = torch.randn(8, flat_ref.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cfg = ChunkwiseConfig(mode="spaco", chunk_len=4, sparse_chunks=2)
    g = torch.Generator().manual_seed(123)
    N = 300
    proj = []
    for _ in range(N):
        m.zero_grad(set_to_none=True)
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        chunkwise_backward(m, x, y, cfg, generator=g)
        proj.append(dirs @ torch.cat([m.get_parameter(k).grad.flatten() for k in keys]))
    proj = torch.stack(proj)
    mean, se = proj.mean(0), proj.std(0) / math.sqrt(N)
    want = dirs @ flat_ref
    assert (se > 0).all()
    assert ((mean - want).abs() <= 4 * se).all(), ((mean - want) / se)


def test_spaco_pipeline_equals_whole_model_and_rejects_mismatched_chunks(fp64_norm):
    torch.manual_seed(7)
    whole = Transformer(model_cfg()).double()
    stages = split_stages(whole, [(0, 2), (2, 4)])
    x, y = data(32)
    cfg = ChunkwiseConfig(mode="spaco", chunk_len=4, sparse_chunks=3, cap=1.5)
    chunks = (1, 4, 6)
    whole.zero_grad(set_to_none=True)
    res = chunkwise_backward(whole, x, y, cfg, chunks=chunks)
    want = grads(whole)
    results, _ = run_pipeline(stages, x, y, cfg, chunks=chunks)
    assert results[1].loss == pytest.approx(res.loss, rel=1e-12)
    with torch.no_grad():
        assert res.loss == pytest.approx(ce(whole(x), y).item(), rel=1e-12)  # the loss of every chunk
    assert max_rel_err(stage_grads(stages), want) <= 1e-10
    # the last stage's input gradient is zero outside the chosen chunks
    ig = results[1].input_grad
    for j in range(8):
        assert bool(ig[:, 4 * j:4 * j + 4].any()) == (j in chunks)
    with pytest.raises(ValueError, match="non-zero on chunk 4, which this stage did not select"):
        chunkwise_backward(stages[0], x, None, cfg, grad_output=ig, chunks=(1, 6, 7))


def test_autocast_bf16_close_to_fp32():
    torch.manual_seed(8)
    m = Transformer(model_cfg())
    x, y = data(32)
    _, ref = reference(m, x, y)
    m.zero_grad(set_to_none=True)
    res = chunkwise_backward(m, x, y, ChunkwiseConfig(mode="seco", chunk_len=8), autocast_dtype=torch.bfloat16)
    got = grads(m)
    assert math.isfinite(res.loss)
    for k in ref:
        cos = F.cosine_similarity(got[k].flatten(), ref[k].flatten(), dim=0)
        assert cos > 0.98, (k, cos)


# --------------------------------------------------------------------------------------------
# The split attention kernel used for [prefix; chunk]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("T, S", [(8, 8), (8, 29), (1, 5), (16, 48)])
def test_prefix_causal_attention_equals_masked_sdpa(dtype, tol, T, S):
    g = torch.Generator().manual_seed(T * 100 + S)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
               for n in (T, S, S))
    do = torch.randn(2, 3, T, 16, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    want_g = torch.autograd.grad(want, (q, k, v), do)
    got = prefix_causal_attention(q, k, v)
    got_g = torch.autograd.grad(got, (q, k, v), do)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_chunkwise_uses_the_split_kernel(monkeypatch):
    calls = []
    real = _PrefixCausal.apply
    monkeypatch.setattr(_PrefixCausal, "apply", lambda *a: calls.append(1) or real(*a))
    m = Transformer(model_cfg(n_layers=2))
    x, y = data(16)
    chunkwise_backward(m, x, y, ChunkwiseConfig(mode="seco", chunk_len=4))
    # pass 1 runs chunks 1..2 with a prefix, pass 2 chunks 1..3; 2 layers each
    assert len(calls) == 2 * (2 + 3)
