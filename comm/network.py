"""Network model for simulation: per-worker links, byte counters, and what transfers cost in time.

Link model (one per worker): ``up_mbps`` / ``down_mbps`` in Mbit/s (10^6 bit/s) and a one-way
``latency_ms``. Payloads go through a relay (object-store style): in an all-gather each worker
uploads its own payload once and downloads every other participant's payload. Upload and download
overlap (full duplex), so worker ``i``'s transfer takes

    t_i = latency_i + max(up_bytes_i·8 / up_bps_i, down_bytes_i·8 / down_bps_i)

A collective is a barrier: it starts when the last participant arrives, ``T0 = max_i clock_i``,
and ends for everyone at ``T0 + max_i t_i``. Counters per rank: ``idle_time_s`` (waiting for the
last arrival, ``T0 − clock_i``), ``comm_time_s`` (``max_i t_i``), ``compute_time_s`` (charged
to the ``distrain.comm.clock.VirtualClock`` by the workers); ``clock_s`` = compute + comm + idle +
transfer waits. Broadcast: the source uploads ``n`` bytes, every other member downloads ``n``; a
barrier moves no bytes and costs the largest latency.

Point-to-point messages (pipeline boundaries) cross the sender's uplink and the receiver's
downlink: bandwidth ``min(up_src, down_dst)``, latency ``latency_src + latency_dst``. Each
directed link is a queue: a message sent at the sender's clock ``t_send`` arrives at

    arrival = max(previous arrival on this link, t_send) + bytes·8 / bandwidth + latency

The sender does not wait; the receiver's clock moves to ``arrival`` if it is earlier (the wait is
booked as ``transfer_wait_s``).

Overlapped all-gathers (``overlap=True``, used when the outer step is applied one round late):
a worker posts its payload and keeps computing. The transfer starts when the last participant has
posted (``T0 = max_i max(clock_i, busy_i)``) and runs in the background until ``T0 + max_i t_i``;
clocks do not move, but the next collective of a worker first waits for its previous background
transfer (``busy_i``) to finish, because that result is needed then.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from distrain.comm.clock import RankTime, VirtualClock


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
class Traffic:
    """Bytes a worker moved: collectives (all-gather, broadcast) and point-to-point messages."""

    bytes_sent: int = 0
    bytes_received: int = 0
    collectives: int = 0
    p2p_bytes_sent: int = 0
    p2p_bytes_received: int = 0
    messages: int = 0


@dataclass
class RankStats(Traffic, RankTime):
    """A snapshot of one worker's traffic and clock (``NetworkModel.stats``)."""


