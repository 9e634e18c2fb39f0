"""Simulation: every worker a thread of this process, over the simulated transport and virtual clock.

``distrain train`` is the one-replica case (no outer round); ``distrain simulate`` runs any
topology through the very same ``Worker.run_round`` and ``RoundLoop`` the multi-process modes use.
The network model turns bytes into simulated seconds on each worker's own link; multi-device
replicas get real gloo process groups between their threads (``distrain.comm.device_groups``), so DDP runs
here exactly as it does under torchrun.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from distrain.comm.device_groups import InProcessGroupHub
from distrain.comm.network import NetworkModel
from distrain.comm.simulated import SimulatedHub
from distrain.checkpoint import CheckpointError
from distrain.config import Config, ConfigError, save_config
from distrain.layout import Layout
from distrain.runtime.common import (
    apply_torch_threads,
    prepare_data,
    rank_checkpoint_steps,
    read_rank_checkpoint,
    save_rank_checkpoint,
    setup_run_dir,
    validation_batches,
)
from distrain.runtime.faults import Fault, HostileCodec
from distrain.runtime.loop import RoundLoop
from distrain.runtime.pool import LoopState, WorkerPool
from distrain.runtime.records import RunSummary
from distrain.runtime.steps import RoundPlan
from distrain.worker.build import build_worker
from distrain.worker.worker import RoundReport, Worker

T = TypeVar("T")


class SimulationPool(WorkerPool):
    """All workers of the layout as threads; the virtual clock is the run's clock."""

    mode = "simulation"
    clock_name = "sim"

    def __init__(self, cfg: Config, faults: list[Fault] | None = None):
        self.cfg = cfg
        self.faults = [f for f in (faults or []) if f.kind in ("hostile", "slow")]
        unsupported = [f.kind for f in (faults or []) if f.kind not in ("hostile", "slow")]
        if unsupported:
            raise ValueError(f"the simulation injects hostile and slow faults only, not {unsupported}")
        self.layout = Layout.from_config(cfg)
        bad = [f.rank for f in self.faults if not 0 <= f.rank < self.layout.world_size]
        if bad:
            raise ValueError(f"fault ranks {bad} outside 0..{self.layout.world_size - 1}")
        if any(r.parallel == "deepspeed" for r in self.layout.replicas):
            raise ConfigError("parallel = 'deepspeed' needs one process per device: run it under torchrun or Ray")
        apply_torch_threads(cfg)
        self.run_dir = setup_run_dir(cfg)
        self.data = prepare_data(cfg, progress=cfg.logging.progress)
        save_config(cfg, self.run_dir / "config.toml")  # now with the resolved vocabulary size
        self.val_batches = validation_batches(cfg, self.data)
        world = self.layout.world_size
        self.hub = SimulatedHub(world, self.layout.byte_groups(), NetworkModel(world, links=self.layout.links()),
                                timeout_s=cfg.topology.round_timeout_s,
                                overlap=cfg.outer.apply_delay == 1)  # delayed apply: all-gathers in the background
        self.threads = ThreadPoolExecutor(max_workers=world, thread_name_prefix="worker")
        specs = self.layout.device_group_specs()
        groups = InProcessGroupHub(cfg.topology.round_timeout_s) if specs else None

        def build(rank: int) -> Worker:  # concurrently: device groups rendezvous between the threads
            dg = groups.groups_for(rank, specs) if groups is not None else None
            return build_worker(cfg, self.layout, rank, self.data, self.hub.transport(rank), dg,
                                self.hub.clock.for_rank(rank))

        self.workers: list[Worker] = self._on_all(build)

    def _on_all(self, fn: Callable[[Any], T], items: list[Any] | None = None) -> list[T]:
        """``fn`` on every worker (or item) in its own thread; the first failure is raised."""
        futures = [self.threads.submit(fn, x) for x in (items if items is not None else range(self.layout.world_size))]
        errors, out = [], []
        for f in futures:
            try:
                out.append(f.result())
            except Exception as e:  # noqa: BLE001 - re-raised below, the first by rank
                errors.append(e)
        if errors:
            raise errors[0]
        return out

    # ----- WorkerPool --------------------------------------------------------------------------
    def checkpoint_steps(self) -> list[list[int]]:
        return [rank_checkpoint_steps(self.run_dir, r) for r in range(self.layout.world_size)]

    def load(self, step: int) -> dict[str, Any] | None:
        try:
            states = [read_rank_checkpoint(self.cfg, self.run_dir, r, step).state for r in range(self.layout.world_size)]
        except CheckpointError:
            return None
        for w, st in zip(self.workers, states):
            w.load_state_dict(st["worker"])
        self.hub.network.load_state_dict(states[0]["pool"]["network"])
        torch.set_rng_state(states[0]["rng"])
        return states[0]["loop"]

    def initial_sync(self) -> None:
        """Nothing to agree on: every thread built its stage from the same seeded initialisation."""

    def run_round(self, round_idx: int, plan: RoundPlan) -> list[RoundReport]:
        for f in self.faults:
            if f.round == round_idx and f.kind == "hostile":  # from this round on: valid, finite, huge frames
                self.workers[f.rank].inject(lambda codec, f=f: HostileCodec(codec, f.delay or 1e30))
            if f.round == round_idx and f.kind == "slow":
                self.workers[f.rank].slow_down(f.factor)
        return self._on_all(lambda w: w.run_round(round_idx, plan.for_replica(w.replica)), self.workers)

    def finish(self, round_idx: int) -> None:
        self._on_all(lambda w: w.finish(), self.workers)

    def evaluate(self, round_idx: int) -> float:
        ranks = self.layout.eval_ranks()
        losses = self._on_all(lambda r: self.workers[r].evaluate(self.val_batches), ranks)
        return losses[-1]  # the full replica's leader, or the pipeline's last stage

    def save(self, step: int, loop: dict[str, Any]) -> None:
        meta = {"round": loop["round"], "step": step, "tokens": loop["tokens"], "config_hash": self.cfg.hash()}
        state = {"loop": loop, "pool": {"network": self.hub.network.state_dict()}, "rng": torch.get_rng_state()}
        for w in self.workers:
            save_rank_checkpoint(self.cfg, self.run_dir, w.rank, step, {**state, "worker": w.state_dict()}, meta)

    def clock(self, state: LoopState) -> tuple[float, float]:
        return self.clock_s(), self.utilisation()

    def record_extra(self) -> dict[str, Any]:
        """The pipeline workers' share of simulated time spent waiting at boundaries (the bubble
        and the transfers of activations and their gradients)."""
        ranks = [w.rank for w in self.layout.workers if self.layout.replicas[w.replica].kind == "pipeline"]
        if not ranks:
            return {}
        stats = [self.hub.stats(r) for r in ranks]
        clock = sum(st.clock_s for st in stats)
        return {"pipeline_wait_share": sum(st.transfer_wait_s for st in stats) / clock if clock > 0 else 0.0,
                "boundary_bytes_total": sum(st.p2p_bytes_sent for st in stats)}

    def clock_s(self) -> float:
        """Simulated wall-clock: the latest worker clock."""
        return max(self.hub.stats(r).clock_s for r in range(self.layout.world_size))

    def utilisation(self) -> float:
        """Fraction of worker-seconds spent computing (the rest is communication and waiting)."""
        clock = self.clock_s()
        busy = sum(self.hub.stats(r).compute_time_s for r in range(self.layout.world_size))
        return busy / (clock * self.layout.world_size) if clock > 0 else 1.0

    def close(self) -> None:
        self.threads.shutdown(wait=True)


class Simulation:
    """A simulated run: the pool of threads and the RoundLoop over it."""

    def __init__(self, cfg: Config, faults: list[Fault] | None = None):
        self.cfg = cfg
        self.pool = SimulationPool(cfg, faults)
        self.loop = RoundLoop(cfg, self.pool, self.pool.run_dir)

    @property
    def workers(self) -> list[Worker]:
        return self.pool.workers

    @property
    def hub(self) -> SimulatedHub:
        return self.pool.hub

    @property
    def run_dir(self) -> Path:
        return self.pool.run_dir

    def clock_s(self) -> float:
        return self.pool.clock_s()

    def utilisation(self) -> float:
        return self.pool.utilisation()

    def run(self) -> RunSummary:
        try:
            summary = self.loop.run()
        finally:
            self.pool.close()
        assert summary is not None  # the simulation's loop is its own coordinator
        return summary


def run_simulation(cfg: Config, faults: list[Fault] | None = None) -> RunSummary:
    t0 = time.perf_counter()
    summary = Simulation(cfg, faults).run()
    summary.wall_s = time.perf_counter() - t0
    return summary
