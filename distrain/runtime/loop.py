"""The RoundLoop: rounds, evaluation, checkpoints, catch-up, resume and metrics — once, for every mode.

A launch mode supplies a ``WorkerPool``: how the loop reaches its workers (threads in this process,
this rank's process among others, Ray actors). The loop runs the same sequence everywhere:

    resume from the newest checkpoint step every rank can read, or agree on the initial weights
    per round: let workers that fell behind catch up → run the round on the live workers →
               finish in-flight updates on the last round → publish the global weights →
               account tokens/steps/bytes/time → log → evaluate and checkpoint when due

Under torchrun the loop runs on every rank (the pool's calls are collectives, so every rank takes
the same decisions) and only the coordinator rank logs; in simulation and under Ray it runs once,
in the driver.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distrain.config import Config
from distrain.layout import Layout
from distrain.runtime.common import newest_common_step, wanted_resume_step
from distrain.runtime.records import RoundLogger, RunSummary, crossed, round_record
from distrain.worker import RoundReport, nominal_steps

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """What a resumed run continues from (saved beside every rank's checkpoint)."""

    round: int = 0
    step: int = 0  # inner steps of a replica at full speed
    tokens: int = 0
    bytes_sent: int = 0
    busy_s: float = 0.0  # real seconds of inner steps (mean over replicas)
    elapsed_s: float = 0.0  # real seconds of the round loop, earlier attempts included
    first_val: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class WorkerPool(ABC):
    """How the RoundLoop reaches its workers in one launch mode."""

    layout: Layout
    mode: str  # simulation | torchrun | ray
    clock_name = "wall"  # what the records' sim_time_s is: "sim" (virtual clock) or "wall"

    @property
    def is_coordinator(self) -> bool:
        """This process logs the run (the driver, or rank 0 under torchrun)."""
        return True

    @property
    def restarted(self) -> bool:
        """The job was restarted under it (torchrun's elastic agent): resume whatever the config says."""
        return False

    @abstractmethod
    def checkpoint_steps(self) -> list[list[int]]:
        """Checkpoint steps of every rank, newest first (not yet verified)."""

    @abstractmethod
    def load(self, step: int) -> dict[str, Any] | None:
        """Every rank loads its checkpoint of ``step``; the saved loop state, or None if any rank cannot."""

    @abstractmethod
    def initial_sync(self) -> None:
        """A fresh run: every segment's owners agree on the initial weights."""

    @abstractmethod
    def run_round(self, round_idx: int, max_steps: int) -> list[RoundReport]:
        """Run ``round_idx`` on the live workers; the reports of those that completed it."""

    @abstractmethod
    def finish(self) -> None:
        """Apply updates still in flight (the last round)."""

    @abstractmethod
    def evaluate(self) -> float:
        """Validation loss of the global weights (on the evaluation replica)."""

    @abstractmethod
    def save(self, step: int, loop: dict[str, Any]) -> None:
        """Every live rank checkpoints its worker, with the loop state beside it."""

    def catch_up(self, round_idx: int) -> list[dict[str, Any]]:
        """Workers that fell behind rejoin at ``round_idx`` (events to log)."""
        return []

    def publish_global(self, round_idx: int) -> None:
        """The global weights at the start of ``round_idx`` go where a restarted worker finds them."""

    def events(self) -> list[dict[str, Any]]:
        """Membership events since the last call (dropped, rejoined, rejected frames)."""
        return []

    def clock(self, state: LoopState) -> tuple[float, float]:
        """(clock seconds, compute utilisation) for the records: the loop's wall-clock by default."""
        return state.elapsed_s, min(1.0, state.busy_s / max(1e-9, state.elapsed_s))

    def summary_extra(self) -> dict[str, Any]:
        return {}

    def record_extra(self) -> dict[str, Any]:
        """Mode-specific figures for the round's record (simulation: the pipelines' waits)."""
        return {}


def n_rounds(cfg: Config) -> int:
    """Rounds of a run: ``train.steps`` inner steps of a full-speed replica, H per round."""
    return math.ceil(cfg.train.steps / nominal_steps(cfg))


class RoundLoop:
    """Drives a pool of workers through the run."""

    def __init__(self, cfg: Config, pool: WorkerPool, run_dir: Path):
        self.cfg, self.pool, self.run_dir = cfg, pool, Path(run_dir)
        self.layout = pool.layout
        self.state = LoopState()
        self.total = n_rounds(cfg)
        self.h = nominal_steps(cfg)
        self.resumed_from: int | None = None

    # ----- start -------------------------------------------------------------------------------
    def _resume(self) -> int | None:
        """Load the newest step every rank has and can read; None: nothing to resume from."""
        steps = self.pool.checkpoint_steps()
        wanted = wanted_resume_step(self.cfg)
        if wanted is not None:  # checkpoint.resume names one step: that one or nothing
            if newest_common_step(steps) is None or wanted not in set.intersection(*map(set, steps)):
                raise ValueError(f"checkpoint.resume: step {wanted} is not checkpointed by every rank of this run")
            steps = [[wanted]]
        bad: set[int] = set()
        for _ in range(1 + max((len(s) for s in steps), default=0)):
            step = newest_common_step(steps, bad)
            if step is None:
                if wanted is not None:
                    raise ValueError(f"checkpoint.resume: step {wanted} cannot be read on every rank")
                return None
            got = self.pool.load(step)
            if got is not None:
                self.state = LoopState(**got)
                return step
            log.warning("checkpoint step %d is not usable on every rank; trying an older one", step)
            bad.add(step)
        return None

    def start(self) -> None:
        if self.cfg.checkpoint.resume != "none" or self.pool.restarted:
            self.resumed_from = self._resume()
        if self.resumed_from is None:
            self.pool.initial_sync()

    # ----- rounds ------------------------------------------------------------------------------
    def _account(self, reports: list[RoundReport], wall_s: float) -> None:
        s = self.state
        s.round += 1
        s.step = min(s.round * self.h, self.cfg.train.steps)
        s.tokens += sum(r.tokens for r in reports)
        busy = [r.extra.get("train_s", 0.0) for r in reports if r.rank == self.layout.reporter(r.replica)]
        s.busy_s += float(sum(busy) / max(1, len(busy)))
        s.elapsed_s += wall_s

    def run(self) -> RunSummary | None:
        t_start = time.perf_counter()
        self.start()
        cfg, pool, s = self.cfg, self.pool, self.state
        logger = RoundLogger(cfg, self.run_dir, self.total, s.round, s.bytes_sent, pool.clock_name) \
            if pool.is_coordinator else None
        try:
            if self.resumed_from is not None:
                if logger is not None:
                    logger.first_val, logger.val_loss = s.first_val, s.first_val
                    logger.log({"kind": "event", "event": "resumed", "step": self.resumed_from, "round": s.round,
                                **pool.summary_extra()})
                    logger.say(f"resumed from step {self.resumed_from} (round {s.round} of {self.total})")
            elif s.round == 0:
                s.first_val = pool.evaluate()
                if logger is not None:
                    logger.initial_val(s.first_val)
            pool.publish_global(s.round)
            for round_idx in range(s.round, self.total):  # bounded by construction
                assert s.round == round_idx, f"loop state at round {s.round}, expected {round_idx}"
                events = pool.catch_up(s.round)
                t0 = time.perf_counter()
                reports = pool.run_round(s.round, cfg.train.steps - s.step)
                if s.round + 1 == self.total:
                    pool.finish()
                pool.publish_global(s.round + 1)
                steps = min(self.h, cfg.train.steps - s.step)
                self._account(reports, time.perf_counter() - t0)
                events += pool.events()
                clock_s, util = pool.clock(s)
                rec = round_record(s.round, s.step, reports, self.layout, s.tokens, s.bytes_sent, clock_s, util,
                                   time.perf_counter() - t0)
                rec.update(pool.record_extra())
                s.bytes_sent = rec["bytes_sent"]
                if logger is not None:
                    for e in events:
                        logger.log({"kind": "event", "step": s.step, **e})
                    logger.train(rec)
                if s.round == self.total or crossed(s.step, steps, cfg.train.eval_every):
                    val = pool.evaluate()
                    if logger is not None:
                        logger.val(rec, val)
                if logger is not None:
                    logger.show(rec)
                if s.round == self.total or crossed(s.step, steps, cfg.checkpoint.every):
                    pool.save(s.step, s.to_dict())
        finally:
            if logger is not None:
                logger.close()
        if logger is None:
            return None
        if cfg.logging.plots:
            from distrain.plots import plot_run

            plot_run(self.run_dir)
        clock_s, util = pool.clock(s)
        summary = logger.summary(self.run_dir, s.round, s.step, s.tokens, clock_s, util, time.perf_counter() - t_start)
        (self.run_dir / "summary.json").write_text(json.dumps({**summary.to_dict(), "mode": pool.mode,
                                                               "world_size": self.layout.world_size,
                                                               **pool.summary_extra()}, indent=1))
        return summary
