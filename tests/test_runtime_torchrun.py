"""torchrun for real (gloo, 127.0.0.1): equivalence with the simulation, elastic restart from
checkpoints, multi-process replicas with DDP and with DeepSpeed ZeRO-2."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import assert_global, assert_same, content, global_weights, own
from subprocs import run_in_session

from distrain.config import load_config, save_config

# Every test launches torchrun worlds: minutes on 2 cores, so out of the fast default (`-m "not slow"`).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300


def tiny_overrides(corpus: Path, cache: Path, out: Path) -> list[str]:
    """The conftest's tiny model and data; 4 rounds of 3 SparseLoCo steps; one thread per worker."""
    return [
        f"--data.source={corpus}", f"--data.cache_dir={cache}", "--data.vocab_size=320", "--data.seq_len=32",
        "--data.val_fraction=0.1", "--model.dim=64", "--model.n_layers=2", "--model.n_heads=4",
        "--model.n_kv_heads=2", "--model.max_seq_len=64", "--train.batch_size=4", "--train.warmup_steps=2",
        "--train.eval_batches=2", f"--run.out_dir={out}", "--logging.progress=false",
        "--logging.tensorboard=false", "--logging.plots=false", "--train.steps=12", "--outer.inner_steps=3",
        "--train.eval_every=6", "--outer.algorithm=sparseloco", "--topology.replicas=3",
        "--runtime.torch_threads=1", "--runtime.byte_backend=gloo", "--runtime.device_backend=gloo",
        "--topology.round_timeout_s=60.0",
        "--topology.step_times=configured",  # step counts fixed in advance: every mode runs the same ones
    ]


def write_config(path: Path, overrides: list[str]) -> Path:
    save_config(load_config(None, overrides), path)
    return path


