"""Per-step planner of heterogeneity-adaptive sequence parallelism: SP groups and who runs what.

Why: with long-tailed document lengths one static SP degree wastes devices — short documents pay
all-to-all traffic they do not need, long ones need many devices' memory. Each step, the devices
of a replica are split into groups of mixed sizes and every sequence goes to one group so that
the step's makespan (``parallel.sp_cost``'s formula) is smallest, subject to each group's memory.

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
every rank are in ``parallel.sp_plan``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from parallel.sp_cost import SPCosts, device_capacities, device_speeds, lower_bound, makespan
from parallel.sp_milp import Slot, solve_milp
from parallel.sp_plan import PlanError, SequenceTooLongError, SPPlan

# ---- device classes and abstract groups -------------------------------------------------------


@dataclass
class DeviceClass:
    devices: list[int]
    speed: float
    capacity: float  # tokens per device (inf: unlimited)


def device_classes(n_devices: int, speeds: Sequence[float] | None, capacity: float | Sequence[float] | None,
                   max_classes: int = 4) -> list[DeviceClass]:
    """Devices of equal speed and capacity, fastest first; more than ``max_classes`` are merged (nearest speeds)."""
    v, c = device_speeds(n_devices, speeds), device_capacities(n_devices, capacity)
    keys = sorted({(round(float(v[i]), 6), float(c[i])) for i in range(n_devices)}, key=lambda k: (-k[0], -k[1]))
    classes = [DeviceClass([i for i in range(n_devices) if (round(float(v[i]), 6), float(c[i])) == k], k[0], k[1])
               for k in keys]
    while len(classes) > max_classes:
        classes = merge_nearest(classes)
    return classes


def merge_nearest(classes: list[DeviceClass]) -> list[DeviceClass]:
    """Merge the two adjacent classes whose speeds are closest (ratio); the merged class takes the minima."""
    j = min(range(len(classes) - 1), key=lambda i: classes[i].speed / classes[i + 1].speed)
    a, b = classes[j], classes[j + 1]
    merged = DeviceClass(sorted(a.devices + b.devices), min(a.speed, b.speed), min(a.capacity, b.capacity))
    return classes[:j] + [merged] + classes[j + 2:]


@dataclass
class _Problem:
    """Lengths, classes and the per-(class, degree) sequence times shared by every stage."""

    lengths: np.ndarray
    costs: SPCosts
    classes: list[DeviceClass]
    types: list[tuple[int, int]]  # (class index, degree)
    times: np.ndarray  # (n_seq, n_types): seconds a sequence adds to a group of that type
    overhead: np.ndarray  # (n_types,): beta1 / speed
    room: np.ndarray  # (n_types,): tokens a group of that type holds

    def type_index(self, cls: int, d: int) -> int:
        return self.types.index((cls, d))


def _problem(lengths: np.ndarray, costs: SPCosts, classes: list[DeviceClass], degrees: Sequence[int]) -> _Problem:
    types = [(ci, d) for ci, c in enumerate(classes) for d in sorted(degrees) if d <= len(c.devices)]
    times = np.empty((lengths.size, len(types)))
    for t, (ci, d) in enumerate(types):
        times[:, t] = costs.seq_s(lengths, d, classes[ci].speed)
    overhead = np.array([costs.beta1 / classes[ci].speed for ci, _ in types])
    room = np.array([d * classes[ci].capacity for ci, d in types])
    return _Problem(lengths, costs, classes, types, times, overhead, room)


@dataclass
class _Draft:
    """A plan before device ids are laid out: group types and an assignment."""

    gtype: list[int]
    assignment: np.ndarray
    milp_status: str | None = None


def _loads(p: _Problem, gtype: list[int], asg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    G = len(gtype)
    cols = np.asarray(gtype)[asg] if asg.size else np.zeros(0, dtype=np.int64)
    t = p.times[np.arange(asg.size), cols] if asg.size else np.zeros(0)
    load = np.bincount(asg, weights=t, minlength=G)
    count = np.bincount(asg, minlength=G)
    tok = np.bincount(asg, weights=p.lengths, minlength=G)
    load = load + np.where(count > 0, p.overhead[gtype], 0.0)
    return load, tok, count


def _draft_makespan(p: _Problem, d: _Draft) -> float:
    return float(_loads(p, d.gtype, d.assignment)[0].max(initial=0.0))


# ---- candidates -------------------------------------------------------------------------------


def _assign_longest_first(p: _Problem, gtype: list[int], order: np.ndarray | None = None) -> np.ndarray | None:
    """Each sequence (longest first) to the group where it finishes earliest and fits; None if one fits nowhere."""
    G = len(gtype)
    gt = np.asarray(gtype)
    load, tok = np.zeros(G), np.zeros(G)
    used = np.zeros(G, dtype=bool)
    room = p.room[gt]
    oh = p.overhead[gt]
    asg = np.empty(p.lengths.size, dtype=np.int64)
    for k in (np.argsort(-p.lengths, kind="stable") if order is None else order):
        fin = load + p.times[k, gt] + np.where(used, 0.0, oh)
        fin[tok + p.lengths[k] > room] = np.inf
        g = int(np.argmin(fin))
        if not np.isfinite(fin[g]):
            return None
        asg[k], load[g], tok[g], used[g] = g, fin[g], tok[g] + p.lengths[k], True
    return asg


def _homogeneous(p: _Problem, d: int) -> _Draft | None:
    gtype = [p.type_index(ci, d) for ci, c in enumerate(p.classes) if d <= len(c.devices)
             for _ in range(len(c.devices) // d)]
    if not gtype:
        return None
    asg = _assign_longest_first(p, gtype)
    return None if asg is None else _Draft(gtype, asg)


def _greedy_at(p: _Problem, target: float, free: list[int]) -> _Draft | None:
    """Longest first: best-fit into an open group within ``target``, else open the cheapest group that meets it."""
    free = list(free)
    gtype: list[int] = []
    load: list[float] = []
    tok: list[float] = []
    asg = np.empty(p.lengths.size, dtype=np.int64)
    type_cls = np.array([ci for ci, _ in p.types])
    type_deg = np.array([d for _, d in p.types])
    for k in np.argsort(-p.lengths, kind="stable"):
        s = p.lengths[k]
        if gtype:
            gt = np.asarray(gtype)
            fin = np.asarray(load) + p.times[k, gt]
            ok = (fin <= target) & (np.asarray(tok) + s <= p.room[gt])
            if ok.any():
                g = int(np.flatnonzero(ok)[np.argmax(fin[ok])])  # best fit: the fullest group it fits
                asg[k], load[g], tok[g] = g, float(fin[g]), tok[g] + s
                continue
        fin_new = p.overhead + p.times[k]
        ok = (fin_new <= target) & (s <= p.room) & (type_deg <= np.asarray(free)[type_cls])
        if not ok.any():
            return None
        cand = np.flatnonzero(ok)
        t = int(cand[np.lexsort((fin_new[cand], type_deg[cand]))[0]])  # fewest devices, then fastest
        free[type_cls[t]] -= type_deg[t]
        gtype.append(t)
        load.append(float(fin_new[t]))
        tok.append(float(s))
        asg[k] = len(gtype) - 1
    # leftover devices become the smallest allowed groups, for the local search to use
    for ci, c in enumerate(p.classes):
        small = [t for t, (cj, d) in enumerate(p.types) if cj == ci]
        if small:
            t = min(small, key=lambda t: p.types[t][1])
            gtype += [t] * (free[ci] // p.types[t][1])
    return _Draft(gtype, asg)


def _greedy(p: _Problem, lo: float, hi: float, iters: int = 14) -> _Draft | None:
    free = [len(c.devices) for c in p.classes]
    best = None
    if not math.isfinite(hi):
        hi = float(p.overhead.max() + p.times.min(axis=1).sum())
        best = _greedy_at(p, hi, free)
        if best is None:
            return None
    for _ in range(iters):
        if hi - lo <= 1e-3 * hi:
            break
        mid = 0.5 * (lo + hi)
        d = _greedy_at(p, mid, free)
        if d is None:
            lo = mid
        else:
            best, hi = d, _draft_makespan(p, d)
    return best


def _refine(p: _Problem, d: _Draft, max_iters: int = 2000, deadline: float = math.inf) -> _Draft:
    """Local search on the exact formula: move or swap a sequence off the critical group while that helps."""
    gt = np.asarray(d.gtype)
    asg = d.assignment.copy()
    load, tok, count = _loads(p, d.gtype, asg)
    room, oh = p.room[gt], p.overhead[gt]
    L = p.lengths
    for it in range(max_iters):
        if it % 64 == 0 and time.perf_counter() > deadline:
            break
        g = int(np.argmax(load))
        top = load[g]
        mine = np.flatnonzero(asg == g)
        if mine.size == 0:
            break
        t_here = p.times[mine, gt[g]]
        # moves: sequence i of g to group h
        after_g = top - t_here - np.where(count[g] == 1, oh[g], 0.0)  # (m,)
        t_there = p.times[mine][:, gt]  # (m, G)
        after_h = load[None, :] + t_there + np.where(count > 0, 0.0, oh)[None, :]
        fits = tok[None, :] + L[mine][:, None] <= room[None, :]
        score = np.maximum(after_g[:, None], after_h)
        score[~fits] = np.inf
        score[:, g] = np.inf
        i, h = np.unravel_index(np.argmin(score), score.shape)
        if score[i, h] < top * (1 - 1e-9):
            k = mine[i]
            asg[k] = h
            load[g], load[h] = after_g[i], after_h[i, h]
            tok[g] -= L[k]
            tok[h] += L[k]
            count[g] -= 1
            count[h] += 1
            continue
        # swaps: sequence i of g with sequence j of another group h
        improved = False
        for h in np.argsort(load):
            if h == g or count[h] == 0:
                continue
            theirs = np.flatnonzero(asg == h)
            new_g = top - t_here[:, None] + p.times[theirs, gt[g]][None, :]
            new_h = load[h] - p.times[theirs, gt[h]][None, :] + p.times[mine, gt[h]][:, None]
            dl = L[theirs][None, :] - L[mine][:, None]
            ok = (tok[g] + dl <= room[g]) & (tok[h] - dl <= room[h])
            sc = np.where(ok, np.maximum(new_g, new_h), np.inf)
            i, j = np.unravel_index(np.argmin(sc), sc.shape)
            if sc[i, j] < top * (1 - 1e-9):
                a, b = mine[i], theirs[j]
                asg[a], asg[b] = h, g
                load[g], load[h] = new_g[i, j], new_h[i, j]
                tok[g] += dl[i, j]
                tok[h] -= dl[i, j]
                improved = True
                break
        if not improved:
            break
    return _Draft(d.gtype, asg, d.milp_status)


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


def _milp_draft(p: _Problem, warm: _Draft | None, n_buckets: int, deadline: float, solver: str,
                mip_gap: float, m_lower: float = 0.0) -> _Draft | None:
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
        return _Draft(warm.gtype, warm.assignment, status)  # no better than the warm start: keep its sequences
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
    return _repair(p, _Draft([int(gtype[g]) for g in used], remap[asg], status))


def _model_makespan(x: np.ndarray, btime: np.ndarray, p: _Problem, slots: list[Slot]) -> float:
    t = np.array([s.type for s in slots])
    used = x.sum(axis=0) > 0
    return float(np.max(np.where(used, p.overhead[t] + (x * btime[:, t]).sum(axis=0), 0.0)))


def _repair(p: _Problem, d: _Draft) -> _Draft | None:
    """Move sequences off groups over their memory (cheapest move first); None if that is impossible."""
    gt = np.asarray(d.gtype)
    asg = d.assignment.copy()
    load, tok, count = _loads(p, d.gtype, asg)
    room, oh = p.room[gt], p.overhead[gt]
    for _ in range(asg.size + 1):
        over = np.flatnonzero(tok > room)
        if over.size == 0:
            return _Draft(d.gtype, asg, d.milp_status)
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


def _warm_counts(p: _Problem, warm: _Draft, slots: list[Slot], bucket: np.ndarray, nb: int,
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


def _layout(p: _Problem, d: _Draft, status: str, solve_s: float) -> SPPlan:
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
    p = _problem(lens, costs, classes, degs)
    deadline = t0 + time_limit_s
    cands = [d for d in (_homogeneous(p, k) for k in degs) if d is not None]
    best_h = min(cands, key=lambda d: _draft_makespan(p, d), default=None)
    hi = _draft_makespan(p, best_h) if best_h is not None else math.inf
    lo = _lower_bound_of(p, n_devices, degs)
    g = _greedy(p, lo, hi)
    pool = [d for d in (best_h, g) if d is not None]
    pool = [_refine(p, d, deadline=deadline) for d in pool]
    if not pool:
        raise PlanError("no plan found: the batch fits no combination of groups (memory)")
    warm = min(pool, key=lambda d: _draft_makespan(p, d))
    status = "greedy"
    if solver != "greedy" and _draft_makespan(p, warm) <= lo * (1 + mip_gap):
        status = "optimal"  # the candidate meets the lower bound: nothing left to search
    elif solver != "greedy" and deadline - time.perf_counter() > 0.05:
        m = _milp_draft(p, warm, n_buckets, deadline - 0.02, solver, mip_gap, lo)
        if m is not None:
            status = m.milp_status
            pool.append(_refine(p, m, deadline=deadline + 0.05))
    best = min(pool, key=lambda d: _draft_makespan(p, d))
    plan = _layout(p, best, status, 0.0)
    plan.predicted_step_s = makespan(plan.groups, plan.assignment, lens, costs, speeds, n_devices)
    plan.solve_s = time.perf_counter() - t0
    return plan


def _lower_bound_of(p: _Problem, n_devices: int, degrees: list[int]) -> float:
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
    p = _problem(lens, costs, classes, [degree])
    d = _homogeneous(p, degree)
    if d is None:
        return None
    if refine:
        d = _refine(p, d)
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
    n_heads with ``uneven_heads`` (``parallel.ulysses`` supports it; the cost model assumes balance)."""
    if n_heads < 1 or n_devices < 1:
        raise PlanError(f"n_heads and n_devices must be >= 1, got {n_heads}, {n_devices}")
    top = min(n_heads, n_devices)
    return [d for d in range(1, top + 1) if uneven_heads or n_heads % d == 0]
