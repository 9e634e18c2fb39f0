"""Per-step planner of heterogeneity-adaptive sequence parallelism: SP groups and who runs what.

Why: with long-tailed document lengths one static SP degree wastes devices — short documents pay
all-to-all traffic they do not need, long ones need many devices' memory. Each step, the devices
of a replica are split into groups of mixed sizes and every sequence goes to one group so that
the step's makespan (``distrain.parallel.sp.cost``'s formula) is smallest, subject to each group's memory.

How (``plan_step``):
1. Devices fall into classes of equal (speed, capacity); groups never mix classes (a mixed group
   runs at its slowest member's speed, so this loses little), except that classes are merged,
   nearest speeds first, when a sequence fits no single class's largest group. Inside a class a
   group is any allowed degree (1 and non-powers of two included).
2. Lengths are bucketed (a dynamic program minimising the extra modelled compute of rounding each
   length up to its bucket's maximum; exact when there are no more distinct lengths than buckets).
3. Candidate plans: the best homogeneous plan (one degree everywhere, longest-first assignment)
   and a greedy one (longest first, open the cheapest group that meets a target makespan,
   binary-searched on the target); both are refined by local search (moves and swaps off the
   critical group).
4. A MILP over bucket counts (FlexSP's formulation: x[b,g] sequences of bucket b in group slot g,
   used[g], makespan M; every sequence placed once, per-class device counts, group memory, group
   time <= M; slots of one type ordered to cut symmetry) solved by HiGHS under a time limit and
   warm-started from the best candidate: with highspy the candidate is handed to the solver as
   its first incumbent (``setSolution``); without highspy, scipy's HiGHS gets no warm start, so
   the candidate's makespan becomes the upper bound of M instead (a cutoff).
5. The MILP's counts are turned back into sequences (longest first into the least-loaded slot of
   that bucket where it fits; sequences left over memory are moved by a repair pass), refined by
   the same local search, and the best plan by the exact formula wins. A MILP solution no better
   than its warm start keeps the warm start's sequences.

status: "optimal" when the MILP was proved optimal (over bucketed lengths), "time_limit" when it
stopped at the limit with a solution, "greedy" when it was not run or found none in time (the
candidates are then the plan). ``predicted_step_s`` is always ``sp_cost.makespan`` of the plan.

The plan type, planning one step ahead in a background thread and sending the leader's plan to
every rank are in ``distrain.parallel.sp.plan``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from distrain.parallel.sp.cost import SPCosts, lower_bound, makespan
from distrain.parallel.sp.milp import Slot, solve_milp
from distrain.parallel.sp.plan import PlanError, SequenceTooLongError, SPPlan
from distrain.parallel.sp.search import (
    DeviceClass,
    Draft,
    Problem,
    device_classes,
    draft_makespan,
    greedy_draft,
    homogeneous_draft,
    loads,
    make_problem,
    merge_nearest,
    refine_draft,
)

# ---- bucketing --------------------------------------------------------------------------------


def bucket_lengths(lengths: np.ndarray, n_buckets: int, cost: Callable[[np.ndarray], np.ndarray],
                   breaks: Sequence[float] = ()) -> np.ndarray:
    """Bucket index of every length; buckets are ranges of sorted lengths chosen by a DP that
    minimises sum over sequences of cost(bucket max) - cost(length). No bucket straddles a value of
    ``breaks`` (the group capacities: a bucket fits a group type wholly or not at all), which can
    add buckets. Exact (one length a bucket) when there are at most ``n_buckets`` distinct lengths."""
    u, inv, cnt = np.unique(lengths, return_inverse=True, return_counts=True)
    U = u.size
    if U <= n_buckets:
        return inv
    cuts_at = sorted({int(np.searchsorted(u, r, side="right")) for r in breaks if np.isfinite(r)} - {0, U})
    n_buckets = max(n_buckets, len(cuts_at) + 1)
    f = cost(u.astype(np.float64))
    C = np.concatenate(([0.0], np.cumsum(cnt)))
    F = np.concatenate(([0.0], np.cumsum(cnt * f)))
    # seg[i, j]: cost of one bucket holding distinct lengths i..j-1 (i < j)
    i_idx = np.arange(U + 1)[:, None]
    j_idx = np.arange(U + 1)[None, :]
    fj = np.concatenate(([0.0], f))[None, :]
    seg = fj * (C[None, :] - C[:, None]) - (F[None, :] - F[:, None])
    seg = np.where(i_idx < j_idx, seg, np.inf)
    for q in cuts_at:  # distinct lengths q-1 and q lie on either side of a break
        seg[:q, q + 1:] = np.inf
    dp = seg[0].copy()  # one bucket covering 0..j-1
    arg = np.zeros((n_buckets, U + 1), dtype=np.int64)
    for b in range(1, n_buckets):
        tot = dp[:, None] + seg
        arg[b] = np.argmin(tot, axis=0)
        dp = tot[arg[b], np.arange(U + 1)]
    cuts, j = [], U
    for b in range(n_buckets - 1, 0, -1):
        i = int(arg[b][j])
        cuts.append(i)
        j = i
    edges = np.array(sorted(set(cuts) - {0}) + [U])
    of_distinct = np.searchsorted(edges, np.arange(U), side="right")
    return of_distinct[inv]


# ---- MILP -------------------------------------------------------------------------------------


def _milp_draft(p: Problem, warm: Draft | None, n_buckets: int, deadline: float, solver: str,
                mip_gap: float, m_lower: float = 0.0) -> Draft | None:
    bucket = bucket_lengths(p.lengths, n_buckets, lambda s: p.costs.seq_s(s, 1), breaks=p.room.tolist())
    nb = int(bucket.max()) + 1
    counts = np.bincount(bucket, minlength=nb)
    members = [np.flatnonzero(bucket == b) for b in range(nb)]
    bmax = np.array([p.lengths[m].max() for m in members], dtype=np.float64)
    # A bucket's sequence costs the mean time and tokens of its members (exact when a bucket is placed
    # whole, and when buckets are single lengths); whether it may go to a group at all uses the maximum.
    bmean = np.array([p.lengths[m].mean() for m in members])
    btime = np.stack([p.times[m].mean(axis=0) for m in members])
    slots: list[Slot] = []
    for t, (ci, d) in enumerate(p.types):
        n_slots = min(len(p.classes[ci].devices) // d, int(counts[bmax <= p.room[t]].sum()))
        slots += [Slot(t, ci, d, k) for k in range(n_slots)]
    slot_room = np.array([p.room[s.type] for s in slots])
    warm_x = _warm_counts(p, warm, slots, bucket, nb, bmean) if warm is not None else None
    if warm_x is not None:  # mean tokens can exceed a full group's real ones: let the warm start stand
        slot_room = np.maximum(slot_room, warm_x.T @ bmean)
    res = solve_milp(
        slots=slots, counts=counts, bucket_max=bmax, bucket_tokens=bmean, bucket_time=btime,
        overhead=p.overhead, room=p.room, slot_room=slot_room, class_devices=[len(c.devices) for c in p.classes],
        warm=warm_x, deadline=deadline, solver=solver, mip_gap=mip_gap, m_lower=m_lower,
    )
    if res is None:
        return None
    x, status, objective = res  # x: (nb, n_slots) integer counts
    if warm_x is not None and objective >= _model_makespan(warm_x, btime, p, slots) * (1 - 1e-6):
        return Draft(warm.gtype, warm.assignment, status)  # no better than the warm start: keep its sequences
    gtype = np.array([s.type for s in slots])
    room = p.room[gtype]
    asg = np.empty(p.lengths.size, dtype=np.int64)
    tok, load = np.zeros(len(slots)), np.where(x.sum(axis=0) > 0, p.overhead[gtype], 0.0)
    for b in np.argsort(-bmax):  # longest first, to the least-loaded slot with quota where it fits
        quota = x[b].astype(np.int64).copy()
        for k in members[b][np.argsort(-p.lengths[members[b]], kind="stable")]:
            cand = np.flatnonzero(quota > 0)
            fit = cand[room[cand] - tok[cand] >= p.lengths[k]]
            g = int(fit[np.argmin(load[fit])]) if fit.size else int(cand[np.argmax(room[cand] - tok[cand])])
            asg[k] = g
            quota[g] -= 1
            tok[g] += p.lengths[k]
            load[g] += p.times[k, gtype[g]]
    used = np.flatnonzero(x.sum(axis=0) > 0)
    remap = -np.ones(len(slots), dtype=np.int64)
    remap[used] = np.arange(used.size)
    return _repair(p, Draft([int(gtype[g]) for g in used], remap[asg], status))


def _model_makespan(x: np.ndarray, btime: np.ndarray, p: Problem, slots: list[Slot]) -> float:
    t = np.array([s.type for s in slots])
    used = x.sum(axis=0) > 0
    return float(np.max(np.where(used, p.overhead[t] + (x * btime[:, t]).sum(axis=0), 0.0)))


def _repair(p: Problem, d: Draft) -> Draft | None:
    """Move sequences off groups over their memory (cheapest move first); None if that is impossible."""
    gt = np.asarray(d.gtype)
    asg = d.assignment.copy()
    load, tok, count = loads(p, d.gtype, asg)
    room, oh = p.room[gt], p.overhead[gt]
    for _ in range(asg.size + 1):
        over = np.flatnonzero(tok > room)
        if over.size == 0:
            return Draft(d.gtype, asg, d.milp_status)
        g = int(over[0])
        mine = np.flatnonzero(asg == g)
        after = load[None, :] + p.times[mine][:, gt] + np.where(count > 0, 0.0, oh)[None, :]
        after[tok[None, :] + p.lengths[mine][:, None] > room[None, :]] = np.inf
        after[:, g] = np.inf
        i, h = np.unravel_index(np.argmin(after), after.shape)
        if not np.isfinite(after[i, h]):
            return None
        k = mine[i]
        asg[k] = h
        load[h] = after[i, h]
        load[g] -= p.times[k, gt[g]] + (oh[g] if count[g] == 1 else 0.0)
        tok[g] -= p.lengths[k]
        tok[h] += p.lengths[k]
        count[g] -= 1
        count[h] += 1
    return None


def _warm_counts(p: Problem, warm: Draft, slots: list[Slot], bucket: np.ndarray, nb: int,
                 bmean: np.ndarray) -> np.ndarray | None:
    """The candidate as bucket counts per slot, slots of a type filled by tokens descending (the MILP's
    symmetry order); None if it has more groups of a type than the MILP has slots."""
    x = np.zeros((nb, len(slots)))
    by_type: dict[int, list[int]] = {}
    for j, s in enumerate(slots):
        by_type.setdefault(s.type, []).append(j)
    used = sorted({int(g) for g in warm.assignment})
    for t in {warm.gtype[g] for g in used}:
        cols = [np.bincount(bucket[warm.assignment == g], minlength=nb) for g in used if warm.gtype[g] == t]
        cols.sort(key=lambda c: -float(c @ bmean))
        free = by_type.get(t, [])
        if len(cols) > len(free):
            return None
        for c, j in zip(cols, free):
            x[:, j] = c
    return x


# ---- layout and the entry point ---------------------------------------------------------------


def _layout(p: Problem, d: Draft, status: str, solve_s: float) -> SPPlan:
    """Device ids: inside each class, groups by degree descending on consecutive devices (aligned blocks
    when degrees are powers of two and classes fill whole nodes). Groups without sequences are dropped."""
    used = sorted({int(g) for g in d.assignment})
    order = sorted(used, key=lambda g: (p.types[d.gtype[g]][0], -p.types[d.gtype[g]][1], g))
    nxt = [0] * len(p.classes)
    groups, index = [], {}
    for g in order:
        ci, deg = p.types[d.gtype[g]]
        devs = p.classes[ci].devices
        groups.append(devs[nxt[ci]: nxt[ci] + deg])
        nxt[ci] += deg
        index[g] = len(groups) - 1
    asg = [index[int(g)] for g in d.assignment]
    return SPPlan(groups, asg, 0.0, status, solve_s)


def _validate(lengths: Sequence[int], n_devices: int, degrees: Sequence[int] | None) -> tuple[np.ndarray, list[int]]:
    if isinstance(n_devices, bool) or not isinstance(n_devices, (int, np.integer)) or n_devices < 1:
        raise PlanError(f"n_devices must be a positive integer, got {n_devices!r}")
    lens = np.asarray(lengths)
    if lens.ndim != 1 or lens.size == 0:
        raise PlanError("lengths must be a non-empty list of sequence lengths")
    if not np.issubdtype(lens.dtype, np.integer) or lens.min() < 1:
        bad = next(i for i, s in enumerate(lengths) if not float(s).is_integer() or s < 1)
        raise PlanError(f"sequence {bad} has length {lengths[bad]!r}; lengths must be positive integers")
    degs = sorted({int(d) for d in (degrees if degrees is not None else range(1, n_devices + 1)) if 1 <= d <= n_devices})
    if not degs:
        raise PlanError(f"no allowed group size fits {n_devices} devices (degrees {list(degrees or [])})")
    return lens.astype(np.int64), degs


def _check_fits(lens: np.ndarray, classes: list[DeviceClass], degrees: list[int]) -> list[DeviceClass]:
    """Merge classes until every sequence fits some group; else name the first sequence that fits none."""
    def room(cs: list[DeviceClass]) -> float:
        return max(max((d for d in degrees if d <= len(c.devices)), default=0) * c.capacity for c in cs)

    while lens.max() > room(classes) and len(classes) > 1:
        classes = merge_nearest(classes)
    biggest = room(classes)
    if lens.max() > biggest:
        k = int(np.argmax(lens > biggest))
        raise SequenceTooLongError(
            f"sequence {k} has {int(lens[k])} tokens, more than the largest group can hold ({biggest:.0f} tokens: "
            f"{max(d for d in degrees if d <= len(classes[0].devices))} devices x {classes[0].capacity:.0f}); "
            "cut sequences shorter (data.max_doc_len; plan-sp --max-len) or give the devices more capacity")
    total = float(lens.sum())
    cap_all = sum(len(c.devices) * c.capacity for c in classes)
    if total > cap_all:
        raise PlanError(f"the batch has {int(total)} tokens, more than all devices hold together ({cap_all:.0f}); "
                        "make the batch smaller (data.batch_tokens; plan-sp --batch)")
    return classes


def plan_step(lengths: Sequence[int], n_devices: int, costs: SPCosts, *, degrees: Sequence[int] | None = None,
              speeds: Sequence[float] | None = None, capacity: float | Sequence[float] | None = None,
              time_limit_s: float = 1.0, n_buckets: int = 16, solver: str = "auto", mip_gap: float = 1e-4,
              max_classes: int = 4) -> SPPlan:
    """The plan for one global batch (see the module docstring). ``degrees``: allowed group sizes
    (default 1..n_devices; for a model, ``allowed_degrees(n_heads, n)``); ``speeds``/``capacity``:
    per device (capacity in tokens, a number for all). ``solver``: auto | highspy | scipy | greedy."""
    if solver not in ("auto", "highspy", "scipy", "greedy"):
        raise PlanError(f"solver {solver!r} is not one of auto, highspy, scipy, greedy")
    t0 = time.perf_counter()
    lens, degs = _validate(lengths, n_devices, degrees)
    classes = _check_fits(lens, device_classes(n_devices, speeds, capacity, max_classes), degs)
    p = make_problem(lens, costs, classes, degs)
    deadline = t0 + time_limit_s
    cands = [d for d in (homogeneous_draft(p, k) for k in degs) if d is not None]
    best_h = min(cands, key=lambda d: draft_makespan(p, d), default=None)
    hi = draft_makespan(p, best_h) if best_h is not None else math.inf
    lo = _lower_bound_of(p, n_devices, degs)
    g = greedy_draft(p, lo, hi)
    pool = [d for d in (best_h, g) if d is not None]
    pool = [refine_draft(p, d, deadline=deadline) for d in pool]
    if not pool:
        raise PlanError("no plan found: the batch fits no combination of groups (memory)")
    warm = min(pool, key=lambda d: draft_makespan(p, d))
    status = "greedy"
    if solver != "greedy" and draft_makespan(p, warm) <= lo * (1 + mip_gap):
        status = "optimal"  # the candidate meets the lower bound: nothing left to search
    elif solver != "greedy" and deadline - time.perf_counter() > 0.05:
        m = _milp_draft(p, warm, n_buckets, deadline - 0.02, solver, mip_gap, lo)
        if m is not None:
            status = m.milp_status
            pool.append(refine_draft(p, m, deadline=deadline + 0.05))
    best = min(pool, key=lambda d: draft_makespan(p, d))
    plan = _layout(p, best, status, 0.0)
    plan.predicted_step_s = makespan(plan.groups, plan.assignment, lens, costs, speeds, n_devices)
    plan.solve_s = time.perf_counter() - t0
    return plan


def _lower_bound_of(p: Problem, n_devices: int, degrees: list[int]) -> float:
    """``sp_cost.lower_bound`` of the classes' problem (merged classes run at their slowest speed)."""
    speeds = [0.0] * n_devices
    caps = [0.0] * n_devices
    for c in p.classes:
        for i in c.devices:
            speeds[i], caps[i] = c.speed, c.capacity
    cap = None if all(math.isinf(x) for x in caps) else caps
    return lower_bound(p.lengths, p.costs, n_devices, degrees, speeds, cap)


