"""One training step of a replica under an adaptive SP plan (``distrain.parallel.sp_planner.SPPlan``).

Why one function: the runtime only has to hand it the global batch, the plan and a provider of
process groups; everything else (which sequences this device runs, its share of their tokens,
Ulysses attention inside its group, exact loss weighting, gradient sync) happens here.

Exactness: every device returns the sum of its tokens' cross-entropy divided by the number of
target tokens of the *whole* batch, back-propagates that, and the gradients are summed over all
devices of the replica. Gradients through attention flow back across the group by the reverse
all-to-alls, so device i's gradient is exactly its tokens' share, whatever the size of its
group, and the sum is the gradient of the batch's mean token loss: the same as one device running
every sequence (up to float rounding). Devices the plan leaves idle contribute zeros.

The model is duck-typed (this package must not import ``distrain``): ``is_first``/``is_last``
(a whole model, not a stage), ``embed(tokens)``, ``head(h)``, ``rope(0, n) -> (cos, sin)`` tables
of shape (n, head_dim) in the half-split ("rotate_half") convention, and ``layers`` in order, each
with ``attention_norm``, ``attention`` (``wq``, ``wk``, ``wv``, ``wo``, ``n_heads``, ``n_kv_heads``,
``head_dim``), ``ffn_norm`` and ``feed_forward``, composed as pre-norm residual blocks —
``distrain.model.Transformer`` is exactly that; the tests compare against its own forward, so a
change there that this file does not follow fails them. Modules are called, never re-implemented,
so swapping ``wo``/``w2``/``tok_embeddings`` for other modules keeps working.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distrain.parallel.sp.ulysses import AttentionFn, GroupProvider, even_split, ulysses_attention

IGNORE_INDEX = -100


@dataclass
class SPStepResult:
    loss: float  # mean token loss of the whole batch (identical on every device)
    tokens: int  # target tokens of the whole batch
    local_tokens: int  # tokens this device ran
    grad_norm: float


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (t, H, D); cos/sin: (t, D). Half-split rotation, as the model applies it."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :].to(x.dtype) + rotated * sin[:, None, :].to(x.dtype)


def _check_batch(inputs: Tensor, targets: Tensor, cu: list[int], plan: Any) -> None:
    if inputs.ndim != 1 or targets.shape != inputs.shape:
        raise ValueError(f"inputs and targets must be 1-D and equal in shape, got {tuple(inputs.shape)}, {tuple(targets.shape)}")
    if not cu or cu[0] != 0 or cu[-1] != inputs.numel() or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to {inputs.numel()} tokens, got {cu[:4]}...{cu[-2:]}")
    if len(plan.assignment) != len(cu) - 1:
        raise ValueError(f"the plan assigns {len(plan.assignment)} sequences, the batch has {len(cu) - 1}")


def local_shard(cu_seqlens: Sequence[int], sequences: Sequence[int], degree: int, rank: int
                ) -> tuple[Tensor, Tensor, list[int], list[int]]:
    """Which tokens of the batch a group's device runs.

    The group packs ``sequences`` (batch indices, in order) into one stream; device ``rank`` of
    ``degree`` holds a contiguous even share of it. Returns (batch token indices of that share,
    their positions inside their documents, the stream's cu_seqlens, every device's token count).
    """
    cu = list(cu_seqlens)
    lens = [cu[k + 1] - cu[k] for k in sequences]
    stream = torch.cat([torch.arange(cu[k], cu[k + 1]) for k in sequences]) if sequences else torch.zeros(0, dtype=torch.long)
    pos = torch.cat([torch.arange(n) for n in lens]) if sequences else torch.zeros(0, dtype=torch.long)
    counts = even_split(sum(lens), degree)
    start = sum(counts[:rank])
    pack_cu = [0]
    for n in lens:
        pack_cu.append(pack_cu[-1] + n)
    return stream[start:start + counts[rank]], pos[start:start + counts[rank]], pack_cu, counts


def sp_loss_sum(model: Any, tokens: Tensor, targets: Tensor, positions: Tensor, pack_cu: Sequence[int],
                counts: Sequence[int], rank: int, group: Any, attention: AttentionFn | None = None) -> Tensor:
    """Sum of cross-entropy over this device's tokens, the model run with Ulysses attention."""
    if not (getattr(model, "is_first", True) and getattr(model, "is_last", True)):
        raise ValueError("adaptive SP runs a whole model, not a pipeline stage")
    h = model.embed(tokens)  # (t, dim)
    cos_all, sin_all = model.rope(0, max(int(positions.max()) + 1, 1) if positions.numel() else 1)
    cos, sin = cos_all[positions], sin_all[positions]
    t = tokens.numel()
    for layer in model.layers.values():
        attn = layer.attention
        a = layer.attention_norm(h)
        q = _rope(attn.wq(a).view(t, attn.n_heads, attn.head_dim), cos, sin)
        k = _rope(attn.wk(a).view(t, attn.n_kv_heads, attn.head_dim), cos, sin)
        v = attn.wv(a).view(t, attn.n_kv_heads, attn.head_dim)
        o = ulysses_attention(q, k, v, pack_cu, counts, rank, group, attention)
        h = h + attn.wo(o.reshape(t, -1))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    logits = model.head(h)
    return F.cross_entropy(logits.float(), targets, reduction="sum", ignore_index=IGNORE_INDEX)


