"""A run's checkpoint by content, and its resume into this run's topology — one path for every mode.

Save: every process writes the parts of its workers into the step's temp directory — each worker
its own part, and each segment's global part by one writer, its lowest live owner
(``segment_writers``) — and the process that logs the run (the driver, or rank 0) commits the
manifest once every part is there (``distrain.checkpoint.store``). Only where each process writes
differs between the modes.

Resume: every process opens the same step (``ResumeSource``: manifest verified, configuration
compared) and derives the same ``ResumePlan`` from the saved topology and its own layout. A worker
takes its own state from the saved worker of the same replica, stage and device (kept), from the
saved stages of its replica whose layers it holds (a pipeline split moved: per-parameter state is
regrouped by name), or from nothing (a replica added, or out of the round when saved: fresh inner
state from the global weights, as a caught-up worker); saved replicas no longer configured are
dropped. A replica continues the saved one of its kind, parallelism, devices and compression at the
same position among those (``match_replicas``). Every worker takes the global weights by name,
whatever segments they were saved in. ``ResumePlan.changes`` names each change for the resume event.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from distrain.checkpoint import (
    CheckpointError,
    Part,
    check_config,
    checkpoint_steps,
    read_manifest,
    read_part,
    write_part,
)
from distrain.config import Config
from distrain.layout import Layout
from distrain.topology import ReplicaSpec
from distrain.worker.state import SHARED, OwnState, Restored, Tables, from_tensors, own_part, restore, segment_part
from distrain.worker.worker import Worker

_WORKER_RE = re.compile(r"^replica-(\d+)/stage-(\d+)-device-(\d+)\.safetensors$")
_SEGMENT_RE = re.compile(r"^global/segment-(\d+)\.safetensors$")


class ResumeMismatchError(ValueError):
    """The checkpoint to resume cannot be resumed by this configuration (the keys are named)."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def saved_steps(run_dir: Path) -> list[int]:
    """The run's checkpoint steps, newest first; the old per-rank format is refused in one line."""
    try:
        return checkpoint_steps(checkpoint_dir(run_dir))
    except CheckpointError as e:
        raise ResumeMismatchError(str(e)) from None


def worker_rel(layout: Layout, rank: int) -> str:
    s = layout.slot(rank)
    return f"replica-{s.replica}/stage-{s.stage}-device-{s.device}.safetensors"


def segment_rel(g: int) -> str:
    return f"global/segment-{g}.safetensors"


# ----- saving ---------------------------------------------------------------------------------------
def segment_writers(layout: Layout, live: Iterable[int]) -> dict[int, int]:
    """Who writes each segment's global part: its lowest live owner (every owner holds the same)."""
    alive = set(live)
    out = {}
    for g in range(len(layout.segments)):
        owners = [r for r in layout.segment_members(g) if r in alive]
        if not owners:
            raise RuntimeError(f"no live worker holds segment {g}'s global weights: cannot checkpoint")
        out[g] = owners[0]
    return out


def write_worker(tmp: Path, worker: Worker, writers: dict[int, int], own: bool = True) -> dict[str, dict[str, Any]]:
    """Write ``worker``'s own part (unless ``own`` is false) and the global part of every segment it
    is the writer of; their manifest entries."""
    files = {}
    if own:
        rel = worker_rel(worker.layout, worker.rank)
        files[rel] = write_part(tmp, rel, own_part(worker))
    for g, rank in writers.items():
        if rank == worker.rank:
            files[segment_rel(g)] = write_part(tmp, segment_rel(g), segment_part(worker, g))
    return files


def _describe_replica(rep: ReplicaSpec) -> dict[str, Any]:
    return {"kind": rep.kind, "parallel": rep.parallel, "bounds": list(rep.bounds), "devices": rep.devices,
            "compress": ([rep.compress_k, rep.compress_method, rep.compress_seed]
                         + ([rep.compress_basis] if rep.compress_basis != "seeded" else [])) if rep.compressed else None}


def describe_topology(layout: Layout) -> dict[str, Any]:
    """What a resume needs of the saved topology: replicas, segments, each worker's data shard."""
    return {"replicas": [_describe_replica(r) for r in layout.replicas],
            "segments": [list(s) for s in layout.segments],
            "shards": [list(layout.data_shard(r)) for r in range(layout.world_size)]}


