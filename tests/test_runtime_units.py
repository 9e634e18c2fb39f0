"""Runtime pieces without launching a job: Coordinator quorum/deadline logic, layout, faults,
weights frames, catch-up, resume agreement, and the torch.distributed transport on 3 local ranks."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import msgpack
import pytest
import torch

from distrain.comm.errors import ShapeMismatchError, StaleFrameError
from distrain.layout import Layout
from distrain.optim import lr_multiplier
from distrain.outer.base import RoundStats
from distrain.runtime.common import newest_common_step
from distrain.runtime.faults import Fault
from distrain.runtime.ray.coordinator import Coordinator
from distrain.worker.frames import decode_params, encode_params
from distrain.worker.worker import RoundReport


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def coord(quorum=1.0, world=3, timeout=10.0):
    clock = Clock()
    groups = {"replicas": list(range(world)), "inside": list(range(world))}
    return Coordinator(world, groups, quorum, timeout, clock=clock, timeout_s=2 * timeout, graced=["replicas"]), clock


# ----- Coordinator -----------------------------------------------------------------------------
def test_collective_completes_when_every_live_member_arrived():
    c, _ = coord()
    for r in (2, 0):
        c.contribute("replicas", 0, 0, "all_gather", None, r, [f"ref{r}"])
        assert c.poll("replicas", 0, 0, r) == ("wait", None)
    c.contribute("replicas", 0, 0, "all_gather", None, 1, ["ref1"])
    assert c.poll("replicas", 0, 0, 0) == ("done", [["ref0"], ["ref1"], ["ref2"]])


def test_a_slow_worker_misses_the_grace_sits_the_round_out_and_never_ends_the_job():
    """With quorum 1.0 a slow worker still cannot fail the round: it is late (alive), not dead."""
    c, clock = coord(quorum=1.0)
    c.contribute("replicas", 4, 0, "all_gather", None, 0, ["a"])
    c.contribute("replicas", 4, 0, "all_gather", None, 2, ["c"])
    clock.t = 9.9
    assert c.poll("replicas", 4, 0, 0)[0] == "wait"
    clock.t = 10.0
    assert c.poll("replicas", 4, 0, 0) == ("done", [["a"], None, ["c"]])
    assert c.live_ranks() == [0, 2] and c.late_ranks() == [1]
    assert c.take_events() == [{"event": "late", "rank": 1, "round": 4, "why": "missed the 10 s grace"}]
    # the late worker learns it is late (it keeps its state); the next collective does not wait for it
    c.contribute("replicas", 4, 0, "all_gather", None, 1, ["b"])
    assert c.poll("replicas", 4, 0, 1)[0] == "late"
    c.contribute("replicas", 4, 1, "all_gather", None, 1, ["b2"])  # a later collective of the round: late at once
    c.contribute("replicas", 4, 1, "all_gather", None, 0, ["a2"])
    c.contribute("replicas", 4, 1, "all_gather", None, 2, ["c2"])
    assert c.poll("replicas", 4, 1, 2) == ("done", [["a2"], None, ["c2"]])
    assert c.poll("replicas", 4, 1, 1)[0] == "late"
    # the driver brings it back with the global weights: it takes part again, with its state
    c.mark_present(1, 5)
    assert c.take_events() == [{"event": "rejoined", "rank": 1, "round": 5, "kept_state": True}]
    for r in range(3):
        c.contribute("replicas", 5, 0, "all_gather", None, r, [r])
    assert c.poll("replicas", 5, 0, 1) == ("done", [[0], [1], [2]])


def test_outside_the_exchange_a_missing_worker_is_dropped_at_the_deadline():
    """A pipeline's per-step records are lock-step: who misses the (longer) deadline there failed."""
    c, clock = coord(quorum=0.6)
    c.contribute("inside", 4, 0, "all_gather", None, 0, ["a"])
    c.contribute("inside", 4, 0, "all_gather", None, 2, ["c"])
    clock.t = 10.0
    assert c.poll("inside", 4, 0, 0)[0] == "wait"  # the grace does not apply here
    clock.t = 20.0
    assert c.poll("inside", 4, 0, 0) == ("done", [["a"], None, ["c"]])
    assert c.live_ranks() == [0, 2] and c.late_ranks() == []
    assert c.take_events() == [{"event": "dropped", "rank": 1, "round": 4, "why": "missed the 20 s deadline"}]
    c.contribute("inside", 4, 0, "all_gather", None, 1, ["b"])
    assert c.poll("inside", 4, 0, 1)[0] == "dropped"


