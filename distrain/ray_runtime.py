"""A Ray job: one actor per worker in a placement group, a Coordinator actor, a driver loop.

The driver (``python -m launch.ray``, usually started by ``ray job submit``) prepares the data,
starts the Coordinator on its own node, reserves one placement-group bundle per worker from
``runtime.worker_cpus/gpus/memory_mb`` (heterogeneous workers get unequal bundles) and starts a
``WorkerHost`` actor in each. Every round it asks the caught-up workers to run
``Worker.run_round`` — the same code as simulation and torchrun, over ``RayTransport`` — and
waits. A worker whose actor dies (or that the Coordinator dropped at the deadline) is marked
absent so the round completes with the others (if they make the quorum); Ray restarts the actor
(``runtime.max_restarts``), and before the next round the driver has it load the current global
weights from the Coordinator and rejoin. Metrics are the driver's (``RoundLogger``), checkpoints
are per worker (``checkpoints/rank-K``) plus the Coordinator's (``checkpoints/coordinator``), and a
restarted job resumes from the Coordinator's newest checkpoint.

Actor arguments and small control values travel with Ray's own serialisation inside the cluster;
model weights and pseudo-gradients travel only as ``bytes`` wire frames, validated on receipt.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from comm.errors import CommError
from comm.ray_transport import QuorumError, RayTransport
from distrain.checkpoint import CheckpointError
from distrain.config import Config, load_config, save_config, to_toml
from distrain.coordinator import CoordinatorActor
from distrain.data import read_shard
from distrain.layout import REPLICAS, Layout, check_runtime, ray_bundles
from distrain.runner import (
    Fault,
    RoundLogger,
    RunSummary,
    apply_torch_threads,
    crossed,
    n_rounds,
    prepare_data,
    rank_checkpoint_steps,
    read_rank_checkpoint,
    save_rank_checkpoint,
    setup_run_dir,
    validation_batches,
)
from distrain.worker import RoundReport, build_worker, decode_params, encode_params, run_id, steps_per_round

log = logging.getLogger(__name__)


def config_from_toml(text: str) -> Config:
    """A resolved config sent as TOML text (strictly re-checked by ``load_config``)."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
        path = f.name
    try:
        return load_config(path)
    finally:
        os.unlink(path)


class NeedsCatchUpError(CommError):
    """A worker was asked to run a round it is not at (it restarted, or missed a round)."""


