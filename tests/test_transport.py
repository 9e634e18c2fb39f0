"""Simulated transport (thread rendezvous, absence, timeouts) and the network model's arithmetic."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import pytest

from distrain.comm.errors import (
    CollectiveMismatchError,
    CollectiveTimeoutError,
    NotAMemberError,
    RankAbsentError,
    UnknownGroupError,
)
from distrain.comm.network import Link, NetworkModel
from distrain.comm.simulated import SimulatedHub, SimulatedTransport, run_ranks
from distrain.comm.transport import Transport

GROUPS = {"stage0": [0, 2], "stage1": [3, 1]}
PATIENT_S = 60.0  # for waits that only need to end eventually: no loaded machine takes this long


class FakeWall:
    """A wall clock for the hub that moves only when the test moves it: a timeout fires when the
    test says, after the ranks it wants have arrived, however slowly their threads started."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def in_thread(fn: Callable[..., object], *args: object) -> Future:
    """``fn(*args)`` in a daemon thread (a stuck call cannot hang the session); its outcome as a Future."""
    fut: Future = Future()

    def body() -> None:
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the test through the Future
            fut.set_exception(exc)

    threading.Thread(target=body, daemon=True).start()
    return fut


def wait_until(cond: Callable[[], bool], what: str) -> None:
    """Poll ``cond`` until it holds; fail naming ``what`` after PATIENT_S."""
    deadline = time.monotonic() + PATIENT_S
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {PATIENT_S:g} s"
        time.sleep(0.01)


def test_all_gather_returns_payloads_in_member_order_across_rounds():
    hub = SimulatedHub(4, GROUPS, timeout_s=PATIENT_S)

    def body(t: SimulatedTransport) -> list:
        rng = random.Random(t.rank)
        group = "stage0" if t.rank in (0, 2) else "stage1"
        out = []
        for rnd in range(5):
            time.sleep(rng.random() * 0.01)
            out.append(t.all_gather_bytes(group, f"r{t.rank}-{rnd}".encode()))
            out.append(t.all_gather_bytes("world", bytes([t.rank, rnd])))
        return out

    results = run_ranks(hub, body, timeout_s=PATIENT_S)
    assert hub.members("stage1") == [1, 3]
    for rank, res in enumerate(results):
        members = [0, 2] if rank in (0, 2) else [1, 3]
        for rnd in range(5):
            assert res[2 * rnd] == [f"r{m}-{rnd}".encode() for m in members]
            assert res[2 * rnd + 1] == [bytes([r, rnd]) for r in range(4)]


def test_broadcast_and_barrier():
    hub = SimulatedHub(3, timeout_s=PATIENT_S)

    def body(t: SimulatedTransport) -> bytes:
        t.barrier("world")
        return t.broadcast_bytes("world", b"weights" if t.rank == 1 else None, src=1)

    assert run_ranks(hub, body) == [b"weights"] * 3
    assert isinstance(hub.transport(0), Transport)


def test_timeout_names_the_missing_rank():
    """Ranks 0 and 1 wait, rank 2 never shows up: once the clock passes the timeout, every waiter
    gets an error that names rank 2 and not the ranks that came."""
    wall = FakeWall()
    hub = SimulatedHub(3, timeout_s=0.2, wall_clock=wall)  # frozen, waiters re-read the clock every 0.2 s
    calls = [in_thread(hub.transport(r).all_gather_bytes, "world", b"x") for r in (0, 1)]
    wait_until(lambda: hub.waiting("world") == {0, 1}, "ranks 0 and 1 waiting")
    assert not any(c.done() for c in calls)  # nobody gives up before the timeout
    wall.now += 1.0
    for call in calls:
        with pytest.raises(CollectiveTimeoutError, match=r"ranks \[2\] did not arrive"):
            call.result(timeout=PATIENT_S)


def test_absent_rank_gets_none_and_can_rejoin():
    hub = SimulatedHub(3, timeout_s=PATIENT_S)
    hub.mark_absent(1)
    t0, t1, t2 = hub.transports()
    out: dict[int, list] = {}

    def gather(t: SimulatedTransport, payload: bytes) -> None:
        out[t.rank] = t.all_gather_bytes("world", payload)

    threads = [threading.Thread(target=gather, args=(t, bytes([t.rank]))) for t in (t0, t2)]
    [th.start() for th in threads]
    [th.join(PATIENT_S) for th in threads]
    assert out[0] == out[2] == [b"\x00", None, b"\x02"]
    with pytest.raises(RankAbsentError):
        t1.all_gather_bytes("world", b"late")
    hub.mark_present(1)
    assert run_ranks(hub, lambda t: t.all_gather_bytes("world", bytes([t.rank])), timeout_s=PATIENT_S) == [
        [b"\x00", b"\x01", b"\x02"]
    ] * 3


