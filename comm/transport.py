"""The Transport interface: how bytes move between workers, independent of what they mean.

Workers are numbered ``0 .. world_size-1``. A *group* is a named, ordered list of ranks — the
workers that own the same parameters in different replicas (e.g. ``"stage0"``) — and every
collective runs on one group. All members call the same collectives in the same order.
``members(group)`` is the configured membership in ascending rank order; ``all_gather_bytes``
returns one entry per member in that order, ``None`` for a member missing from this collective
(absent/dead, or dropped by a timeout policy).

Point-to-point messages (``send_bytes`` / ``recv_bytes``: pipeline boundaries) are ordered per
directed pair: the n-th ``recv_bytes(src)`` returns the n-th message ``src`` sent to this rank.
``send_bytes`` never waits for the receiver, so two neighbours that each send before they receive
cannot deadlock. Transports carry bytes only; what the bytes mean (frames, their validation) is
the caller's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

WORLD = "world"


class Transport(ABC):
    """Byte collectives over named groups; implementations: simulated, torch.distributed, Ray."""

    @property
    @abstractmethod
    def rank(self) -> int:
        """This endpoint's worker rank."""

    @property
    @abstractmethod
    def world_size(self) -> int:
        """Number of workers (ranks) in the job."""

    @abstractmethod
    def members(self, group: str) -> list[int]:
        """Ranks of ``group`` in ascending order (the positions of ``all_gather_bytes`` results)."""

    @abstractmethod
    def all_gather_bytes(self, group: str, payload: bytes) -> list[bytes | None]:
        """Every member's payload, in ``members(group)`` order; ``None`` where a member is missing."""

    @abstractmethod
    def broadcast_bytes(self, group: str, payload: bytes | None, src: int) -> bytes:
        """``src``'s payload delivered to every member (``src`` passes bytes, others ``None``)."""

    @abstractmethod
    def barrier(self, group: str) -> None:
        """Return once every live member of ``group`` has reached the barrier."""

    @abstractmethod
    def send_bytes(self, dst: int, payload: bytes) -> None:
        """Queue ``payload`` for rank ``dst``; returns without waiting for the receiver."""

    @abstractmethod
    def recv_bytes(self, src: int) -> bytes:
        """The next message from rank ``src``; waits (bounded by the transport's timeout)."""

    def begin_round(self, round_idx: int) -> None:
        """Collectives and messages from now on belong to outer round ``round_idx``.

        Transports that match by round (Ray: a restarted worker must land on the same keys as
        the others) use it; the others ignore it."""
