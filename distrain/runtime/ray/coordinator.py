"""The Coordinator of a Ray job: membership, rounds, quorum, the global weights for catch-up.

Workers never talk to each other directly: each collective of a round (``distrain.comm.ray_transport``) is
matched here. A collective completes when every *live* member has contributed; when its deadline
(``topology.round_timeout_s`` after the first contribution) passes, it completes with whoever
arrived if that is at least the quorum (``ceil(topology.quorum · members)``) and the missing
members are dropped — they stop being live, and a late contribution is answered "dropped" so the
worker knows to catch up. Below the quorum the collective fails for everyone. The driver marks a
worker whose actor died absent at once, so a crash costs no deadline.

The Coordinator also keeps the latest global weights — one object-store reference per segment to
a dense wire frame, published after every round by a live owner of that segment — which a
restarted worker loads for the segments it holds to rejoin, a short history of round records, and
the loop state a resumed job continues from; it checkpoints them
(``checkpoints/coordinator/step-N``) so a restarted job resumes.

``Coordinator`` is plain Python (unit-testable, no Ray); ``CoordinatorActor`` adds what needs Ray
(resolving the weights reference to save it). Ray is imported lazily.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

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
                 timeout_s: float = 600.0, clock: Callable[[], float] = time.monotonic):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 < quorum <= 1:
            raise ValueError(f"quorum must be in (0, 1], got {quorum}")
        self.world_size = world_size
        self.groups = {WORLD: list(range(world_size)), **{k: sorted(v) for k, v in (groups or {}).items()}}
        self.quorum, self.timeout_s, self.clock = quorum, float(timeout_s), clock
        self.live: set[int] = set(range(world_size))
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
        if g.status != "open":
            return  # too late: poll answers "dropped"
        if (g.op, g.src) != (op, src):
            g.status, g.reason = "error", f"rank {rank} called {op}(src={src}), others {g.op}(src={g.src})"
            return
        g.items[rank] = item
        self._check(key, g)

    def poll(self, group: str, round_idx: int, seq: int, rank: int) -> tuple[str, Any]:
        """``("wait", None)``, ``("done", items per member)``, ``("dropped" | "quorum" | "error", reason)``."""
        g = self._open.get((group, int(round_idx), int(seq)))
        if g is None:
            return "error", f"no collective {group!r} round {round_idx} #{seq} (never opened, or expired)"
        self._check((group, int(round_idx), int(seq)), g)
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
            if self.clock() < g.opened + self.timeout_s:
                return
            missing = sorted(g.required - arrived)
            if len(arrived) < need:
                g.status = "quorum"
                g.reason = (f"{len(arrived)} of {len(g.members)} members arrived within {self.timeout_s:g} s, "
                            f"quorum is {need}; missing {missing}")
                return
            for r in missing:
                self._drop(r, key[1], "missed the deadline")  # re-checks this gather too
            if g.status != "open":
                return
        if len(arrived) < need:
            g.status, g.reason = "quorum", f"only {len(arrived)} live contributions, quorum is {need}"
            return
        if g.op == "broadcast" and g.src not in arrived:
            g.status, g.reason = "error", f"broadcast source {g.src} is absent"
            return
        g.result = [g.items.get(r) for r in g.members]
        g.status = "done"

    # ----- membership --------------------------------------------------------------------------
    def _drop(self, rank: int, round_idx: int, why: str) -> None:
        if rank in self.live:
            self.live.discard(rank)
            self.events.append({"event": "dropped", "rank": rank, "round": round_idx, "why": why})
        for key, g in list(self._open.items()):
            if rank in g.required and g.status == "open":
                g.required.discard(rank)
                self._check(key, g)

    def mark_absent(self, rank: int, round_idx: int, why: str = "worker failed") -> None:
        """A worker died or failed in ``round_idx``: stop waiting for it in open and future collectives."""
        self._drop(rank, round_idx, why)

    def mark_present(self, rank: int, round_idx: int) -> None:
        """A worker caught up: it takes part from the next collective opened (of ``round_idx``)."""
        if rank not in self.live:
            self.live.add(rank)
            self.events.append({"event": "rejoined", "rank": rank, "round": round_idx})

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
        return {"round": self.loop.get("round", 0), "live": self.live_ranks(), "world_size": self.world_size,
                "global_round": self.global_round, "loop": dict(self.loop), "open": open_now,
                "last_record": self.records[-1] if self.records else None}

    def state_dict(self) -> dict[str, Any]:
        return {"loop": dict(self.loop), "global_round": self.global_round, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["world_size"]) != self.world_size:
            raise ValueError(f"coordinator checkpoint is for {state['world_size']} workers, this job has {self.world_size}")
        self.loop = dict(state["loop"])
        self.global_round = int(state["global_round"])


def coordinator_checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / "coordinator"


class CoordinatorActor(Coordinator):
    """The Coordinator as a Ray actor: adds checkpointing of the global weights it references."""

    def save(self, run_dir: str, step: int, keep: int) -> str:
        """Write round, loop state and every segment's global frame (raw bytes) to ``checkpoints/coordinator``."""
        import ray

        from distrain.checkpoint import save_checkpoint

        if not self.global_items:
            raise RuntimeError("no global weights published yet")
        frames = {}
        for g, item in self.global_items.items():
            frame = ray.get(item[0])
            if not isinstance(frame, bytes):
                raise TypeError(f"global weights object of segment {g} is {type(frame).__name__}, not bytes")
            frames[g] = torch.frombuffer(bytearray(frame), dtype=torch.uint8)
        state = {**self.state_dict(), "global_frames": frames}
        path = save_checkpoint(coordinator_checkpoint_dir(Path(run_dir)), step, state,
                               {"round": self.loop.get("round", 0), "step": step}, keep=keep)
        return str(path)

    def steps(self, run_dir: str) -> list[int]:
        from distrain.checkpoint import list_checkpoints

        return [int(p.name.split("-", 1)[1]) for p in list_checkpoints(coordinator_checkpoint_dir(Path(run_dir)))]

    def load(self, run_dir: str, step: int) -> dict[str, Any] | None:
        """Resume from the coordinator checkpoint of ``step``; its loop state (None: unusable)."""
        import ray

        from distrain.checkpoint import CheckpointError, read_checkpoint

        try:
            loaded = read_checkpoint(coordinator_checkpoint_dir(Path(run_dir)) / f"step-{step}")
        except CheckpointError:
            return None
        self.load_state_dict(loaded.state)
        self.global_items = {g: [ray.put(t.numpy().tobytes())] for g, t in loaded.state["global_frames"].items()}
        return dict(self.loop)
