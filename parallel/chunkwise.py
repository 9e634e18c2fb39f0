"""Chunk-wise sequential optimisation for long sequences: SeCO (exact) and SpaCO (sparse).

Why: back-propagating a long sequence at once keeps every layer's activations for every token
alive. SeCO cuts the sequence into n chunks and back-propagates one chunk at a time, so only one
chunk's activations, the K/V cache and its gradient are held (Li et al., "Training Long-Context
LLMs Efficiently via Chunk-wise Optimization", 2025).

SeCO (exact):
  pass 1, no grad, chunks 0 → n-2: run each chunk on top of the K/V of the chunks before it and
          keep every layer's post-RoPE K/V (before GQA expansion) in one buffer per layer;
          chunk j's slice of it becomes a detached leaf with requires_grad. (The last chunk is
          not run: nothing reads its K/V and pass 2 computes its loss.)
  pass 2, chunks n-1 → 0: rebuild chunk i's graph with the leaves of chunks < i as prefix and
          chunk i's own K/V computed in-graph, then back-propagate at once
          [chunk loss, own K/V of every layer] with seeds [scale, K/V-leaf grads of chunk i].
  The leaf grads of chunk i are complete when chunk i is reached (only later chunks read them),
  so the parameter gradients equal full back-propagation up to rounding. Compute ≈ 4/3 of full
  back-propagation (one extra forward). A chunk's loss is its token sum divided by the number of
  target tokens of the whole sequence, so the chunks add up to the usual mean.

SpaCO (sparse), the estimator and exactly what is unbiased:
  Write the exact gradient as a sum over *paths*: the loss of chunk k, then m ≥ 0 K/V hops
  k > j1 > … > jm (a gradient crossing from one chunk's graph into an earlier chunk's K/V), ending
  in the parameters used by chunk jm. A path touches m+1 distinct chunks and is computed only when
  all of them are back-propagated. SpaCO back-propagates a random set S of chunks, multiplies each
  back-propagated chunk's loss by n/t and every relayed K/V gradient by n/t (the "hop" factor), so a
  computed path carries weight (n/t)^(m+1).
  * sampling="bernoulli" (default): each chunk is in S independently with probability p = t/n
    (t chunks on average). P(path computed) = p^(m+1), so E[estimate] = exact gradient for every
    path: the estimator is unbiased. tests/test_chunkwise.py checks this exactly (enumerating all
    subsets) and by Monte Carlo.
  * sampling="uniform": exactly t chunks without replacement (the paper's code). P(path computed)
    = ∏_{l=0..m} (t-l)/(n-l): single-chunk terms (m = 0) are unbiased, but a path through m+1
    chunks is down-weighted by ∏_{l=1..m} n(t-l) / (t(n-l)) < 1 in expectation and paths through
    more than t chunks are never computed. No estimator that back-propagates exactly t < n chunks
    can be unbiased for those paths, which is why "bernoulli" is the default.
  * cap > 0 replaces the hop factor by min(n/t, cap) (the paper uses 2). The loss factor stays n/t,
    so single-chunk terms stay unbiased; with bernoulli sampling a path with m hops is then scaled
    by (cap·t/n)^m in expectation: biased, but with far less variance from long paths.
  Pass 1 of SpaCO runs only the chunks a back-propagated chunk reads, plus (last stage) the chunks
  whose loss pass 2 skips, so the reported loss is always the whole sequence's, unscaled.
  Pipelines: the loss factor is applied once, on the last stage; the hop factor on every stage (a
  hop can happen in any layer). All stages of one replica must back-propagate the same chunks for
  the same sequence: draw them once with `select_chunks` and pass `chunks=`, or give every stage an
  identically seeded generator. A stage that receives a non-zero output gradient on a chunk it did
  not select raises instead of silently dropping it.

Attention of a chunk over [prefix; own] is the model's own code, which calls
`distrain.parallel.chunkwise_attention.prefix_causal_attention` (two unmasked flash calls merged by their
log-sum-exp on CPU: much faster than one masked call).

The model is duck-typed (this package must not import `distrain`): it needs `is_first`, `is_last`,
`layers` (ordered, each with `attention_norm`, `attention.project_kv(x, cos, sin)` and
`forward(x, cos, sin, prefix, kv)` where `prefix` has `.k`/`.v`), `embed`, `head` and
`rope(start_pos, length)` — `distrain.model.Transformer` and its stages provide exactly that.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


MODES = ("off", "seco", "spaco")
SAMPLINGS = ("bernoulli", "uniform")
DEFAULT_SAMPLING = "bernoulli"
IGNORE_INDEX = -100  # targets equal to this are not predicted (same as F.cross_entropy)


class ChunkwiseSpec(Protocol):
    """What is read from the config (distrain.config.ChunkwiseConfig has these fields).

    An optional `sampling` attribute ("bernoulli" | "uniform") is read too when present.
    """

    mode: str
    chunk_len: int
    sparse_chunks: int
    cap: float
    pad: bool


class ChunkableModel(Protocol):
    is_first: bool
    is_last: bool
    layers: Any  # ordered mapping of blocks (nn.ModuleDict)

    def embed(self, tokens: Tensor) -> Tensor: ...
    def head(self, h: Tensor) -> Tensor: ...
    def rope(self, start_pos: int, length: int) -> tuple[Tensor, Tensor]: ...


@dataclass
class ChunkwiseResult:
    loss: float | None  # mean token loss of the whole sequence (last stage), unscaled
    input_grad: Tensor | None  # d(loss·scale)/d(inputs) for a stage fed hidden states
    n_chunks: int
    chunks: tuple[int, ...]  # chunk indices that were back-propagated, ascending


@dataclass(frozen=True)
class ChunkPlan:
    seq_len: int
    chunk_len: int
    n_chunks: int

    @property
    def padded_len(self) -> int:
        return self.chunk_len * self.n_chunks


@dataclass
class _Prefix:
    """K/V of earlier positions for one layer (the model reads `.k` and `.v`)."""

    k: Tensor
    v: Tensor


def _check_mode(cfg: ChunkwiseSpec) -> str:
    if cfg.mode not in MODES:
        raise ValueError(f"train.chunkwise.mode {cfg.mode!r} is not one of {', '.join(MODES)}")
    return cfg.mode


def _sampling(cfg: ChunkwiseSpec, sampling: str | None) -> str:
    s = sampling if sampling is not None else getattr(cfg, "sampling", DEFAULT_SAMPLING)
    if s not in SAMPLINGS:
        raise ValueError(f"SpaCO sampling {s!r} is not one of {', '.join(SAMPLINGS)}")
    return s


def plan_chunks(seq_len: int, cfg: ChunkwiseSpec) -> ChunkPlan:
    """How a sequence of `seq_len` positions is cut; mode "off" is one chunk."""
    if seq_len < 1:
        raise ValueError(f"cannot chunk an empty sequence (length {seq_len})")
    if _check_mode(cfg) == "off":
        return ChunkPlan(seq_len, seq_len, 1)
    c = cfg.chunk_len
    if isinstance(c, bool) or not isinstance(c, int) or c < 1:
        raise ValueError(f"train.chunkwise.chunk_len must be a positive integer for mode {cfg.mode!r}, got {c!r}")
    if seq_len % c and not cfg.pad:
        raise ValueError(
            f"sequence length {seq_len} is not a multiple of train.chunkwise.chunk_len {c}: "
            f"change one of them or set train.chunkwise.pad = true"
        )
    return ChunkPlan(seq_len, c, math.ceil(seq_len / c))


def factors(n_chunks: int, cfg: ChunkwiseSpec) -> tuple[float, float]:
    """(loss factor, K/V hop factor) of the estimator; (1, 1) for exact modes."""
    if _check_mode(cfg) != "spaco":
        return 1.0, 1.0
    t = _check_t(n_chunks, cfg)
    f = n_chunks / t
    if cfg.cap < 0 or math.isnan(cfg.cap) or 0 < cfg.cap < 1:
        raise ValueError(f"train.chunkwise.cap must be 0 (no cap) or >= 1, got {cfg.cap}")
    return f, (min(f, cfg.cap) if cfg.cap > 0 else f)


def _check_t(n_chunks: int, cfg: ChunkwiseSpec) -> int:
    t = cfg.sparse_chunks
    if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= n_chunks:
        raise ValueError(
            f"train.chunkwise.sparse_chunks (t) must be in [1, {n_chunks}] for a sequence of "
            f"{n_chunks} chunks, got {t!r}"
        )
    return t


def select_chunks(
    n_chunks: int, cfg: ChunkwiseSpec, generator: torch.Generator | None = None, sampling: str | None = None
) -> tuple[int, ...]:
    """Chunks to back-propagate: all of them for SeCO/off, a random set for SpaCO (see module doc)."""
    if _check_mode(cfg) != "spaco":
        return tuple(range(n_chunks))
    t = _check_t(n_chunks, cfg)
    if _sampling(cfg, sampling) == "uniform":
        picked = torch.randperm(n_chunks, generator=generator)[:t]
    else:
        picked = torch.nonzero(torch.rand(n_chunks, generator=generator) < t / n_chunks).flatten()
    return tuple(sorted(int(i) for i in picked))


def _check_chunks(chunks: Sequence[int], n_chunks: int, mode: str) -> tuple[int, ...]:
    if mode != "spaco":
        raise ValueError(f"chunks= picks SpaCO chunks; mode {mode!r} back-propagates every chunk")
    out = tuple(sorted(int(i) for i in chunks))
    if len(set(out)) != len(out) or any(not 0 <= i < n_chunks for i in out):
        raise ValueError(f"chunks must be distinct indices in [0, {n_chunks}), got {list(chunks)}")
    return out


def _check_io(model: ChunkableModel, inputs: Tensor, targets: Tensor | None, grad_output: Tensor | None,
              loss_scale: float) -> None:
    if model.is_first:
        if inputs.dim() != 2 or inputs.is_floating_point():
            raise ValueError(f"the first stage takes token ids (batch, seq), got {tuple(inputs.shape)} {inputs.dtype}")
    elif inputs.dim() != 3 or not inputs.is_floating_point():
        raise ValueError(f"this stage takes hidden states (batch, seq, dim), got {tuple(inputs.shape)} {inputs.dtype}")
    if model.is_last:
        if targets is None:
            raise ValueError("the last stage needs targets (batch, seq) to compute the loss")
        if grad_output is not None:
            raise ValueError("the last stage computes its own loss: pass targets, not grad_output")
        if tuple(targets.shape) != tuple(inputs.shape[:2]):
            raise ValueError(f"targets {tuple(targets.shape)} do not match inputs {tuple(inputs.shape[:2])}")
    else:
        if targets is not None:
            raise ValueError("only the last stage takes targets; other stages take grad_output")
        if grad_output is None:
            raise ValueError("a stage that is not last needs grad_output (dL/d its output hidden states)")
        if grad_output.dim() != 3 or tuple(grad_output.shape[:2]) != tuple(inputs.shape[:2]):
            raise ValueError(f"grad_output {tuple(grad_output.shape)} does not match inputs {tuple(inputs.shape[:2])}")
        if loss_scale != 1.0:
            raise ValueError("loss_scale applies to the loss on the last stage; grad_output already carries it, "
                             f"so a stage that is not last needs loss_scale=1.0, got {loss_scale}")


def _pad_seq(x: Tensor, length: int, value: float) -> Tensor:
    extra = length - x.shape[1]
    if extra == 0:
        return x
    pad = x.new_full((x.shape[0], extra, *x.shape[2:]), value)
    return torch.cat((x, pad), dim=1)


def _chunk_layers(model: ChunkableModel) -> list[Any]:
    layers = list(model.layers.values())
    if not layers:
        raise ValueError("the model (stage) holds no layers")
    return layers


def _loss_sum(model: ChunkableModel, h: Tensor, targets: Tensor) -> Tensor:
    logits = model.head(h)
    if logits.dtype != torch.float64:  # low precision is upcast (as distrain.model.cross_entropy); fp64 stays
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _chunk_forward(model: ChunkableModel, layers: list[Any], x: Tensor, start: int,
                   prefix: Callable[[int], _Prefix | None]) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """One chunk through the stage's layers on top of `prefix(layer)`; returns output and own K/V."""
    h = model.embed(x) if model.is_first else x
    cos, sin = model.rope(start, x.shape[1])
    own = []
    for li, layer in enumerate(layers):
        kv = layer.attention.project_kv(layer.attention_norm(h), cos, sin)
        own.append(kv)
        h = layer(h, cos, sin, prefix(li), kv)
    return h, own


