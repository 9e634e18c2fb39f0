"""Runtime benchmark: real processes vs the simulation, and the overlap option (outer.apply_delay).

    python bench/runtime.py            # about 8 minutes on 2 shared CPU cores
    python bench/runtime.py --quick    # a smaller check, about 6 minutes

1. Throughput. One 3-replica SparseLoCo job (the model and data of configs/torchrun_cpu.toml, one
   torch thread per worker, every mode building its workers the same way) run (a) in simulation —
   3 threads in one process, (b) under torchrun — 3 gloo processes on 127.0.0.1, (c) as a Ray job
   — 3 actors on a private local Ray instance. tokens/s = tokens trained by all replicas / wall-clock
   of the round loop (process start, data loading and the first evaluation excluded; the
   end-to-end seconds of each mode are reported beside). All three reach the same weights.
2. Heterogeneous equivalence. A 2-device DDP replica beside a single-device replica (3 workers),
   in the three modes: ``hetero_identical`` is true when every worker's checkpointed model and
   global weights are bit-identical across simulation, torchrun and Ray.
3. Overlap. The simulation with outer.apply_delay = 0 and 1 over slow simulated links (1 Mbit/s,
   20 ms): final validation loss and simulated wall-clock. With apply_delay = 1 each round's
   all-gather runs in the background of the next round's inner steps (network model
   ``overlap=True``) and its aggregate is applied one round late.

Writes bench/results/runtime.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import machine

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distrain.config import load_config, save_config  # noqa: E402
from distrain.runtime.simulation import Simulation  # noqa: E402

RESULTS = REPO / "bench" / "results" / "runtime.json"


def throughput_config(out: Path, steps: int) -> list[str]:
    return [f"--run.out_dir={out}", f"--train.steps={steps}", "--train.eval_every=100000", "--train.eval_batches=1",
            "--checkpoint.every=0", "--logging.progress=false", "--logging.tensorboard=false",
            "--logging.plots=false", "--runtime.torch_threads=1", "--topology.round_timeout_s=300.0"]


def run_sim(cfg_path: Path, name: str, extra: list[str] = ()) -> dict:
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        s = Simulation(load_config(cfg_path, [f"--run.name={name}", *extra])).run()
    finally:
        torch.set_num_threads(threads)
    return {**s.to_dict(), "end_to_end_s": time.perf_counter() - t0, "loop_s": s.wall_s}


def run_process(cmd: list[str], run_dir: Path, timeout: float = 900) -> dict:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {**summary, "end_to_end_s": wall, "loop_s": summary["sim_time_s"]}


def final_states(run_dir: Path, world: int) -> list[dict[str, torch.Tensor]]:
    """The run's last checkpoint: every tensor of every part (global weights, each worker's own
    state) but the process RNG, which differs between modes."""
    from distrain.checkpoint import list_checkpoints, read_all

    parts = read_all(list_checkpoints(run_dir / "checkpoints")[0])
    return [{f"{rel}:{k}": v for rel, p in parts.items() for k, v in p.tensors.items() if k != "rng/torch"}]


def same_tensors(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run of the benchmark)")
    ap.add_argument("--out", default="/tmp/distrain_bench_runtime", help="run directories")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = 30 if args.quick else 45
    overlap_steps = 60 if args.quick else 90

    # 1. throughput: the same job in the three modes
    base = out / "throughput.toml"
    save_config(load_config("torchrun_cpu", throughput_config(out / "runs", steps)), base)
    modes = {"sim": run_sim(base, "sim")}
    modes["torchrun"] = run_process(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "-m",
         "distrain.launch.torchrun", "--config", str(base), "--run.name=torchrun"], out / "runs" / "torchrun")
    modes["ray"] = run_process(
        [sys.executable, "-m", "distrain.launch.ray", "--address", "local", "--num-cpus", "3", "--config", str(base),
         "--run.name=ray"], out / "runs" / "ray")
    tps = {m: r["tokens"] / r["loop_s"] for m, r in modes.items()}
    same = {m: r["final_val_loss"] == modes["sim"]["final_val_loss"] for m, r in modes.items()}

    # 2. heterogeneous topology: one 2-device DDP replica and one single-device replica
    het = out / "hetero.toml"
    save_config(load_config("torchrun_cpu", throughput_config(out / "runs", steps) + [
        "--topology.replicas=0", "--topology.replica=[{devices=2}, {}]", "--checkpoint.every=15"]), het)
    hetero = {"sim": run_sim(het, "het_sim")}
    hetero["torchrun"] = run_process(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "-m",
         "distrain.launch.torchrun", "--config", str(het), "--run.name=het_torchrun"], out / "runs" / "het_torchrun")
    hetero["ray"] = run_process(
        [sys.executable, "-m", "distrain.launch.ray", "--address", "local", "--num-cpus", "3", "--config", str(het),
         "--run.name=het_ray"], out / "runs" / "het_ray")
    states = {m: final_states(out / "runs" / f"het_{m}", 3) for m in hetero}
    hetero_identical = all(same_tensors(states["sim"], states[m]) for m in ("torchrun", "ray"))

    # 3. overlap: delayed apply over slow links, in simulation
    slow = out / "overlap.toml"
    save_config(load_config("torchrun_cpu", [
        f"--run.out_dir={out / 'runs'}", f"--train.steps={overlap_steps}", f"--train.eval_every={overlap_steps}",
        "--checkpoint.every=0", "--logging.progress=false", "--logging.tensorboard=false", "--logging.plots=false",
        "--network.up_mbps=1.0", "--network.down_mbps=1.0", "--network.latency_ms=20.0",
        "--network.step_time_s=0.25"]), slow)
    overlap = {}
    for key, delay in (("off", 0), ("on", 1)):
        r = run_sim(slow, f"overlap_{key}", [f"--outer.apply_delay={delay}"])
        overlap[key] = {"final_val_loss": r["final_val_loss"], "sim_wallclock_s": r["sim_time_s"],
                        "utilisation": r["utilisation"], "wire_bytes_per_replica_per_round": r["wire_bytes_per_replica_per_round"]}

    command = "python bench/runtime.py" + (" --quick" if args.quick else "")
    result = {
        "sim_tokens_per_s": tps["sim"],
        "torchrun_tokens_per_s": tps["torchrun"],
        "ray_tokens_per_s": tps["ray"],
        "overlap": overlap,
        "hetero_identical": hetero_identical,
        "machine": machine(),
        "command": command,
        "details": {
            "throughput_job": f"configs/torchrun_cpu.toml, 3 replicas, {steps} inner steps each "
                              "(SparseLoCo H=15), 1 torch thread per worker",
            "tokens_per_s_definition": "tokens of all replicas / round-loop wall-clock (start-up excluded)",
            "end_to_end_s": {m: r["end_to_end_s"] for m, r in modes.items()},
            "loop_s": {m: r["loop_s"] for m, r in modes.items()},
            "tokens": {m: r["tokens"] for m, r in modes.items()},
            "final_val_loss_equal_to_sim": same,
            "hetero_job": "the throughput job with [[topology.replica]] devices = 2 (DDP) and devices = 1: "
                          "3 workers; every worker's model and global weights compared bit for bit",
            "hetero_tokens_per_s": {m: r["tokens"] / r["loop_s"] for m, r in hetero.items()},
            "hetero_final_val_loss": {m: r["final_val_loss"] for m, r in hetero.items()},
            "overlap_job": f"configs/torchrun_cpu.toml, 3 replicas, {overlap_steps} steps, simulated links "
                           "1 Mbit/s up and down, 20 ms latency, 0.25 s per inner step",
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
