"""How many inner steps each replica runs in a round: one decision per round, by the RoundLoop.

Policies (``topology.straggler_policy``):

- ``window`` (the default): a compute window per round — ``topology.window_s``, or H × the
  fastest replica's step time — and every replica runs as many inner steps as fit in it at its own
  step time, so all replicas reach the exchange together. Step times are **measured**
  (``topology.step_times = "measured"``): an exponential average of each replica's mean step
  time over its recent rounds, on its own clock (simulated time in the simulation, real time
  under torchrun and Ray), so a pipeline replica's bubble and boundary waits count; the first
  round, with nothing measured yet, starts from the configured speeds. With
  ``"configured"`` the step times are ``network.step_time_s / speed`` and the counts are fixed
  in advance (every launch mode then runs the same counts, bit for bit). Under measured windows a
  replica also stops at a step boundary when its next step would overrun the window.
- ``fewer_steps``: H × speed / fastest steps from the configured speeds.
- ``wait``: H steps each; the round waits for the slowest.

``topology.step_plan`` replays the counts a run logged (its ``metrics.jsonl``): a measured run is
reproducible from its log. Progress is counted in inner steps of a full-speed replica: a round
stands for H of them (fewer in the last), whatever each replica's count, and the learning-rate
schedule and ``train.steps`` follow it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distrain.config import Config
from distrain.inner.schedule import OVERRUN
from distrain.layout import Layout
from distrain.worker.plan import ReplicaRound
from distrain.worker.worker import RoundReport

EMA_KEEP = 0.5  # weight of the previous estimate in a replica's step-time average


def nominal_steps(cfg: Config) -> int:
    """Inner steps of a full-speed replica per round: H for the round-based algorithms, the logging
    period otherwise."""
    return max(1, cfg.outer.inner_steps if cfg.algorithm.rounds else cfg.logging.log_every)


def n_rounds(cfg: Config) -> int:
    """Rounds of a run: ``train.steps`` inner steps of a full-speed replica, H per round."""
    return math.ceil(cfg.train.steps / nominal_steps(cfg))


@dataclass
class RoundPlan:
    """One round's decision: every replica's step count, the window, and what it was cut from."""

    round: int
    progress: float  # global progress (full-speed inner steps) before the round
    span: float  # global progress the round stands for
    steps: list[int]  # inner steps per replica
    step_s: list[float] = field(default_factory=list)  # per replica, the step time the counts assume
    window_s: float = 0.0  # the compute window (0: no window)
    enforce: bool = False  # replicas stop at a step boundary when the window closes (measured windows)
    source: str = "nominal"  # nominal | configured | measured | replay
    limits: list[int] = field(default_factory=list)  # replay: the steps each replica actually ran

    def for_replica(self, replica: int) -> ReplicaRound:
        step_s = self.step_s[replica] if self.step_s else 0.0
        return ReplicaRound(self.steps[replica], self.progress, self.span,
                            self.window_s if self.enforce else 0.0, step_s,
                            self.limits[replica] if self.limits else -1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def configured_step_s(cfg: Config, layout: Layout) -> list[float]:
    """Each replica's step time from its configured speed (no measurement)."""
    base = cfg.network.step_time_s or 1.0
    return [base / rep.speed for rep in layout.replicas]


def measured_step_s(reports: list[RoundReport], n_replicas: int) -> list[float]:
    """Each replica's mean step time this round: its slowest worker's (0: it ran no step)."""
    out = [0.0] * n_replicas
    for r in reports:
        if r.steps:
            out[r.replica] = max(out[r.replica], r.step_s)
    return out


def read_step_plan(path: str | Path) -> dict[int, tuple[list[int], list[int]]]:
    """What a run logged per round: (the steps planned per replica, the steps each ran) — a
    replica's steps sit where its plan spread them, and a window may have stopped it earlier."""
    plans: dict[int, tuple[list[int], list[int]]] = {}
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("kind") == "train" and "replica_steps" in rec:
            ran = [int(x) for x in rec["replica_steps"]]
            planned = rec.get("plan", {}).get("steps", ran) if isinstance(rec.get("plan"), dict) else ran
            plans[int(rec["round"]) - 1] = ([int(x) for x in planned], ran)
    return plans


class StepPlanner:
    """Decides each round's step counts from the configured policy and the measured step times."""

    def __init__(self, cfg: Config, layout: Layout):
        self.cfg, self.layout = cfg, layout
        self.policy = cfg.topology.straggler_policy if cfg.algorithm.rounds else "wait"
        self.h = nominal_steps(cfg)
        self.replay = read_step_plan(cfg.topology.step_plan) if cfg.topology.step_plan else None

    def plan(self, round_idx: int, progress: float, estimates: list[float]) -> RoundPlan:
        """The plan of ``round_idx``, which starts at ``progress``; ``estimates``: each replica's
        measured step time so far (empty, or 0 for a replica not measured yet)."""
        n = self.layout.n_replicas
        span = float(min(self.h, self.cfg.train.steps - progress))
        nominal = max(1, round(span))
        if self.policy == "wait":
            return RoundPlan(round_idx, progress, span, [nominal] * n)
        configured = configured_step_s(self.cfg, self.layout)
        if self.policy == "fewer_steps":
            fastest = min(configured)
            return RoundPlan(round_idx, progress, span, [max(1, round(span * fastest / t)) for t in configured],
                             configured, source="configured")
        if self.replay is not None:
            planned, ran = self.replay.get(round_idx, ([], []))
            if len(planned) != n or len(ran) != n or any(r > p for r, p in zip(ran, planned)):
                raise ValueError(f"topology.step_plan: no step counts for round {round_idx} of {n} replicas "
                                 f"in {self.cfg.topology.step_plan}")
            return RoundPlan(round_idx, progress, span, planned, source="replay", limits=ran)
        measured = self.cfg.topology.step_times == "measured"
        step_s = [e if measured and e > 0 else c for e, c in zip(estimates or [0.0] * n, configured)]
        window = self.cfg.topology.window_s * span / self.h if self.cfg.topology.window_s else span * min(step_s)
        steps = [max(1, math.floor(window / t + OVERRUN)) for t in step_s]
        calibrated = measured and bool(estimates) and all(e > 0 for e in estimates)
        # until every replica has been measured (the first round calibrates), nothing is cut short
        return RoundPlan(round_idx, progress, span, steps, step_s, window, enforce=calibrated,
                         source="measured" if calibrated else "configured")


def update_estimates(estimates: list[float], reports: list[RoundReport], n_replicas: int) -> list[float]:
    """Each replica's step-time average after this round (a replica that ran nothing keeps its own)."""
    measured = measured_step_s(reports, n_replicas)
    old = estimates or [0.0] * n_replicas
    return [o if m <= 0 else (m if o <= 0 else EMA_KEEP * o + (1 - EMA_KEEP) * m) for o, m in zip(old, measured)]
