"""Cost model of adaptive sequence parallelism: the time of one step under a plan, and bounds.

Why a model: the planner (`distrain.parallel.sp.planner`) chooses SP groups per step by predicting what a
plan costs; these few coefficients, fitted by `distrain profile-sp` on the real hardware, are
all it knows about the machine.

The formula (the contract `distrain plan-sp` is checked against). A plan is a list of groups,
each a list of device ids, and an assignment of every sequence to one group. For group g of
d = |g| devices, with speed v_g = the smallest speed factor of its devices (a group runs at its
slowest member's pace; speed 1 = the profiled device) and its sequences S_g (lengths s):

    T_g = (beta1 + sum_{s in S_g} (alpha1·s² + alpha2·s) / d) / v_g
          + sum_{s in S_g} bytes_per_token_alltoall · s / (d · alltoall_gbps[d] · 1e9)

    T_g = 0 when S_g is empty; the all-to-all term is 0 when d = 1.
    predicted step time M = max_g T_g   (the makespan: every group works in parallel)

alpha1 (s/token²) is attention's quadratic cost and alpha2 (s/token) everything linear (matmuls,
norms, loss) of forward + backward on one device; beta1 (s) is a group's fixed cost per step
(launch, synchronisation, ZeRO gathers on GPUs). Ulysses sends each device's s/d tokens' q, k, v and
attention output across the group, forward and backward, so the bytes are
bytes_per_token_alltoall · s / d per device. ``alltoall_gbps[d]`` is the bandwidth measured for
groups of d devices (it drops ~10× once a group leaves a node); a size that was not profiled
uses the smallest profiled size above it (the conservative neighbour), or the largest profiled
size when none is above.

Memory: a device holds the activations of its s/d share of every sequence of its group at once,
so a group is feasible when sum_{s in S_g} s <= d · capacity, capacity = the smallest per-device
token capacity among its devices (``capacity_tokens`` derives it from free memory and
``memory_per_token``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

COST_KEYS = ("alpha1", "alpha2", "beta1", "alltoall_gbps", "bytes_per_token_alltoall", "memory_per_token")


class CostModelError(ValueError):
    """Coefficients that cannot describe a machine (negative, missing, non-finite)."""


@dataclass(frozen=True)
class SPCosts:
    alpha1: float  # seconds per token² of one sequence on one device (attention)
    alpha2: float  # seconds per token on one device (everything linear)
    beta1: float  # seconds per group per step
    alltoall_gbps: dict[int, float] = field(default_factory=dict)  # group size -> GB/s (1e9 B/s)
    bytes_per_token_alltoall: float = 0.0  # all-to-all bytes per token of a sequence (fwd + bwd)
    memory_per_token: float = 0.0  # activation bytes per token a device holds

    def __post_init__(self) -> None:
        for name in ("alpha1", "alpha2", "beta1", "bytes_per_token_alltoall", "memory_per_token"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise CostModelError(f"cost {name} must be a finite number >= 0, got {v!r}")
        if self.alpha1 == 0 and self.alpha2 == 0:
            raise CostModelError("costs alpha1 and alpha2 are both 0: sequences would cost nothing")
        bw = {}
        for k, v in dict(self.alltoall_gbps).items():
            try:
                d = int(k)
            except (TypeError, ValueError):
                raise CostModelError(f"alltoall_gbps key {k!r} is not a group size") from None
            if d < 2 or str(k).strip() != str(d):
                raise CostModelError(f"alltoall_gbps key {k!r} must be a group size >= 2")
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise CostModelError(f"alltoall_gbps[{d}] must be a positive number, got {v!r}")
            bw[d] = float(v)
        if self.bytes_per_token_alltoall > 0 and not bw:
            raise CostModelError("alltoall_gbps is empty but bytes_per_token_alltoall > 0: no bandwidth for groups > 1")
        object.__setattr__(self, "alltoall_gbps", dict(sorted(bw.items())))

    # ---- the formula -----------------------------------------------------------------------
    def bandwidth_gbps(self, d: int) -> float:
        """Bandwidth of a group of d >= 2 devices: profiled size d, else the next larger one, else the largest."""
        if d in self.alltoall_gbps:
            return self.alltoall_gbps[d]
        above = [k for k in self.alltoall_gbps if k > d]
        return self.alltoall_gbps[above[0] if above else max(self.alltoall_gbps)]

    def compute_s(self, s: np.ndarray | float, d: int) -> np.ndarray | float:
        """Compute seconds of sequences of length s in a group of d devices at speed 1 (no beta1)."""
        s = np.asarray(s, dtype=np.float64)
        return (self.alpha1 * s * s + self.alpha2 * s) / d

    def comm_s(self, s: np.ndarray | float, d: int) -> np.ndarray | float:
        s = np.asarray(s, dtype=np.float64)
        if d == 1 or self.bytes_per_token_alltoall == 0:
            return s * 0.0
        return self.bytes_per_token_alltoall * s / (d * self.bandwidth_gbps(d) * 1e9)

    def seq_s(self, s: np.ndarray | float, d: int, speed: float = 1.0) -> np.ndarray | float:
        """Seconds a sequence adds to its group (beta1 excluded)."""
        return self.compute_s(s, d) / speed + self.comm_s(s, d)

    def group_s(self, lengths: Sequence[int] | np.ndarray, d: int, speed: float = 1.0) -> float:
        """T_g of the module docstring."""
        s = np.asarray(lengths, dtype=np.float64)
        if s.size == 0:
            return 0.0
        return float((self.beta1 + self.compute_s(s, d).sum()) / speed + self.comm_s(s, d).sum())

    def capacity_tokens(self, free_bytes: float) -> int:
        """Tokens a device can hold with ``free_bytes`` of memory for activations."""
        if self.memory_per_token <= 0:
            raise CostModelError("memory_per_token is 0: cannot turn a memory size into a token capacity")
        return int(free_bytes // self.memory_per_token)

    # ---- files -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"alpha1": self.alpha1, "alpha2": self.alpha2, "beta1": self.beta1,
                "alltoall_gbps": {str(k): v for k, v in self.alltoall_gbps.items()},
                "bytes_per_token_alltoall": self.bytes_per_token_alltoall, "memory_per_token": self.memory_per_token}

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "costs") -> SPCosts:
        if not isinstance(d, Mapping):
            raise CostModelError(f"{where}: expected a JSON object, got {type(d).__name__}")
        d = d.get("costs", d) if "alpha1" not in d else d  # accept a plan-sp / profile-sp output too
        missing = [k for k in COST_KEYS if k not in d]
        if missing:
            raise CostModelError(f"{where}: missing cost keys {missing} (need {list(COST_KEYS)})")
        unknown = sorted(set(d) - set(COST_KEYS))
        if unknown:
            raise CostModelError(f"{where}: unknown cost keys {unknown} (known: {list(COST_KEYS)})")
        if not isinstance(d["alltoall_gbps"], Mapping):
            raise CostModelError(f"{where}: alltoall_gbps must be an object of group size -> GB/s")
        try:
            return cls(**{k: d[k] for k in COST_KEYS})
        except CostModelError as e:
            raise CostModelError(f"{where}: {e}") from None

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return p

    @classmethod
    def load(cls, path: str | Path) -> SPCosts:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"costs file not found: {p}")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise CostModelError(f"{p}: not JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_dict(data, str(p))


# Reference coefficients of a 7B GPT on A100s, from the FlexSP reference code (Hetu-Galvatron,
# `flexsp` branch; converted from ms and MB): compute fitted there, all-to-all measured with 2 IB
# links per node (8 GPUs a node). Used by the benchmark's 64-device cases; never as a default.
REFERENCE_7B = SPCosts(
    alpha1=5.128e-9, alpha2=183.9576e-6, beta1=0.6293563,
    alltoall_gbps={2: 119.54, 4: 104.07, 8: 96.5, 16: 10.33, 32: 5.94, 64: 4.87},
    bytes_per_token_alltoall=4 * 2 * 32 * 4096 * 2,  # q,k,v,out × fwd+bwd × layers × hidden × bf16
    memory_per_token=4.480441895 * 2**20,
)


def alltoall_bytes_per_token(n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int, elem_bytes: int,
                             degree: int | None = None) -> float:
    """Bytes per token a Ulysses layer stack sends (forward + backward): q, k, v out and the output back.

    K/V are sent once per destination that needs them; with fewer K/V heads than the degree a K/V
    head is replicated to each device holding one of its query heads, so at ``degree`` >= n_kv_heads
    K/V cost as much as q. ``degree=None``: the K/V-sharded case (degree <= n_kv_heads).
    """
    kv = n_kv_heads if degree is None else max(n_kv_heads, min(degree, n_heads))
    per_layer = (2 * n_heads + 2 * kv) * head_dim * elem_bytes  # q + out, and k + v
    return float(2 * n_layers * per_layer)  # forward and backward


# ---- plans: feasibility, makespan, bounds -----------------------------------------------------


def device_speeds(n: int, speeds: Sequence[float] | None) -> np.ndarray:
    """Speed factor per device (all 1 when not given), checked."""
    v = np.ones(n) if speeds is None or len(speeds) == 0 else np.asarray(speeds, dtype=np.float64)
    if v.shape != (n,):
        raise ValueError(f"speeds has {v.size} entries for {n} devices")
    if not np.all(np.isfinite(v)) or np.any(v <= 0):
        raise ValueError(f"speeds must be positive, got {v.tolist()}")
    return v


def device_capacities(n: int, capacity: float | Sequence[float] | None) -> np.ndarray:
    """Token capacity per device (inf when not given; one number for all), checked."""
    if capacity is None:
        return np.full(n, np.inf)
    c = np.asarray(capacity, dtype=np.float64)
    c = np.full(n, float(c)) if c.ndim == 0 else c
    if c.shape != (n,):
        raise ValueError(f"capacity has {c.size} entries for {n} devices")
    if np.any(c <= 0):
        raise ValueError(f"capacity must be positive (tokens per device), got {c.tolist()}")
    return c


def group_times(groups: Sequence[Sequence[int]], assignment: Sequence[int], lengths: Sequence[int],
                costs: SPCosts, speeds: Sequence[float] | None = None, n_devices: int | None = None) -> list[float]:
    """T_g for every group (module docstring)."""
    n = n_devices if n_devices is not None else 1 + max((i for g in groups for i in g), default=0)
    v = device_speeds(n, speeds)
    lens = np.asarray(lengths, dtype=np.int64)
    asg = np.asarray(assignment, dtype=np.int64)
    return [costs.group_s(lens[asg == j], len(g), float(v[list(g)].min())) for j, g in enumerate(groups)]


def makespan(groups: Sequence[Sequence[int]], assignment: Sequence[int], lengths: Sequence[int],
             costs: SPCosts, speeds: Sequence[float] | None = None, n_devices: int | None = None) -> float:
    """Predicted step time M = max_g T_g of a plan."""
    return max(group_times(groups, assignment, lengths, costs, speeds, n_devices), default=0.0)


def check_plan(groups: Sequence[Sequence[int]], assignment: Sequence[int], lengths: Sequence[int], n_devices: int,
               capacity: float | Sequence[float] | None = None, degrees: Sequence[int] | None = None) -> None:
    """Raise ValueError naming the first violation: device count, disjointness, coverage, memory."""
    seen: set[int] = set()
    for j, g in enumerate(groups):
        if len(g) == 0:
            raise ValueError(f"group {j} has no devices")
        if degrees is not None and len(g) not in degrees:
            raise ValueError(f"group {j} has {len(g)} devices, not an allowed degree {sorted(degrees)}")
        for i in g:
            if not 0 <= i < n_devices:
                raise ValueError(f"group {j} names device {i}, outside 0..{n_devices - 1}")
            if i in seen:
                raise ValueError(f"device {i} is in two groups")
            seen.add(i)
    if len(assignment) != len(lengths):
        raise ValueError(f"assignment has {len(assignment)} entries for {len(lengths)} sequences")
    bad = [k for k, a in enumerate(assignment) if not 0 <= a < len(groups)]
    if bad:
        raise ValueError(f"sequence {bad[0]} is assigned to group {assignment[bad[0]]}, not one of {len(groups)}")
    cap = device_capacities(n_devices, capacity)
    lens = np.asarray(lengths, dtype=np.int64)
    asg = np.asarray(assignment, dtype=np.int64)
    for j, g in enumerate(groups):
        tokens = int(lens[asg == j].sum())
        room = len(g) * cap[list(g)].min()
        if tokens > room:
            raise ValueError(f"group {j} ({len(g)} devices) holds {tokens} tokens, over its capacity {room:.0f}")


def lower_bound(lengths: Sequence[int], costs: SPCosts, n_devices: int, degrees: Sequence[int],
                speeds: Sequence[float] | None = None, capacity: float | Sequence[float] | None = None) -> float:
    """A makespan no plan can beat (so plan / bound - 1 bounds how far from optimal a plan can be).

    The smallest M that passes both tests:
    * single sequence: M >= each sequence's time alone in the best group it fits (fastest d devices).
    * area: for the devices S a plan uses, d·v_g·(M - beta1/v_g) >= each group's work, so
      M >= (W + beta1·|S|) / sum_{i in S} v_i, minimised over |S| from the fewest devices memory
      allows (taking the fastest). W = sum_s (alpha1·s² + alpha2·s + v_min·the cheapest all-to-all
      device-seconds of s over the group sizes it may use) — and a sequence may only use sizes whose
      own time is <= M, so a long sequence that must go to a big group (slow links) is charged for it.
      W depends on M, so the bound is the fixed point, found by bisection.
    """
    v = np.sort(device_speeds(n_devices, speeds))[::-1]
    cap = np.sort(device_capacities(n_devices, capacity))[::-1]
    s = np.asarray(lengths, dtype=np.float64)
    if s.size == 0:
        return 0.0
    degs = sorted(d for d in set(degrees) if 1 <= d <= n_devices)
    alone = np.full((len(degs), s.size), np.inf)  # time of s alone in the fastest group of size d
    dev_comm = np.zeros((len(degs), s.size))  # all-to-all device-seconds of s at size d, slowest speed
    for j, d in enumerate(degs):
        fits = s <= d * cap[d - 1] if np.isfinite(cap[d - 1]) else np.ones(s.size, bool)
        t = (costs.beta1 + costs.compute_s(s, d)) / v[d - 1] + costs.comm_s(s, d)
        alone[j] = np.where(fits, t, np.inf)
        dev_comm[j] = d * costs.comm_s(s, d) * v[-1]
    single = float(alone.min(axis=0).max())
    if not math.isfinite(single):
        return math.inf
    compute = float((costs.alpha1 * s * s + costs.alpha2 * s).sum())
    total, cmax = s.sum(), cap[0]
    k_min = min(n_devices, max(1, math.ceil(total / cmax)) if math.isfinite(cmax) else 1)
    vsum = np.cumsum(v)
    ks = np.arange(k_min, n_devices + 1)

    def area(m: float) -> float:
        comm = np.where(alone <= m * (1 + 1e-12), dev_comm, np.inf).min(axis=0).sum()
        return float(((compute + comm + costs.beta1 * ks) / vsum[ks - 1]).min())

    lo, hi = single, area(single)
    if hi <= lo:
        return lo
    for _ in range(60):  # area() falls as M grows: bisect on M = area(M)
        mid = 0.5 * (lo + hi)
        if area(mid) <= mid:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-9 * hi:
            break
    return float(hi)


# ---- checking a fit ------------------------------------------------------------------------------


def mape(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Mean absolute percentage error, as a fraction (0.2 = 20 %)."""
    p, m = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if p.shape != m.shape or p.size == 0:
        raise ValueError("need equally many predicted and measured values, at least one")
    return float(np.mean(np.abs(p - m) / m))
