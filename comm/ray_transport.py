"""Ray transport: frames travel through the Ray object store; a Coordinator actor matches them up.

Each collective of a round is keyed ``(group, round, seq)`` (``seq`` counts this worker's
collectives since ``begin_round``), so a worker that restarts and rejoins lands on the same keys as
everyone else. A member ``ray.put``s its payload and hands the *reference* (wrapped in a list, so
Ray passes it on unresolved) to the Coordinator, then polls until the Coordinator declares the
collective complete — every live member arrived, or the deadline passed with a quorum — and
fetches the other members' payloads from the object store. Members the Coordinator dropped come
back as ``None``; a member whose own contribution came too late gets ``RoundDroppedError`` and
must catch up before the next round.

Payloads are ``bytes`` and stay bytes: anything else fetched from the store is refused, and the
bytes are validated by ``comm.wire`` by the caller. (Ray's own control messages inside the cluster
use Ray's serialisation; that is the cluster's trust boundary, not a frame.)

The coordinator handle is duck-typed (``contribute`` / ``poll`` remote methods, see
``distrain.coordinator``), so ``comm`` does not import the trainer.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from comm.errors import CollectiveTimeoutError, CommError, NotAMemberError, UnknownGroupError
from comm.transport import WORLD, Transport


class RoundDroppedError(CommError):
    """This worker was dropped from a collective (late or marked dead); it must catch up."""


class QuorumError(CommError):
    """A collective's deadline passed with fewer live contributions than the quorum."""


def _ray() -> Any:
    import ray  # lazy: comm (and distrain) import without Ray installed

    return ray


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
        self._round = 0
        self._seq: dict[str, int] = defaultdict(int)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    def begin_round(self, round_idx: int) -> None:
        """Collectives from now on belong to ``round_idx`` (numbered from 0 within it)."""
        self._round = int(round_idx)
        self._seq.clear()

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
        ray.get(self._coord.contribute.remote(group, self._round, seq, op, src, self._rank, item))
        deadline = time.monotonic() + self._wait_s
        delay = 0.002
        while True:
            status, value = ray.get(self._coord.poll.remote(group, self._round, seq, self._rank))
            if status == "done":
                return value
            if status == "dropped":
                raise RoundDroppedError(f"rank {self._rank} dropped from {group!r} round {self._round}: {value}")
            if status == "quorum":
                raise QuorumError(f"group {group!r} round {self._round}: {value}")
            if status == "error":
                raise CommError(f"group {group!r} round {self._round} {op}: {value}")
            if time.monotonic() > deadline:
                raise CollectiveTimeoutError(f"group {group!r} round {self._round} {op}: no answer from the "
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