class _KVCache:
    """Per-layer K/V of the chunks pass 1 ran (one buffer per layer), and the leaves pass 2 reads."""

    def __init__(self, chunk_len: int, n_chunks: int) -> None:
        self.c, self.n = chunk_len, n_chunks
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        self.leaves: list[list[tuple[Tensor, Tensor]] | None] = []

    def write(self, i: int, own: list[tuple[Tensor, Tensor]]) -> None:
        if not self.k:
            for k, v in own:
                self.k.append(k.new_empty((*k.shape[:2], self.n * self.c, k.shape[3])))
                self.v.append(v.new_empty((*v.shape[:2], self.n * self.c, v.shape[3])))
        sl = slice(i * self.c, (i + 1) * self.c)
        for li, (k, v) in enumerate(own):
            self.k[li][:, :, sl] = k
            self.v[li][:, :, sl] = v

    def view(self, i: int, li: int) -> _Prefix | None:
        """Pass 1: K/V of chunks < i, no copy."""
        end = i * self.c
        return _Prefix(self.k[li][:, :, :end], self.v[li][:, :, :end]) if i else None

    def make_leaves(self, upto: int, needs_grad: set[int]) -> None:
        """Chunks < upto become detached leaves (views of the buffers); only `needs_grad` collect grads."""
        for j in range(upto):
            sl = slice(j * self.c, (j + 1) * self.c)
            kv = [(k[:, :, sl].detach(), v[:, :, sl].detach()) for k, v in zip(self.k, self.v)]
            if j in needs_grad:
                for k, v in kv:
                    k.requires_grad_(True)
                    v.requires_grad_(True)
            self.leaves.append(kv)

    def leaf_prefix(self, i: int, li: int) -> _Prefix | None:
        """Pass 2: K/V of chunks < i as part of the graph, so their gradients reach the leaves."""
        if not i:
            return None
        return _Prefix(torch.cat([self.leaves[j][li][0] for j in range(i)], dim=2),
                       torch.cat([self.leaves[j][li][1] for j in range(i)], dim=2))

    def pop_grads(self, i: int, own: list[tuple[Tensor, Tensor]], hop: float) -> tuple[list[Tensor], list[Tensor]]:
        """(own K/V outputs, seeds): the gradient later chunks left on chunk i's K/V, times `hop`;
        chunk i's leaves are freed."""
        outs, seeds = [], []
        if i < len(self.leaves):
            for kv, leaf_kv in zip(own, self.leaves[i]):
                for out, leaf in zip(kv, leaf_kv):
                    if leaf.grad is not None:
                        outs.append(out)
                        seeds.append(leaf.grad if hop == 1.0 else leaf.grad * hop)
            self.leaves[i] = None
        return outs, seeds


