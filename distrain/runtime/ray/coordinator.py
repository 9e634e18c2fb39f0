"""The Coordinator of a Ray job: membership, rounds, quorum, the global weights for catch-up.

Workers never talk to each other directly: each collective of a round (``distrain.comm.ray_transport``) is
matched here. A collective completes when every *live* member has contributed; when its grace
(``topology.grace_s`` after the first contribution) passes, it completes with whoever arrived and
the missing members are **late**: alive, but out of this round — they stop being live until the
driver brings them back, and their contribution, when it comes, is answered "late" so the worker
sits the round out and keeps its state. Only dead members count against the quorum
(``ceil(topology.quorum · members)``): the driver marks a worker whose actor died absent at once
(a crash costs no deadline), and below the quorum a collective fails for everyone. A slow worker
never ends a job.

The Coordinator also keeps the latest global weights — one object-store reference per segment to
a dense wire frame, published after every round by a live owner of that segment — which a
restarted worker loads for the segments it holds to rejoin, a short history of round records, and
the loop state. Checkpoints are the workers' (``distrain.runtime.resume``): a restarted job's
workers resume from them and publish the global weights here again.

``Coordinator`` is plain Python (unit-testable, no Ray); ``CoordinatorActor`` is it as a Ray actor.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from distrain.comm.transport import WORLD

Key = tuple[str, int, int]  # (group, round, seq)
HISTORY = 64  # round records kept in memory


@dataclass
class _Gather:
    op: str
    src: int | None
    members: list[int]
    required: set[int]
    opened: float
    items: dict[int, Any] = field(default_factory=dict)
    status: str = "open"  # open | done | quorum | error
    result: list[Any] | None = None
    reason: str = ""


class Coordinator:
    """Matches collectives, tracks who is live, holds the global weights reference and counters."""

    def __init__(self, world_size: int, groups: Mapping[str, Sequence[int]] | None = None, quorum: float = 1.0,
                 grace_s: float = 600.0, clock: Callable[[], float] = time.monotonic, timeout_s: float | None = None,
                 graced: Sequence[str] | None = None):
        """``graced``: the groups whose collectives end at the grace with late members (the rounds'
        exchanges; default: all); the others (a pipeline's per-step records, broadcasts) wait
        ``timeout_s`` (default: the grace) and then drop whoever did not come as failed."""
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 < quorum <= 1:
            raise ValueError(f"quorum must be in (0, 1], got {quorum}")
        self.world_size = world_size
        self.groups = {WORLD: list(range(world_size)), **{k: sorted(v) for k, v in (groups or {}).items()}}
        if not grace_s > 0:
            raise ValueError(f"grace_s must be positive, got {grace_s}")
        self.quorum, self.grace_s, self.clock = quorum, float(grace_s), clock
        self.timeout_s = float(timeout_s) if timeout_s is not None else self.grace_s
        self.graced = set(self.groups) if graced is None else set(graced)
        self.live: set[int] = set(range(world_size))
        self.late: dict[int, int] = {}  # alive members out of the rounds since: rank → the round they missed
        self.global_round = -1  # the round the global weights are the start of
        self.global_items: dict[str, Any] = {}  # segment (as a string) → [ref] to its dense frame
        self.loop: dict[str, Any] = {}
        self.records: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._open: dict[Key, _Gather] = {}

    # ----- collectives -------------------------------------------------------------------------
    def need(self, group: str) -> int:
        """Contributions a collective of ``group`` needs to complete without everyone."""
        return max(1, math.ceil(self.quorum * len(self.groups[group]) - 1e-9))

    def contribute(self, group: str, round_idx: int, seq: int, op: str, src: int | None, rank: int, item: Any) -> None:
        members = self.groups.get(group)
        if members is None or rank not in members:
            raise ValueError(f"rank {rank} is not a member of group {group!r}")
        key = (group, int(round_idx), int(seq))
        g = self._open.get(key)
        if g is None:
            g = self._open[key] = _Gather(op, src, members, self.live & set(members), self.clock())
        if g.status != "open" or rank in self.late or (rank not in self.live and rank not in g.required):
            return  # too late, or out of the rounds: poll answers "late" or "dropped"
        if (g.op, g.src) != (op, src):
            g.status, g.reason = "error", f"rank {rank} called {op}(src={src}), others {g.op}(src={g.src})"
            return
        g.items[rank] = item
        self._check(key, g)

    def poll(self, group: str, round_idx: int, seq: int, rank: int) -> tuple[str, Any]:
        """``("wait", None)``, ``("done", items per member)``, ``("late" | "dropped" | "quorum" | "error",
        reason)``."""
        g = self._open.get((group, int(round_idx), int(seq)))
        if g is None:
            return "error", f"no collective {group!r} round {round_idx} #{seq} (never opened, or expired)"
        self._check((group, int(round_idx), int(seq)), g)
        if rank in self.late and rank not in g.items:
            return "late", f"this worker missed the grace of round {self.late[rank]}; it rejoins from the global weights"
        if g.status == "done":
            if rank not in g.items:
                return "dropped", "the collective completed without this worker"
            return "done", g.result
        if g.status == "open":
            return "wait", None
        return g.status, g.reason

    def _check(self, key: Key, g: _Gather) -> None:
        if g.status != "open":
            return
        arrived = set(g.items)
        need = self.need(key[0])
        if not g.required <= arrived:
            graced = key[0] in self.graced
            if self.clock() < g.opened + (self.grace_s if graced else self.timeout_s):
                return
            for r in sorted(g.required - arrived):
                if graced:
                    self._make_late(r, key[1])  # re-checks this gather too
                else:
                    self.mark_absent(r, key[1], f"missed the {self.timeout_s:g} s deadline")
            if g.status != "open":
                return
        alive = arrived | (set(self.late) & set(g.members))
        if len(alive) < need:
            g.status, g.reason = "quorum", (f"only {len(arrived)} contributions and {len(alive) - len(arrived)} late "
                                            f"members alive, quorum is {need}")
            return
        if g.op == "broadcast" and g.src not in arrived:
            g.status, g.reason = "error", f"broadcast source {g.src} is absent"
            return
        g.result = [g.items.get(r) for r in g.members]
        g.status = "done"

    # ----- membership --------------------------------------------------------------------------
    def _release(self, rank: int) -> None:
        """Stop waiting for ``rank`` in the open collectives."""
        for key, g in list(self._open.items()):
            if rank in g.required and g.status == "open":
                g.required.discard(rank)
                self._check(key, g)

    def mark_late(self, rank: int, round_idx: int) -> None:
        """The driver holds ``rank`` out of the rounds from ``round_idx`` (its replica was late)."""
        self._make_late(rank, round_idx)

    def _make_late(self, rank: int, round_idx: int) -> None:
        if rank in self.live:
            self.live.discard(rank)
            self.late[rank] = round_idx
            self.events.append({"event": "late", "rank": rank, "round": round_idx,
                                "why": f"missed the {self.grace_s:g} s grace"})
        self._release(rank)

    def mark_absent(self, rank: int, round_idx: int, why: str = "worker failed") -> None:
        """A worker died or failed in ``round_idx``: stop waiting for it in open and future collectives."""
        if rank in self.live or rank in self.late:
            self.live.discard(rank)
            self.late.pop(rank, None)
            self.events.append({"event": "dropped", "rank": rank, "round": round_idx, "why": why})
        self._release(rank)

    def mark_present(self, rank: int, round_idx: int) -> None:
        """A worker caught up: it takes part from the next collective opened (of ``round_idx``)."""
        if rank not in self.live:
            was_late = self.late.pop(rank, None) is not None
            self.live.add(rank)
            self.events.append({"event": "rejoined", "rank": rank, "round": round_idx, "kept_state": was_late})

    def late_ranks(self) -> list[int]:
        """Alive members out of the rounds (they missed a grace; the driver brings them back)."""
        return sorted(self.late)

    def live_ranks(self) -> list[int]:
        return sorted(self.live)

    # ----- global weights, rounds, metrics ------------------------------------------------------
    def set_global(self, round_idx: int, items: dict[str, Any]) -> None:
        """The global weights at the start of ``round_idx``: segment → ``[ref]`` to a dense frame."""
        self.global_round, self.global_items = int(round_idx), dict(items)

    def get_global(self) -> tuple[int, dict[str, Any]]:
        return self.global_round, dict(self.global_items)

    def end_round(self, round_idx: int, record: dict[str, Any] | None = None, loop: dict[str, Any] | None = None) -> None:
        """Round ``round_idx - 1`` is over: keep its record (and the loop state, for a checkpoint),
        forget collectives two rounds old."""
        if record is not None:
            self.records = (self.records + [dict(record)])[-HISTORY:]
        if loop:
            self.loop = dict(loop)
        for key in [k for k in self._open if k[1] < int(round_idx) - 1]:
            del self._open[key]

    def take_events(self) -> list[dict[str, Any]]:
        out, self.events = self.events, []
        return out

    def status(self) -> dict[str, Any]:
        open_now = {f"{k[0]}/{k[1]}/{k[2]}": sorted(g.items) for k, g in self._open.items() if g.status == "open"}
        return {"round": self.loop.get("round", 0), "live": self.live_ranks(), "late": self.late_ranks(),
                "world_size": self.world_size,
                "global_round": self.global_round, "loop": dict(self.loop), "open": open_now,
                "last_record": self.records[-1] if self.records else None}


class CoordinatorActor(Coordinator):
    """The Coordinator as a Ray actor (``ray.remote(CoordinatorActor)``)."""