def test_marking_absent_releases_a_waiting_collective():
    hub = SimulatedHub(2, timeout_s=PATIENT_S)
    call = in_thread(hub.transport(0).all_gather_bytes, "world", b"a")
    wait_until(lambda: hub.waiting("world") == {0}, "rank 0 waiting")  # already inside, not arriving late
    hub.mark_absent(1)
    assert call.result(timeout=PATIENT_S) == [b"a", None]


def test_drop_policy_completes_without_the_straggler():
    """Ranks 0 and 2 wait for rank 1 until the timeout, then complete without it; rank 1 is absent."""
    wall = FakeWall()
    hub = SimulatedHub(3, timeout_s=0.2, on_timeout="drop", wall_clock=wall)
    calls = [in_thread(hub.transport(r).all_gather_bytes, "world", bytes([r])) for r in (0, 2)]
    wait_until(lambda: hub.waiting("world") == {0, 2}, "ranks 0 and 2 waiting")
    assert not any(c.done() for c in calls) and hub.absent() == set()  # the straggler is waited for
    wall.now += 1.0
    assert [c.result(timeout=PATIENT_S) for c in calls] == [[b"\x00", None, b"\x02"]] * 2
    assert hub.absent() == {1}


def test_misuse_errors():
    hub = SimulatedHub(4, GROUPS, timeout_s=PATIENT_S)  # the mismatch is found on arrival, not by a timeout
    t0 = hub.transport(0)
    with pytest.raises(UnknownGroupError, match="stage9"):
        t0.all_gather_bytes("stage9", b"")
    with pytest.raises(NotAMemberError):
        t0.all_gather_bytes("stage1", b"")
    with pytest.raises(TypeError, match="bytes"):
        t0.all_gather_bytes("stage0", "text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distinct"):
        SimulatedHub(2, {"g": [0, 0]})

    def body(t: SimulatedTransport):
        if t.rank == 0:
            return t.all_gather_bytes("stage0", b"x")
        if t.rank == 2:
            return t.barrier("stage0")
        return None

    with pytest.raises(CollectiveMismatchError):
        run_ranks(hub, body, timeout_s=PATIENT_S)


# ----- network model ---------------------------------------------------------------------------


def test_all_gather_time_is_latency_plus_bytes_over_bandwidth():
    links = {0: Link(10, 100, 5), 1: Link(100, 50, 10), 2: Link(100, 100, 20)}
    net = NetworkModel(3, links=links)
    hub = SimulatedHub(3, network=net, timeout_s=PATIENT_S)
    compute = [1.0, 2.5, 0.5]
    sizes = [1000, 20000, 5000]

    def body(t: SimulatedTransport) -> None:
        hub.clock.advance_compute(t.rank, compute[t.rank])
        t.all_gather_bytes("world", b"\x00" * sizes[t.rank])

    run_ranks(hub, body)
    # Each worker: latency + max(own bytes·8/up, others' bytes·8/down); collective = slowest one.
    t0 = 0.005 + max(1000 * 8 / 10e6, 25000 * 8 / 100e6)  # 0.007
    t1 = 0.010 + max(20000 * 8 / 100e6, 6000 * 8 / 50e6)  # 0.0116
    t2 = 0.020 + max(5000 * 8 / 100e6, 21000 * 8 / 100e6)  # 0.02168
    duration = max(t0, t1, t2)
    assert duration == pytest.approx(0.02168)
    for r in range(3):
        st = hub.stats(r)
        assert st.clock_s == pytest.approx(2.5 + duration)
        assert st.comm_time_s == pytest.approx(duration)
        assert st.idle_time_s == pytest.approx(2.5 - compute[r])
        assert st.compute_time_s == compute[r]
        assert st.bytes_sent == sizes[r]
        assert st.bytes_received == sum(sizes) - sizes[r]
        assert st.clock_s == pytest.approx(st.compute_time_s + st.comm_time_s + st.idle_time_s)

    # Broadcast of 50 kB from rank 1, then a barrier (costs the largest latency).
    run_ranks(hub, lambda t: (t.broadcast_bytes("world", b"\x01" * 50000 if t.rank == 1 else None, 1), t.barrier("world")))
    bcast = max(0.010 + 50000 * 8 / 100e6, 0.005 + 50000 * 8 / 100e6, 0.020 + 50000 * 8 / 100e6)
    assert hub.stats(0).clock_s == pytest.approx(2.5 + duration + bcast + 0.020)
    assert hub.stats(1).bytes_sent == 20000 + 50000
    assert hub.stats(2).bytes_received == 21000 + 50000


def test_absent_rank_is_not_charged():
    net = NetworkModel.uniform(3, up_mbps=8, down_mbps=8, latency_ms=0)  # 1 MB/s each way
    hub = SimulatedHub(3, network=net, timeout_s=PATIENT_S)
    hub.mark_absent(2)

    def body(t: SimulatedTransport):
        if t.rank != 2:
            t.all_gather_bytes("world", b"\x00" * 1000)

    run_ranks(hub, body)
    assert hub.stats(0).clock_s == pytest.approx(1000 / 1e6)
    assert hub.stats(2).clock_s == 0 and hub.stats(2).bytes_received == 0


