"""Measuring what the adaptive-SP cost model needs, on the processes of one replica.

Why: the planner is only as good as its coefficients, and they depend on the model, the devices
and the links; ``distrain profile-sp`` runs these functions on every process of a replica (all
processes call each function together) and fits ``distrain.parallel.sp_cost.SPCosts`` from the result.

* ``time_plans``: wall seconds of one forward + backward of each of several plans, the slowest
  device's (what the cost model predicts as the makespan). Every group works at once, as in
  training, so shared resources (cores, memory bandwidth, links) are loaded as they will be;
  profiles keep every device busy (devices a group size leaves over run a filler group).
* ``alltoall_gbps``: bytes each device holds / seconds of one ``all_to_all_single`` among groups
  of d devices (all groups at once).
* ``activation_bytes_per_token``: bytes of tensors autograd saves for backward, per token (slope
  over two lengths), on one device.
* ``fit_costs``: non-negative least squares of pass times on
  ``beta1 + (alpha1·Σs² + alpha2·Σs)/d + gamma_d·Σs/d``, relative residuals; ``gamma_d`` (seconds
  per token of all-to-all at degree d) becomes the bandwidth ``bytes_per_token_alltoall / gamma_d``
  (the microbenchmark's value where gamma_d fits to zero). Fitting the all-to-all from whole passes
  captures what a microbenchmark misses (many small messages, their latency, overlap). Where noise
  hides the per-token compute (both alphas fit to 0), it is re-fitted from the one-device passes,
  floored at a negligible positive cost (``fit_costs``).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from distrain.parallel.sp.cost import SPCosts, alltoall_bytes_per_token
from distrain.parallel.sp.plan import SPPlan
from distrain.parallel.sp.step import sp_forward_backward
from distrain.parallel.sp.ulysses import GroupProvider


def _max_over_ranks(x: float) -> float:  # noqa: D103
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def homogeneous_groups(n_devices: int, degree: int) -> list[list[int]]:
    return [list(range(i * degree, (i + 1) * degree)) for i in range(n_devices // degree)]


def synthetic_batch(lengths: Sequence[int], vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(seed)
    T = int(sum(lengths))
    tok = torch.randint(0, vocab, (T + 1,), generator=g)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return tok[:-1], tok[1:], cu


def time_once(model: Any, plan: SPPlan, batch: tuple[torch.Tensor, torch.Tensor, list[int]], device: int,
              group_for: GroupProvider) -> list[float]:
    """One forward + backward of ``plan`` on every device at once: each group's seconds (its slowest member's)."""
    import torch.distributed as dist

    inputs, targets, cu = batch
    for p in model.parameters():
        p.grad = None
    dist.barrier()
    t0 = time.perf_counter()
    sp_forward_backward(model, inputs, targets, cu, plan, device, group_for)
    t = torch.zeros(dist.get_world_size(), dtype=torch.float64)
    t[dist.get_rank()] = time.perf_counter() - t0
    dist.all_reduce(t)
    return [max(float(t[r]) for r in g) for g in plan.groups]


def time_plans(model: Any, items: Sequence[tuple[SPPlan, Sequence[int]]], device: int, group_for: GroupProvider,
               vocab: int, repeats: int = 5) -> list[float]:
    """The fastest of ``repeats`` makespans of each (plan, lengths), the items interleaved: every item
    sees the same spread of background load, so a busy moment on a shared machine slows one run of
    each, not all runs of one (the fastest run counts: other jobs only ever add time). One untimed
    warm-up run of each item first."""
    batches = [synthetic_batch(lengths, vocab) for _, lengths in items]
    for (plan, _), b in zip(items, batches):
        time_once(model, plan, b, device, group_for)
    best = [math.inf] * len(items)
    for _ in range(repeats):
        for i, ((plan, _), b) in enumerate(zip(items, batches)):
            best[i] = min(best[i], max(time_once(model, plan, b, device, group_for)))
    return best


def alltoall_gbps(device: int, n_devices: int, degree: int, group_for: GroupProvider, nbytes: int = 1 << 22,
                  repeats: int = 5) -> float:
    """Bytes each device holds / seconds of one all_to_all_single in groups of ``degree`` (all groups at once)."""
    import torch.distributed as dist

    groups = homogeneous_groups(n_devices, degree)
    pgs = [group_for(tuple(g)) for g in groups]
    mine = next((pg for g, pg in zip(groups, pgs) if device in g), None)
    n = nbytes // 4 // degree * degree
    x, out = torch.ones(n), torch.empty(n)
    times = []
    for i in range(repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        if mine is not None:
            dist.all_to_all_single(out, x, group=mine)
        t = _max_over_ranks(time.perf_counter() - t0)
        if i:
            times.append(t)
    return n * 4 / statistics.median(times) / 1e9


def activation_bytes_per_token(model: Any, lengths: Sequence[int] = (64, 256), vocab: int = 256) -> float:
    """Slope of autograd-saved bytes over tokens for single sequences on one device (no process group)."""
    from distrain.parallel.sp.step import local_shard, sp_loss_sum

    sizes = []
    for n in lengths:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
            return t

        inputs, targets, cu = synthetic_batch([n], vocab)
        idx, pos, pack_cu, counts = local_shard(cu, [0], 1, 0)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = sp_loss_sum(model, inputs[idx], targets[idx], pos, pack_cu, counts, 0, None)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        sizes.append(sum(b for ptr, b in seen.items() if ptr not in params))
        del loss
    return float((sizes[-1] - sizes[0]) / (lengths[-1] - lengths[0]))


# A per-token cost this small is negligible in every profiled pass (see ``fit_costs``).
ALPHA2_FLOOR_FRACTION = 1e-3


def _nnls_relative(A: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Non-negative least squares of ``A·x ≈ y`` in residuals weighted by ``w``, columns rescaled
    (the coefficients span orders of magnitude)."""
    from scipy.optimize import nnls

    scale = np.abs(A).max(axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls((A * w[:, None]) / scale, y * w)
    return coef / scale


def fit_costs(samples: Sequence[tuple[Sequence[int], int, float]], bytes_per_token: float,
              measured_gbps: dict[int, float], memory_per_token: float) -> SPCosts:
    """SPCosts from (lengths of each group's pass, degree, seconds) samples (see the module docstring).

    Why a fallback: on a loaded machine, or with profiled lengths so short that a pass is mostly
    fixed cost, the noise can exceed what tokens add; the joint fit then gives the tokens' time to
    beta1 and the all-to-all terms and both alphas fit to 0, a model ``SPCosts`` refuses
    (sequences would cost nothing) and the profile would abort. Tokens always cost compute, so
    alpha2 is then fitted from the one-device passes alone (no all-to-all term can take their
    time), at least ``ALPHA2_FLOOR_FRACTION`` of the fastest pass spread over the most tokens a
    device ran (negligible in every profiled pass, but positive), and beta1 and the all-to-all
    terms are re-fitted with it held.
    """
    degs = sorted({d for _, d, _ in samples if d > 1})
    cols = 3 + len(degs)
    if len(samples) < cols:
        raise ValueError(f"need at least {cols} timing samples to fit {cols} coefficients, got {len(samples)}")
    A = np.zeros((len(samples), cols))
    y = np.array([t for _, _, t in samples], dtype=np.float64)
    for i, (ls, d, _) in enumerate(samples):
        s = np.asarray(ls, dtype=np.float64)
        A[i, :3] = ((s * s).sum() / d, s.sum() / d, 1.0)
        if d > 1:
            A[i, 3 + degs.index(d)] = s.sum() / d
    w = 1.0 / y
    coef = _nnls_relative(A, y, w)
    if coef[0] <= 0 and coef[1] <= 0:
        one = np.array([d == 1 for _, d, _ in samples])
        alpha2 = _nnls_relative(A[one][:, 1:3], y[one], w[one])[0] if one.sum() >= 2 else 0.0
        alpha2 = max(float(alpha2), ALPHA2_FLOOR_FRACTION * y.min() / A[:, 1].max())
        rest = _nnls_relative(A[:, 2:], y - alpha2 * A[:, 1], w)  # beta1 and the all-to-alls, alpha2 held
        coef = np.concatenate([[0.0, alpha2], rest])
    gbps = {}
    for j, d in enumerate(degs):
        gamma = coef[3 + j]
        gbps[d] = bytes_per_token / gamma / 1e9 if gamma > 1e-15 else measured_gbps[d]
    for d, v in measured_gbps.items():
        gbps.setdefault(d, v)
    return SPCosts(alpha1=float(coef[0]), alpha2=float(coef[1]), beta1=float(coef[2]), alltoall_gbps=gbps,
                   bytes_per_token_alltoall=bytes_per_token, memory_per_token=memory_per_token)


def model_bytes_per_token(model: Any, elem_bytes: int = 4) -> float:
    """All-to-all bytes per token of this model's layers with K/V heads sharded (degree <= n_kv_heads)."""
    layers = list(model.layers.values())
    a = layers[0].attention
    return alltoall_bytes_per_token(len(layers), a.n_heads, a.n_kv_heads, a.head_dim, elem_bytes)
