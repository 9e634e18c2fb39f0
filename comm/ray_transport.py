"""Ray transport: frames travel through the Ray object store; a Coordinator actor matches them up.

Each collective of a round is keyed ``(group, round, seq)`` (``seq`` counts this worker's
collectives since ``begin_round``), so a worker that restarts and rejoins lands on the same keys as
everyone else. A member ``ray.put``s its payload and hands the *reference* (wrapped in a list, so
Ray passes it on unresolved) to the Coordinator, then polls until the Coordinator declares the
collective complete — every live member arrived, or the grace passed — and fetches the other
members' payloads from the object store. Members that did not come back as ``None``; a member
whose own contribution came after the grace gets ``RoundLateError`` (it is alive: it sits the
round out and rejoins with its state), one the Coordinator dropped as failed ``RoundDroppedError``
(it must be rebuilt and catch up).

Payloads are ``bytes`` and stay bytes: anything else fetched from the store is refused, and the
bytes are validated by ``distrain.comm.wire`` by the caller. (Ray's own control messages inside the cluster
use Ray's serialisation; that is the cluster's trust boundary, not a frame.)

Point-to-point messages go actor to actor: the sender calls the receiving actor's ``deliver``
remote method (a worker actor runs several threads, so it takes deliveries while its round runs)
with ``(src, round, seq, payload)``; the receiver's ``Mailbox`` hands them out in ``seq`` order
for the current round and discards anything of an older round — what a failed round left behind
never reaches the next one.

The coordinator and peer handles are duck-typed (``contribute`` / ``poll`` / ``deliver`` remote
methods, see ``distrain.runtime``), so ``comm`` does not import the trainer.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from distrain.comm.errors import CollectiveTimeoutError, CommError, NotAMemberError, RoundLateError, UnknownGroupError
from distrain.comm.transport import WORLD, Transport


class RoundDroppedError(CommError):
    """This worker was dropped from a collective (late or marked dead); it must catch up."""


class QuorumError(CommError):
    """A collective's deadline passed with fewer live contributions than the quorum."""


def _ray() -> Any:
    import ray  # lazy: comm (and distrain) import without Ray installed

    return ray