def test_link_validation():
    with pytest.raises(ValueError, match="positive"):
        Link(0, 10, 1)
    with pytest.raises(ValueError, match="outside"):
        NetworkModel(2, links={5: Link()})


def test_overlapped_all_gather_runs_behind_compute():
    """Overlap: clocks do not wait for the transfer; the next collective waits for the previous one."""
    net = NetworkModel.uniform(2, up_mbps=8.0, down_mbps=8.0, latency_ms=100.0)  # 1 MB/s
    net.clock.advance_compute(0, 1.0)
    net.clock.advance_compute(1, 2.0)
    end = net.all_gather({0: 500_000, 1: 500_000}, overlap=True)  # each uploads 0.5 MB, downloads 0.5 MB
    assert end == pytest.approx(2.0 + 0.1 + 0.5)
    assert net.clock.now(0) == 1.0 and net.clock.now(1) == 2.0  # nobody waited
    net.clock.advance_compute(0, 0.2)  # rank 0 is back before the transfer ended: it idles until 2.6
    net.clock.advance_compute(1, 3.0)
    end2 = net.all_gather({0: 0, 1: 0}, overlap=True)
    assert end2 == pytest.approx(5.0 + 0.1)
    assert net.stats(0).idle_time_s == pytest.approx(2.6 - 1.2)
    assert net.stats(0).clock_s == pytest.approx(2.6)


# ----- point to point ----------------------------------------------------------------------------


def test_messages_arrive_in_order_on_the_virtual_clock():
    """arrival = max(previous arrival, send time) + bytes/min(up_src, down_dst) + lat_src + lat_dst."""
    links = {0: Link(8, 100, 10), 1: Link(100, 4, 5)}  # 0 uploads 1 MB/s, 1 downloads 0.5 MB/s
    hub = SimulatedHub(2, network=NetworkModel(2, links=links), timeout_s=PATIENT_S)

    def body(t: SimulatedTransport):
        if t.rank == 0:
            hub.clock.advance_compute(0, 1.0)
            t.send_bytes(1, b"a" * 50_000)  # 0.1 s at 0.5 MB/s, + 15 ms: arrives 1.115
            t.send_bytes(1, b"b" * 50_000)  # queued behind it on the link: arrives 1.23
            hub.clock.advance_compute(0, 5.0)
            t.send_bytes(1, b"c")  # sent at 6.0: the link is free again
            return None
        hub.clock.advance_compute(1, 1.2)
        got = [t.recv_bytes(0) for _ in range(3)]
        return got, hub.stats(1)

    _, (got, st) = run_ranks(hub, body)
    assert got == [b"a" * 50_000, b"b" * 50_000, b"c"]
    assert st.clock_s == pytest.approx(6.0 + 1 * 8 / 4e6 + 0.015)
    assert st.transfer_wait_s == pytest.approx(st.clock_s - 1.2)  # it waited for b (0.03 s) and c
    assert hub.stats(0).clock_s == 6.0  # the sender never waits
    assert hub.stats(0).p2p_bytes_sent == 100_001 == st.p2p_bytes_received
    assert hub.stats(0).bytes_sent == 0  # point-to-point traffic is counted apart from collectives


def test_both_neighbours_send_before_they_receive_without_deadlock():
    hub = SimulatedHub(2, timeout_s=PATIENT_S)

    def body(t: SimulatedTransport):
        other = 1 - t.rank
        for i in range(20):
            t.send_bytes(other, f"{t.rank}:{i}".encode())
        return [t.recv_bytes(other).decode() for _ in range(20)]

    a, b = run_ranks(hub, body)
    assert a == [f"1:{i}" for i in range(20)] and b == [f"0:{i}" for i in range(20)]


def test_receive_from_an_absent_rank_fails_at_once_and_a_rejoined_rank_starts_empty():
    wall = FakeWall()  # never moves: a receive that waited for the timeout would never return
    hub = SimulatedHub(2, timeout_s=0.2, wall_clock=wall)
    t0, t1 = hub.transports()
    t1.send_bytes(0, b"old")
    hub.mark_absent(1)
    assert t0.recv_bytes(1) == b"old"  # what arrived before the failure is still there
    with pytest.raises(RankAbsentError, match="absent"):
        in_thread(t0.recv_bytes, 1).result(timeout=PATIENT_S)
    t0.send_bytes(1, b"stale")
    hub.mark_present(1)
    t0.send_bytes(1, b"fresh")
    assert t1.recv_bytes(0) == b"fresh"


def test_receive_times_out_with_a_clear_error():
    hub = SimulatedHub(2, timeout_s=0.2)
    with pytest.raises(CollectiveTimeoutError, match="no message from rank 1"):
        hub.transport(0).recv_bytes(1)