def sp_forward_backward(model: Any, inputs: Tensor, targets: Tensor, cu_seqlens: Sequence[int], plan: Any,
                        device: int, group_for: GroupProvider, *, ranks: Sequence[int] | None = None,
                        attention: AttentionFn | None = None, autocast_dtype: torch.dtype | None = None
                        ) -> tuple[float, int, int]:
    """Forward and backward of device ``device``'s share of the plan; grads accumulate in ``.grad``.

    ``ranks[i]``: global rank of replica device i (default: i). ``group_for`` is called with the
    sorted global rank tuple of every group of the plan (in plan order, on every device: a lazily
    creating provider stays collective); a device's rank in its group is its global rank's position. Returns (this device's loss sum, the batch's target tokens, tokens run).
    """
    cu = [int(c) for c in (cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else cu_seqlens)]
    _check_batch(inputs, targets, cu, plan)
    ranks = list(range(max(i for g in plan.groups for i in g) + 1)) if ranks is None else list(ranks)
    # group ranks follow global rank order (torch.distributed.new_group sorts its ranks)
    pgs = [group_for(tuple(sorted(ranks[i] for i in g))) if len(g) > 1 else None for g in plan.groups]
    n_targets = int((targets != IGNORE_INDEX).sum())
    g = plan.group_of(device)
    if g is None:
        return 0.0, n_targets, 0
    members = sorted(plan.groups[g], key=lambda i: ranks[i])
    r = members.index(device)
    idx, pos, pack_cu, counts = local_shard(cu, plan.sequences_of(g), len(members), r)
    dev = next(iter(model.parameters())).device
    ctx = torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    with ctx:
        loss = sp_loss_sum(model, inputs[idx].to(dev), targets[idx].to(dev), pos.to(dev), pack_cu, counts, r, pgs[g],
                           attention)
    (loss / max(n_targets, 1)).backward()
    return float(loss.detach()), n_targets, idx.numel()


def sp_train_step(model: nn.Module, optimizer: torch.optim.Optimizer | None, inputs: Tensor, targets: Tensor,
                  cu_seqlens: Sequence[int], plan: Any, device: int, group_for: GroupProvider, *,
                  ranks: Sequence[int] | None = None, grad_clip: float = 0.0, attention: AttentionFn | None = None,
                  autocast_dtype: torch.dtype | None = None) -> SPStepResult:
    """zero_grad, this device's forward/backward, gradients (and loss) summed over the replica, clip, step.

    Every device of the replica calls it with the same batch and plan. The replica's process group
    is ``group_for(tuple(ranks))``. ``optimizer=None`` stops after the gradient sum (tests, custom loops).
    """
    import torch.distributed as dist

    params = [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]
    for p in params:
        p.grad = None
    n_dev = len(ranks) if ranks is not None else max(i for g in plan.groups for i in g) + 1
    all_ranks = list(range(n_dev)) if ranks is None else list(ranks)
    replica_pg = group_for(tuple(sorted(all_ranks))) if n_dev > 1 else None
    loss_sum, n_targets, local = sp_forward_backward(model, inputs, targets, cu_seqlens, plan, device, group_for,
                                                     ranks=all_ranks, attention=attention, autocast_dtype=autocast_dtype)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([loss_sum], device=grads[0].device)])
    if replica_pg is not None:
        dist.all_reduce(flat, group=replica_pg)
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[off:off + n].view_as(p).to(p.dtype)
        off += n
    loss = float(flat[-1]) / max(n_targets, 1)
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite training loss {loss}")
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else torch.tensor(0.0)
    if optimizer is not None:
        optimizer.step()
    return SPStepResult(loss, n_targets, local, float(norm))