class _FaultyTransport(RayTransport):
    """Fault injection on the worker side of a Ray job.

    ``stale_round``: in that round this worker re-sends its previous round's frame.
    ``hold_round``: in that round this worker stops after its inner steps, before sending its
    frame, for up to ``hold_s`` — the window in which the driver kills its actor, so the kill
    lands mid-round every time (not before the round started, nor after it finished).
    """

    def __init__(self, *args: Any, stale_round: int = -1, hold_round: int = -1, hold_s: float = 60.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._stale_round, self._hold_round, self._hold_s = stale_round, hold_round, hold_s
        self._last: bytes | None = None
        self._current = 0

    def begin_round(self, round_idx: int) -> None:
        super().begin_round(round_idx)
        self._current = round_idx

    def all_gather_bytes(self, group: str, payload: bytes) -> list[bytes | None]:
        if self._current == self._hold_round:
            log.warning("fault injection: worker %d holds in round %d until it is killed", self.rank, self._current)
            time.sleep(self._hold_s)
        send = self._last if self._current == self._stale_round and self._last is not None else payload
        self._last = payload
        return super().all_gather_bytes(group, send)


class WorkerHost:
    """Inside a Ray actor: one ``Worker`` built exactly as simulation builds it."""

    def __init__(self, cfg_toml: str, rank: int, coordinator: Any, faults: tuple[str, ...] = ()):
        self.cfg = cfg = config_from_toml(cfg_toml)
        apply_torch_threads(cfg)
        self.rank = rank
        data = prepare_data(cfg)  # cached by the driver (or prepared here, on another node)
        R = cfg.topology.replicas
        faults = [Fault.parse(f) for f in faults if f]
        kwargs: dict[str, Any] = dict(groups={REPLICAS: list(range(R))}, timeout_s=cfg.topology.round_timeout_s)
        for f in faults:
            kwargs["stale_round" if f.kind == "stale" else "hold_round"] = f.round
        self.transport: RayTransport = (_FaultyTransport if faults else RayTransport)(coordinator, rank, R, **kwargs)
        self.worker = build_worker(cfg, rank, rank, read_shard(data.train_path), self.transport)
        self.val_batches = validation_batches(cfg, data)
        self.run = run_id(cfg)
        self.next_round = 0

    def info(self) -> dict[str, Any]:
        return {"rank": self.rank, "pid": os.getpid(), "next_round": self.next_round,
                "threads": torch.get_num_threads()}

    def run_round(self, round_idx: int, max_steps: int) -> dict[str, Any]:
        if round_idx != self.next_round:
            raise NeedsCatchUpError(f"worker {self.rank} is at round {self.next_round}, asked for {round_idx}")
        self.next_round = -1  # a round that fails half-way leaves the worker needing a catch-up
        self.transport.begin_round(round_idx)
        report = self.worker.run_round(round_idx, max_steps)
        self.next_round = round_idx + 1
        return report.to_dict()

    def finish(self) -> None:
        self.worker.finish()

    def export_global(self, round_idx: int) -> tuple[bytes, int]:
        """The global weights at the start of ``round_idx``, as a dense wire frame, and its size
        (a second, tiny return value the driver can check without fetching the frame)."""
        frame = encode_params(self.worker.global_params(), self.run, round_idx, self.rank)
        return frame, len(frame)

    def catch_up(self, round_idx: int, item: list[Any]) -> int:
        """Load the Coordinator's global weights (start of ``round_idx``) and join that round."""
        import ray

        data = ray.get(item[0])
        if not isinstance(data, bytes):
            raise TypeError(f"global weights object is {type(data).__name__}, not bytes")
        self.worker.catch_up(decode_params(data, self.worker.param_shapes(), self.run, round_idx), round_idx)
        self.next_round = round_idx
        return os.getpid()

    def evaluate(self) -> float:
        return self.worker.evaluate(self.val_batches)

    def save(self, run_dir: str, step: int, meta: dict[str, Any]) -> None:
        state = {"round": self.next_round, "worker": self.worker.state_dict(), "rng": torch.get_rng_state()}
        save_rank_checkpoint(Path(run_dir), self.rank, step, state, meta, self.cfg.checkpoint.keep)

    def load(self, run_dir: str, step: int) -> bool:
        """Resume this worker from its own checkpoint at ``step``; False if it has none usable."""
        if step not in rank_checkpoint_steps(Path(run_dir), self.rank):
            return False
        try:
            st = read_rank_checkpoint(Path(run_dir), self.rank, step).state
        except CheckpointError as e:
            log.warning("worker %d: %s", self.rank, e)
            return False
        self.worker.load_state_dict(st["worker"])
        self.next_round = int(st["round"])
        torch.set_rng_state(st["rng"])
        return True


def _is_worker_failure(exc: BaseException) -> bool:
    """Failures the job survives: the actor died, or the transport dropped/timed out the worker."""
    import ray

    return isinstance(exc, (ray.exceptions.RayActorError, CommError)) and not isinstance(exc, QuorumError)


class RayJob:
    """The driver: owns the Coordinator, the placement group and the worker actors."""

    def __init__(self, cfg: Config, faults: list[Fault] | None = None):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

        check_runtime(cfg)
        if cfg.outer.algorithm not in ("diloco", "sparseloco"):
            raise ValueError("the Ray runtime runs diloco or sparseloco (rounds of H inner steps)")
        if cfg.runtime.replica_devices and any(d != 1 for d in cfg.runtime.replica_devices):
            raise ValueError("the Ray runtime runs one process per replica; multi-process replicas need torchrun")
        if not Path(cfg.run.out_dir).is_absolute():
            log.warning("run.out_dir=%r is relative to the job's working directory; give an absolute path "
                        "to find the run after the job", cfg.run.out_dir)
        self.cfg, self.faults = cfg, list(faults or [])
        self.layout = Layout.from_config(cfg)
        self.run_dir = setup_run_dir(cfg).resolve()
        self.data = prepare_data(cfg, progress=cfg.logging.progress)
        save_config(cfg, self.run_dir / "config.toml")
        R = cfg.topology.replicas
        here = ray.get_runtime_context().get_node_id()
        self.coordinator = ray.remote(CoordinatorActor).options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        ).remote(R, {REPLICAS: list(range(R))}, cfg.topology.quorum, cfg.topology.round_timeout_s)
        bundles = ray_bundles(cfg)
        self.pg = placement_group(bundles, strategy=cfg.runtime.placement_strategy, name=f"distrain-{cfg.run.name}")
        try:
            ray.get(self.pg.ready(), timeout=max(60.0, cfg.topology.round_timeout_s))
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"the cluster cannot place the workers' bundles {bundles} "
                               f"(strategy {cfg.runtime.placement_strategy}); available: {ray.available_resources()}") from None
        text = to_toml(cfg.to_dict())
        host = ray.remote(WorkerHost)
        self.actors = [
            host.options(num_cpus=b["CPU"], num_gpus=b.get("GPU", 0), memory=b.get("memory"),
                         max_restarts=cfg.runtime.max_restarts, max_task_retries=0,
                         scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
                         ).remote(text, r, self.coordinator, self._worker_faults(r))
            for r, b in enumerate(bundles)
        ]
        self.active: set[int] = set(range(R))
        self.behind: set[int] = set()
        self.tokens, self.bytes_sent, self.busy_s, self.elapsed_s = 0, 0, 0.0, 0.0
        self.round, self.step = 0, 0

    def _worker_faults(self, rank: int) -> tuple[str, ...]:
        """The worker-side part of the faults aimed at ``rank`` (see ``_FaultyTransport``)."""
        return tuple(f"{f.kind}:rank={f.rank},round={f.round}" for f in self.faults
                     if f.rank == rank and f.kind in ("stale", "kill"))

    # ----- helpers -------------------------------------------------------------------------------
    def _call(self, rank: int, method: str, *args: Any, timeout: float | None = None) -> Any:
        import ray

        return ray.get(getattr(self.actors[rank], method).remote(*args), timeout=timeout)

    def _lose(self, rank: int, round_idx: int, why: str) -> None:
        """Worker ``rank`` failed: the rounds go on without it until it has caught up."""
        import ray

        log.warning("round %d: worker %d dropped: %s", round_idx, rank, why)
        self.active.discard(rank)
        self.behind.add(rank)
        ray.get(self.coordinator.mark_absent.remote(rank, round_idx, why.split(":")[0]))

    def _on_active(self, method: str, *args: Any) -> dict[int, Any]:
        """Call ``method`` on every active worker; one that died since is dropped, not fatal."""
        import ray

        refs = {r: getattr(self.actors[r], method).remote(*args) for r in sorted(self.active)}
        out = {}
        for r, ref in refs.items():
            try:
                out[r] = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - sorted into survivable and fatal
                if not _is_worker_failure(e):
                    raise
                self._lose(r, self.round, f"{type(e).__name__}: {str(e).splitlines()[0]}")
        return out

    def _evaluate(self) -> float:
        """Validation loss on the lowest live worker (they all hold the global weights)."""
        import ray

        for r in sorted(self.active):
            try:
                return self._call(r, "evaluate")
            except ray.exceptions.RayActorError as e:
                self._lose(r, self.round, f"{type(e).__name__}")
        raise RuntimeError("no live worker to evaluate on")

    def _publish_global(self, round_idx: int) -> None:
        """Hand the Coordinator the global weights of ``round_idx`` from the lowest live worker.

        The frame stays in the object store (owned by this driver, so it outlives the worker)."""
        import ray

        for r in sorted(self.active):
            frame_ref, size_ref = self.actors[r].export_global.options(num_returns=2).remote(round_idx)
            try:
                ray.get(size_ref)
            except ray.exceptions.RayActorError as e:
                self._lose(r, round_idx, type(e).__name__)
                continue
            ray.get(self.coordinator.set_global.remote(round_idx, [frame_ref]))
            return
        raise RuntimeError(f"round {round_idx}: no live worker to take the global weights from")

    def _events(self, logger: RoundLogger) -> list[dict[str, Any]]:
        import ray

        events = ray.get(self.coordinator.take_events.remote())
        for e in events:
            logger.log({"kind": "event", **e})
        return events

    def _resume(self) -> bool:
        """Whole-job restart: the Coordinator's newest checkpoint, each worker's own state at that step."""
        import ray

        got = ray.get(self.coordinator.load.remote(str(self.run_dir)))
        if got is None:
            return False
        self.round, self.step = int(got["round"]), int(got["step"])
        self.tokens = int(got["counters"]["tokens"])
        self.bytes_sent = int(got["counters"].get("bytes_sent", 0))
        self.busy_s = float(got["counters"].get("busy_ms", 0)) / 1e3
        self.elapsed_s = float(got["counters"].get("elapsed_ms", 0)) / 1e3
        loaded = ray.get([a.load.remote(str(self.run_dir), self.step) for a in self.actors])
        self.behind = {r for r, ok in enumerate(loaded) if not ok}
        self.active -= self.behind
        for r in self.behind:
            ray.get(self.coordinator.mark_absent.remote(r, self.round, "no usable checkpoint at resume"))
        return True

    def _catch_up(self, round_idx: int, logger: RoundLogger) -> None:
        """Workers that are behind load the global weights of ``round_idx`` and rejoin."""
        import ray

        if not self.behind:
            return
        g_round, item = ray.get(self.coordinator.get_global.remote())
        if g_round != round_idx:
            raise RuntimeError(f"Coordinator holds the weights of round {g_round}, round {round_idx} is next")
        wait_s = min(120.0, self.cfg.topology.round_timeout_s)
        for r in sorted(self.behind):
            deadline = time.monotonic() + wait_s
            while True:  # a restarting actor answers "unavailable" until its constructor has run
                try:
                    pid = self._call(r, "catch_up", round_idx, item, timeout=max(1.0, deadline - time.monotonic()))
                    break
                except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError) as e:
                    if time.monotonic() >= deadline:
                        pid = None
                        log.warning("worker %d cannot rejoin yet: %s", r, type(e).__name__)
                        break
                    time.sleep(0.2)
                except ray.exceptions.RayActorError as e:  # gone for good (restarts used up)
                    pid = None
                    log.warning("worker %d cannot rejoin: %s", r, str(e).splitlines()[0])
                    break
            if pid is None:
                continue
            self.behind.discard(r)
            self.active.add(r)
            ray.get(self.coordinator.mark_present.remote(r))
            logger.log({"kind": "event", "event": "caught_up", "rank": r, "round": round_idx, "step": self.step,
                        "pid": pid})

    def _run_round(self, round_idx: int, remaining: int, logger: RoundLogger) -> list[RoundReport]:
        import ray

        pending = {self.actors[r].run_round.remote(round_idx, remaining): r for r in sorted(self.active)}
        for f in self.faults:
            if f.kind == "kill" and f.round == round_idx and f.rank in self.active:
                time.sleep(f.delay)
                ray.kill(self.actors[f.rank], no_restart=False)
                logger.log({"kind": "event", "event": "killed", "rank": f.rank, "round": round_idx, "step": self.step})
        deadline = time.monotonic() + 2 * self.cfg.topology.round_timeout_s + 60.0
        reports: list[RoundReport] = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RuntimeError(f"round {round_idx}: workers {sorted(pending.values())} neither finished nor failed")
            r = pending.pop(ready[0])
            try:
                reports.append(RoundReport.from_dict(ray.get(ready[0])))
            except Exception as e:  # noqa: BLE001 - sorted into survivable and fatal just below
                if not _is_worker_failure(e):
                    raise
                self._lose(r, round_idx, f"{type(e).__name__}: {str(e).splitlines()[0]}")
        if not reports:
            raise RuntimeError(f"round {round_idx}: no worker finished it")
        return sorted(reports, key=lambda rep: rep.rank)

    def _counters(self, logger: RoundLogger) -> dict[str, int]:
        """What a resumed job continues from (integers: the Coordinator keeps int counters)."""
        return {"tokens": self.tokens, "step": self.step, "bytes_sent": logger.bytes_sent,
                "busy_ms": int(self.busy_s * 1e3), "elapsed_ms": int(self.elapsed_s * 1e3)}

    def _save(self, step: int) -> None:
        import ray

        meta = {"round": self.round, "step": step, "tokens": self.tokens, "config_hash": self.cfg.hash()}
        self._on_active("save", str(self.run_dir), step, meta)
        ray.get(self.coordinator.save.remote(str(self.run_dir), step, self.cfg.checkpoint.keep))

    # ----- the loop -------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        import ray

        cfg = self.cfg
        t_start = time.perf_counter()
        spr0 = steps_per_round(cfg, 0)
        total = n_rounds(cfg, spr0)
        resumed = cfg.checkpoint.resume == "auto" and self._resume()
        ray.get([a.info.remote() for a in self.actors])  # every actor built: the clock starts now
        if not resumed:
            self._publish_global(0)
        logger = RoundLogger(cfg, self.run_dir, total, self.round, self.bytes_sent)
        loop_start, elapsed0 = time.perf_counter(), self.elapsed_s
        try:
            if resumed:
                logger.log({"kind": "event", "event": "resumed", "round": self.round, "step": self.step})
            else:
                logger.initial_val(self._evaluate())
            while self.round < total:
                self._catch_up(self.round, logger)
                remaining = cfg.train.steps - self.round * spr0
                t0 = time.perf_counter()
                reports = self._run_round(self.round, remaining, logger)
                self.round += 1
                if self.round == total:
                    self._on_active("finish")
                self._publish_global(self.round)
                wall = time.perf_counter() - t0
                self.step = min(self.round * spr0, cfg.train.steps)  # what rank 0 has done, even if it failed
                self.tokens += sum(r.tokens for r in reports)
                self.busy_s += sum(r.extra.get("train_s", 0.0) for r in reports) / len(reports)
                self.elapsed_s = elapsed0 + time.perf_counter() - loop_start
                self._events(logger)
                rec = logger.train(self.round, reports, self.tokens, self.elapsed_s,
                                   min(1.0, self.busy_s / max(1e-9, self.elapsed_s)), wall_s=wall,
                                   extra={"workers": len(reports)})
                ray.get(self.coordinator.end_round.remote(self.round, rec, self._counters(logger)))
                if logger.eval_due(rec, reports[0].steps):
                    logger.val(rec, self._evaluate())
                logger.show(rec, clock="wall")
                if self.round == total or crossed(self.step, reports[0].steps, cfg.checkpoint.every):
                    self._save(self.step)
        finally:
            logger.close()
        summary = logger.summary(self.run_dir, self.round, self.step, self.tokens, self.elapsed_s,
                                 min(1.0, self.busy_s / max(1e-9, self.elapsed_s)), time.perf_counter() - t_start)
        (self.run_dir / "summary.json").write_text(json.dumps({**summary.to_dict(), "mode": "ray",
                                                               "workers": len(self.actors)}, indent=1))
        return summary

    def close(self) -> None:
        """Stop the actors and release the placement group (the cluster itself keeps running)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a, no_restart=True)
        ray.kill(self.coordinator, no_restart=True)
        remove_placement_group(self.pg)
