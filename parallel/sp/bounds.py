"""A tighter lower bound on the makespan of any plan: the planning problem with fractions allowed.

Why: ``sp_cost.lower_bound`` is cheap (the planner calls it every step to stop early) but blind to
memory: when a long sequence forces a big group whose links are slow, that group's devices can
only do the rest of their work at the big group's all-to-all rate, and memory stops the others
from taking it all. Benchmarks that say "within x % of the bound" need a bound that sees this.

For a makespan M, the relaxation asks for n_t >= 0 groups of each type t = (speed class c,
degree d) (fractional counts) and fractions x[s, t] of each sequence:
    sum_t x[s, t] = 1                                                each sequence placed
    sum over types of speed >= v_c of d_t · n_t <= devices of speed >= v_c   (a group runs at
        its slowest member's speed, so faster devices may serve slower types)
    sum_s x[s, t] · tau[s, t] + beta1 / v_t · n_t <= M · n_t          time of the type's groups
    sum_s x[s, t] · s <= d_t · C_t · n_t                             their memory
    x[s, t] <= n_t                                                   a sequence needs a whole group
    x[s, t] = 0 where s alone in one group of type t needs more than M or does not fit
Every plan of makespan M gives a feasible point (counts and 0/1 fractions), so the smallest M
that is feasible is a lower bound; it is found by bisection, each step one LP (HiGHS via scipy).
C_t is the largest capacity among devices of speed >= v_c (optimistic, hence still a bound).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from distrain.parallel.sp.cost import SPCosts, device_capacities, device_speeds, lower_bound


def _types(n: int, speeds: Sequence[float] | None, capacity, degrees: Sequence[int]):
    v = device_speeds(n, speeds)
    c = device_capacities(n, capacity)
    classes = sorted({round(float(x), 9) for x in v}, reverse=True)
    types = []  # (class index, degree, speed, capacity per device)
    avail = []  # devices of speed >= class speed
    for ci, sp in enumerate(classes):
        faster = v >= sp - 1e-12
        avail.append(int(faster.sum()))
        cap = float(c[faster].max())
        types += [(ci, d, sp, cap) for d in sorted(set(degrees)) if 1 <= d <= avail[-1]]
    return classes, avail, types


def _feasible(m: float, s: np.ndarray, costs: SPCosts, classes, avail, types) -> bool:
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    B, T = s.size, len(types)
    tau = np.stack([costs.seq_s(s, d, sp) for _, d, sp, _ in types], axis=1)  # (B, T)
    oh = np.array([costs.beta1 / sp for _, _, sp, _ in types])
    room = np.array([d * cap for _, d, _, cap in types])
    ok = (tau + oh[None, :] <= m * (1 + 1e-12)) & (s[:, None] <= room[None, :])
    if not ok.any(axis=1).all():
        return False
    ks, ts = np.nonzero(ok)
    nx = ks.size  # x variables first, then n_t
    rows, cols, vals = [], [], []
    b_ub, b_eq = [], np.ones(B)
    # equality: each sequence placed
    eq = coo_matrix((np.ones(nx), (ks, np.arange(nx))), shape=(B, nx + T))
    r = 0
    for ci in range(len(classes)):  # nested device counts
        for t, (cj, d, _, _) in enumerate(types):
            if cj <= ci:
                rows.append(r)
                cols.append(nx + t)
                vals.append(float(d))
        b_ub.append(float(avail[ci]))
        r += 1
    for t in range(T):
        mine = np.flatnonzero(ts == t)
        rows += [r] * mine.size + [r]
        cols += mine.tolist() + [nx + t]
        vals += tau[ks[mine], t].tolist() + [oh[t] - m]
        b_ub.append(0.0)
        r += 1
        if math.isfinite(room[t]):
            rows += [r] * mine.size + [r]
            cols += mine.tolist() + [nx + t]
            vals += s[ks[mine]].tolist() + [-room[t]]
            b_ub.append(0.0)
            r += 1
    # a sequence placed in a type means at least one whole group of it: x[s, t] <= n_t
    rows += np.repeat(np.arange(r, r + nx), 2).tolist()
    cols += np.stack([np.arange(nx), nx + ts], axis=1).reshape(-1).tolist()
    vals += [1.0, -1.0] * nx
    b_ub += [0.0] * nx
    r += nx
    ub = coo_matrix((vals, (rows, cols)), shape=(r, nx + T))
    res = linprog(np.zeros(nx + T), A_ub=ub.tocsr(), b_ub=np.array(b_ub), A_eq=eq.tocsr(), b_eq=b_eq,
                  bounds=[(0, 1)] * nx + [(0, None)] * T, method="highs")
    return res.status == 0


def relaxed_lower_bound(lengths: Sequence[int], costs: SPCosts, n_devices: int, degrees: Sequence[int],
                        speeds: Sequence[float] | None = None, capacity: float | Sequence[float] | None = None,
                        upper: float | None = None, rel_tol: float = 1e-3) -> float:
    """The relaxation's bound (module docstring), never below ``sp_cost.lower_bound``; ``upper``: a
    makespan known to be feasible (a plan's), to start the bisection from."""
    s = np.asarray(lengths, dtype=np.float64)
    lo = lower_bound(lengths, costs, n_devices, degrees, speeds, capacity)
    if s.size == 0 or not math.isfinite(lo):
        return lo
    classes, avail, types = _types(n_devices, speeds, capacity, degrees)
    hi = upper if upper is not None and upper >= lo else None
    if hi is None:
        hi = 2 * lo
        while not _feasible(hi, s, costs, classes, avail, types):
            hi *= 2
            if hi > 1e6 * lo:
                return lo
    if _feasible(lo, s, costs, classes, avail, types):
        return lo
    while hi - lo > rel_tol * lo:
        mid = 0.5 * (lo + hi)
        if _feasible(mid, s, costs, classes, avail, types):
            hi = mid
        else:
            lo = mid
    return float(lo)
