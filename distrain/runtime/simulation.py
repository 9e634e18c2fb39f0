"""Simulation: every worker a thread of this process, over the simulated transport and virtual clock.

``distrain train`` is the one-replica case (no outer round); ``distrain simulate`` runs any
topology through the very same ``Worker.run_round`` and ``RoundLoop`` the multi-process modes use.
The network model turns bytes into simulated seconds on each worker's own link; multi-device
replicas get real gloo process groups between their threads (``distrain.comm.device_groups``), so DDP runs
here exactly as it does under torchrun.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from distrain.checkpoint import CheckpointError, abort_step, begin_step, commit_step
from distrain.comm.device_groups import InProcessGroupHub
from distrain.comm.errors import CommError, FrameError
from distrain.comm.network import NetworkModel
from distrain.comm.simulated import SimulatedHub
from distrain.comm.transport import Transport
from distrain.config import Config, ConfigError, save_config
from distrain.layout import Layout
from distrain.runtime.common import apply_torch_threads, keep_tokenizer, prepare_data, setup_run_dir, validation_batches
from distrain.runtime.faults import BoundaryFault, Fault, HostileCodec
from distrain.runtime.loop import RoundLoop
from distrain.runtime.pool import LoopState, Resumed, WorkerPool
from distrain.runtime.records import RunSummary
from distrain.runtime.resume import (
    ResumeSource,
    checkpoint_dir,
    manifest_for,
    saved_steps,
    segment_writers,
    write_worker,
)
from distrain.runtime.steps import RoundPlan
from distrain.worker.build import build_worker
from distrain.worker.stage import EMBEDDING
from distrain.worker.worker import RoundReport, Worker

T = TypeVar("T")
log = logging.getLogger(__name__)
SIM_FAULTS = ("hostile", "flip", "slow", "boundary")
# what ends a replica's round, not the run: a rejected boundary frame (or the absent partner it leaves
# behind), a non-finite loss
REPLICA_FAILURES = (FrameError, CommError, FloatingPointError)


class SimulationPool(WorkerPool):
    """All workers of the layout as threads; the virtual clock is the run's clock."""

    mode = "simulation"
    clock_name = "sim"

    def __init__(self, cfg: Config, faults: list[Fault] | None = None):
        self.cfg = cfg
        self.faults = [f for f in (faults or []) if f.kind in SIM_FAULTS]
        unsupported = [f.kind for f in (faults or []) if f.kind not in SIM_FAULTS]
        if unsupported:
            raise ValueError(f"the simulation injects {', '.join(SIM_FAULTS)} faults only, not {unsupported}")
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
        keep_tokenizer(self.run_dir, self.data)
        self.val_batches = validation_batches(cfg, self.data)
        world = self.layout.world_size
        self.hub = SimulatedHub(world, self.layout.byte_groups(), NetworkModel(world, links=self.layout.links()),
                                timeout_s=cfg.topology.round_timeout_s,
                                overlap=cfg.outer.apply_delay == 1)  # delayed apply: all-gathers in the background
        self.threads = ThreadPoolExecutor(max_workers=world, thread_name_prefix="worker")
        specs = self.layout.device_group_specs()
        groups = InProcessGroupHub(cfg.topology.round_timeout_s) if specs else None

        # fault injection on the wire: a worker's boundary frames go bad from some round on
        self.transports: list[Transport] = [self.hub.transport(r) for r in range(world)]
        for f in self.faults:
            if f.kind == "boundary":
                self.transports[f.rank] = BoundaryFault(self.transports[f.rank], f.round, f.delay)

        def build(rank: int) -> Worker:  # concurrently: device groups rendezvous between the threads
            dg = groups.groups_for(rank, specs) if groups is not None else None
            return build_worker(cfg, self.layout, rank, self.data, self.transports[rank], dg,
                                self.hub.clock.for_rank(rank))

        self.workers: list[Worker] = self._on_all(build)
        self.out: set[int] = set()  # replicas that left a round; they rejoin from the global weights
        self._events: list[dict[str, Any]] = []

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
        return [saved_steps(self.run_dir)]

    def load(self, step: int) -> Resumed | None:
        """Every worker (concurrently: a multi-device replica's devices agree on the weights) from
        the checkpoint of ``step``; the network model's state when the topology is unchanged, else
        its clock continues from the saved one."""
        try:
            src = ResumeSource(self.cfg, self.layout, checkpoint_dir(self.run_dir) / f"step-{step}")
            self._on_all(src.restore, self.workers)
            rng = next((t for t in (src.rng(r) for r in range(self.layout.world_size)) if t is not None), None)
        except CheckpointError as e:
            log.warning("checkpoint step %d unusable: %s", step, e)
            return None
        saved = src.manifest.get("pool") or {}
        if src.unchanged() and isinstance(saved.get("network"), dict):
            self.hub.network.load_state_dict(saved["network"])
        else:
            self._continue_clock(saved.get("network"))
        if rng is not None:
            torch.set_rng_state(rng)
        return Resumed(src.loop, src.plan.changes)

    def _continue_clock(self, network: dict[str, Any] | None) -> None:
        """Another topology: every rank's clock starts at the saved latest one, its time split as the
        saved ranks' was on average (so utilisation carries on); link queues start empty."""
        clocks = network.get("clock") if isinstance(network, dict) else None
        if not isinstance(clocks, list) or not clocks:
            return
        keys = ("compute_time_s", "comm_time_s", "idle_time_s", "transfer_wait_s")
        latest = max(float(c.get("clock_s", 0.0)) for c in clocks)
        mean = {k: sum(float(c.get(k, 0.0)) for c in clocks) / len(clocks) for k in keys}
        self.hub.network.clock.load_state_dict([{**mean, "clock_s": latest, "busy_until_s": latest}
                                                for _ in range(self.layout.world_size)])

    def initial_sync(self) -> None:
        """Nothing to agree on: every thread built its stage from the same seeded initialisation."""

    def run_round(self, round_idx: int, plan: RoundPlan) -> list[RoundReport]:
        """Every worker's part of the round, in threads. A replica whose step cannot go on (a stage
        rejected a boundary frame, its loss went non-finite) leaves the round at once: its workers
        are marked absent, so the others' exchanges complete without them instead of waiting out
        ``topology.round_timeout_s``; it rejoins from the global weights before the next round."""
        for f in self.faults:
            if f.round == round_idx and f.kind == "hostile":  # from this round on: valid, finite, huge frames
                self.workers[f.rank].inject(lambda codec, f=f: HostileCodec(codec, f.delay or 1e30))
            if f.round == round_idx and f.kind == "flip":  # from this round on: its own update, negated, under the clip
                self.workers[f.rank].inject(lambda codec, f=f: HostileCodec(codec, -f.flip_factor))
            if f.round == round_idx and f.kind == "slow":
                self.workers[f.rank].slow_down(f.factor)
        for t in self.transports:
            t.begin_round(round_idx)
        failed: dict[int, str] = {}
        lock = threading.Lock()

        def run(w: Worker) -> RoundReport | None:
            try:
                return w.run_round(round_idx, plan.for_replica(w.replica))
            except REPLICA_FAILURES as e:
                with lock:
                    first = w.replica not in failed
                    failed.setdefault(w.replica, f"{type(e).__name__}: {e}")
                if first:
                    for r in self.layout.ranks(w.replica):
                        self.hub.mark_absent(r)
                return None

        reports = [r for r in self._on_all(run, self.workers) if r is not None]
        for replica, why in sorted(failed.items()):
            log.warning("round %d: replica %d left the round: %s", round_idx, replica, why)
            self._events.append({"event": "left_round", "replica": replica, "round": round_idx, "why": why})
            self.out.add(replica)
        if not reports:
            raise RuntimeError(f"round {round_idx}: every replica left it ({'; '.join(failed.values())})")
        return reports

    def catch_up(self, round_idx: int, replica_steps: list[int]) -> list[dict[str, Any]]:
        """Replicas that left the last round take the global weights and rejoin (their own optimiser
        state, error buffers and data position stay)."""
        events = []
        for replica in sorted(self.out):
            ranks = self.layout.ranks(replica)
            for r in ranks:
                self.hub.mark_present(r)
            live = [w for w in self.workers if w.replica not in self.out]
            self._on_all(lambda w: w.rejoin(*self._global_for(w, live)), [self.workers[r] for r in ranks])
            events.append({"event": "rejoined", "replica": replica, "round": round_idx, "kept_state": True})
        self.out.clear()
        return events

    def _global_for(self, w: Worker, live: list[Worker]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The global weights of what ``w`` holds (and the global embedding, for a later stage of a
        compressed pipeline), from the live workers that own those segments."""
        params: dict[str, torch.Tensor] = {}
        embedding = None
        for g in self.layout.segments_in(w.slot.layers):
            owner = next(o for o in live if g in o.syncs and o.syncs[g].moves_in_rounds)
            params.update(owner.syncs[g].global_state())
        if w.shadow is not None:
            owner = next(o for o in live if 0 in o.syncs and o.syncs[0].moves_in_rounds)
            embedding = owner.syncs[0].global_state()[EMBEDDING]
        return {n: t for n, t in params.items() if n in w.param_shapes()}, embedding

    def events(self, round_idx: int) -> list[dict[str, Any]]:
        out, self._events = self._events, []
        return out

    def finish(self, round_idx: int) -> None:
        self._on_all(lambda w: w.finish(), self.workers)

    def evaluate(self, round_idx: int) -> float:
        ranks = self.layout.eval_ranks()
        losses = self._on_all(lambda r: self.workers[r].evaluate(self.val_batches), ranks)
        return losses[-1]  # the full replica's leader, or the pipeline's last stage

    def save(self, step: int, loop: dict[str, Any]) -> None:
        """Every worker's own part and each segment's global part (by its lowest owner still in the
        round) into one temp directory, committed once all are written."""
        live = [w.rank for w in self.workers if w.replica not in self.out]
        writers = segment_writers(self.layout, live)
        ckpt = checkpoint_dir(self.run_dir)
        tmp = begin_step(ckpt, step)
        try:
            files: dict[str, Any] = {}
            for w in self.workers:
                files.update(write_worker(tmp, w, writers))
        except BaseException:
            abort_step(tmp)
            raise
        manifest = manifest_for(self.cfg, self.layout, loop, pool={"network": self.hub.network.state_dict()})
        commit_step(ckpt, tmp, step, manifest, files, keep=self.cfg.checkpoint.keep)

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
