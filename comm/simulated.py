"""In-process transport: workers are threads of one process meeting at a rendezvous per collective.

``SimulatedHub(world_size, groups, network)`` owns the rendezvous state and hands out one
``SimulatedTransport`` endpoint per rank. Collectives on a group are numbered per rank (the n-th
call of every member meets the n-th call of the others). A collective completes when every member
that was live when it opened has arrived; ranks marked absent (``mark_absent``) are not waited for
and get ``None`` in all-gather results. A rank that comes back (``mark_present``) joins from the
next collective that no live member has opened yet. Waits are bounded by ``timeout_s``: with
``on_timeout="raise"`` every waiter gets a ``CollectiveTimeoutError`` naming the missing ranks;
with ``"drop"`` the missing ranks are marked absent and the collective completes without them.
The waits read ``wall_clock`` (``time.monotonic`` unless given): a test passes a fake one and moves
it past the timeout once the ranks it means to arrive are ``waiting``, so which ranks a timeout
names never depends on how fast threads start on a loaded machine.
Each completed collective is charged to the ``NetworkModel`` (bytes and simulated time).

Point-to-point messages wait in a queue per directed pair, stamped with their arrival on the
virtual clock (``NetworkModel.send``); ``recv_bytes`` takes the oldest one and moves the
receiver's clock to its arrival. A receive from a rank that is marked absent fails at once
instead of waiting out the timeout; a rank that comes back starts with empty queues.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from distrain.comm.errors import (
    CollectiveMismatchError,
    CollectiveTimeoutError,
    CommError,
    NotAMemberError,
    RankAbsentError,
    UnknownGroupError,
)
from distrain.comm.clock import VirtualClock
from distrain.comm.network import Link, NetworkModel, RankStats
from distrain.comm.transport import WORLD, Transport

T = TypeVar("T")


@dataclass
class _Collective:
    op: str
    src: int | None
    required: set[int]
    payloads: dict[int, bytes | None] = field(default_factory=dict)
    waiting: set[int] = field(default_factory=set)
    done: bool = False
    result: object = None
    error: CommError | None = None


@dataclass
class _Group:
    members: list[int]
    next_seq: dict[int, int]
    open: dict[int, _Collective] = field(default_factory=dict)
    failed: dict[int, CommError] = field(default_factory=dict)


class SimulatedHub:
    """Rendezvous point and network accounting for ``world_size`` in-process workers."""

    def __init__(
        self,
        world_size: int,
        groups: Mapping[str, Sequence[int]] | None = None,
        network: NetworkModel | None = None,
        timeout_s: float = 60.0,
        on_timeout: str = "raise",
        overlap: bool = False,
        wall_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be ≥ 1, got {world_size}")
        if on_timeout not in ("raise", "drop"):
            raise ValueError(f"on_timeout must be 'raise' or 'drop', got {on_timeout!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        spec = {WORLD: list(range(world_size)), **{k: list(v) for k, v in (groups or {}).items()}}
        self._groups: dict[str, _Group] = {}
        for name, ranks in spec.items():
            if not ranks or len(set(ranks)) != len(ranks) or not all(0 <= r < world_size for r in ranks):
                raise ValueError(f"group {name!r}: ranks {ranks} must be distinct, non-empty, in 0..{world_size - 1}")
            members = sorted(ranks)
            self._groups[name] = _Group(members=members, next_seq={r: 0 for r in members})
        self.world_size = world_size
        self.network = network or NetworkModel(world_size, Link())
        if self.network.world_size != world_size:
            raise ValueError(f"network model has {self.network.world_size} ranks, hub has {world_size}")
        self.timeout_s = float(timeout_s)
        self.overlap = overlap  # all-gathers run in the background of the next round's compute
        self.on_timeout = on_timeout
        self._wall = wall_clock  # seconds; bounds every wait (fake in tests, see the module docstring)
        self._absent: set[int] = set()
        self._cond = threading.Condition()
        self._mail: dict[tuple[int, int], deque[tuple[float, bytes]]] = {}

    # ----- endpoints and membership -------------------------------------------------------------
    def transport(self, rank: int) -> "SimulatedTransport":
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside 0..{self.world_size - 1}")
        return SimulatedTransport(self, rank)

    def transports(self) -> list["SimulatedTransport"]:
        return [self.transport(r) for r in range(self.world_size)]

    def members(self, group: str) -> list[int]:
        return list(self._group(group).members)

    def absent(self) -> set[int]:
        with self._cond:
            return set(self._absent)

    def waiting(self, group: str) -> set[int]:
        """Ranks blocked right now in an open collective on ``group``: what a test waits for
        instead of sleeping and hoping the threads got there."""
        g = self._group(group)
        with self._cond:
            return {r for col in g.open.values() for r in col.waiting}

    @property
    def clock(self) -> VirtualClock:
        return self.network.clock

    def mark_absent(self, rank: int) -> None:
        """Treat ``rank`` as dead: open and future collectives complete without it."""
        with self._cond:
            self._absent.add(rank)
            for group in self._groups.values():
                for seq, col in list(group.open.items()):
                    col.required.discard(rank)
                    self._maybe_complete(group, col)
            self._cond.notify_all()

    def mark_present(self, rank: int) -> None:
        """Let ``rank`` take part again, from the first collective no member has opened yet."""
        with self._cond:
            if rank not in self._absent:
                return
            self._absent.discard(rank)
            for group in self._groups.values():
                if rank in group.next_seq:
                    group.next_seq[rank] = max(group.next_seq.values())
            for key in [k for k in self._mail if rank in k]:
                del self._mail[key]
            self.network.forget_links(rank)

    # ----- point to point ----------------------------------------------------------------------
    def send(self, src: int, dst: int, payload: bytes) -> None:
        self._check_rank(dst)
        with self._cond:
            if src in self._absent:
                raise RankAbsentError(f"rank {src} is marked absent and cannot send")
            arrival = self.network.send(src, dst, len(payload))
            self._mail.setdefault((src, dst), deque()).append((arrival, payload))
            self._cond.notify_all()

    def recv(self, dst: int, src: int) -> bytes:
        self._check_rank(src)
        deadline = self._wall() + self.timeout_s
        with self._cond:
            while True:
                if dst in self._absent:
                    raise RankAbsentError(f"rank {dst} is marked absent and cannot receive")
                box = self._mail.get((src, dst))
                if box:
                    arrival, payload = box.popleft()
                    self.network.receive(dst, arrival)
                    return payload
                if src in self._absent:
                    raise RankAbsentError(f"rank {dst} waits for a message from rank {src}, which is absent")
                remaining = deadline - self._wall()
                if remaining <= 0:
                    raise CollectiveTimeoutError(f"rank {dst}: no message from rank {src} within {self.timeout_s:g} s")
                self._cond.wait(remaining)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside 0..{self.world_size - 1}")

    def stats(self, rank: int) -> RankStats:
        return self.network.stats(rank)

    # ----- the rendezvous ----------------------------------------------------------------------
    def collective(self, rank: int, group: str, op: str, payload: bytes | None, src: int | None = None) -> object:
        """Deposit ``payload`` for ``rank``'s next collective on ``group`` and wait for its result."""
        g = self._group(group)
        if rank not in g.next_seq:
            raise NotAMemberError(f"rank {rank} is not a member of group {group!r} ({g.members})")
        with self._cond:
            if rank in self._absent:
                raise RankAbsentError(f"rank {rank} is marked absent and cannot join a collective")
            seq = g.next_seq[rank]
            g.next_seq[rank] = seq + 1
            if seq in g.failed:
                raise g.failed[seq]
            col = g.open.get(seq)
            if col is None:
                live = {r for r in g.members if r not in self._absent}
                col = g.open[seq] = _Collective(op=op, src=src, required=live)
            if (col.op, col.src) != (op, src):
                self._fail(g, seq, col, CollectiveMismatchError(
                    f"group {group!r} step {seq}: rank {rank} called {op}(src={src}) but others called {col.op}(src={col.src})"))
            else:
                col.payloads[rank] = payload
                self._maybe_complete(g, col)
            col.waiting.add(rank)
            deadline = self._wall() + self.timeout_s
            while not col.done and col.error is None:
                remaining = deadline - self._wall()
                if remaining <= 0:
                    self._on_timeout(group, g, seq, col)
                    break
                self._cond.wait(remaining)
            col.waiting.discard(rank)
            if not col.waiting:
                g.open.pop(seq, None)
            if col.error is not None:
                raise col.error
            return col.result

    def _on_timeout(self, name: str, g: _Group, seq: int, col: _Collective) -> None:
        missing = sorted(col.required - set(col.payloads))
        if self.on_timeout == "drop":
            self._absent.update(missing)
            for r in missing:
                for other in self._groups.values():
                    for c in other.open.values():
                        c.required.discard(r)
                        self._maybe_complete(other, c)
            self._cond.notify_all()
            return
        self._fail(g, seq, col, CollectiveTimeoutError(
            f"group {name!r} {col.op} step {seq}: ranks {missing} did not arrive within {self.timeout_s:g} s"))

    def _fail(self, g: _Group, seq: int, col: _Collective, error: CommError) -> None:
        col.error = error
        g.failed[seq] = error
        self._cond.notify_all()

    def _maybe_complete(self, g: _Group, col: _Collective) -> None:
        """Compute the result and charge the network once every required rank has arrived."""
        if col.done or col.error is not None or not col.required <= set(col.payloads):
            return
        arrived = sorted(col.payloads)
        if col.op == "all_gather":
            sizes = {r: len(col.payloads[r] or b"") for r in arrived}
            self.network.all_gather(sizes, overlap=self.overlap)
            col.result = [col.payloads.get(r) for r in g.members]
        elif col.op == "broadcast":
            data = col.payloads.get(col.src) if col.src is not None else None
            if data is None:
                col.error = RankAbsentError(f"broadcast source {col.src} is absent")
                self._cond.notify_all()
                return
            self.network.broadcast(arrived, col.src, len(data))
            col.result = data
        else:
            self.network.barrier(arrived)
        col.done = True
        self._cond.notify_all()

    def _group(self, group: str) -> _Group:
        g = self._groups.get(group)
        if g is None:
            raise UnknownGroupError(f"unknown group {group!r} (known: {', '.join(sorted(self._groups))})")
        return g


