"""Network model for simulation: per-worker links, simulated clocks, byte and time counters.

Link model (one per worker): ``up_mbps`` / ``down_mbps`` in Mbit/s (10^6 bit/s) and a one-way
``latency_ms``. Payloads go through a relay (object-store style): in an all-gather each worker
uploads its own payload once and downloads every other participant's payload. Upload and download
overlap (full duplex), so worker ``i``'s transfer takes

    t_i = latency_i + max(up_bytes_i·8 / up_bps_i, down_bytes_i·8 / down_bps_i)

A collective is a barrier: it starts when the last participant arrives, ``T0 = max_i clock_i``,
and ends for everyone at ``T0 + max_i t_i``. Counters per rank: ``idle_time_s`` (waiting for the
last arrival, ``T0 − clock_i``), ``comm_time_s`` (``max_i t_i``), ``compute_time_s`` (from
``advance_compute``); ``clock_s`` = compute + comm + idle. Broadcast: the source uploads
``n`` bytes, every other member downloads ``n``; a barrier moves no bytes and costs the largest
latency.

Overlapped all-gathers (``overlap=True``, used when the outer step is applied one round late):
a worker posts its payload and keeps computing. The transfer starts when the last participant has
posted (``T0 = max_i max(clock_i, busy_i)``) and runs in the background until ``T0 + max_i t_i``;
clocks do not move, but the next collective of a worker first waits for its previous background
transfer (``busy_i``) to finish, because that result is needed then.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Link:
    """One worker's access link."""

    up_mbps: float = 100.0
    down_mbps: float = 100.0
    latency_ms: float = 20.0

    def __post_init__(self) -> None:
        if not (self.up_mbps > 0 and self.down_mbps > 0):
            raise ValueError(f"bandwidths must be positive, got up={self.up_mbps} down={self.down_mbps} Mbit/s")
        if not self.latency_ms >= 0:
            raise ValueError(f"latency must be non-negative, got {self.latency_ms} ms")

    def transfer_s(self, up_bytes: int, down_bytes: int) -> float:
        """Seconds to upload ``up_bytes`` while downloading ``down_bytes``, latency included."""
        up = up_bytes * 8 / (self.up_mbps * 1e6)
        down = down_bytes * 8 / (self.down_mbps * 1e6)
        return self.latency_ms / 1e3 + max(up, down)


@dataclass
class RankStats:
    """Per-rank counters (a snapshot when returned by ``NetworkModel.stats``)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    comm_time_s: float = 0.0
    compute_time_s: float = 0.0
    idle_time_s: float = 0.0
    clock_s: float = 0.0
    busy_until_s: float = 0.0  # end of this rank's background (overlapped) transfer
    collectives: int = 0


class NetworkModel:
    """Accounts bytes and simulated time per worker; thread-safe."""

    def __init__(self, world_size: int, default: Link | None = None, links: dict[int, Link] | None = None) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be ≥ 1, got {world_size}")
        links = dict(links or {})
        bad = [r for r in links if not 0 <= r < world_size]
        if bad:
            raise ValueError(f"links given for ranks {bad} outside 0..{world_size - 1}")
        self.world_size = world_size
        self._links = [links.get(r, default or Link()) for r in range(world_size)]
        self._stats = [RankStats() for _ in range(world_size)]
        self._lock = threading.Lock()

    @classmethod
    def uniform(cls, world_size: int, up_mbps: float, down_mbps: float, latency_ms: float) -> "NetworkModel":
        return cls(world_size, Link(up_mbps, down_mbps, latency_ms))

    def link(self, rank: int) -> Link:
        return self._links[self._check(rank)]

    def stats(self, rank: int) -> RankStats:
        with self._lock:
            return replace(self._stats[self._check(rank)])

    def load_stats(self, stats: list[RankStats]) -> None:
        """Restore every rank's counters and clock (resuming a simulated run)."""
        if len(stats) != self.world_size:
            raise ValueError(f"got stats for {len(stats)} ranks, the model has {self.world_size}")
        with self._lock:
            self._stats = [replace(s) for s in stats]

    def clock(self, rank: int) -> float:
        return self.stats(rank).clock_s

    def advance_compute(self, rank: int, seconds: float) -> None:
        """Charge ``seconds`` of computation to ``rank``'s clock."""
        if not seconds >= 0:
            raise ValueError(f"compute time must be non-negative, got {seconds}")
        with self._lock:
            st = self._stats[self._check(rank)]
            st.compute_time_s += seconds
            st.clock_s += seconds

    def all_gather(self, sizes: dict[int, int], overlap: bool = False) -> float:
        """Account an all-gather among the ranks in ``sizes`` (rank → own payload bytes)."""
        total = sum(sizes.values())
        return self._collective({r: (n, total - n) for r, n in sizes.items()}, overlap)

    def broadcast(self, participants: list[int], src: int, nbytes: int) -> float:
        """Account a broadcast of ``nbytes`` from ``src`` to the other participants."""
        return self._collective({r: (nbytes, 0) if r == src else (0, nbytes) for r in participants})

    def barrier(self, participants: list[int]) -> float:
        return self._collective({r: (0, 0) for r in participants})

    def _collective(self, traffic: dict[int, tuple[int, int]], overlap: bool = False) -> float:
        """Advance the participants' clocks to the collective's end time (or, overlapped, only
        to the end of their previous background transfer) and return the end time."""
        if not traffic:
            return 0.0
        with self._lock:
            for r in traffic:
                self._check(r)
            for r in traffic:  # a worker needs its previous background transfer's result first
                st = self._stats[r]
                if st.busy_until_s > st.clock_s:
                    st.idle_time_s += st.busy_until_s - st.clock_s
                    st.clock_s = st.busy_until_s
            start = max(self._stats[r].clock_s for r in traffic)
            duration = max(self._links[r].transfer_s(up, down) for r, (up, down) in traffic.items())
            end = start + duration
            for r, (up, down) in traffic.items():
                st = self._stats[r]
                if overlap:
                    st.busy_until_s = end
                else:
                    st.idle_time_s += start - st.clock_s
                    st.clock_s = end
                st.comm_time_s += duration
                st.bytes_sent += up
                st.bytes_received += down
                st.collectives += 1
            return end

    def _check(self, rank: int) -> int:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside 0..{self.world_size - 1}")
        return rank