def test_below_quorum_the_collective_fails_for_everyone():
    """Only dead members count against the quorum."""
    c, clock = coord(quorum=1.0)
    c.contribute("replicas", 0, 0, "all_gather", None, 0, ["a"])
    c.contribute("replicas", 0, 0, "all_gather", None, 1, ["b"])
    c.mark_absent(2, 0, "ActorDiedError")
    status, reason = c.poll("replicas", 0, 0, 0)
    assert status == "quorum" and "quorum is 3" in reason


def test_marking_a_dead_worker_absent_completes_at_once_and_it_rejoins_later():
    c, _ = coord(quorum=0.5)
    c.contribute("replicas", 1, 0, "all_gather", None, 0, ["a"])
    c.contribute("replicas", 1, 0, "all_gather", None, 2, ["c"])
    c.mark_absent(1, 1, "ActorDiedError")
    assert c.poll("replicas", 1, 0, 2) == ("done", [["a"], None, ["c"]])
    c.contribute("replicas", 1, 0, "all_gather", None, 1, ["b"])  # its restarted actor's stale call
    assert c.poll("replicas", 1, 0, 1)[0] == "dropped"
    c.mark_present(1, 2)
    c.end_round(2)
    for r in range(3):
        c.contribute("replicas", 2, 0, "all_gather", None, r, [r])
    assert c.poll("replicas", 2, 0, 1) == ("done", [[0], [1], [2]])
    assert [e["event"] for e in c.take_events()] == ["dropped", "rejoined"]


def test_broadcast_needs_its_source_and_mismatched_calls_fail():
    c, _ = coord(quorum=0.3)
    c.contribute("replicas", 0, 0, "broadcast", 1, 0, [])
    c.mark_absent(1, 0)
    c.mark_absent(2, 0)
    assert c.poll("replicas", 0, 0, 0) == ("error", "broadcast source 1 is absent")
    c2, _ = coord()
    c2.contribute("replicas", 0, 0, "all_gather", None, 0, ["a"])
    c2.contribute("replicas", 0, 0, "barrier", None, 1, [])
    assert c2.poll("replicas", 0, 0, 0)[0] == "error"
    with pytest.raises(ValueError, match="not a member"):
        c2.contribute("replicas", 0, 0, "all_gather", None, 7, [])


def test_old_collectives_are_forgotten_and_the_loop_state_is_kept():
    c, _ = coord()
    for r in range(3):
        c.contribute("replicas", 0, 0, "all_gather", None, r, [r])
    c.end_round(3, {"loss": 1.0}, {"round": 3, "tokens": 12, "step": 9})
    assert c.poll("replicas", 0, 0, 0)[0] == "error"  # expired
    c.set_global(3, {"0": ["w0"], "1": ["w1"]})
    assert c.get_global() == (3, {"0": ["w0"], "1": ["w1"]})
    assert (c.status()["round"], c.status()["loop"]["tokens"], c.status()["global_round"]) == (3, 12, 3)


# ----- faults, resume agreement ------------------------------------------------------------------
def test_fault_specs():
    assert Fault.parse("kill:rank=1,round=2,delay=0.5") == Fault("kill", 1, 2, 0.5)
    assert Fault.parse("exit:round=3,rank=0") == Fault("exit", 0, 3)
    for bad in ("boom:rank=1,round=2", "kill:rank=1", "kill:rank=x,round=1", "kill:rank=1,round=2,when=3"):
        with pytest.raises(ValueError, match="fault"):
            Fault.parse(bad)