def _as_bytes(payload: object) -> bytes:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    return bytes(payload)


class SimulatedTransport(Transport):
    """One rank's endpoint on a ``SimulatedHub``."""

    def __init__(self, hub: SimulatedHub, rank: int) -> None:
        self._hub = hub
        self._rank = rank

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._hub.world_size

    @property
    def hub(self) -> SimulatedHub:
        return self._hub

    def members(self, group: str) -> list[int]:
        return self._hub.members(group)

    def all_gather_bytes(self, group: str, payload: bytes) -> list[bytes | None]:
        result = self._hub.collective(self._rank, group, "all_gather", _as_bytes(payload))
        return list(result)  # type: ignore[call-overload]

    def broadcast_bytes(self, group: str, payload: bytes | None, src: int) -> bytes:
        if src not in self._hub.members(group):
            raise NotAMemberError(f"broadcast source {src} is not a member of group {group!r}")
        if self._rank == src and payload is None:
            raise ValueError("the broadcast source must pass a payload")
        data = _as_bytes(payload) if self._rank == src else None
        return self._hub.collective(self._rank, group, "broadcast", data, src=src)  # type: ignore[return-value]

    def barrier(self, group: str) -> None:
        self._hub.collective(self._rank, group, "barrier", None)

    def send_bytes(self, dst: int, payload: bytes) -> None:
        self._hub.send(self._rank, dst, _as_bytes(payload))

    def recv_bytes(self, src: int) -> bytes:
        return self._hub.recv(self._rank, src)

    def stats(self) -> RankStats:
        return self._hub.stats(self._rank)


def run_ranks(hub: SimulatedHub, fn: Callable[[SimulatedTransport], T], timeout_s: float = 120.0) -> list[T]:
    """Run ``fn(transport)`` for every rank in its own thread; results in rank order.

    Re-raises the first worker exception (by rank). Raises ``CollectiveTimeoutError`` if a thread
    is still running after ``timeout_s`` (threads are daemons, so a stuck one cannot hang exit).
    """
    results: list[object] = [None] * hub.world_size
    errors: list[BaseException | None] = [None] * hub.world_size

    def body(rank: int) -> None:
        try:
            results[rank] = fn(hub.transport(rank))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            errors[rank] = exc

    threads = [threading.Thread(target=body, args=(r,), name=f"sim-rank-{r}", daemon=True) for r in range(hub.world_size)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [r for r, t in enumerate(threads) if t.is_alive()]
    if stuck:
        raise CollectiveTimeoutError(f"ranks {stuck} still running after {timeout_s:g} s")
    for exc in errors:
        if exc is not None:
            raise exc
    return results  # type: ignore[return-value]