def torchrun(config: Path, nproc: int, *extra: str, restarts: int = 0) -> subprocess.CompletedProcess:
    """Launch and wait; the whole process group is killed if it outlives the timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={restarts}", "--monitor-interval=0.5", "-m", "distrain.launch.torchrun",
           "--config", str(config), *extra]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    return run_in_session(cmd, cwd=REPO, env=env, timeout_s=TIMEOUT_S, what="torchrun")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tiny_corpus, data_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    return tiny_overrides(tiny_corpus, data_cache, root / "runs"), root


@pytest.fixture(scope="module")
def baseline(setup):
    """3 processes, one replica each, no fault; checkpoints every 6 steps."""
    over, root = setup
    cfg = write_config(root / "base.toml", over + ["--run.name=base", "--checkpoint.every=6"])
    res = torchrun(cfg, 3)
    assert res.returncode == 0, res.stdout[-4000:]
    return root / "runs" / "base"


def test_torchrun_equals_simulation_bit_for_bit(setup, baseline):
    from distrain.runtime.simulation import Simulation

    over, _ = setup
    threads = torch.get_num_threads()
    try:
        sim = Simulation(load_config(None, over + ["--run.name=sim"]))
        summary = sim.run()
    finally:
        torch.set_num_threads(threads)
    assert_global(sim.workers[0].global_state(), baseline)
    for w in sim.workers:  # every replica ends the run on the global weights
        assert_global(w.global_state(), baseline)
    assert_same(content(sim.run_dir), content(baseline))  # and so does every worker's own state
    sim_losses = [m["loss"] for m in metrics(sim.run_dir) if m["kind"] == "train"]
    tr_rows = metrics(baseline)
    assert [m["loss"] for m in tr_rows if m["kind"] == "train"] == sim_losses
    assert [m["val_loss"] for m in tr_rows if m["kind"] == "val"][-1] == summary.final_val_loss
    assert [m["contributors"] for m in tr_rows if m["kind"] == "train"] == [3, 3, 3, 3]
    got = json.loads((baseline / "summary.json").read_text())
    assert got["rounds"] == 4 and got["steps"] == 12 and got["tokens"] == summary.tokens


def test_a_throttled_rank_stops_at_its_window_keeps_its_state_and_the_run_replays(setup):
    """Rank 2 slowed 8x from round 1 under measured windows (real time): its replica stops at a step
    boundary as its window closes — the others never wait for a full round of slow steps — its AdamW
    state counts every step it ran, and the simulation replays the logged step counts bit for bit."""
    from distrain.runtime.simulation import Simulation

    over, root = setup
    over = [o for o in over if o != "--topology.step_times=configured"]
    cfg = write_config(root / "throttle.toml", over + ["--run.name=throttle", "--train.steps=24",
                                                       "--outer.inner_steps=4", "--train.eval_every=24"])
    res = torchrun(cfg, 3, "--fault=slow:rank=2,factor=8,round=1")
    assert res.returncode == 0, res.stdout[-4000:]
    run_dir = root / "runs" / "throttle"
    train = [m for m in metrics(run_dir) if m["kind"] == "train"]
    fast = sum(m["replica_steps"][0] for m in train[1:])
    slow = sum(m["replica_steps"][2] for m in train[1:])
    assert slow <= 0.6 * fast, [m["replica_steps"] for m in train]
    state = own(run_dir, 2)
    step = state.meta["schedule"]["step"]
    assert {int(v) for k, v in state.tensors.items() if k.endswith("/step")} == {step}
    assert step == sum(m["replica_steps"][2] for m in train)
    threads = torch.get_num_threads()
    try:
        sim = Simulation(load_config(cfg, ["--run.name=replay", f"--topology.step_plan={run_dir / 'metrics.jsonl'}"]))
        sim.run()
    finally:
        torch.set_num_threads(threads)
    assert [m["replica_steps"] for m in metrics(sim.run_dir) if m["kind"] == "train"] == \
        [m["replica_steps"] for m in train]
    assert_global(sim.workers[0].global_state(), run_dir)


def test_killed_rank_restarts_elastically_from_the_last_checkpoint(setup, baseline):
    """Rank 1 dies at the start of round 3 (9 steps done, last checkpoint at step 6): torchrun
    restarts all ranks, they agree on step 6, replay round 2 and end on the baseline's weights."""
    over, root = setup
    cfg = write_config(root / "elastic.toml", over + ["--run.name=elastic", "--checkpoint.every=6"])
    res = torchrun(cfg, 3, "--fault=exit:rank=1,round=3", restarts=1)
    assert res.returncode == 0, res.stdout[-4000:]
    assert "fault injection: rank 1 exits at the start of round 3" in res.stdout
    run = root / "runs" / "elastic"
    rows = metrics(run)
    resumed = [m for m in rows if m.get("event") == "resumed"]
    assert resumed == [{"kind": "event", "event": "resumed", "step": 6, "round": 2, "changes": [], "attempt": 1,
                        "byte_backend": "gloo", "device_backend": "gloo"}]
    assert "resumed from step 6 (round 2 of 4)" in res.stdout  # said whatever the verbosity
    steps_before_crash = max(m["step"] for m in rows[: rows.index(resumed[0])] if m["kind"] == "train")
    assert steps_before_crash - resumed[0]["step"] <= 6  # lost no more than the checkpoint interval
    assert_same(content(baseline), content(run))


