"""Ulysses sequence-parallel attention for packed variable-length sequences inside one SP group.

Why: in a group of d devices each device holds a contiguous 1/d of the group's packed tokens for
everything but attention. Attention needs whole sequences, so one all-to-all turns "my tokens,
all heads" into "all tokens, my heads", each device attends over complete documents for its
heads, and a second all-to-all turns the result back (DeepSpeed-Ulysses). Everything here is an
``all_to_all_single`` with explicit split sizes, which gloo supports, so it runs and is tested on CPU.

What users of Ulysses implementations ask for, and how it is handled:
* lengths not divisible by d: the packed stream of T tokens is split as evenly as possible (the
  first T mod d devices hold one more token); split sizes differ per device, nothing is padded.
* heads not divisible by d: query heads are split the same way (``head_split``); a device with
  more heads does more attention work (the cost model assumes balanced heads).
* GQA with fewer K/V heads than d: each device receives exactly the K/V heads its query heads
  read, so a K/V head is replicated to every device that needs it; its gradient is summed back
  by the backward all-to-all (the reverse exchange) and the local gather's backward.
* packing: ``cu_seqlens`` (offsets of the documents in the group's packed stream) makes attention
  block-diagonal causal: each document attends only to itself, positions restart per document.

Process groups are created once per rank tuple and cached (``GroupCache``); the runtime may
inject any provider ``Callable[[tuple[int, ...]], ProcessGroup]`` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

GroupProvider = Callable[[tuple[int, ...]], Any]
AttentionFn = Callable[[Tensor, Tensor, Tensor, Sequence[int]], Tensor]


class GroupCache:
    """Process groups by (global) rank tuple, each created once and reused.

    ``torch.distributed.new_group`` is collective over the whole job: every process must ask for
    the same tuples in the same order, members or not. ``sp_step`` does exactly that (it asks for
    every group of the plan, in plan order, on every rank), and ``precreate`` lets a launcher make
    a known set at start-up.
    """

    def __init__(self, new_group: Callable[[list[int]], Any] | None = None):
        if new_group is None:
            import torch.distributed as dist

            new_group = dist.new_group
        self._new_group = new_group
        self._groups: dict[tuple[int, ...], Any] = {}

    def __call__(self, ranks: tuple[int, ...]) -> Any:
        key = tuple(int(r) for r in ranks)
        if len(set(key)) != len(key) or not key:
            raise ValueError(f"a process group needs distinct ranks, got {ranks!r}")
        if key not in self._groups:
            self._groups[key] = self._new_group(sorted(key))
        return self._groups[key]

    def precreate(self, rank_tuples: Iterable[tuple[int, ...]]) -> None:
        for t in rank_tuples:
            self(t)

    def __len__(self) -> int:
        return len(self._groups)


def even_split(n: int, parts: int) -> list[int]:
    """n split into ``parts`` sizes differing by at most one, larger first."""
    if parts < 1 or n < 0:
        raise ValueError(f"cannot split {n} into {parts} parts")
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def head_split(n_heads: int, degree: int) -> list[int]:
    """Query heads per device of a group; every device needs at least one head."""
    if degree > n_heads:
        raise ValueError(f"an SP group of {degree} devices needs at least {degree} query heads, the model has {n_heads}")
    return even_split(n_heads, degree)


def _offsets(sizes: Sequence[int]) -> list[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single on flat tensors; the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, send: list[int], recv: list[int], group: Any) -> Tensor:
        import torch.distributed as dist

        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty(sum(recv))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        import torch.distributed as dist

        out = grad.new_empty(sum(ctx.send))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


def all_to_all(x: Tensor, send: list[int], recv: list[int], group: Any) -> Tensor:
    """Differentiable all-to-all of a flat tensor: ``send[j]`` elements go to group rank j."""
    return _AllToAll.apply(x, send, recv, group)


def varlen_causal_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Sequence[int]) -> Tensor:
    """Causal attention inside each document of a packed stream. q, k, v: (T, H, D) -> (T, H, D)."""
    outs = []
    for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if e > s:
            qs, ks, vs = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)[0].transpose(0, 1))
    return torch.cat(outs, dim=0) if outs else q.new_zeros(q.shape)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Sequence[int], token_counts: Sequence[int],
                      rank: int, group: Any = None, attention: AttentionFn | None = None) -> Tensor:
    """Attention of this device's tokens of a group's packed stream, computed across the group.

    q: (t, H, D), k/v: (t, H_kv, D) for this device's ``token_counts[rank]`` tokens (after RoPE);
    ``cu_seqlens``: document offsets in the whole packed stream (sum(token_counts) tokens);
    ``group``: the process group of the ``len(token_counts)`` devices (None for one device).
    Returns (t, H, D): what single-device causal attention over each document gives for these tokens.
    """
    attention = attention or varlen_causal_attention
    d = len(token_counts)
    t, H, D = q.shape
    Hkv = k.shape[1]
    if H % Hkv:
        raise ValueError(f"{H} query heads are not a multiple of {Hkv} K/V heads")
    if t != token_counts[rank] or k.shape[0] != t or v.shape != k.shape:
        raise ValueError(f"device {rank} holds {t} tokens, token_counts says {token_counts[rank]} "
                         f"(q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)})")
    rep = H // Hkv
    if d == 1:
        return attention(q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), cu_seqlens)
    hq = head_split(H, d)
    qo = _offsets(hq)
    kv_lo = [qo[j] // rep for j in range(d)]  # K/V heads device j needs: [kv_lo, kv_hi)
    kv_hi = [(qo[j + 1] - 1) // rep + 1 for j in range(d)]
    width = [hq[j] + 2 * (kv_hi[j] - kv_lo[j]) for j in range(d)]  # heads sent to device j per token
    parts = []
    for j in range(d):
        parts.append(torch.cat((q[:, qo[j]:qo[j + 1]], k[:, kv_lo[j]:kv_hi[j]], v[:, kv_lo[j]:kv_hi[j]]), dim=1).reshape(-1))
    send = [t * width[j] * D for j in range(d)]
    recv = [token_counts[i] * width[rank] * D for i in range(d)]
    got = all_to_all(torch.cat(parts), send, recv, group)
    full = got.view(-1, width[rank], D)  # all tokens of the stream in device order = stream order
    nk = kv_hi[rank] - kv_lo[rank]
    qf, kf, vf = full[:, :hq[rank]], full[:, hq[rank]:hq[rank] + nk], full[:, hq[rank] + nk:]
    idx = torch.tensor([(qo[rank] + i) // rep - kv_lo[rank] for i in range(hq[rank])], device=q.device)
    out = attention(qf, kf.index_select(1, idx), vf.index_select(1, idx), cu_seqlens)  # (T, hq_r, D)
    to = _offsets(token_counts)
    back = torch.cat([out[to[i]:to[i + 1]].reshape(-1) for i in range(d)])
    send_b = [token_counts[i] * hq[rank] * D for i in range(d)]
    recv_b = [t * hq[j] * D for j in range(d)]
    mine = all_to_all(back, send_b, recv_b, group)
    chunks = torch.split(mine, recv_b)
    return torch.cat([c.view(t, hq[j], D) for j, c in enumerate(chunks)], dim=1)
