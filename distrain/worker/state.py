"""A worker's state by content: what a checkpoint stores once per segment, and what per worker.

A segment's part (``segment_part``, written by one of its owners) holds its global weights and the
outer state every owner holds identically — the outer step's momentum and pending aggregate — by
parameter name. A worker's own part (``own_part``) holds what is its alone: the inner optimiser's
state by parameter name (under ZeRO, this process's partition), error-feedback buffers and round
anchors by name, the step count, data position and shard, tokens, its generator and the process
RNG. Its model's weights are not in it: at a round's end they are the global weights (through a
compressed stage's constraint) — except with ``outer.apply_delay = 1``, where a replica keeps its
own progress on top of them, so there its model's own parameters are stored too.

Because everything per-parameter is keyed by the ordinary parameter name (layers keep their global
index), a worker of another topology takes what it holds from any set of parts (``restore``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from distrain.checkpoint import Part
from distrain.layout import segment_of
from distrain.outer.base import Weights
from distrain.worker.stage import EMBEDDING
from distrain.worker.worker import Worker

Tables = dict[str, Weights]  # table ("weight", "momentum", "ef", ...) → parameter name → tensor
SHARED = ("weight", "momentum", "pending")  # a segment part's tables
OWN = ("ef", "anchor", "start")  # a worker part's outer tables


def to_tensors(tables: Tables) -> dict[str, torch.Tensor]:
    """``{"<table>/<name>": tensor}``: the flat naming of a part's tensors."""
    return {f"{t}/{n}": v for t, table in tables.items() for n, v in table.items()}


def from_tensors(tensors: dict[str, torch.Tensor], names: tuple[str, ...]) -> Tables:
    """The tables ``names`` of a part's flat tensors."""
    out: Tables = {t: {} for t in names}
    for key, v in tensors.items():
        table, _, name = key.partition("/")
        if table in out:
            out[table][name] = v
    return out


def keeps_local(worker: Worker) -> bool:
    """Its model holds more than the global weights: the replica's own progress (delayed apply)."""
    return bool(worker.cfg.algorithm.rounds and worker.cfg.outer.apply_delay == 1)


def segment_part(worker: Worker, g: int) -> Part:
    """Segment ``g``'s global state as this owner holds it (what every owner holds alike)."""
    sync = worker.syncs[g]
    if sync.moves_in_rounds:
        tables: Tables = {"weight": sync.global_state(), **sync.shared_tables()}
    else:  # no outer weights (none, ddp): the replicas' models are the global weights, identical
        lay = worker.layout
        tables = {"weight": {n: t for n, t in worker.view.read().items()
                             if segment_of(n, lay.n_layers, lay.segments) == g}}
    return Part(to_tensors(tables), {"segment": g, "layers": list(worker.layout.segments[g]),
                                     "names": sorted(tables["weight"])})


def own_part(worker: Worker) -> Part:
    """What only this worker holds (see the module's docstring)."""
    tensors, sched = worker.schedule.state_tensors()
    tables: Tables = {}
    for sync in worker.syncs.values():
        for t, table in sync.own_tables().items():
            tables.setdefault(t, {}).update(table)
    tensors.update(to_tensors(tables))
    tensors["rng/torch"] = torch.get_rng_state()
    local = keeps_local(worker)
    if local:
        tensors.update({f"local/{n}": p for n, p in worker.model.named_parameters()})
        if worker.sub is not None:
            tensors["buffer/token_table"] = worker.sub.token_table
    slot = worker.slot
    meta = {"replica": slot.replica, "stage": slot.stage, "device": slot.device, "layers": list(slot.layers),
            "schedule": sched, "sampler": worker.sampler.state_dict(), "shard": list(worker.layout.data_shard(slot.rank)),
            "tokens": worker.tokens, "outer": {str(g): s.own_meta() for g, s in worker.syncs.items()},
            "local": local}
    return Part(tensors, meta)


@dataclass
class OwnState:
    """A worker's own state, possibly merged by name from several saved workers (a re-cut pipeline)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Restored:
    """What a restore did, for the resume event."""

    optimizer: tuple[int, int] = (0, 0)  # parameters whose inner-optimiser state was restored, of all
    reseek: bool = False  # its data shard changed: the position was moved as for a catch-up
    fresh: bool = False


@torch.no_grad()
def restore(worker: Worker, shared: Tables, own: OwnState | None, steps_done: int) -> Restored:
    """Put ``worker`` back: the global weights (and momentum, pending aggregate) from ``shared`` —
    every name it holds must be there — then its own state from ``own``; without one it joins as a
    caught-up worker would (fresh inner state, at ``steps_done`` inner steps)."""
    weights = shared.get("weight", {})
    names = set(worker.param_shapes())
    missing = sorted(names - set(weights))
    if missing:
        raise KeyError(f"the checkpoint holds no global value of {missing[0]}"
                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    embedding = weights.get(EMBEDDING) if worker.shadow is not None else None
    if worker.shadow is not None and embedding is None:
        raise KeyError(f"the checkpoint holds no global value of {EMBEDDING} (a compressed stage follows it)")
    if own is None:  # even if an earlier, failed restore left some
        for sync in worker.syncs.values():
            sync.load_own({}, {})
    worker.load_global({n: weights[n] for n in names}, embedding)
    for sync in worker.syncs.values():
        sync.load_shared(shared)
    if worker.shadow is not None:
        worker.shadow.load_shared(shared)
    worker.late = False
    if own is None:  # fresh: nothing of its own (load_global set where it starts the round)
        worker.schedule.load_state_tensors({}, {"step": steps_done})
        worker.seek_data(steps_done)
        worker.tokens = 0
        return Restored(fresh=True)
    meta = own.meta
    tables = from_tensors(own.tensors, OWN)
    local = _local(worker, own.tensors) if meta.get("local") else None
    if meta.get("local") and local is None:
        tables.pop("anchor")  # its progress was saved for another split: it starts from the global weights
    outer_meta = meta.get("outer", {})
    for g, sync in worker.syncs.items():
        sync.load_own(tables, outer_meta.get(str(g), {}))
    restored = worker.schedule.load_state_tensors(own.tensors, meta["schedule"])
    reseek = list(meta.get("shard", [])) != list(worker.layout.data_shard(worker.rank))
    if reseek:
        worker.seek_data(worker.schedule.step)
    else:
        worker.sampler.load_state_dict(meta["sampler"])
    worker.tokens = int(meta.get("tokens", 0))
    if local is not None:
        _load_local(worker, local, own.tensors.get("buffer/token_table"))
    return Restored(restored, reseek)


def _local(worker: Worker, tensors: dict[str, torch.Tensor]) -> Weights | None:
    """The model's own saved parameters, when they are exactly the ones it holds (else None)."""
    local = {k[len("local/"):]: v for k, v in tensors.items() if k.startswith("local/")}
    shapes = {n: tuple(p.shape) for n, p in worker.model.named_parameters()}
    ok = set(local) == set(shapes) and all(tuple(local[n].shape) == s for n, s in shapes.items())
    return local if ok else None


def _load_local(worker: Worker, local: Weights, token_table: torch.Tensor | None) -> None:
    """The model's own parameters (delayed apply: the global weights minus the replica's progress)."""
    for n, p in worker.model.named_parameters():
        p.copy_(local[n].to(p.device, p.dtype))
    if worker.sub is not None and token_table is not None:
        worker.sub.token_table.copy_(token_table.to(worker.sub.token_table))
    worker.schedule.refresh()