def test_a_job_of_another_topology_resumes_the_checkpoint_as_the_simulation_does(setup, baseline):
    """The 3-replica baseline's checkpoint of step 6, resumed by a job of 2 replicas (one removed)
    under torchrun and in the simulation: the change is named in one line and in the resume event,
    and both end on the same losses and state, bit for bit — one code path for every mode."""
    import shutil

    from distrain.runtime.simulation import Simulation

    over, root = setup
    over = [o for o in over if not o.startswith("--topology.replicas=")]
    over += ["--topology.replicas=2", "--checkpoint.resume=auto"]
    for name in ("shrink", "shrink_sim"):
        shutil.copytree(baseline / "checkpoints" / "step-6", root / "runs" / name / "checkpoints" / "step-6")
    cfg = write_config(root / "shrink.toml", over + ["--run.name=shrink"])
    res = torchrun(cfg, 2)
    assert res.returncode == 0, res.stdout[-4000:]
    assert "resumed from step 6 (round 2 of 4) into a changed topology: saved replica 2 (full/single) removed: " \
           "its state dropped; data split into 2 streams (was 3)" in res.stdout
    threads = torch.get_num_threads()
    try:
        sim = Simulation(load_config(cfg, ["--run.name=shrink_sim"]))
        sim.run()
    finally:
        torch.set_num_threads(threads)
    run = root / "runs" / "shrink"
    events = [[m for m in metrics(d) if m.get("event") == "resumed"] for d in (run, sim.run_dir)]
    assert events[0][0]["changes"] == events[1][0]["changes"] and len(events[0][0]["changes"]) == 2
    assert [m["loss"] for m in metrics(run) if m["kind"] == "train"] == \
        [m["loss"] for m in metrics(sim.run_dir) if m["kind"] == "train"]
    assert_same(content(sim.run_dir), content(run))


def multi_process_run(setup, name: str, parallel: str) -> Path:
    over, root = setup
    over = [o for o in over if not o.startswith("--topology.replicas=")]
    cfg = write_config(root / f"{name}.toml", over + [f"--run.name={name}",
                                                     f"--topology.replica=[{{devices=2, parallel='{parallel}'}}, {{}}]"])
    res = torchrun(cfg, 3)
    assert res.returncode == 0, res.stdout[-4000:]
    return root / "runs" / name


@pytest.fixture(scope="module")
def ddp_run(setup):
    return multi_process_run(setup, "ddp", "ddp")


def check_two_replicas(run: Path) -> None:
    follower = own(run, 0, device=1)
    assert follower.meta["outer"] == {}  # only the leader takes part in the outer round
    assert not [k for k in follower.tensors if k.startswith("ef/")] and [k for k in own(run, 0).tensors
                                                                        if k.startswith("ef/")]
    vals = [m["val_loss"] for m in metrics(run) if m["kind"] == "val"]
    assert torch.isfinite(torch.tensor(vals)).all() and vals[-1] < vals[0] - 0.2
    rounds = [m for m in metrics(run) if m["kind"] == "train"]
    assert [m["contributors"] for m in rounds] == [2, 2, 2, 2]
    # replica 0 (2 processes) and replica 1 (1 process) each read their own shard: 3 shards of tokens
    assert rounds[-1]["tokens"] == 12 * 4 * 32 * 3


def test_ddp_replica_of_two_processes_beside_a_single_process_replica(ddp_run):
    check_two_replicas(ddp_run)
    # the frames' groups and the replica's device group each got the backend configured for them
    got = json.loads((ddp_run / "summary.json").read_text())
    assert (got["byte_backend"], got["device_backend"]) == ("gloo", "gloo")


