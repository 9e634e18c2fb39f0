"""Direction check: a contribution that pulls against the others' consensus is set aside.

Bounds on size (``robust``: the norm; ``coords``: each coordinate) still let a frame of honest size
point the wrong way: one member sending its own pseudo-gradient negated at 1.9× the median norm
was kept every round and tripled the aggregate's deviation. Honest replicas train on the same
objective, so each one's pseudo-gradient agrees with the sum of the others' (cosine 0.15–0.3 in
the honest runs of ``bench/hostile.py``); a sign-flipped one disagrees by as much.

``direction_check`` works on the Gram matrix of the round's (coordinate-bounded) contributions —
G[i][j] = Σ over tensors of ⟨cᵢ, cⱼ⟩ in float64 — so every later step is exact small arithmetic:
the cosine of each active contribution to the sum of the other active ones (its leave-one-out
consensus); the lowest one, if below ``min_cos``, is set aside and the cosines recomputed without
it, at most ⌊(n − 1)/2⌋ times (a minority), never with fewer than 3 contributions (two that
disagree give no consensus). ``min_cos`` ≤ 0 by default: a replica whose direction is merely
unrelated to the others' (an honest outlier, other data) is never set aside, only one that pulls
against them. The check is per round, from that round's frames alone, so every replica — also one
restarted without history — sets aside exactly the same members.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

from distrain.comm.coords import Decoded

Member = Hashable


@dataclass(frozen=True)
class DirectionPolicy:
    """``min_cos``: a contribution whose cosine to the others' sum is below this is set aside."""

    min_cos: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.min_cos, bool) or not isinstance(self.min_cos, (int, float)) \
                or not -1.0 <= self.min_cos <= 1.0:
            raise ValueError(f"direction min_cos must be a number in [-1, 1], got {self.min_cos!r}")


@dataclass(frozen=True)
class Verdict:
    """One member's direction this round: its cosine to the others' consensus (nan: not judged)
    and its weight (1: kept, 0: set aside)."""

    member: Member
    cosine: float
    weight: float
    reason: str = ""


def gram(tensors: Sequence[Sequence[Decoded]], numels: Sequence[int]) -> list[list[float]]:
    """G[i][j] = Σ over tensors of ⟨cᵢ, cⱼ⟩, float64, on the CPU. ``tensors[t][i]``: contribution i's
    decoded tensor t. One dense float64 buffer of one tensor at a time."""
    n = len(tensors[0]) if tensors else 0
    g = torch.zeros(n, n, dtype=torch.float64)
    for parts, numel in zip(tensors, numels):
        cpu = [(gi.cpu(), v.cpu().to(torch.float64)) for gi, v in parts]
        for j, (gj, vj) in enumerate(cpu):
            dense = torch.zeros(numel, dtype=torch.float64)
            dense[gj] = vj
            for i in range(j, n):
                gi, vi = cpu[i]
                g[i, j] += torch.dot(dense[gi], vi)
    g = torch.tril(g) + torch.tril(g, -1).T
    return g.tolist()


def loo_cosines(g: Sequence[Sequence[float]], active: Sequence[int]) -> dict[int, float]:
    """Cosine of each active contribution to the sum of the other active ones (nan when either has
    no length)."""
    out: dict[int, float] = {}
    for i in active:
        others = [j for j in active if j != i]
        dot = sum(g[i][j] for j in others)
        loo = sum(g[j][k] for j in others for k in others)
        norm = g[i][i] * loo
        out[i] = dot / math.sqrt(norm) if norm > 0 else float("nan")
    return out


def direction_check(members: Sequence[Member], g: Sequence[Sequence[float]],
                    policy: DirectionPolicy | None = None) -> list[Verdict]:
    """One verdict per member (in order); see the module docstring for the rule."""
    policy = policy or DirectionPolicy()
    n = len(members)
    active = list(range(n))
    aside: dict[int, float] = {}
    last: dict[int, float] = {i: float("nan") for i in active}
    while n >= 3 and len(aside) < (n - 1) // 2:
        cos = loo_cosines(g, active)
        last.update(cos)
        judged = [(c, i) for i, c in cos.items() if not math.isnan(c)]
        if not judged:
            break
        worst_cos, worst = min(judged)  # ties: the lower index
        if not worst_cos < policy.min_cos:
            break
        aside[worst] = worst_cos
        active.remove(worst)
    if aside:  # the kept members' cosines to the consensus they now form
        last.update(loo_cosines(g, active))
    out = []
    for i, m in enumerate(members):
        if i in aside:
            out.append(Verdict(m, aside[i], 0.0, f"member {m}: direction disagrees with the others' "
                                                 f"(cosine {aside[i]:.3f} < {policy.min_cos:g}), set aside"))
        else:
            out.append(Verdict(m, last[i], 1.0))
    return out