class NetworkModel:
    """Accounts bytes and simulated time per worker on a ``VirtualClock``; thread-safe."""

    def __init__(self, world_size: int, default: Link | None = None, links: dict[int, Link] | None = None,
                 clock: VirtualClock | None = None) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be ≥ 1, got {world_size}")
        links = dict(links or {})
        bad = [r for r in links if not 0 <= r < world_size]
        if bad:
            raise ValueError(f"links given for ranks {bad} outside 0..{world_size - 1}")
        self.world_size = world_size
        self.clock = clock or VirtualClock(world_size)
        if self.clock.world_size != world_size:
            raise ValueError(f"clock has {self.clock.world_size} ranks, network {world_size}")
        self._links = [links.get(r, default or Link()) for r in range(world_size)]
        self._traffic = [Traffic() for _ in range(world_size)]
        self._arrival: dict[tuple[int, int], float] = {}  # last arrival per directed link

    @classmethod
    def uniform(cls, world_size: int, up_mbps: float, down_mbps: float, latency_ms: float) -> "NetworkModel":
        return cls(world_size, Link(up_mbps, down_mbps, latency_ms))

    def link(self, rank: int) -> Link:
        return self._links[self._check(rank)]

    def stats(self, rank: int) -> RankStats:
        with self.clock.lock:
            t, tr = self.clock.at(self._check(rank)), self._traffic[rank]
            return RankStats(**{f.name: getattr(tr, f.name) for f in fields(Traffic)},
                             **{f.name: getattr(t, f.name) for f in fields(RankTime)})

    def state_dict(self) -> dict:
        with self.clock.lock:
            return {"clock": self.clock.state_dict(), "traffic": [vars(t).copy() for t in self._traffic],
                    "arrival": [[s, d, a] for (s, d), a in sorted(self._arrival.items())]}

    def load_state_dict(self, state: dict) -> None:
        """Restore every rank's counters, clock and link queues (resuming a simulated run)."""
        if len(state["traffic"]) != self.world_size:
            raise ValueError(f"got traffic for {len(state['traffic'])} ranks, the model has {self.world_size}")
        with self.clock.lock:
            self.clock.load_state_dict(state["clock"])
            self._traffic = [Traffic(**{k: int(v) for k, v in d.items()}) for d in state["traffic"]]
            self._arrival = {(int(s), int(d)): float(a) for s, d, a in state["arrival"]}

    def all_gather(self, sizes: dict[int, int], overlap: bool = False) -> float:
        """Account an all-gather among the ranks in ``sizes`` (rank → own payload bytes)."""
        total = sum(sizes.values())
        return self._collective({r: (n, total - n) for r, n in sizes.items()}, overlap)

    def broadcast(self, participants: list[int], src: int, nbytes: int) -> float:
        """Account a broadcast of ``nbytes`` from ``src`` to the other participants."""
        return self._collective({r: (nbytes, 0) if r == src else (0, nbytes) for r in participants})

    def barrier(self, participants: list[int]) -> float:
        return self._collective({r: (0, 0) for r in participants})

    def send(self, src: int, dst: int, nbytes: int) -> float:
        """Account a point-to-point message sent now (the sender's clock); returns its arrival."""
        up, down = self.link(src), self.link(dst)
        seconds = nbytes * 8 / (min(up.up_mbps, down.down_mbps) * 1e6) + (up.latency_ms + down.latency_ms) / 1e3
        with self.clock.lock:
            sent_at = self.clock.at(src).clock_s
            arrival = max(self._arrival.get((src, dst), 0.0), sent_at) + seconds
            self._arrival[(src, dst)] = arrival
            self._traffic[src].p2p_bytes_sent += nbytes
            self._traffic[src].messages += 1
            self._traffic[dst].p2p_bytes_received += nbytes
            return arrival

    def receive(self, dst: int, arrival: float) -> None:
        """The receiver takes a message that arrives at ``arrival``: it waits for it if early."""
        self.clock.wait_until(self._check(dst), arrival, "transfer")

    def forget_links(self, rank: int) -> None:
        """A worker restarted: its links start empty (nothing of the old queue is delivered)."""
        with self.clock.lock:
            self._arrival = {k: v for k, v in self._arrival.items() if rank not in k}

    def _collective(self, traffic: dict[int, tuple[int, int]], overlap: bool = False) -> float:
        """Advance the participants' clocks to the collective's end time (or, overlapped, only
        to the end of their previous background transfer) and return the end time."""
        if not traffic:
            return 0.0
        with self.clock.lock:
            for r in traffic:
                self._check(r)
            for r in traffic:  # a worker needs its previous background transfer's result first
                self.clock.wait_until(r, self.clock.at(r).busy_until_s, "idle")
            start = max(self.clock.at(r).clock_s for r in traffic)
            duration = max(self._links[r].transfer_s(up, down) for r, (up, down) in traffic.items())
            end = start + duration
            for r, (up, down) in traffic.items():
                t, tr = self.clock.at(r), self._traffic[r]
                if overlap:
                    t.busy_until_s = end
                else:
                    self.clock.wait_until(r, start, "idle")
                    t.clock_s = end
                t.comm_time_s += duration
                tr.bytes_sent += up
                tr.bytes_received += down
                tr.collectives += 1
            return end

    def _check(self, rank: int) -> int:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside 0..{self.world_size - 1}")
        return rank