def chunkwise_backward(
    model: ChunkableModel,
    inputs: Tensor,
    targets: Tensor | None,
    cfg: ChunkwiseSpec,
    loss_scale: float = 1.0,
    generator: torch.Generator | None = None,
    grad_output: Tensor | None = None,
    autocast_dtype: torch.dtype | None = None,
    *,
    chunks: Sequence[int] | None = None,
    sampling: str | None = None,
) -> ChunkwiseResult:
    """Back-propagate one batch of sequences chunk by chunk, accumulating into `.grad`.

    Last stage (or whole model): `targets` given; accumulates d(loss·loss_scale)/dθ with loss the
    mean token cross-entropy (targets == -100 are ignored), so repeated calls with
    loss_scale = 1/accum accumulate gradients. Other stages: `grad_output` = dL/d(output hidden
    states). Stages fed hidden states return `input_grad` for the stage before them.
    SpaCO draws its chunks with `generator` (or takes them from `chunks=`); see the module doc.
    """
    mode = _check_mode(cfg)
    _check_io(model, inputs, targets, grad_output, loss_scale)
    layers = _chunk_layers(model)
    plan = plan_chunks(inputs.shape[1], cfg)
    n, c, T = plan.n_chunks, plan.chunk_len, plan.seq_len
    loss_factor, hop = factors(n, cfg)
    selected = (_check_chunks(chunks, n, mode) if chunks is not None
                else select_chunks(n, cfg, generator, sampling))
    sel = set(selected)

    x = _pad_seq(inputs, plan.padded_len, 0)
    tgt = _pad_seq(targets, plan.padded_len, IGNORE_INDEX) if targets is not None else None
    gout = _pad_seq(grad_output, plan.padded_len, 0) if grad_output is not None else None
    count = int((targets != IGNORE_INDEX).sum()) if targets is not None else 0
    if targets is not None and count == 0:
        raise ValueError("every target is the ignore index (-100): there is no loss to back-propagate")
    if gout is not None and mode == "spaco":
        for j in range(n):
            if j not in sel and bool(gout[:, j * c:(j + 1) * c].any()):
                raise ValueError(
                    f"grad_output is non-zero on chunk {j}, which this stage did not select: all stages of a "
                    "pipeline must back-propagate the same chunks (pass chunks= or identically seeded generators)"
                )

    amp = (torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    loss_sum = 0.0

    # Pass 1 (no grad): the chunks a back-propagated chunk reads, plus (last stage) the chunks whose
    # loss pass 2 will not compute, so the reported loss is always the whole sequence's.
    last_sel = max(selected, default=-1)
    skipped = [j for j in range(n) if j not in sel] if model.is_last else []
    n_fwd = max(last_sel, max(skipped, default=-1) + 1)
    cache = _KVCache(c, n_fwd)
    with torch.no_grad(), amp:
        for i in range(n_fwd):
            sl = slice(i * c, (i + 1) * c)
            h, own = _chunk_forward(model, layers, x[:, sl], i * c, functools.partial(cache.view, i))
            cache.write(i, own)
            if model.is_last and i not in sel:
                loss_sum += float(_loss_sum(model, h, tgt[:, sl]))
    cache.make_leaves(max(last_sel, 0), sel)

    # Pass 2 (chunks n-1 → 0): one chunk's graph at a time, seeded with its loss (or output
    # gradient) and the K/V gradient later chunks left on it.
    input_grad = torch.zeros_like(x) if not model.is_first else None
    seed = loss_scale * loss_factor / count if count else 0.0
    with torch.enable_grad(), amp:
        for i in reversed(selected):
            sl = slice(i * c, (i + 1) * c)
            xin = x[:, sl] if model.is_first else x[:, sl].detach().requires_grad_(True)
            h, own = _chunk_forward(model, layers, xin, i * c, functools.partial(cache.leaf_prefix, i))
            if model.is_last:
                ls = _loss_sum(model, h, tgt[:, sl])
                loss_sum += float(ls.detach())
                outs, seeds = [ls], [torch.tensor(seed, dtype=ls.dtype, device=ls.device)]
            else:
                outs, seeds = [h], [gout[:, sl].to(h.dtype)]
            kv_outs, kv_seeds = cache.pop_grads(i, own, hop)
            torch.autograd.backward(outs + kv_outs, seeds + kv_seeds)
            if input_grad is not None and xin.grad is not None:
                input_grad[:, sl] = xin.grad
    if input_grad is not None:
        input_grad = input_grad[:, :T].to(inputs.dtype)
    loss = loss_sum / count if model.is_last else None
    return ChunkwiseResult(loss=loss, input_grad=input_grad, n_chunks=n, chunks=selected)