def manifest_for(cfg: Config, layout: Layout, loop: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The manifest of a checkpoint (``commit_step`` adds format, step and parts)."""
    return {"config": cfg.to_dict(), "config_hash": cfg.hash(), "round": loop["round"], "tokens": loop["tokens"],
            "loop": loop, "topology": describe_topology(layout), **extra}


# ----- planning a resume ------------------------------------------------------------------------------
def _signature(rep: dict[str, Any]) -> tuple[Any, ...]:
    """What must match for a replica's per-worker state to carry over (not its split)."""
    return rep["kind"], rep["parallel"], rep["devices"], tuple(rep["compress"] or ())


def _name(rep: dict[str, Any]) -> str:
    s = f"{rep['kind']}/{rep['parallel']}"
    if rep["devices"] > 1:
        s += f"×{rep['devices']}"
    if rep["kind"] == "pipeline":
        s += f", stages {rep['bounds']}"
    if rep["compress"]:
        s += f", k={rep['compress'][0]}" + (f", basis {rep['compress'][3]}" if len(rep["compress"]) > 3 else "")
    return s


@dataclass
class ResumePlan:
    """Where every worker of this layout takes its own state from (same in every process)."""

    match: dict[int, int] = field(default_factory=dict)  # replica → the saved replica it continues
    own: dict[int, list[str]] = field(default_factory=dict)  # rank → saved worker parts (absent: fresh)
    scalars: dict[int, str] = field(default_factory=dict)  # rank → the part its step, data position come from
    changes: list[str] = field(default_factory=list)  # for the resume event, one entry per change


def _saved_workers(files: Iterable[str]) -> dict[tuple[int, int, int], str]:
    out = {}
    for rel in files:
        m = _WORKER_RE.match(rel)
        if m:
            out[(int(m.group(1)), int(m.group(2)), int(m.group(3)))] = rel
    return out


def _ints(xs: Any, n: int | None = None) -> bool:
    return isinstance(xs, list) and (n is None or len(xs) == n) and all(type(x) is int for x in xs)


def _topology_ok(topo: Any) -> bool:
    if not isinstance(topo, dict):
        return False
    reps, segs, shards = topo.get("replicas"), topo.get("segments"), topo.get("shards")
    if not (isinstance(reps, list) and reps and isinstance(segs, list) and segs and isinstance(shards, list)):
        return False
    for r in reps:
        if not (isinstance(r, dict) and r.get("kind") in ("full", "pipeline") and isinstance(r.get("parallel"), str)
                and _ints(r.get("bounds")) and len(r["bounds"]) >= 2 and r["bounds"] == sorted(r["bounds"])
                and type(r.get("devices")) is int and r["devices"] >= 1
                and (r.get("compress") is None or (isinstance(r["compress"], list) and len(r["compress"]) in (3, 4)))):
            return False
    return all(_ints(s, 2) for s in segs) and all(_ints(s, 2) for s in shards)


def check_topology(where: Path, topo: Any) -> dict[str, Any]:
    """The manifest's topology section must have the shape ``describe_topology`` writes."""
    if not _topology_ok(topo):
        raise CheckpointError(f"{where}: the manifest's topology is not of the expected shape")
    return topo


def match_replicas(saved: list[dict[str, Any]], layout: Layout) -> dict[int, int]:
    """Each replica continues the saved replica of the same kind, parallelism, devices and
    compression that comes at the same position among those of its kind (the k-th full replica the
    k-th saved one); its split may differ."""
    pools: dict[tuple[Any, ...], list[int]] = {}
    for i, rep in enumerate(saved):
        pools.setdefault(_signature(rep), []).append(i)
    out = {}
    for rep in layout.replicas:
        pool = pools.get(_signature(_describe_replica(rep)), [])
        if pool:
            out[rep.index] = pool.pop(0)
    return out


def plan_resume(manifest: dict[str, Any], layout: Layout) -> ResumePlan:
    """Match this layout's workers to the saved ones (see the module's docstring)."""
    saved = manifest["topology"]["replicas"]
    parts = _saved_workers(manifest["files"])
    plan = ResumePlan(match=match_replicas(saved, layout))
    kept = set(plan.match.values())
    for old in range(len(saved)):
        if old not in kept:
            plan.changes.append(f"saved replica {old} ({_name(saved[old])}) removed: its state dropped")
    for rep in layout.replicas:
        new = _describe_replica(rep)
        if rep.index not in plan.match:
            plan.changes.append(f"replica {rep.index} ({_name(new)}) added: fresh inner state from the global weights")
            continue
        i = plan.match[rep.index]
        old = saved[i]
        mine = {k: v for k, v in parts.items() if k[0] == i}
        if len(mine) != (len(old["bounds"]) - 1) * old["devices"]:
            del plan.match[rep.index]
            plan.changes.append(f"replica {rep.index} ({_name(new)}) was out of the round when saved: fresh inner "
                                "state from the global weights")
            continue
        for r in layout.ranks(rep.index):
            slot = layout.slot(r)
            a, b = slot.layers
            old_stages = [s for s in range(len(old["bounds"]) - 1) if old["bounds"][s] < b and a < old["bounds"][s + 1]]
            plan.own[r] = [mine[(i, s, slot.device)] for s in old_stages]
            plan.scalars[r] = mine[(i, min(slot.stage, len(old["bounds"]) - 2), slot.device)]
        if i != rep.index:
            plan.changes.append(f"replica {rep.index} continues saved replica {i}")
        if list(old["bounds"]) != list(rep.bounds):
            plan.changes.append(f"replica {rep.index} re-split: stages {old['bounds']} → {list(rep.bounds)}, its "
                                "inner-optimiser and error-feedback state regrouped by layer")
    old_streams = len({tuple(s) for s in manifest["topology"]["shards"]})
    new_streams = layout.data_shard(0)[1]
    if old_streams != new_streams and plan.own:
        plan.changes.append(f"data split into {new_streams} streams (was {old_streams}): kept replicas' positions "
                            "moved as for a catch-up")
    return plan


def adjust_loop(loop: dict[str, Any], plan: ResumePlan, n_replicas: int) -> dict[str, Any]:
    """The loop state for this topology: a continued replica keeps its counters; a new one is at
    the run's progress, and its step time is measured afresh."""
    out = dict(loop)
    steps, times = list(loop.get("replica_steps") or []), list(loop.get("step_s") or [])

    def saved(values: list[Any], r: int) -> Any:
        i = plan.match.get(r)
        return values[i] if i is not None and i < len(values) else None

    if steps:
        out["replica_steps"] = [int(v) if (v := saved(steps, r)) is not None else int(loop["step"])
                                for r in range(n_replicas)]
    if times:
        out["step_s"] = [float(v) if (v := saved(times, r)) is not None else 0.0 for r in range(n_replicas)]
    return out


# ----- resuming ----------------------------------------------------------------------------------------
class ResumeSource:
    """One verified checkpoint opened for this layout; every process builds the same one."""

    def __init__(self, cfg: Config, layout: Layout, path: Path):
        self.path, self.layout = Path(path), layout
        self.manifest = read_manifest(self.path)
        try:
            check_config(str(self.path), self.manifest.get("config"), cfg.to_dict())
        except CheckpointError as e:
            raise ResumeMismatchError(str(e)) from None
        check_topology(self.path, self.manifest.get("topology"))
        loop = self.manifest.get("loop")
        if not isinstance(loop, dict) or not isinstance(loop.get("round"), int) or not isinstance(loop.get("step"), int):
            raise CheckpointError(f"{self.path}: the manifest's loop state is not of the expected shape")
        self.plan = plan_resume(self.manifest, layout)
        self.loop = adjust_loop(loop, self.plan, layout.n_replicas)
        self._parts: dict[str, Part] = {}
        self._lock = threading.Lock()

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    def part(self, rel: str) -> Part:
        """A part, verified and decoded once per process (workers of one process share it)."""
        with self._lock:
            if rel not in self._parts:
                self._parts[rel] = read_part(self.path, self.manifest, rel)
            return self._parts[rel]

    def shared(self) -> Tables:
        """The global weights, momentum and pending aggregate of every segment, by name."""
        out: Tables = {t: {} for t in SHARED}
        for rel in sorted(r for r in self.manifest["files"] if _SEGMENT_RE.match(r)):
            for t, table in from_tensors(self.part(rel).tensors, SHARED).items():
                out[t].update(table)
        return out

    def own(self, rank: int) -> OwnState | None:
        """This worker's own state: merged by name from its saved parts (None: fresh)."""
        rels = self.plan.own.get(rank)
        if not rels:
            return None
        tensors: dict[str, Any] = {}
        for rel in rels:
            tensors.update(self.part(rel).tensors)
        scalars = self.part(self.plan.scalars[rank])
        tensors.update({k: v for k, v in scalars.tensors.items() if k.startswith("rng/")})
        meta = dict(scalars.meta)
        if len(rels) > 1 or rels[0] != self.plan.scalars[rank]:  # regrouped: its outer meta by segment is moot
            meta["outer"] = {}
        return OwnState(tensors, meta)

    def restore(self, worker: Worker) -> Restored:
        """Put ``worker`` back from this checkpoint; a CheckpointError (one line) when it cannot be."""
        try:
            own = self.own(worker.rank)
            steps = self.loop["replica_steps"][worker.replica] if self.loop.get("replica_steps") \
                else int(self.loop["step"])
            return restore(worker, self.shared(), own, steps)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise CheckpointError(f"{self.path}: cannot restore worker {worker.rank} ({type(e).__name__}: {e})") \
                from None

    def rng(self, rank: int) -> Any:
        """The process RNG state saved with ``rank``'s own part (None: fresh worker)."""
        rel = self.plan.scalars.get(rank)
        return self.part(rel).tensors.get("rng/torch") if rel else None

    def unchanged(self) -> bool:
        return not self.plan.changes


def resume_note(step: int, round_idx: int, total: int, changes: list[str]) -> str:
    """The one line a resumed run prints."""
    line = f"resumed from step {step} (round {round_idx} of {total})"
    return line + (" into a changed topology: " + "; ".join(changes) if changes else "")
