"""A real local Ray cluster (token auth): ``ray job submit`` end to end and equal to the
simulation; a worker actor killed mid-round, a stale frame, restart and catch-up.

The cluster gets its own temp dir, ports and token; teardown stops exactly the processes of this
cluster (found by its temp dir and GCS port, then their children), never other Ray clusters.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from checkpoints import assert_global, assert_same, content, global_weights, newest, own, parts
from subprocs import run_in_session

from distrain.checkpoint import read_manifest
from distrain.config import load_config, save_config

# A real cluster and a job per test: minutes on 2 cores, so out of the fast default (`-m "not slow"`).
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray not installed")]

REPO = Path(__file__).resolve().parent.parent
JOB_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_pids(marks: list[str]) -> set[int]:
    """Processes whose command line names this cluster, and all their descendants (Linux /proc)."""
    cmd, parent = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found = {pid for pid, c in cmd.items() if any(m in c for m in marks)} - {os.getpid()}
    grew = True
    while grew:
        kids = {pid for pid, pp in parent.items() if pp in found} - found - {os.getpid()}
        grew = bool(kids)
        found |= kids
    return found


def stop_cluster(marks: list[str]) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        pids = cluster_pids(marks)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and cluster_pids(marks):
            time.sleep(0.2)


def run(cmd: list[str], env: dict, timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    return run_in_session(cmd, cwd=REPO, env=env, timeout_s=timeout, what=" ".join(cmd[:4]))


def own_agent_ports() -> list[str]:
    """Free ports for the node's agents: Ray's fixed default (52365) may still be held by another
    cluster's agent (the README test's), and a head whose agent cannot bind never accepts a job."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