def test_resume_agreement_is_the_newest_step_everyone_has():
    assert newest_common_step([[12, 9, 6], [9, 6, 3], [12, 9]]) == 9
    assert newest_common_step([[12, 9, 6], [9, 6, 3], [12, 9]], exclude={9}) is None
    assert newest_common_step([[12, 9, 6], [9, 6], [6, 9]], exclude={9}) == 6
    assert newest_common_step([[], [3]]) is None


# ----- weights frames, reports, catch-up -------------------------------------------------------
def test_weights_frame_is_bit_exact_and_validated():
    torch.manual_seed(0)
    params = {"a.weight": torch.randn(5, 7), "b": torch.randn(3)}
    shapes = {n: tuple(t.shape) for n, t in params.items()}
    frame = encode_params(params, "run-x", 4, 1)
    back = decode_params(frame, shapes, "run-x", 4)
    assert all(torch.equal(back[n], params[n]) for n in params)
    with pytest.raises(StaleFrameError):
        decode_params(frame, shapes, "run-x", 5)  # a frame of an older round
    with pytest.raises(ShapeMismatchError):
        decode_params(frame, {"a.weight": (7, 5), "b": (3,)}, "run-x", 4)


def test_round_report_survives_msgpack():
    rep = RoundReport(2, 1, 5, 3, 18, 384, 4.25, 1e-3, 0.3,
                      [RoundStats(5, 100, 4000, 3, 1, ["stale"], 0.01, 0), RoundStats(5, 80, 3000, 3, 0, [], 0.01, 1)],
                      extra={"train_s": 0.2})
    assert RoundReport.from_dict(msgpack.unpackb(msgpack.packb(rep.to_dict()), raw=False)) == rep


def test_catch_up_puts_weights_schedule_and_data_where_a_never_failed_replica_is(tiny_config):
    from distrain.comm.simulated import SimulatedHub
    from distrain.data import TokenSampler, read_shard
    from distrain.runtime.common import prepare_data
    from distrain.worker.build import build_worker

    cfg = tiny_config("--outer.algorithm=sparseloco", "--topology.replicas=2", "--outer.inner_steps=3",
                      "--train.steps=30", "--train.warmup_steps=4")
    data = prepare_data(cfg)
    tokens = read_shard(data.train_path)
    layout = Layout.from_config(cfg)
    hub = SimulatedHub(2, layout.byte_groups())
    w = build_worker(cfg, layout, 1, data, hub.transport(1))
    new = {n: t + 1.0 for n, t in w.global_state().items()}
    w.catch_up(new, steps_done=12)  # its replica ran 4 rounds of 3 steps
    assert w.schedule.step == 12
    assert all(torch.equal(w.global_state()[n], new[n]) for n in new)
    assert all(torch.equal(p.detach(), new[n]) for n, p in w.model.named_parameters())
    fresh = TokenSampler(tokens, cfg.data.seq_len, cfg.train.batch_size, rank=1, world_size=2, seed=cfg.run.seed)
    for _ in range(12):
        fresh.next_batch()
    assert torch.equal(w.sampler.next_batch()[0], fresh.next_batch()[0])
    res = w.schedule.train_step()  # and it trains on from there (by default at its own step's learning rate)
    assert res.lr == pytest.approx(cfg.train.lr * lr_multiplier(12, cfg.train)) and w.schedule.step == 13
    res = w.schedule.train_step(progress=20.5)  # in a round, at the run's global progress
    assert res.lr == pytest.approx(cfg.train.lr * lr_multiplier(20.5, cfg.train)) and w.schedule.step == 14


