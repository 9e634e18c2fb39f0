"""The adaptive-SP planner's problem and its fast candidates: device classes, drafts of a plan,
the homogeneous and greedy plans and the local search that refines them.

Why apart from ``planner``: these are the heuristics every plan starts from (and the whole plan
when the MILP finds nothing better in time); ``planner`` adds bucketing, the MILP and the checks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from distrain.parallel.sp.cost import SPCosts, device_capacities, device_speeds


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
class Problem:
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


def make_problem(lengths: np.ndarray, costs: SPCosts, classes: list[DeviceClass], degrees: Sequence[int]) -> Problem:
    types = [(ci, d) for ci, c in enumerate(classes) for d in sorted(degrees) if d <= len(c.devices)]
    times = np.empty((lengths.size, len(types)))
    for t, (ci, d) in enumerate(types):
        times[:, t] = costs.seq_s(lengths, d, classes[ci].speed)
    overhead = np.array([costs.beta1 / classes[ci].speed for ci, _ in types])
    room = np.array([d * classes[ci].capacity for ci, d in types])
    return Problem(lengths, costs, classes, types, times, overhead, room)


@dataclass
class Draft:
    """A plan before device ids are laid out: group types and an assignment."""

    gtype: list[int]
    assignment: np.ndarray
    milp_status: str | None = None


def loads(p: Problem, gtype: list[int], asg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    G = len(gtype)
    cols = np.asarray(gtype)[asg] if asg.size else np.zeros(0, dtype=np.int64)
    t = p.times[np.arange(asg.size), cols] if asg.size else np.zeros(0)
    load = np.bincount(asg, weights=t, minlength=G)
    count = np.bincount(asg, minlength=G)
    tok = np.bincount(asg, weights=p.lengths, minlength=G)
    load = load + np.where(count > 0, p.overhead[gtype], 0.0)
    return load, tok, count


def draft_makespan(p: Problem, d: Draft) -> float:
    return float(loads(p, d.gtype, d.assignment)[0].max(initial=0.0))


# ---- candidates -------------------------------------------------------------------------------


def assign_longest_first(p: Problem, gtype: list[int], order: np.ndarray | None = None) -> np.ndarray | None:
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


def homogeneous_draft(p: Problem, d: int) -> Draft | None:
    gtype = [p.type_index(ci, d) for ci, c in enumerate(p.classes) if d <= len(c.devices)
             for _ in range(len(c.devices) // d)]
    if not gtype:
        return None
    asg = assign_longest_first(p, gtype)
    return None if asg is None else Draft(gtype, asg)


def greedy_at(p: Problem, target: float, free: list[int]) -> Draft | None:
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
    return Draft(gtype, asg)


def greedy_draft(p: Problem, lo: float, hi: float, iters: int = 14) -> Draft | None:
    free = [len(c.devices) for c in p.classes]
    best = None
    if not math.isfinite(hi):
        hi = float(p.overhead.max() + p.times.min(axis=1).sum())
        best = greedy_at(p, hi, free)
        if best is None:
            return None
    for _ in range(iters):
        if hi - lo <= 1e-3 * hi:
            break
        mid = 0.5 * (lo + hi)
        d = greedy_at(p, mid, free)
        if d is None:
            lo = mid
        else:
            best, hi = d, draft_makespan(p, d)
    return best


def refine_draft(p: Problem, d: Draft, max_iters: int = 2000, deadline: float = math.inf) -> Draft:
    """Local search on the exact formula: move or swap a sequence off the critical group while that helps."""
    gt = np.asarray(d.gtype)
    asg = d.assignment.copy()
    load, tok, count = loads(p, d.gtype, asg)
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
    return Draft(d.gtype, asg, d.milp_status)
