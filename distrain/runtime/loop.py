"""The RoundLoop: rounds, evaluation, checkpoints, catch-up, resume and metrics — once, for every mode.

A launch mode supplies a ``WorkerPool``: how the loop reaches its workers (threads in this process,
this rank's process among others, Ray actors). The loop runs the same sequence everywhere:

    resume from the newest checkpoint every process can restore (into this topology), or agree on the initial weights
    per round: let workers that fell behind catch up → run the round on the live workers →
               finish in-flight updates on the last round → publish the global weights →
               account tokens/steps/bytes/time → log → evaluate and checkpoint when due

Under torchrun the loop runs on every rank (the pool's calls are collectives, so every rank takes
the same decisions) and only the coordinator rank logs; in simulation and under Ray it runs once,
in the driver.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from distrain.config import Config
from distrain.runtime.common import newest_common_step, wanted_resume_step
from distrain.runtime.pool import LoopState, WorkerPool
from distrain.runtime.records import RoundLogger, RunSummary, crossed, round_record
from distrain.runtime.resume import resume_note
from distrain.runtime.steps import StepPlanner, n_rounds, nominal_steps, update_estimates
from distrain.worker.worker import RoundReport

log = logging.getLogger(__name__)


class RoundLoop:
    """Drives a pool of workers through the run."""

    def __init__(self, cfg: Config, pool: WorkerPool, run_dir: Path):
        self.cfg, self.pool, self.run_dir = cfg, pool, Path(run_dir)
        self.layout = pool.layout
        self.state = LoopState()
        self.total = n_rounds(cfg)
        self.h = nominal_steps(cfg)
        self.planner = StepPlanner(cfg, self.layout)
        self.resumed_from: int | None = None
        self.changes: list[str] = []  # how the topology differs from the checkpoint's (resume event)

    # ----- start -------------------------------------------------------------------------------
    def _resume(self) -> int | None:
        """Load the newest step every rank has and can read; None: nothing to resume from."""
        steps = self.pool.checkpoint_steps()
        wanted = wanted_resume_step(self.cfg)
        if wanted is not None:  # checkpoint.resume names one step: that one or nothing
            if newest_common_step(steps) is None or wanted not in set.intersection(*map(set, steps)):
                raise ValueError(f"checkpoint.resume: step {wanted} is not a checkpoint of this run")
            steps = [[wanted]]
        bad: set[int] = set()
        for _ in range(1 + max((len(s) for s in steps), default=0)):
            step = newest_common_step(steps, bad)
            if step is None:
                if wanted is not None:
                    raise ValueError(f"checkpoint.resume: step {wanted} cannot be resumed (see the warnings)")
                return None
            got = self.pool.load(step)
            if got is not None:
                self.state = LoopState(**got.loop)
                self.changes = got.changes
                return step
            log.warning("checkpoint step %d is not usable; trying an older one", step)
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
        n = self.layout.n_replicas
        s.round += 1
        s.step = min(s.round * self.h, self.cfg.train.steps)
        s.tokens += sum(r.tokens for r in reports)
        s.step_s = update_estimates(s.step_s, reports, n)
        done = s.replica_steps or [0] * n
        for r in reports:
            if r.rank == self.layout.reporter(r.replica):
                done[r.replica] += r.steps
        s.replica_steps = done
        s.clipped += sum(st.clipped for r in reports for st in r.outer)
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
                                "changes": self.changes, **pool.summary_extra()})
                    logger.say(resume_note(self.resumed_from, s.round, self.total, self.changes))
            if logger is not None:
                for rep in self.layout.replicas:  # what was chosen for the user, and why
                    if rep.choice:
                        logger.say(f"replica {rep.index} ({rep.kind}): {rep.choice}")
            if self.resumed_from is None and s.round == 0:
                s.first_val = pool.evaluate(s.round)
                if logger is not None:
                    logger.initial_val(s.first_val)
            pool.publish_global(s.round)
            for round_idx in range(s.round, self.total):  # bounded by construction
                assert s.round == round_idx, f"loop state at round {s.round}, expected {round_idx}"
                events = pool.catch_up(s.round, s.replica_steps or [0] * self.layout.n_replicas)
                plan = self.planner.plan(s.round, float(s.step), s.step_s)
                t0 = time.perf_counter()
                reports = pool.run_round(s.round, plan)
                if s.round + 1 == self.total:
                    pool.finish(s.round)
                pool.publish_global(s.round + 1)
                steps = min(self.h, cfg.train.steps - s.step)
                self._account(reports, time.perf_counter() - t0)
                events += pool.events(round_idx)
                clock_s, util = pool.clock(s)
                rec = round_record(s.round, s.step, reports, self.layout, s.tokens, s.bytes_sent, clock_s, util,
                                   time.perf_counter() - t0, plan)
                rec.update(pool.record_extra())
                s.bytes_sent = rec["bytes_sent"]
                if logger is not None:
                    for e in events:
                        logger.log({"kind": "event", "step": s.step, **e})
                        if e["event"] == "left_round":  # the user sees why at once, in one line
                            logger.say(f"round {e['round']}: replica {e['replica']} left the round: {e['why']}")
                    logger.train(rec)
                if s.round == self.total or crossed(s.step, steps, cfg.train.eval_every):
                    val = pool.evaluate(s.round)
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
