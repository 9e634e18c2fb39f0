"""A Ray job: one actor per worker, a Coordinator actor, and the RoundLoop in the driver.

The driver (``python -m distrain.launch.ray``, usually started by ``ray job submit``) prepares the data,
starts the Coordinator on its own node and one ``WorkerHost`` actor per worker of the layout, in
placement groups built from the topology's per-worker resources: a multi-device full replica's
bundles are STRICT_PACKed into a placement group of their own (its devices need a fast
interconnect and join one torch.distributed world), every other worker shares one placement group
with ``runtime.placement_strategy``. Each round it asks the live workers to run
``Worker.run_round`` — the same code as simulation and torchrun, over ``RayTransport`` — and waits.

The unit of failure is a replica. A worker whose actor dies (or whom the Coordinator drops at the
deadline) takes its replica out of the round: all its workers are marked absent in every segment
group, so the other replicas' round completes (if they make the quorum); the replica's other
actors are restarted too (their pipeline partners or device world are gone). Before the next
round every worker of the replica is set up again and loads the current global weights of the
segments it holds from the Coordinator, its step, schedule and data position moved to where a
worker that never failed would be; then the replica rejoins.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from distrain.comm.errors import CommError, FrameError
from distrain.comm.ray_transport import QuorumError
from distrain.config import Config, save_config, to_toml
from distrain.layout import Layout
from distrain.checkpoint import CheckpointError, abort_step, begin_step, commit_step
from distrain.runtime.common import keep_tokenizer, prepare_data, setup_run_dir
from distrain.runtime.faults import Fault
from distrain.runtime.ray.coordinator import CoordinatorActor
from distrain.runtime.loop import RoundLoop
from distrain.runtime.pool import Resumed, WorkerPool
from distrain.runtime.records import RunSummary
from distrain.runtime.resume import (
    ResumeSource,
    checkpoint_dir,
    manifest_for,
    saved_steps,
)
from distrain.runtime.steps import RoundPlan
from distrain.runtime.ray.host import WorkerHost
from distrain.worker.worker import RoundReport

log = logging.getLogger(__name__)

ACTOR_THREADS = 4  # a worker takes peers' deliveries while its round runs
LATE_POLL_S = 0.5  # how often the driver asks the Coordinator who is late while a round runs


def _reason(exc: BaseException) -> str:
    """One line saying why a worker failed: the worker's own exception, not Ray's wrapper around it."""
    cause = getattr(exc, "cause", None)
    exc = cause if isinstance(cause, BaseException) else exc
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _is_worker_failure(exc: BaseException) -> bool:
    """Failures the job survives (its replica leaves the round): the actor died, the transport dropped
    or timed out the worker, a stage rejected a boundary frame, a loss went non-finite."""
    import ray

    return isinstance(exc, (ray.exceptions.RayActorError, CommError, FrameError, FloatingPointError)) \
        and not isinstance(exc, QuorumError)


class RayPool(WorkerPool):
    """The driver's view of the job: the Coordinator, the placement groups and the worker actors."""

    mode = "ray"

    def __init__(self, cfg: Config, faults: list[Fault] | None = None):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if not cfg.algorithm.rounds:
            raise ValueError("the Ray runtime runs diloco or sparseloco (rounds of H inner steps)")
        if not Path(cfg.run.out_dir).is_absolute():
            log.warning("run.out_dir=%r is relative to the job's working directory; give an absolute path "
                        "to find the run after the job", cfg.run.out_dir)
        self.cfg, self.faults = cfg, list(faults or [])
        self.layout = lay = Layout.from_config(cfg)
        self.run_dir = setup_run_dir(cfg).resolve()
        self.data = prepare_data(cfg, progress=cfg.logging.progress)
        save_config(cfg, self.run_dir / "config.toml")
        keep_tokenizer(self.run_dir, self.data)
        here = ray.get_runtime_context().get_node_id()
        self.coordinator = ray.remote(CoordinatorActor).options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        ).remote(lay.world_size, lay.byte_groups(), cfg.topology.quorum, cfg.topology.grace_s,
                 timeout_s=cfg.topology.round_timeout_s,
                 graced=[lay.segment_group(g) for g in range(len(lay.segments))])
        self.pgs, placement = self._placement_groups()
        text = to_toml(cfg.to_dict())
        host = ray.remote(WorkerHost)
        self.actors = [
            host.options(max_concurrency=ACTOR_THREADS, max_restarts=cfg.runtime.max_restarts, max_task_retries=0,
                         **placement[r]).remote(text, r, self.coordinator, self._worker_faults(r))
            for r in range(lay.world_size)
        ]
        self.active: set[int] = set()
        self.behind: set[int] = set(range(lay.world_size))
        # replicas held out because a worker of theirs was late: rank → its unfinished round (or None)
        self.late: dict[int, Any] = {}
        self.late_since: dict[int, float] = {}  # replica → when it was held out
        self.waited: set[int] = set()  # failed replicas whose restart the driver has waited for once
        self._events: list[dict[str, Any]] = []
        self._setup(sorted(self.behind))  # every worker built; the clock starts after this
        self.active, self.behind = set(range(lay.world_size)), set()

    # ----- placement and set-up ------------------------------------------------------------------
    def _placement_groups(self) -> tuple[list[Any], list[dict[str, Any]]]:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        lay, cfg = self.layout, self.cfg
        together = [r for rep in lay.replicas if rep.kind == "full" and rep.devices > 1 for r in lay.ranks(rep.index)]
        plans = [(f"replica{rep.index}", lay.ranks(rep.index), "STRICT_PACK")
                 for rep in lay.replicas if rep.kind == "full" and rep.devices > 1]
        rest = [r for r in range(lay.world_size) if r not in together]
        if rest:
            plans.append(("workers", rest, cfg.runtime.placement_strategy))
        pgs, placement = [], [dict() for _ in range(lay.world_size)]
        for name, ranks, strategy in plans:
            bundles = [lay.ray_bundle(r) for r in ranks]
            pg = placement_group(bundles, strategy=strategy, name=f"distrain-{cfg.run.name}-{name}")
            try:
                ray.get(pg.ready(), timeout=max(60.0, cfg.topology.round_timeout_s))
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(f"the cluster cannot place the bundles {bundles} of {name} (strategy {strategy}); "
                                   f"available: {ray.available_resources()}") from None
            pgs.append(pg)
            for i, r in enumerate(ranks):
                b = lay.ray_bundle(r)
                placement[r] = dict(num_cpus=b["CPU"], num_gpus=b.get("GPU", 0), memory=b.get("memory"),
                                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
        return pgs, placement

    def _worker_faults(self, rank: int) -> tuple[str, ...]:
        """The worker-side part of the faults aimed at ``rank`` (see ``FaultyTransport``)."""
        return tuple(f.spec() for f in self.faults
                     if f.rank == rank and f.kind in ("stale", "kill", "slow", "late", "boundary"))

    def _peers(self, rank: int) -> dict[int, Any]:
        """A pipeline stage talks point to point with the other stages of its replica."""
        replica = self.layout.replica_of(rank)
        if self.layout.replicas[replica].kind != "pipeline":
            return {}
        return {r: self.actors[r] for r in self.layout.ranks(replica) if r != rank}

    def _ready(self, ranks: list[int], wait_s: float) -> bool:
        """Are the actors of ``ranks`` up (a restarting actor answers "unavailable", or not at all while
        it waits for a node, until its constructor has run)? Waits up to ``wait_s``."""
        import ray

        deadline = time.monotonic() + wait_s
        while True:
            try:
                ray.get([self.actors[r].info.remote() for r in ranks], timeout=max(0.5, deadline - time.monotonic()))
                return True
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.2)

    def _setup(self, ranks: list[int], wait_s: float | None = None) -> dict[int, int]:
        """Build the workers of ``ranks`` (whole replicas) once their actors are up; rank → pid.
        ``wait_s``: how long to wait for restarting actors (default: start-up's long wait)."""
        import ray

        wait = min(180.0, 2 * self.cfg.topology.round_timeout_s) if wait_s is None else wait_s
        if not self._ready(ranks, wait):
            raise ray.exceptions.GetTimeoutError(f"workers {ranks} are not up after {wait:g} s")
        addresses: dict[int, str | None] = {r: None for r in ranks}
        for rep in self.layout.replicas:
            ranks_of = self.layout.ranks(rep.index)
            if rep.kind == "full" and rep.devices > 1 and ranks_of[0] in addresses:
                addr = ray.get(self.actors[ranks_of[0]].rendezvous.remote())
                addresses.update({r: addr for r in ranks_of})
        refs = {r: self.actors[r].setup.remote(self._peers(r), addresses[r]) for r in ranks}
        return {r: ray.get(ref) for r, ref in refs.items()}

    # ----- failures --------------------------------------------------------------------------------
    def _lose(self, rank: int, round_idx: int, why: str) -> None:
        """``rank`` failed in ``round_idx``: its whole replica leaves the rounds until it has caught up."""
        import ray

        replica = self.layout.replica_of(rank)
        log.warning("round %d: worker %d failed (%s): replica %d leaves the round", round_idx, rank, why, replica)
        for r in self.layout.ranks(replica):
            if r in self.behind:
                continue
            self.active.discard(r)
            self.behind.add(r)
            ray.get(self.coordinator.mark_absent.remote(r, round_idx, why.split(":")[0]))
            if r != rank:  # its partners' pipeline or device world is gone: they restart too
                ray.kill(self.actors[r], no_restart=False)

    def _call_active(self, round_idx: int, method: str, *args: Any) -> dict[int, Any]:
        """``method`` on every active worker; one that failed takes its replica out, not the job."""
        import ray

        refs = {r: getattr(self.actors[r], method).remote(*args) for r in sorted(self.active)}
        out = {}
        for r, ref in refs.items():
            try:
                out[r] = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - sorted into survivable and fatal
                if not _is_worker_failure(e):
                    raise
                self._lose(r, round_idx, _reason(e))
        return out

    # ----- WorkerPool --------------------------------------------------------------------------
    def checkpoint_steps(self) -> list[list[int]]:
        return [saved_steps(self.run_dir)]

    def load(self, step: int) -> Resumed | None:
        """The driver opens the checkpoint (plan, loop state); every actor restores its worker from
        it. A worker that cannot catches up from the global weights instead."""
        import ray

        try:
            src = ResumeSource(self.cfg, self.layout, checkpoint_dir(self.run_dir) / f"step-{step}")
        except CheckpointError as e:
            log.warning("checkpoint step %d unusable: %s", step, e)
            return None
        loaded = ray.get([a.load.remote(str(self.run_dir), step) for a in self.actors])
        for r, ok in enumerate(loaded):
            if not ok:
                self._lose(r, int(src.loop["round"]), "its checkpoint state cannot be restored")
        ray.get(self.coordinator.end_round.remote(int(src.loop["round"]), None, src.loop))
        return Resumed(src.loop, src.plan.changes)

    def initial_sync(self) -> None:
        """Nothing to agree on: every actor built its stage from the same seeded initialisation."""

    def publish_global(self, round_idx: int) -> None:
        """Each segment's global weights of ``round_idx`` from its lowest live owner to the Coordinator
        (the frames stay in the object store, owned by this driver, so they outlive the workers)."""
        import ray

        items: dict[str, Any] = {}
        for g in range(len(self.layout.segments)):
            for r in [m for m in self.layout.segment_members(g) if m in self.active]:
                frame_ref, size_ref = self.actors[r].export_global.options(num_returns=2).remote(round_idx, g)
                try:
                    ray.get(size_ref)
                except ray.exceptions.RayActorError as e:
                    self._lose(r, round_idx, type(e).__name__)
                    continue
                items[str(g)] = [frame_ref]
                break
            else:
                raise RuntimeError(f"round {round_idx}: no live worker holds segment {g}'s global weights")
        ray.get(self.coordinator.set_global.remote(round_idx, items))

    def _hold(self, replica: int, round_idx: int, pending: dict[Any, int]) -> None:
        """A worker of ``replica`` was late for ``round_idx``: the whole replica sits out (a pipeline's
        stages move together) until every one of its workers is done, then rejoins with its state.
        ``pending``: the round's unfinished calls; the replica's leave it (the driver never waits)."""
        import ray

        ranks = self.layout.ranks(replica)
        unfinished = {r: ref for ref, r in pending.items() if r in ranks}
        for ref in unfinished.values():
            pending.pop(ref)
        for r in ranks:
            if r in self.active:
                self.active.discard(r)
                self.late[r] = unfinished.get(r)
                ray.get(self.coordinator.mark_late.remote(r, round_idx))
        self.late_since.setdefault(replica, time.monotonic())
        log.warning("round %d: replica %d was late for the exchange; it sits the round out and rejoins with its "
                    "state", round_idx, replica)

    def _rejoin_late(self, round_idx: int, items: dict[str, Any]) -> list[dict[str, Any]]:
        """Held-out replicas whose workers are all done take the global weights of ``round_idx`` and
        rejoin, keeping their optimiser state and error buffers; one held out past
        ``topology.round_timeout_s`` is taken for failed."""
        import ray

        events: list[dict[str, Any]] = []
        for replica in sorted({self.layout.replica_of(r) for r in self.late}):
            ranks = self.layout.ranks(replica)
            refs = [self.late[r] for r in ranks if self.late.get(r) is not None]
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0) if refs else ([], [])
            if len(done) < len(refs):
                if time.monotonic() - self.late_since[replica] > self.cfg.topology.round_timeout_s:
                    for r in ranks:
                        self.late.pop(r, None)
                    self.late_since.pop(replica, None)
                    self._lose(ranks[0], round_idx, "late for longer than topology.round_timeout_s")
                    ray.kill(self.actors[ranks[0]], no_restart=False)
                continue
            try:
                ray.get(refs)
                ray.get([self.actors[r].rejoin.remote(round_idx, items) for r in ranks])
            except Exception as e:  # noqa: BLE001 - sorted into survivable and fatal
                if not _is_worker_failure(e):
                    raise
                for r in ranks:
                    self.late.pop(r, None)
                self.late_since.pop(replica, None)
                self._lose(ranks[0], round_idx, _reason(e))
                continue
            for r in ranks:
                self.late.pop(r)
                self.active.add(r)
                ray.get(self.coordinator.mark_present.remote(r, round_idx))
            self.late_since.pop(replica, None)  # the Coordinator logs its workers' "rejoined" (kept_state)
        return events

    def catch_up(self, round_idx: int, replica_steps: list[int]) -> list[dict[str, Any]]:
        """Replicas that were late rejoin with the global weights of ``round_idx`` (keeping their state);
        replicas that failed are set up again, load those weights and move to where a replica that
        never failed would be (``replica_steps``: the inner steps each has run)."""
        import ray

        events: list[dict[str, Any]] = []
        if not self.behind and not self.late:
            return events
        g_round, items = ray.get(self.coordinator.get_global.remote())
        if g_round != round_idx:
            raise RuntimeError(f"Coordinator holds the weights of round {g_round}, round {round_idx} is next")
        events += self._rejoin_late(round_idx, items)
        for replica in sorted({self.layout.replica_of(r) for r in self.behind}):
            ranks = self.layout.ranks(replica)
            # its actors restarting in place come up within the grace; one whose node is gone must not
            # stall the others each round: after that first wait it is only looked at, not waited for
            wait = 0.0 if replica in self.waited else self.cfg.topology.grace_s
            self.waited.add(replica)
            try:
                pids = self._setup(ranks, wait)
                ray.get([self.actors[r].catch_up.remote(round_idx, items, replica_steps[replica]) for r in ranks])
            except Exception as e:  # noqa: BLE001 - a replica that cannot come back yet stays out
                if not (_is_worker_failure(e) or isinstance(e, ray.exceptions.GetTimeoutError)):
                    raise
                log.warning("replica %d cannot rejoin yet: %s", replica, _reason(e))
                continue
            self.waited.discard(replica)
            for r in ranks:
                self.behind.discard(r)
                self.active.add(r)
                ray.get(self.coordinator.mark_present.remote(r, round_idx))
                events.append({"event": "caught_up", "rank": r, "round": round_idx, "pid": pids[r]})
        return events

    def run_round(self, round_idx: int, plan: RoundPlan) -> list[RoundReport]:
        """Run the round on the active workers; return once every worker that is not late has
        reported. A replica the Coordinator found late (it missed an exchange's grace) is held out
        at once, and its unfinished calls are left running: the driver never waits for it."""
        import ray

        lay = self.layout
        pending = {self.actors[r].run_round.remote(round_idx, plan.for_replica(lay.replica_of(r)).to_dict()): r
                   for r in sorted(self.active)}
        for f in self.faults:
            if f.kind == "kill" and f.round == round_idx and f.rank in self.active:
                time.sleep(f.delay)
                ray.kill(self.actors[f.rank], no_restart=False)
                self._events.append({"event": "killed", "rank": f.rank, "round": round_idx})
        deadline = time.monotonic() + 2 * self.cfg.topology.round_timeout_s + 60.0
        reports: list[RoundReport] = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(LATE_POLL_S, max(0.0, deadline - time.monotonic())))
            if not ready:
                for r in ray.get(self.coordinator.late_ranks.remote()):
                    if r in self.active:
                        self._hold(lay.replica_of(r), round_idx, pending)
                if pending and time.monotonic() > deadline:
                    raise RuntimeError(f"round {round_idx}: workers {sorted(pending.values())} neither finished "
                                       "nor failed")
                continue
            r = pending.pop(ready[0])
            try:
                report = RoundReport.from_dict(ray.get(ready[0]))
            except Exception as e:  # noqa: BLE001 - sorted into survivable and fatal just below
                if not _is_worker_failure(e):
                    raise
                self._lose(r, round_idx, _reason(e))
                continue
            if report.extra.get("late") and r in self.active:
                self._hold(report.replica, round_idx, pending)
            if not report.extra.get("late"):
                reports.append(report)
        reports = [rep for rep in reports if rep.rank not in self.behind]  # a replica that failed left the round
        if not reports:
            raise RuntimeError(f"round {round_idx}: no worker finished it")
        return sorted(reports, key=lambda rep: rep.rank)

    def finish(self, round_idx: int) -> None:
        self._call_active(round_idx, "finish")

    def evaluate(self, round_idx: int) -> float:
        """Validation loss on the evaluation replica (a full replica's leader, or every stage of a
        pipeline), or on the next live replica that can give it."""
        import ray

        first = self.layout.eval_replica
        order = [first] + [r.index for r in self.layout.replicas if r.index != first]
        for replica in order:
            ranks = self.layout.eval_ranks(replica)
            if not all(r in self.active for r in ranks):
                continue
            refs = [self.actors[r].evaluate.remote() for r in ranks]
            try:
                return ray.get(refs)[-1]  # the leader, or the pipeline's last stage
            except Exception as e:  # noqa: BLE001 - sorted into survivable and fatal
                if not _is_worker_failure(e):
                    raise
                self._lose(ranks[0], round_idx, _reason(e))
        raise RuntimeError("no live replica to evaluate on")

    def save(self, step: int, loop: dict[str, Any]) -> None:
        """Every active worker writes its own part into the step's temp directory, then each
        segment's global part is written by its lowest active owner (the next one if that fails); the
        driver commits once all are there. A replica that is out (failed or late) writes nothing: a
        resume starts it from the global weights."""
        import ray

        round_idx = int(loop["round"])
        ray.get(self.coordinator.end_round.remote(round_idx, None, loop))
        ckpt = checkpoint_dir(self.run_dir)
        tmp = begin_step(ckpt, step)
        try:
            files = {k: v for part in self._call_active(round_idx, "save", str(tmp), True, []).values()
                     for k, v in part.items()}
            for g in range(len(self.layout.segments)):
                for r in [m for m in self.layout.segment_members(g) if m in self.active]:
                    try:
                        files.update(ray.get(self.actors[r].save.remote(str(tmp), False, [g])))
                        break
                    except Exception as e:  # noqa: BLE001 - sorted into survivable and fatal
                        if not _is_worker_failure(e):
                            raise
                        self._lose(r, round_idx, _reason(e))
                else:
                    raise RuntimeError(f"no live worker holds segment {g}'s global weights: cannot checkpoint")
        except BaseException:
            abort_step(tmp)
            raise
        commit_step(ckpt, tmp, step, manifest_for(self.cfg, self.layout, loop), files, keep=self.cfg.checkpoint.keep)

    def events(self, round_idx: int) -> list[dict[str, Any]]:
        import ray

        ray.get(self.coordinator.end_round.remote(round_idx + 1))
        out, self._events = self._events + ray.get(self.coordinator.take_events.remote()), []
        return out

    def summary_extra(self) -> dict[str, Any]:
        return {"workers": len(self.actors)}

    def close(self) -> None:
        """Stop the actors and release the placement groups (the cluster itself keeps running)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a, no_restart=True)
        ray.kill(self.coordinator, no_restart=True)
        for pg in self.pgs:
            remove_placement_group(pg)


def run_ray_job(cfg: Config, faults: list[Fault] | None = None) -> RunSummary:
    pool = RayPool(cfg, faults)
    try:
        summary = RoundLoop(cfg, pool, pool.run_dir).run()
    finally:
        pool.close()
    assert summary is not None  # the driver is the coordinator
    return summary