class Mailbox:
    """Messages delivered to one worker, by sender; taken in order within the open round.

    ``round`` is the worker's open round as the loop handed it (``begin_round``): the one place on
    the worker's side of the transport that holds it; the transport keys its collectives by it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.round = 0
        self._box: dict[int, dict[tuple[int, int], bytes]] = defaultdict(dict)

    def begin_round(self, round_idx: int) -> None:
        with self._cond:
            self.round = int(round_idx)
            for box in self._box.values():
                for key in [k for k in box if k[0] < self.round]:
                    del box[key]

    def put(self, src: int, round_idx: int, seq: int, payload: bytes) -> None:
        if not isinstance(payload, bytes):
            raise CommError(f"message from rank {src} is {type(payload).__name__}, not bytes")
        with self._cond:
            if round_idx < self.round:
                return  # a message of a round that is over: dropped
            self._box[src][(int(round_idx), int(seq))] = payload
            self._cond.notify_all()

    def take(self, src: int, seq: int, timeout_s: float) -> bytes:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                got = self._box[src].pop((self.round, seq), None)
                if got is not None:
                    return got
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CollectiveTimeoutError(f"no message #{seq} from rank {src} in round {self.round} "
                                                 f"within {timeout_s:g} s")
                self._cond.wait(remaining)


class RayTransport(Transport):
    """One worker's endpoint; collectives are matched by the Coordinator actor ``coordinator``."""

    def __init__(self, coordinator: Any, rank: int, world_size: int, groups: Mapping[str, Sequence[int]] | None = None,
                 timeout_s: float = 600.0, poll_s: float = 0.05) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self._coord = coordinator
        self._rank, self._world = rank, world_size
        self._groups = {WORLD: list(range(world_size)), **{k: sorted(v) for k, v in (groups or {}).items()}}
        # the Coordinator enforces the real deadline; this bound only guards against a dead Coordinator
        self._wait_s = 2 * float(timeout_s) + 30.0
        self._poll_s = poll_s
        self._seq: dict[str, int] = defaultdict(int)
        self._peers: dict[int, Any] = {}
        self.mailbox = Mailbox()
        self._sent: dict[int, int] = defaultdict(int)
        self._taken: dict[int, int] = defaultdict(int)
        self._p2p_wait_s = float(timeout_s)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    def begin_round(self, round_idx: int) -> None:
        """Collectives and messages from now on belong to ``round_idx`` (numbered from 0 within it)."""
        self._seq.clear()
        self._sent.clear()
        self._taken.clear()
        self.mailbox.begin_round(round_idx)

    def set_peers(self, peers: Mapping[int, Any]) -> None:
        """Actor handles of the workers this one exchanges messages with (rank → handle)."""
        self._peers = dict(peers)

    def send_bytes(self, dst: int, payload: bytes) -> None:
        peer = self._peers.get(dst)
        if peer is None:
            raise NotAMemberError(f"rank {self._rank} has no peer rank {dst} (peers: {sorted(self._peers)})")
        seq = self._sent[dst]
        self._sent[dst] = seq + 1
        peer.deliver.remote(self._rank, self.mailbox.round, seq, _as_bytes(payload))  # not awaited: no wait

    def recv_bytes(self, src: int) -> bytes:
        if src not in self._peers:
            raise NotAMemberError(f"rank {self._rank} has no peer rank {src} (peers: {sorted(self._peers)})")
        seq = self._taken[src]
        self._taken[src] = seq + 1
        return self.mailbox.take(src, seq, self._p2p_wait_s)

    def members(self, group: str) -> list[int]:
        return list(self._members(group))

    def all_gather_bytes(self, group: str, payload: bytes) -> list[bytes | None]:
        members = self._member_of(group)
        data = _as_bytes(payload)
        items = list(self._collective(group, "all_gather", None, data))
        me = members.index(self._rank)
        items[me] = None  # our own payload is at hand
        out = self._fetch(items)
        out[me] = data
        return out

    def broadcast_bytes(self, group: str, payload: bytes | None, src: int) -> bytes:
        members = self._member_of(group)
        if src not in members:
            raise NotAMemberError(f"broadcast source {src} is not a member of group {group!r}")
        if self._rank == src and payload is None:
            raise ValueError("the broadcast source must pass a payload")
        data = _as_bytes(payload) if self._rank == src else None
        items = self._collective(group, "broadcast", src, data)
        if self._rank == src:
            return data  # type: ignore[return-value]
        got = self._fetch([items[members.index(src)]])[0]
        if got is None:
            raise RoundDroppedError(f"broadcast source {src} of group {group!r} is absent")
        return got

    def barrier(self, group: str) -> None:
        self._member_of(group)
        self._collective(group, "barrier", None, b"")

    # ----- the protocol with the Coordinator ---------------------------------------------------
    def _collective(self, group: str, op: str, src: int | None, data: bytes | None) -> list[Any]:
        ray = _ray()
        seq = self._seq[group]
        self._seq[group] = seq + 1
        item = [ray.put(data)] if data is not None and op != "barrier" else []
        ray.get(self._coord.contribute.remote(group, self.mailbox.round, seq, op, src, self._rank, item))
        deadline = time.monotonic() + self._wait_s
        delay = 0.002
        while True:
            status, value = ray.get(self._coord.poll.remote(group, self.mailbox.round, seq, self._rank))
            if status == "done":
                return value
            if status == "late":
                raise RoundLateError(f"rank {self._rank} late for {group!r} round {self.mailbox.round}: {value}")
            if status == "dropped":
                raise RoundDroppedError(f"rank {self._rank} dropped from {group!r} round {self.mailbox.round}: {value}")
            if status == "quorum":
                raise QuorumError(f"group {group!r} round {self.mailbox.round}: {value}")
            if status == "error":
                raise CommError(f"group {group!r} round {self.mailbox.round} {op}: {value}")
            if time.monotonic() > deadline:
                raise CollectiveTimeoutError(f"group {group!r} round {self.mailbox.round} {op}: no answer from the "
                                             f"Coordinator within {self._wait_s:g} s")
            time.sleep(delay)
            delay = min(self._poll_s, delay * 2)

    def _fetch(self, items: list[Any]) -> list[bytes | None]:
        """Payload bytes of each member's item (``[ref]`` or ``[]`` or ``None``); bytes only."""
        ray = _ray()
        refs = {i: it[0] for i, it in enumerate(items) if it}
        values = dict(zip(refs, ray.get(list(refs.values())))) if refs else {}
        out: list[bytes | None] = []
        for i in range(len(items)):
            v = values.get(i)
            if v is not None and not isinstance(v, bytes):
                raise CommError(f"object store returned {type(v).__name__} where a bytes frame was expected")
            out.append(v)
        return out

    def _members(self, group: str) -> list[int]:
        g = self._groups.get(group)
        if g is None:
            raise UnknownGroupError(f"unknown group {group!r} (known: {', '.join(sorted(self._groups))})")
        return g

    def _member_of(self, group: str) -> list[int]:
        members = self._members(group)
        if self._rank not in members:
            raise NotAMemberError(f"rank {self._rank} is not a member of group {group!r} ({members})")
        return members


def _as_bytes(payload: object) -> bytes:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    return bytes(payload)