def homogeneous_plan(lengths: Sequence[int], n_devices: int, costs: SPCosts, degree: int, *,
                     speeds: Sequence[float] | None = None, capacity: float | Sequence[float] | None = None,
                     refine: bool = True) -> SPPlan | None:
    """Every group of ``degree`` devices (as many as fit in each class), longest-first assignment refined
    by local search; None when the batch does not fit such groups."""
    lens, _ = _validate(lengths, n_devices, [degree])
    classes = device_classes(n_devices, speeds, capacity, max_classes=n_devices)
    if not any(len(c.devices) >= degree for c in classes):
        classes = [DeviceClass(list(range(n_devices)), min(c.speed for c in classes), min(c.capacity for c in classes))]
    p = make_problem(lens, costs, classes, [degree])
    d = homogeneous_draft(p, degree)
    if d is None:
        return None
    if refine:
        d = refine_draft(p, d)
    plan = _layout(p, d, "greedy", 0.0)
    plan.predicted_step_s = makespan(plan.groups, plan.assignment, lens, costs, speeds, n_devices)
    return plan


def best_homogeneous(lengths: Sequence[int], n_devices: int, costs: SPCosts, degrees: Sequence[int], *,
                     speeds: Sequence[float] | None = None, capacity: float | Sequence[float] | None = None
                     ) -> tuple[int, SPPlan] | None:
    """(degree, plan) of the fastest homogeneous plan over ``degrees``; None if none fits."""
    best = None
    for d in sorted(set(degrees)):
        if d > n_devices:
            continue
        plan = homogeneous_plan(lengths, n_devices, costs, d, speeds=speeds, capacity=capacity)
        if plan is not None and (best is None or plan.predicted_step_s < best[1].predicted_step_s):
            best = (d, plan)
    return best


def allowed_degrees(n_heads: int, n_devices: int, uneven_heads: bool = False) -> list[int]:
    """Group sizes a model's heads allow: divisors of n_heads (balanced Ulysses), or any size up to
    n_heads with ``uneven_heads`` (``distrain.parallel.sp.ulysses`` supports it; the cost model assumes balance)."""
    if n_heads < 1 or n_devices < 1:
        raise PlanError(f"n_heads and n_devices must be >= 1, got {n_heads}, {n_devices}")
    top = min(n_heads, n_devices)
    return [d for d in range(1, top + 1) if uneven_heads or n_heads % d == 0]
