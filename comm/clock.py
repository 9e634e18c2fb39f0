"""Simulated time: one virtual clock per worker, moved by compute and by the network model.

The clock never sleeps: a worker's compute advances its own clock (``advance_compute``), a
collective moves every participant to the collective's end (``distrain.comm.network``), and a
point-to-point receive moves the receiver to the message's arrival. Time spent waiting is booked
by cause — ``idle`` (waiting for the last participant of a collective), ``transfer`` (waiting for
a point-to-point message) — so utilisation and a pipeline's bubble can be read off the counters.
Real launchers have no virtual clock: their workers get a ``WallClock``, which charges nothing.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol


class ComputeClock(Protocol):
    """What a worker needs of a clock: charge the seconds its compute took (simulated), let time pass
    without work (a slowed worker), and read it."""

    def advance(self, seconds: float) -> None: ...

    def stall(self, seconds: float) -> None: ...

    def now(self) -> float: ...


@dataclass
class RankTime:
    """One worker's clock and where its time went."""

    clock_s: float = 0.0
    compute_time_s: float = 0.0
    comm_time_s: float = 0.0  # duration of the collectives it took part in
    idle_time_s: float = 0.0  # waiting for the last participant (or its own background transfer)
    transfer_wait_s: float = 0.0  # waiting for point-to-point messages (pipeline bubbles, boundaries)
    busy_until_s: float = 0.0  # end of its background (overlapped) collective


class VirtualClock:
    """Per-worker simulated clocks; thread-safe (``lock`` is shared with the network model)."""

    def __init__(self, world_size: int) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be ≥ 1, got {world_size}")
        self.world_size = world_size
        self.lock = threading.RLock()
        self._t = [RankTime() for _ in range(world_size)]

    def _check(self, rank: int) -> int:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside 0..{self.world_size - 1}")
        return rank

    def at(self, rank: int) -> RankTime:
        """The live record of ``rank`` (callers hold ``lock`` while they change it)."""
        return self._t[self._check(rank)]

    def now(self, rank: int) -> float:
        with self.lock:
            return self.at(rank).clock_s

    def snapshot(self, rank: int) -> RankTime:
        with self.lock:
            return replace(self.at(rank))

    def advance_compute(self, rank: int, seconds: float) -> None:
        """Charge ``seconds`` of computation to ``rank``'s clock."""
        if not seconds >= 0:
            raise ValueError(f"compute time must be non-negative, got {seconds}")
        with self.lock:
            t = self.at(rank)
            t.compute_time_s += seconds
            t.clock_s += seconds

    def wait_until(self, rank: int, when: float, cause: str) -> None:
        """Move ``rank`` forward to ``when`` (if it is behind), booking the wait to ``cause``."""
        if cause not in ("idle", "transfer"):
            raise ValueError(f"unknown wait cause {cause!r}")
        with self.lock:
            t = self.at(rank)
            if when > t.clock_s:
                if cause == "idle":
                    t.idle_time_s += when - t.clock_s
                else:
                    t.transfer_wait_s += when - t.clock_s
                t.clock_s = when

    def for_rank(self, rank: int) -> "RankClock":
        return RankClock(self, self._check(rank))

    def state_dict(self) -> list[dict[str, Any]]:
        with self.lock:
            return [asdict(t) for t in self._t]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        """Restore every rank's clock (resuming a simulated run)."""
        if len(state) != self.world_size:
            raise ValueError(f"got clocks for {len(state)} ranks, this clock has {self.world_size}")
        with self.lock:
            self._t = [RankTime(**{k: float(v) for k, v in d.items()}) for d in state]


@dataclass(frozen=True)
class RankClock:
    """One worker's handle on the virtual clock (what its inner schedule charges compute to)."""

    clock: VirtualClock
    rank: int

    def advance(self, seconds: float) -> None:
        self.clock.advance_compute(self.rank, seconds)

    def stall(self, seconds: float) -> None:
        """A slowed worker's extra time: booked as compute (it is busy, only slower)."""
        self.clock.advance_compute(self.rank, seconds)

    def now(self) -> float:
        return self.clock.now(self.rank)


class WallClock:
    """Real launchers' clock: compute takes the time it takes (nothing to charge); ``now`` is real time."""

    def advance(self, seconds: float) -> None:
        pass

    def stall(self, seconds: float) -> None:
        """A slowed worker's extra time really passes."""
        time.sleep(seconds)

    def now(self) -> float:
        return time.perf_counter()
