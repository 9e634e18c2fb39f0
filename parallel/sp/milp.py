"""The FlexSP mixed-integer program over bucketed lengths, solved by HiGHS (highspy, or scipy's copy).

Why a separate module: the planner's heuristics and the solver interface change for different
reasons; this file only turns counts, times and capacities into a MILP and back.

Variables: M (makespan); per group slot j, used[j] ∈ {0, 1}; per (bucket b, slot j) where a
sequence of b fits the slot's memory, x[b, j] ∈ {0..n_b} sequences. Minimise M subject to
    sum_j x[b, j] = n_b                                    every sequence placed once
    sum_{j in class c} d_j · used[j] <= devices of c       device counts
    sum_b s_b · x[b, j] <= room_j · used[j]                memory (s_b: the bucket's mean tokens), links x to used
    x[b, j] = 0 where b's longest sequence exceeds room_j
    overhead_j · used[j] + sum_b t[b, j] · x[b, j] <= M    group time
    used[j+1] <= used[j],  tokens[j+1] <= tokens[j]        for consecutive slots of one type (symmetry)
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Slot:
    type: int  # index into the planner's (class, degree) types
    cls: int
    degree: int
    k: int  # k-th slot of its type


_HIGHSPY: bool | None = None
_LOCK = threading.Lock()


def _have_highspy() -> bool:
    """Whether highspy imports; its first ``Highs()`` prints a banner on the C stdout, which would corrupt
    JSON output (``distrain plan-sp --json``), so that first instance is made with fd 1 sent to stderr."""
    global _HIGHSPY
    with _LOCK:
        if _HIGHSPY is None:
            try:
                import highspy
            except ImportError:
                _HIGHSPY = False
                return False
            sys.stdout.flush()
            saved = os.dup(1)
            try:
                os.dup2(2, 1)
                highspy.Highs()
            finally:
                os.dup2(saved, 1)
                os.close(saved)
            _HIGHSPY = True
    return _HIGHSPY


def solve_milp(*, slots: list[Slot], counts: np.ndarray, bucket_max: np.ndarray, bucket_tokens: np.ndarray,
               bucket_time: np.ndarray, overhead: np.ndarray, room: np.ndarray, slot_room: np.ndarray,
               class_devices: list[int], warm: np.ndarray | None,
               deadline: float, solver: str = "auto", mip_gap: float = 1e-4,
               m_lower: float = 0.0) -> tuple[np.ndarray, str, float] | None:
    """(x of shape (n_buckets, n_slots), "optimal" | "time_limit", makespan of x in the model), or None
    without a solution in time.

    ``deadline`` is a ``time.perf_counter()`` instant: building the model counts against it too.
    ``bucket_max`` decides which slots a bucket may use at all (its longest sequence fits the type's
    ``room``); ``bucket_tokens`` and ``slot_room`` are the memory rows; ``bucket_time[b, type]`` the
    seconds one sequence of b adds to a group of that type.
    """
    nb, S = counts.size, len(slots)
    if S == 0:
        return None
    types = np.array([s.type for s in slots])
    fin = np.isfinite(room[types])
    pairs = [(b, j) for j in range(S) for b in range(nb) if counts[b] > 0 and bucket_max[b] <= room[types[j]]]
    pidx = {bj: 1 + S + i for i, bj in enumerate(pairs)}  # column of x[b, j]; column 0 is M, 1..S used
    n_col = 1 + S + len(pairs)

    rows, cols, vals, lo, hi = [], [], [], [], []

    def row(entries: list[tuple[int, float]], lb: float, ub: float) -> None:
        r = len(lo)
        for c, v in entries:
            rows.append(r)
            cols.append(c)
            vals.append(v)
        lo.append(lb)
        hi.append(ub)

    by_slot: dict[int, list[tuple[int, int]]] = {}
    for b, j in pairs:
        by_slot.setdefault(j, []).append((b, pidx[(b, j)]))
    for b in range(nb):
        if counts[b] > 0:
            row([(pidx[(b, j)], 1.0) for bb, j in pairs if bb == b], float(counts[b]), float(counts[b]))
    for c, n in enumerate(class_devices):
        mine = [(1 + j, float(s.degree)) for j, s in enumerate(slots) if s.cls == c]
        if mine:
            row(mine, -math.inf, float(n))
    total = float(counts.sum())
    for j in range(S):
        xs = by_slot.get(j, [])
        if fin[j]:
            row([(c, float(bucket_tokens[b])) for b, c in xs] + [(1 + j, -float(slot_room[j]))], -math.inf, 0.0)
        else:
            row([(c, 1.0) for _, c in xs] + [(1 + j, -total)], -math.inf, 0.0)
        row([(c, float(bucket_time[b, types[j]])) for b, c in xs] + [(1 + j, float(overhead[types[j]])), (0, -1.0)],
            -math.inf, 0.0)
    for j in range(S - 1):
        if slots[j + 1].type == slots[j].type:
            row([(1 + j + 1, 1.0), (1 + j, -1.0)], -math.inf, 0.0)
            nxt = dict(by_slot.get(j + 1, []))
            cur = dict(by_slot.get(j, []))
            row([(c, float(bucket_tokens[b])) for b, c in nxt.items()] + [(c, -float(bucket_tokens[b])) for b, c in cur.items()],
                -math.inf, 0.0)

    col_lo = np.zeros(n_col)
    col_hi = np.empty(n_col)
    col_lo[0], col_hi[0] = max(0.0, m_lower), math.inf
    col_hi[1:1 + S] = 1.0
    for (b, _), c in pidx.items():
        col_hi[c] = float(counts[b])
    integrality = np.ones(n_col, dtype=np.int32)
    integrality[0] = 0
    cost = np.zeros(n_col)
    cost[0] = 1.0

    start = None
    if warm is not None:
        start = np.zeros(n_col)
        for j in range(S):
            used = warm[:, j].sum() > 0
            start[1 + j] = float(used)
        for (b, j), c in pidx.items():
            start[c] = warm[b, j]
        if any(warm[b, j] > 0 and (b, j) not in pidx for b in range(nb) for j in range(S)):
            start = None
        else:
            t = [overhead[types[j]] * start[1 + j] + sum(bucket_time[b, types[j]] * warm[b, j] for b in range(nb))
                 for j in range(S)]
            start[0] = max(t)

    from scipy.sparse import csc_matrix

    A = csc_matrix((vals, (rows, cols)), shape=(len(lo), n_col))
    time_limit_s = deadline - time.perf_counter()
    if time_limit_s < 0.02:
        return None
    use_highspy = (solver == "highspy" or solver == "auto") and _have_highspy()
    if solver == "highspy" and not use_highspy:
        raise ImportError("solver = 'highspy' but highspy is not installed (pip install highspy)")
    if use_highspy:
        x, status = _solve_highspy(A, np.array(lo), np.array(hi), cost, col_lo, col_hi, integrality, start,
                                   time_limit_s, mip_gap)
    else:
        if start is not None:
            col_hi[0] = start[0] * (1 + 1e-9)  # no warm start in scipy: the candidate's makespan is a cutoff
        x, status = _solve_scipy(A, np.array(lo), np.array(hi), cost, col_lo, col_hi, integrality, time_limit_s, mip_gap)
    if x is None:
        return None
    out = np.zeros((nb, S))
    for (b, j), c in pidx.items():
        out[b, j] = round(x[c])
    if not np.array_equal(out.sum(axis=1), counts.astype(np.float64)):
        return None  # numerically off solution: let the candidates stand
    return out, status, float(x[0])


def _solve_highspy(A, lo, hi, cost, col_lo, col_hi, integrality, start, time_limit_s, mip_gap):
    import highspy

    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(max(time_limit_s, 0.01)))
    h.setOptionValue("mip_rel_gap", float(mip_gap))
    h.setOptionValue("random_seed", 0)
    h.setOptionValue("threads", 1)
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = A.shape[1], A.shape[0]
    lp.col_cost_, lp.col_lower_, lp.col_upper_ = cost, col_lo, col_hi
    lp.row_lower_, lp.row_upper_ = lo, hi
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = A.indptr.astype(np.int32)
    lp.a_matrix_.index_ = A.indices.astype(np.int32)
    lp.a_matrix_.value_ = A.data.astype(np.float64)
    lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous for i in integrality]
    h.passModel(lp)
    if start is not None:
        sol = highspy.HighsSolution()
        sol.col_value = list(map(float, start))
        sol.value_valid = True
        h.setSolution(sol)
    h.run()
    ms = h.getModelStatus()
    info = h.getInfo()
    if info.primal_solution_status != 2:  # kSolutionStatusFeasible
        return None, None
    x = np.asarray(h.getSolution().col_value)
    if ms == highspy.HighsModelStatus.kOptimal:
        return x, "optimal"
    return x, "time_limit"


def _solve_scipy(A, lo, hi, cost, col_lo, col_hi, integrality, time_limit_s, mip_gap):
    from scipy.optimize import Bounds, LinearConstraint, milp

    res = milp(cost, constraints=LinearConstraint(A, lo, hi), integrality=integrality,
               bounds=Bounds(col_lo, col_hi),
               options={"time_limit": float(max(time_limit_s, 0.01)), "mip_rel_gap": float(mip_gap), "disp": False})
    if res.x is None:
        return None, None
    return np.asarray(res.x), "optimal" if res.status == 0 else "time_limit"