# ----- torch.distributed transport on 3 gloo ranks ---------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _transport_body(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from distrain.comm.errors import CommError, NotAMemberError
    from distrain.comm.torch_transport import TorchTransport

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    res: dict = {}
    try:
        t = TorchTransport({"pair": [2, 0]}, timeout_s=30)
        payload = bytes([rank]) * (rank * 1000)  # rank 0 sends nothing, sizes differ
        res["world"] = [len(b) for b in t.all_gather_bytes("world", payload)]
        res["world_ok"] = t.all_gather_bytes("world", payload) == [bytes([r]) * (r * 1000) for r in range(world)]
        if rank in (0, 2):
            res["pair"] = [b.decode() for b in t.all_gather_bytes("pair", f"from{rank}".encode())]
            res["bcast"] = t.broadcast_bytes("pair", b"w" * 70000 if rank == 2 else None, src=2) == b"w" * 70000
        else:
            try:
                t.all_gather_bytes("pair", b"x")
            except NotAMemberError as e:
                res["not_member"] = str(e)
        t.barrier("world")
        # point to point: every rank sends to both neighbours before it receives (no deadlock),
        # several messages per link arrive in order, an empty message is a message
        left, right = (rank - 1) % world, (rank + 1) % world
        for i in range(3):
            t.send_bytes(right, f"{rank}>{right}#{i}".encode() * (i * 5000))
            t.send_bytes(left, b"")
        res["p2p"] = [t.recv_bytes(left) == f"{left}>{rank}#{i}".encode() * (i * 5000) for i in range(3)]
        res["p2p_empty"] = [t.recv_bytes(right) for _ in range(3)] == [b"", b"", b""]
        t.flush()
        try:
            TorchTransport({"pair": [rank, (rank + 1) % world]})  # every rank a different spec
        except CommError as e:
            res["mismatch"] = str(e)
    finally:
        dist.destroy_process_group()
        Path(out, f"{rank}.json").write_text(json.dumps(res))


def test_torch_transport_variable_sizes_groups_broadcast(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_transport_body, args=(3, _free_port(), str(tmp_path)), nprocs=3, join=True)
    res = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(3)]
    for r in range(3):
        assert res[r]["world"] == [0, 1000, 2000] and res[r]["world_ok"]
        assert "group spec differs" in res[r]["mismatch"]
    assert res[0]["pair"] == res[2]["pair"] == ["from0", "from2"]
    assert res[0]["bcast"] and res[2]["bcast"]
    assert "not a member of group 'pair'" in res[1]["not_member"]
    assert all(res[r]["p2p"] == [True, True, True] and res[r]["p2p_empty"] for r in range(3))


def test_ray_mailbox_orders_by_sequence_and_drops_older_rounds():
    from distrain.comm.errors import CollectiveTimeoutError
    from distrain.comm.ray_transport import Mailbox

    box = Mailbox()
    box.begin_round(2)
    box.put(5, 2, 1, b"second")  # a threaded actor may run deliveries out of order
    box.put(5, 2, 0, b"first")
    box.put(5, 1, 2, b"left over from a failed round")
    box.put(5, 3, 0, b"early: next round")
    assert box.take(5, 0, 1.0) == b"first" and box.take(5, 1, 1.0) == b"second"
    with pytest.raises(CollectiveTimeoutError, match="no message #2 from rank 5 in round 2"):
        box.take(5, 2, 0.1)
    box.begin_round(3)
    assert box.take(5, 0, 1.0) == b"early: next round"
    with pytest.raises(Exception, match="not bytes"):
        box.put(5, 3, 1, "a str")


def test_each_kind_of_group_gets_its_own_backend(monkeypatch):
    """Frames between replicas over one backend, a replica's tensors over another: the default world
    carries both (``cpu:gloo,cuda:nccl``) and every device group is created with its own."""
    import torch.distributed as dist

    from distrain.comm import device_groups as dg
    from distrain.comm.errors import CommError
    from distrain.comm.torch_transport import resolve_backend, world_backend

    assert world_backend("gloo", "gloo") == "gloo" and world_backend("gloo", "nccl") == "cpu:gloo,cuda:nccl"
    with pytest.raises(CommError, match="give frames gloo"):
        world_backend("nccl", "gloo")
    if not torch.cuda.is_available():
        assert resolve_backend("auto") == "gloo"
        with pytest.raises(CommError, match="needs CUDA"):
            resolve_backend("nccl")
    made = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "new_group", lambda ranks, backend=None, **kw: made.append((tuple(ranks), backend)) or
                        f"pg{len(made)}")
    groups = dg.ProcessDeviceGroups([(0, 1), (2, 3)], rank=1, backend="nccl")
    assert made == [((0, 1), "nccl"), ((2, 3), "nccl")] and groups.backend == "nccl"
    assert groups.group([0, 1]) == "pg1"