@pytest.fixture(scope="module")
def cluster():
    temp = tempfile.mkdtemp(prefix="dtray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_DEDUP_LOGS": "0", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    env.pop("RAY_ADDRESS", None)
    marks = [temp, f":{gcs} "]  # cmdline args end in a space once NULs are replaced
    try:
        res = run(["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                   f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--num-cpus=4",
                   "--object-store-memory=200000000", f"--temp-dir={temp}", "--disable-usage-stats",
                   "--include-dashboard=true", *own_agent_ports()], env, timeout=180)
        assert res.returncode == 0, res.stdout[-3000:]
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        stop_cluster(marks)
        shutil.rmtree(temp, ignore_errors=True)


def tiny_config(path: Path, corpus: Path, cache: Path, out: Path, name: str, *extra: str) -> Path:
    cfg = load_config(REPO / "configs" / "ray_local.toml", [
        f"--data.source={corpus}", f"--data.cache_dir={cache}", "--data.vocab_size=320", "--data.seq_len=32",
        "--data.val_fraction=0.1", "--model.dim=64", "--model.n_layers=2",
        "--model.n_heads=4", "--model.n_kv_heads=2", "--model.max_seq_len=64", "--train.batch_size=4",
        "--train.warmup_steps=2", "--train.eval_batches=2", "--train.steps=12", "--outer.inner_steps=3",
        "--train.eval_every=6", "--checkpoint.every=6", f"--run.out_dir={out}", f"--run.name={name}",
        "--logging.tensorboard=false", "--logging.plots=false", "--topology.round_timeout_s=60.0",
        "--topology.replica=[{cpus=2.0}, {count=2, cpus=1.0}]", "--train.lr=2e-3",
        "--topology.step_times=configured", *extra])  # step counts fixed in advance: equal to the simulation's
    save_config(cfg, path)
    return path


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def baseline(cluster, tiny_corpus, data_cache, tmp_path_factory):
    """``ray job submit --working-dir . -- python -m distrain.launch.ray``: 3 workers, no fault."""
    root = tmp_path_factory.mktemp("ray")
    cfg = tiny_config(root / "base.toml", tiny_corpus, data_cache, root / "runs", "base")
    excludes = json.dumps({"excludes": [".git", ".cache", "runs", "*.egg-info", "**/__pycache__", "bench/results"]})
    submit = ["ray", "job", "submit", "--address", cluster["dashboard"], "--working-dir", ".",
              "--runtime-env-json", excludes, "--", "python", "-m", "distrain.launch.ray", "--config", str(cfg)]
    # A fresh head's dashboard can answer before its job agent has registered; the job was then not
    # submitted, so submitting again is safe (bounded: 12 tries, 5 s apart).
    for _ in range(12):
        res = run(submit, cluster["env"])
        if "No available agent to submit job" not in res.stdout:
            break
        time.sleep(5)
    assert res.returncode == 0 and "succeeded" in res.stdout, res.stdout[-4000:]
    return root, cfg


def test_ray_job_submit_equals_the_simulation(baseline):
    from distrain.runtime.simulation import Simulation

    root, cfg_path = baseline
    run_dir = root / "runs" / "base"
    threads = torch.get_num_threads()
    try:
        sim = Simulation(load_config(cfg_path, ["--run.name=sim"]))
        summary = sim.run()
    finally:
        torch.set_num_threads(threads)
    assert_global(sim.workers[0].global_state(), run_dir)
    assert_same(content(sim.run_dir), content(run_dir))  # every worker's own state too
    rows = metrics(run_dir)
    train = [m for m in rows if m["kind"] == "train"]
    assert [m["loss"] for m in train] == [m["loss"] for m in metrics(sim.run_dir) if m["kind"] == "train"]
    assert [m["workers"] for m in train] == [3, 3, 3, 3]
    assert [m["val_loss"] for m in rows if m["kind"] == "val"][-1] == summary.final_val_loss
    loop = read_manifest(newest(run_dir))["loop"]
    assert loop["round"] == 4 and loop["tokens"] == summary.tokens


def test_worker_killed_mid_round_is_dropped_restarted_and_caught_up(cluster, baseline, tiny_corpus, data_cache):
    """Worker 1's actor is killed in round 1, after its inner steps and before it sends its frame
    (it is held there until the kill): the round completes with workers 0 and 2
    (quorum 0.6 of 3), Ray restarts the actor, it loads the global weights from the Coordinator
    and rejoins in round 2; in round 2 worker 2 re-sends its round-1 frame, which every receiver
    rejects as stale. The run ends finite and close to the no-fault run."""
    root, _ = baseline
    cfg = tiny_config(root / "fault.toml", tiny_corpus, data_cache, root / "runs", "fault")
    res = run([sys.executable, "-m", "distrain.launch.ray", "--address", cluster["gcs"], "--config", str(cfg),
               "--fault=kill:rank=1,round=1,delay=0.5", "--fault=stale:rank=2,round=2"], cluster["env"])
    assert res.returncode == 0, res.stdout[-4000:]
    rows = metrics(root / "runs" / "fault")
    events = [(m["event"], m["rank"], m["round"]) for m in rows if m["kind"] == "event"]
    assert ("killed", 1, 1) in events and ("dropped", 1, 1) in events
    assert ("caught_up", 1, 2) in events and ("rejoined", 1, 2) in events
    train = {m["round"]: m for m in rows if m["kind"] == "train"}
    assert train[2]["workers"] == 2 and train[2]["contributors"] == 2  # round 1 completed without worker 1
    assert train[3]["workers"] == 3 and train[3]["rejected"] == 3 and train[3]["contributors"] == 2
    assert train[4]["workers"] == 3 and train[4]["rejected"] == 0
    assert "frame is for round 1, current round is 2" in res.stdout
    final = [m["val_loss"] for m in rows if m["kind"] == "val"]
    clean = [m["val_loss"] for m in metrics(root / "runs" / "base") if m["kind"] == "val"]
    assert all(math.isfinite(v) for v in final)
    # the restarted replica lost its error feedback and AdamW moments, one round had 2 of 3
    # contributions and another 2 valid frames: keep at least 60 % of the clean run's improvement
    assert abs(final[-1] - clean[-1]) < 0.4 * (clean[0] - clean[-1])
    saved = parts(root / "runs" / "fault")
    assert all(f"replica-{r}/stage-0-device-0.safetensors" in saved for r in range(3))  # every worker, the restarted too
    assert all(torch.isfinite(v).all() for v in global_weights(root / "runs" / "fault").values())


def test_a_late_replica_sits_the_round_out_and_rejoins_with_its_state(cluster, baseline, tiny_corpus, data_cache):
    """Worker 2 waits 2 s before its round-1 exchange (alive, past the 0.5 s grace): round 1 completes
    with workers 0 and 1 although the quorum is every replica, the driver does not wait for worker 2
    (later rounds go on without it), and once it is done it rejoins from the global weights with its
    own AdamW moments and error buffers — never rebuilt, never counted as failed."""
    root, _ = baseline
    cfg = tiny_config(root / "late.toml", tiny_corpus, data_cache, root / "runs", "late", "--topology.quorum=1.0",
                      "--topology.grace_s=0.5", "--train.steps=180", "--train.eval_every=180", "--checkpoint.every=0")
    res = run([sys.executable, "-m", "distrain.launch.ray", "--address", cluster["gcs"], "--config", str(cfg),
               "--fault=late:rank=2,round=1,delay=2"], cluster["env"])
    assert res.returncode == 0, res.stdout[-4000:]
    rows = metrics(root / "runs" / "late")
    events = [(m["event"], m["rank"]) for m in rows if m["kind"] == "event"]
    assert ("late", 2) in events and ("rejoined", 2) in events
    assert not any(e in (("dropped", 2), ("caught_up", 2), ("killed", 2)) for e in events)
    rejoined = next(m for m in rows if m["kind"] == "event" and m["event"] == "rejoined" and m["rank"] == 2)
    assert rejoined["kept_state"] is True
    train = {m["round"]: m for m in rows if m["kind"] == "train"}
    assert train[2]["replicas"] == 2 and train[2]["contributors"] == 2  # round 1 went on without it
    assert train[max(train)]["replicas"] == 3  # it takes part again
    # its AdamW state counts every step it ran: the late round's too (it was not rebuilt)
    state = own(root / "runs" / "late", 2)
    adam = {int(v) for k, v in state.tensors.items() if k.startswith("optim/") and k.endswith("/step")}
    assert adam == {state.meta["schedule"]["step"]}  # a rebuilt worker's moments would count only the steps since


def test_a_throttled_replica_runs_fewer_steps_in_its_window(cluster, baseline, tiny_corpus, data_cache):
    """Worker 2 slowed 8x from round 1 under measured windows: from then on it stops at a step
    boundary as its window closes — it contributes what it has instead of stalling the others — and
    the job ends with every replica in every round."""
    root, _ = baseline
    cfg = tiny_config(root / "throttle.toml", tiny_corpus, data_cache, root / "runs", "throttle",
                      "--topology.step_times=measured", "--train.steps=24", "--outer.inner_steps=4",
                      "--train.eval_every=24", "--checkpoint.every=0")
    res = run([sys.executable, "-m", "distrain.launch.ray", "--address", cluster["gcs"], "--config", str(cfg),
               "--fault=slow:rank=2,factor=8,round=1"], cluster["env"])
    assert res.returncode == 0, res.stdout[-4000:]
    train = [m for m in metrics(root / "runs" / "throttle") if m["kind"] == "train"]
    assert all(m["replicas"] == 3 for m in train)
    fast = sum(m["replica_steps"][0] for m in train[1:])
    slow = sum(m["replica_steps"][2] for m in train[1:])
    assert slow <= 0.6 * fast, [m["replica_steps"] for m in train]


def test_restarted_job_resumes_from_the_checkpoint(cluster, baseline):
    """A copy of the baseline run that lost its last checkpoint (step 12) resumes at step 6 and
    ends on the baseline's weights and state exactly."""
    root, cfg_path = baseline
    base, cut = root / "runs" / "base", root / "runs" / "cut"
    shutil.copytree(base, cut)
    shutil.rmtree(cut / "checkpoints" / "step-12")
    (cut / "checkpoints" / "latest").unlink()
    (cut / "metrics.jsonl").unlink()
    res = run([sys.executable, "-m", "distrain.launch.ray", "--address", cluster["gcs"], "--config", str(cfg_path),
               "--run.name=cut", "--checkpoint.resume=auto"], cluster["env"])
    assert res.returncode == 0, res.stdout[-4000:]
    rows = metrics(cut)
    assert rows[0] == {"kind": "event", "event": "resumed", "round": 2, "step": 6, "changes": [], "workers": 3}
    assert "resumed from step 6 (round 2 of 4)" in res.stdout
    assert [m["round"] for m in rows if m["kind"] == "train"] == [3, 4]
    assert [m["tokens"] for m in rows if m["kind"] == "train"][-1] == [
        m["tokens"] for m in metrics(base) if m["kind"] == "train"][-1]
    assert_same(content(base), content(cut))


def test_a_job_of_another_topology_resumes_the_checkpoint_as_the_simulation_does(cluster, baseline):
    """The 3-replica baseline's checkpoint of step 6 resumed by a Ray job of 2 replicas (one removed,
    its state dropped) and by the simulation: the same change named, the same losses and state, bit
    for bit."""
    from distrain.runtime.simulation import Simulation

    root, cfg_path = baseline
    for name in ("shrink", "shrink_sim"):
        shutil.copytree(root / "runs" / "base" / "checkpoints" / "step-6", root / "runs" / name / "checkpoints" / "step-6")
    over = ["--topology.replica=[{cpus=2.0}, {cpus=1.0}]", "--checkpoint.resume=auto"]
    res = run([sys.executable, "-m", "distrain.launch.ray", "--address", cluster["gcs"], "--config", str(cfg_path),
               "--run.name=shrink", *over], cluster["env"])
    assert res.returncode == 0, res.stdout[-4000:]
    assert "into a changed topology: saved replica 2 (full/single) removed: its state dropped" in res.stdout
    threads = torch.get_num_threads()
    try:
        sim = Simulation(load_config(cfg_path, ["--run.name=shrink_sim", *over]))
        sim.run()
    finally:
        torch.set_num_threads(threads)
    runs = (root / "runs" / "shrink", sim.run_dir)
    events = [[m for m in metrics(d) if m.get("event") == "resumed"][0]["changes"] for d in runs]
    assert events[0] == events[1]
    assert [m["loss"] for m in metrics(runs[0]) if m["kind"] == "train"] == \
        [m["loss"] for m in metrics(runs[1]) if m["kind"] == "train"]
    assert_same(content(runs[1]), content(runs[0]))


def test_heterogeneous_ray_job_equals_the_simulation(cluster, baseline, tiny_corpus, data_cache):
    """A 2-device DDP replica (two actors joined in a torch.distributed world of their own inside a
    STRICT_PACK placement group) beside a single-device replica: the Ray job ends on the
    simulation's weights and losses, bit for bit."""
    from distrain.runtime.simulation import Simulation

    root, _ = baseline
    cfg = tiny_config(root / "hetero.toml", tiny_corpus, data_cache, root / "runs", "hetero",
                      "--topology.replica=[{devices=2}, {}]")
    res = run([sys.executable, "-m", "distrain.launch.ray", "--address", cluster["gcs"], "--config", str(cfg)], cluster["env"])
    assert res.returncode == 0, res.stdout[-4000:]
    threads = torch.get_num_threads()
    try:
        sim = Simulation(load_config(cfg, ["--run.name=hetero_sim"]))
        sim.run()
    finally:
        torch.set_num_threads(threads)
    run_dir = root / "runs" / "hetero"
    for r in (0, 2):
        assert_global(sim.workers[r].global_state(), run_dir)
    assert_same(content(sim.run_dir), content(run_dir))  # the follower's state too
    train = [m for m in metrics(run_dir) if m["kind"] == "train"]
    assert [m["loss"] for m in train] == [m["loss"] for m in metrics(sim.run_dir) if m["kind"] == "train"]
    assert [m["workers"] for m in train] == [3, 3, 3, 3] and [m["replicas"] for m in train] == [2, 2, 2, 2]


MIXED = "--topology.replica=[{count=2}, {kind='pipeline', stages=2, compress={k=8}}]"


def test_a_bad_boundary_frame_drops_its_pipeline_replica_at_once(cluster, baseline, tiny_corpus, data_cache):
    """The pipeline's first stage (rank 2) sends NaN boundary frames from round 1: the second stage
    rejects the first, the pipeline replica leaves that round at once with the reason named, the
    full replicas complete it, and the job ends (Ray restarts the replica; its frames stay bad)."""
    root, _ = baseline
    cfg = tiny_config(root / "badboundary.toml", tiny_corpus, data_cache, root / "runs", "badboundary", MIXED,
                      "--topology.round_timeout_s=600.0", "--topology.quorum=0.5")
    res = run([sys.executable, "-m", "distrain.launch.ray", "--address", cluster["gcs"], "--config", str(cfg),
               "--fault=boundary:rank=2,round=1"], cluster["env"])
    assert res.returncode == 0, res.stdout[-4000:]
    rows = metrics(root / "runs" / "badboundary")
    dropped = [m for m in rows if m["kind"] == "event" and m["event"] == "dropped" and m["round"] == 1]
    assert {m["rank"] for m in dropped} == {2, 3}
    assert any("BoundaryRejectedError" in m["why"] for m in dropped)
    assert "stage 1 rejected the forward boundary frame of step 3" in res.stdout
    train = {m["round"]: m for m in rows if m["kind"] == "train"}
    assert train[2]["replicas"] == 2 and train[2]["contributors"] == 2  # round 1: the full replicas alone


@pytest.mark.parametrize("basis", ["seeded", "embedding"])
def test_mixed_topology_ray_job_equals_the_simulation(cluster, baseline, tiny_corpus, data_cache, basis):
    """Two full replicas and a 2-stage compressed pipeline replica (its stages are actors that
    pass boundaries actor to actor): the Ray job ends on the simulation's weights, bit for bit —
    also when both stage actors rebuild U from the global embedding every round."""
    from distrain.runtime.simulation import Simulation

    root, _ = baseline
    name = f"mixed_{basis}"
    topology = MIXED.replace("compress={k=8}", f"compress={{k=8, basis='{basis}'}}")
    cfg = tiny_config(root / f"{name}.toml", tiny_corpus, data_cache, root / "runs", name, topology)
    res = run([sys.executable, "-m", "distrain.launch.ray", "--address", cluster["gcs"], "--config", str(cfg)], cluster["env"])
    assert res.returncode == 0, res.stdout[-4000:]
    threads = torch.get_num_threads()
    try:
        sim = Simulation(load_config(cfg, [f"--run.name={name}_sim"]))
        sim.run()
    finally:
        torch.set_num_threads(threads)
    run_dir = root / "runs" / name
    assert not [m for m in metrics(run_dir) if m.get("event") in ("left_round", "dropped")]  # no frame rejected
    for r in range(4):
        assert_global(sim.workers[r].global_state(), run_dir)
    assert_same(content(sim.run_dir), content(run_dir))
    assert [m["loss"] for m in metrics(run_dir) if m["kind"] == "train"] == \
        [m["loss"] for m in metrics(sim.run_dir) if m["kind"] == "train"]


def test_a_killed_stage_worker_drops_its_pipeline_replica_which_rejoins(cluster, baseline, tiny_corpus, data_cache):
    """The second stage of the pipeline replica is killed mid-round 1: its whole replica leaves
    that round (the two full replicas complete it, quorum 0.6), both stage actors restart, load
    the global weights of their own segments (and the embedding) and rejoin in round 2; the run
    ends with every worker on the same global weights."""
    root, _ = baseline
    cfg = tiny_config(root / "stagefault.toml", tiny_corpus, data_cache, root / "runs", "stagefault", MIXED)
    res = run([sys.executable, "-m", "distrain.launch.ray", "--address", cluster["gcs"], "--config", str(cfg),
               "--fault=kill:rank=3,round=1,delay=0.5"], cluster["env"])
    assert res.returncode == 0, res.stdout[-4000:]
    rows = metrics(root / "runs" / "stagefault")
    events = [(m["event"], m["rank"], m["round"]) for m in rows if m["kind"] == "event"]
    assert ("killed", 3, 1) in events and ("dropped", 3, 1) in events and ("dropped", 2, 1) in events
    assert ("caught_up", 2, 2) in events and ("caught_up", 3, 2) in events
    train = {m["round"]: m for m in rows if m["kind"] == "train"}
    assert train[2]["replicas"] == 2 and train[2]["contributors"] == 2  # round 1 without the pipeline
    assert train[3]["replicas"] == 3 and train[4]["replicas"] == 3 and train[4]["contributors"] == 3
    assert all(math.isfinite(m["val_loss"]) for m in rows if m["kind"] == "val")
    run_dir = root / "runs" / "stagefault"
    saved = parts(run_dir)  # the rejoined stages wrote their state; the global weights are finite
    assert "replica-2/stage-0-device-0.safetensors" in saved and "replica-2/stage-1-device-0.safetensors" in saved
    assert all(torch.isfinite(v).all() for v in global_weights(run_dir).values())


def test_adaptive_sp_replica_ray_job_equals_the_simulation(cluster, baseline, tiny_corpus, data_cache):
    """A 2-device adaptive-SP replica (two actors in a torch world of their own, Ulysses over gloo)
    beside a one-device replica: the Ray job ends on the simulation's weights, bit for bit."""
    from distrain.runtime.simulation import Simulation

    root, _ = baseline
    cfg = tiny_config(root / "sp.toml", tiny_corpus, data_cache, root / "runs", "sp", "--data.sampler=documents",
                      "--topology.replica=[{devices=2, parallel='sp'}, {}]")
    res = run([sys.executable, "-m", "distrain.launch.ray", "--address", cluster["gcs"], "--config", str(cfg)], cluster["env"])
    assert res.returncode == 0, res.stdout[-4000:]
    threads = torch.get_num_threads()
    try:
        sim = Simulation(load_config(cfg, ["--run.name=sp_sim"]))
        sim.run()
    finally:
        torch.set_num_threads(threads)
    run_dir = root / "runs" / "sp"
    for r in (0, 2):
        assert_global(sim.workers[r].global_state(), run_dir)
    assert_same(content(sim.run_dir), content(run_dir))
    assert [m["loss"] for m in metrics(run_dir) if m["kind"] == "train"] == \
        [m["loss"] for m in metrics(sim.run_dir) if m["kind"] == "train"]


# ----- two nodes on 127.0.0.1: one is killed mid-run, a new one joins ------------------------------
def start_node(gcs: str, env: dict) -> str:
    """A worker node of one CPU joining the cluster at ``gcs``; its mark (a port in its raylet's
    command line) finds its processes to kill."""
    port = free_port()
    res = run(["ray", "start", f"--address={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
               f"--node-manager-port={port}", f"--object-manager-port={free_port()}", "--disable-usage-stats",
               *own_agent_ports()], env, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:]
    return f"node_manager_port={port}"


@pytest.fixture
def two_nodes():
    temp = tempfile.mkdtemp(prefix="dtr2n", dir="/tmp")
    gcs = free_port()
    # node deaths noticed within ~2 s instead of Ray's default tens of seconds
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_DEDUP_LOGS": "0", "PYTHONWARNINGS": "ignore::DeprecationWarning",
           "RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "500",
           "RAY_health_check_timeout_ms": "500", "RAY_health_check_failure_threshold": "3"}
    env.pop("RAY_ADDRESS", None)
    marks = [temp, f":{gcs} "]
    try:
        res = run(["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=1",
                   "--object-store-memory=200000000", f"--temp-dir={temp}", "--disable-usage-stats",
                   "--include-dashboard=false", *own_agent_ports()], env, timeout=180)
        assert res.returncode == 0, res.stdout[-3000:]
        yield {"gcs": f"127.0.0.1:{gcs}", "env": env, "node_b": start_node(f"127.0.0.1:{gcs}", env)}
    finally:
        stop_cluster(marks)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_killed_node_takes_its_replica_out_and_a_new_node_brings_it_back(two_nodes, tiny_corpus, data_cache,
                                                                           tmp_path):
    """Two replicas spread over two nodes (STRICT_SPREAD), quorum 1/2. Node B is killed mid-run: the
    replica on the head node completes the round and goes on alone; a new node joins, Ray places the
    lost worker there and it catches up from the Coordinator's global weights; both end on the same
    weights, nothing of the global state lost."""
    cfg = tiny_config(tmp_path / "nodes.toml", tiny_corpus, data_cache, tmp_path / "runs", "nodes",
                      "--topology.replica=[{count=2, cpus=1.0}]", "--topology.quorum=0.5",
                      "--runtime.placement_strategy=STRICT_SPREAD", "--topology.grace_s=2.0",
                      "--train.steps=90", "--train.eval_every=90", "--checkpoint.every=0")
    env = two_nodes["env"]
    cmd = [sys.executable, "-m", "distrain.launch.ray", "--address", two_nodes["gcs"], "--config", str(cfg),
           "--fault=slow:rank=0,factor=10", "--fault=slow:rank=1,factor=10"]  # rounds long enough to aim at
    log = tmp_path / "job.log"
    with open(log, "w") as out:
        job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    metrics_file = tmp_path / "runs" / "nodes" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and job.poll() is None:  # the job is in round 3
            if metrics_file.exists() and sum(1 for line in metrics_file.read_text().splitlines()
                                             if '"train"' in line) >= 2:
                break
            time.sleep(0.2)
        assert job.poll() is None, log.read_text()[-3000:]
        stop_cluster([two_nodes["node_b"]])  # node B and everything on it, killed
        start_node(two_nodes["gcs"], env)
        job.wait(timeout=max(1.0, deadline + 120 - time.monotonic()))
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 0, log.read_text()[-4000:]
    rows = metrics(tmp_path / "runs" / "nodes")
    events = [(m["event"], m["rank"]) for m in rows if m["kind"] == "event"]
    lost = {r for e, r in events if e == "dropped"}  # whichever worker Ray had placed on node B
    assert len(lost) == 1 and ("caught_up", lost.pop()) in events, events
    train = [m for m in rows if m["kind"] == "train"]
    alone = [m["round"] for m in train if m["replicas"] == 1]
    assert alone and min(alone) >= 3 and train[-1]["replicas"] == 2  # it went on alone, then both again
    assert all(m["loss"] == m["loss"] for m in train)  # finite (not NaN) throughout
    saved = parts(tmp_path / "runs" / "nodes")  # both workers wrote their state at the end
    assert all(f"replica-{r}/stage-0-device-0.safetensors" in saved for r in (0, 1))
    assert all(torch.isfinite(v).all() for v in global_weights(tmp_path / "runs" / "nodes").values())