def test_heterogeneous_topology_torchrun_equals_simulation(setup, ddp_run):
    """The same 2-device DDP replica + 1-device replica in simulation (threads over in-process gloo
    groups) ends on the torchrun job's weights and losses, bit for bit."""
    from distrain.runtime.simulation import Simulation

    over, root = setup
    over = [o for o in over if not o.startswith("--topology.replicas=")]
    threads = torch.get_num_threads()
    try:
        sim = Simulation(load_config(None, over + ["--run.name=ddp_sim", "--topology.replica=[{devices=2}, {}]"]))
        sim.run()
    finally:
        torch.set_num_threads(threads)
    for r in (0, 2):  # the leaders hold the global weights
        assert_global(sim.workers[r].global_state(), ddp_run)
    assert_same(content(sim.run_dir), content(ddp_run))  # and every device, the follower too, the same state
    assert [m["loss"] for m in metrics(sim.run_dir) if m["kind"] == "train"] == \
        [m["loss"] for m in metrics(ddp_run) if m["kind"] == "train"]


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed not installed")
def test_deepspeed_zero2_replica_inside_a_two_replica_sparseloco_run(setup, ddp_run):
    """Replica 0 trains with DeepSpeed ZeRO-2 over its 2 processes (gloo, DS_ACCELERATOR=cpu).

    In fp32 with the same AdamW, clipping and schedule it computes what DDP computes, but ZeRO
    reduce-scatters gradients where DDP all-reduces them: sums in another order differ in the last
    bits, and SparseLoCo's top-k turns last-bit differences into different selections from round 2
    on. So: round 1 equal to 1e-6, the run's end equal to 1e-2 in loss."""
    run = multi_process_run(setup, "zero2", "deepspeed")
    check_two_replicas(run)
    zero = [own(run, 0, device=d).meta["schedule"]["zero"] for d in (0, 1)]
    n_params = sum(t.numel() for t in global_weights(run).values())
    assert all(z["stage"] == 2 for z in zero)
    assert sum(sum(z["partitions"]) for z in zero) >= n_params  # each holds its shard (plus padding)
    assert all(sum(z["partitions"]) <= n_params // 2 + 64 for z in zero)
    for d in (0, 1):  # and its partition of the AdamW moments is checkpointed
        moments = {k: v for k, v in own(run, 0, device=d).tensors.items() if k.startswith("zero/")}
        assert sum(v.numel() for k, v in moments.items() if k.endswith("/exp_avg")) == sum(zero[d]["partitions"])
    ds, ddp = metrics(run), metrics(ddp_run)
    first = [next(m for m in rows if m["kind"] == "train") for rows in (ds, ddp)]
    assert first[0]["loss"] == pytest.approx(first[1]["loss"], abs=1e-6)
    last = [[m["val_loss"] for m in rows if m["kind"] == "val"][-1] for rows in (ds, ddp)]
    assert last[0] == pytest.approx(last[1], abs=1e-2)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed not installed")
def test_a_deepspeed_replica_resumes_its_zero_partitions_bit_for_bit(setup):
    """Each ZeRO-2 process checkpoints its partition of the AdamW moments: a job resumed from the
    checkpoint of step 6 ends exactly where the uninterrupted job does (moments restarted at zero,
    as before, would not)."""
    import shutil

    over, root = setup
    over = [o for o in over if not o.startswith("--topology.replicas=")]
    over += ["--topology.replica=[{devices=2, parallel='deepspeed'}, {}]", "--checkpoint.every=6"]
    straight, cut = root / "runs" / "zero_straight", root / "runs" / "zero_cut"
    res = torchrun(write_config(root / "zero_straight.toml", over + ["--run.name=zero_straight"]), 3)
    assert res.returncode == 0, res.stdout[-4000:]
    shutil.copytree(straight / "checkpoints" / "step-6", cut / "checkpoints" / "step-6")
    res = torchrun(write_config(root / "zero_cut.toml", over + ["--run.name=zero_cut", "--checkpoint.resume=auto"]), 3)
    assert res.returncode == 0, res.stdout[-4000:]
    assert "resumed from step 6 (round 2 of 4)" in res.stdout
    assert [m["loss"] for m in metrics(cut) if m["kind"] == "train"] == \
        [m["loss"] for m in metrics(straight) if m["kind"] == "train"][2:]
    assert any(k.startswith("zero/") for k in own(cut, 0, device=1).tensors)
    assert_same(content(straight), content(cut))


def test_a_bad_boundary_frame_ends_the_attempt_at_once_in_one_line(setup):
    """Rank 1 (the pipeline's first stage) sends NaN boundary frames from round 1: rank 2 rejects the
    first one and the attempt ends within seconds — torch collectives cannot leave the replica
    behind — with one line naming the stage, the step and the reason (not the 600 s timeout)."""
    import time

    over, root = setup
    over = [o for o in over if not o.startswith(("--topology.replicas=", "--topology.round_timeout_s="))]
    cfg = write_config(root / "badboundary.toml", over + [
        "--topology.replica=[{}, {kind='pipeline', stages=2, compress={k=8}}]", "--run.name=badboundary",
        "--topology.round_timeout_s=600.0"])
    t0 = time.monotonic()
    res = torchrun(cfg, 3, "--fault=boundary:rank=1,round=1")
    assert time.monotonic() - t0 < 120, "the attempt should end in seconds, not at the collective timeout"
    assert res.returncode != 0
    lines = [ln for ln in res.stdout.splitlines()
             if ln.startswith("distrain.launch.torchrun: rank 2: BoundaryRejectedError")]
    assert len(lines) == 1 and "stage 1 rejected the forward boundary frame of step 3" in lines[0], res.stdout[-3000:]
    assert "NonFiniteError" in lines[0]


@pytest.mark.parametrize("basis", ["seeded", "embedding"])
def test_mixed_full_and_compressed_pipeline_torchrun_equals_simulation(setup, basis):
    """A full replica beside a 2-stage compressed pipeline replica (k = 8), 3 gloo processes:
    boundaries over torch.distributed point-to-point, two segment groups; the job ends on the
    simulation's weights and losses, bit for bit. With ``basis = "embedding"`` the two stage
    processes rebuild U every round, each from its own copy of the global embedding: every frame
    carries the sender's fingerprint and the receiver checks it against its own, so a run that ends
    on the simulation's weights had equal fingerprints in both processes at every step."""
    from distrain.runtime.simulation import Simulation

    over, root = setup
    over = [o for o in over if not o.startswith("--topology.replicas=")]
    mixed = over + [f"--topology.replica=[{{}}, {{kind='pipeline', stages=2, compress={{k=8, basis='{basis}'}}}}]"]
    name = f"mixed_{basis}"
    cfg = write_config(root / f"{name}.toml", mixed + [f"--run.name={name}"])
    res = torchrun(cfg, 3)
    assert res.returncode == 0, res.stdout[-4000:]
    threads = torch.get_num_threads()
    try:
        sim = Simulation(load_config(cfg, [f"--run.name={name}_sim"]))
        sim.run()
    finally:
        torch.set_num_threads(threads)
    run = root / "runs" / name
    assert not [m for m in metrics(run) if m.get("event") == "left_round"]  # no frame was rejected
    for r in range(3):
        assert_global(sim.workers[r].global_state(), run)
    assert_same(content(sim.run_dir), content(run))
    assert [m["loss"] for m in metrics(sim.run_dir) if m["kind"] == "train"] == \
        [m["loss"] for m in metrics(run) if m["kind"] == "train"]
    assert [m["val_loss"] for m in metrics(sim.run_dir) if m["kind"] == "val"] == \
        [m["val_loss"] for m in metrics(run) if m["kind"] == "val"]


def test_adaptive_sp_replica_torchrun_equals_simulation(setup):
    """A 2-device adaptive-SP replica (whole documents, a plan per step, Ulysses all-to-all over gloo
    inside its groups) beside a one-device replica, inside the SparseLoCo round: torchrun ends on
    the simulation's weights and losses, bit for bit."""
    from distrain.runtime.simulation import Simulation

    over, root = setup
    over = [o for o in over if not o.startswith("--topology.replicas=")]
    sp = over + ["--data.sampler=documents", "--topology.replica=[{devices=2, parallel='sp'}, {}]"]
    cfg = write_config(root / "sp.toml", sp + ["--run.name=sp"])
    res = torchrun(cfg, 3)
    assert res.returncode == 0, res.stdout[-4000:]
    threads = torch.get_num_threads()
    try:
        sim = Simulation(load_config(cfg, ["--run.name=sp_sim"]))
        sim.run()
    finally:
        torch.set_num_threads(threads)
    run = root / "runs" / "sp"
    for r in (0, 2):
        assert_global(sim.workers[r].global_state(), run)
    assert_same(content(sim.run_dir), content(run))
    assert [m["loss"] for m in metrics(sim.run_dir) if m["kind"] == "train"] == \
        [m["loss"] for m in metrics(run) if m["kind"] == "train"]
