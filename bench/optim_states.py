"""Weak-memory participants: AdamW with 8-/4-bit moments (torchao) against fp32 AdamW, in simulation.

    python bench/optim_states.py                     # the recorded configuration (150 steps, 3 seeds)
    python bench/optim_states.py --steps 20 --seeds 0 --out /tmp/x.json   # a quick look
    python bench/optim_states.py --merge-pair "adamw+adamw8bit/no-norm-clip"  # one heterogeneous row, added

The embedded default's model (dim 128, 4 layers, 4096-token vocabulary, 1.79M parameters) on its
data. Per optimiser, one replica (outer.algorithm = none) per seed: the optimiser's state in bytes
per parameter (every state tensor: quantised codes, their block scales and value maps, the fp32
moments of the tensors torchao leaves unquantised, the step counts), the final validation loss,
and the real seconds per inner step relative to AdamW's (median over the steps after the first
five, which include torch.compile's compilation of the quantised update; the runs of a seed are
interleaved, so the machine's load touches every optimiser alike). Then the heterogeneous row:
two SparseLoCo replicas, one of them adamw8bit, against two AdamW replicas, same seeds.

Writes bench/results/optim_states.json (with the machine and the command).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from common import command, machine

from distrain.config import load_config
from distrain.inner.schedule import InnerSchedule
from distrain.runtime.simulation import Simulation

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "optim_states.json"
OPTIMIZERS = ("adamw", "adamw8bit", "adamw4bit")
PAIR8 = "[{count=1}, {count=1, optimizer='adamw8bit'}]"
# name -> (replica tables, extra overrides); the last row turns the norm clip off: with two contributors
# its reference is the smaller norm, and it scaled the pair's larger early pseudo-gradients down
HETERO = {"adamw+adamw": ("[{count=2}]", []), "adamw+adamw8bit": (PAIR8, []),
          "adamw+adamw8bit/no-norm-clip": (PAIR8, ["--outer.robust_clip=0"])}
WARM = 5  # steps left out of the step time (compilation)


def run(steps: int, seed: int, out: Path, overrides: list[str]) -> dict[str, Any]:
    """One simulated run: its final validation loss, each replica's state bytes per parameter and
    real seconds per step (median after WARM steps)."""
    seconds: dict[int, list[float]] = {}
    original = InnerSchedule.train_step

    def timed(self: InnerSchedule, *args: Any, **kwargs: Any) -> Any:
        report = original(self, *args, **kwargs)
        seconds.setdefault(id(self), []).append(report.seconds)
        return report

    cfg = load_config("default", [
        f"--train.steps={steps}", f"--train.eval_every={steps}", "--train.warmup_steps=15", f"--run.seed={seed}",
        "--checkpoint.every=0", "--runtime.torch_threads=1", "--logging.progress=false", "--logging.plots=false",
        "--logging.tensorboard=false", f"--run.out_dir={out}", *overrides])
    InnerSchedule.train_step = timed  # type: ignore[method-assign]
    try:
        sim = Simulation(cfg)
        summary = sim.run()
    finally:
        InnerSchedule.train_step = original  # type: ignore[method-assign]
    return {"final_val_loss": summary.final_val_loss,
            "state_bytes_per_param": [w.schedule.state_bytes_per_param() for w in sim.workers],
            "step_s": [statistics.median(seconds[id(w.schedule)][WARM:]) for w in sim.workers]}


def mean_std(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--data-cache", default=".cache/distrain")
    ap.add_argument("--runs", default="/tmp/distrain_bench_optim_states")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--merge-pair", choices=list(HETERO), help="run only this heterogeneous row and add it to --out")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.merge_pair:
        merge_pair(args.merge_pair, args)
        return
    base = [f"--data.cache_dir={args.data_cache}"]
    single: dict[str, list[dict[str, Any]]] = {o: [] for o in OPTIMIZERS}
    hetero: dict[str, list[dict[str, Any]]] = {h: [] for h in HETERO}
    for seed in args.seeds:  # interleaved: every optimiser meets the machine's load of the moment
        for o in OPTIMIZERS:
            single[o].append(run(args.steps, seed, Path(args.runs) / f"{o}-{seed}",
                                 [*base, "--topology.replica=[{count=1}]", "--outer.algorithm=none",
                                  f"--train.optimizer={o}"]))
            print(o, seed, single[o][-1], flush=True)
        for h in HETERO:
            hetero[h].append(run_pair(h, args, seed, base))
    adamw_step = [r["step_s"][0] for r in single["adamw"]]
    result: dict[str, Any] = {
        "conditions": {"model": "the embedded default's (dim 128, 4 layers, 4 heads, 2 kv heads, vocab 4096)",
                       "steps": args.steps, "seeds": args.seeds, "batch": "8 x 128 tokens", "lr": 2e-3,
                       "warmup_steps": 15, "torch_threads": 1, "torchao": _torchao_version()},
        "optimizers": {}, "hetero": {}}
    for o, rows in single.items():
        result["optimizers"][o] = {
            "state_bytes_per_param": rows[0]["state_bytes_per_param"][0],
            "final_val_loss": [r["final_val_loss"] for r in rows], **_prefix("final_val_loss", rows),
            "step_s": [r["step_s"][0] for r in rows],
            "step_time_vs_adamw": statistics.mean(r["step_s"][0] / a for r, a in zip(rows, adamw_step))}
    for h, rows in hetero.items():
        result["hetero"][h] = pair_row(h, rows)
    result["machine"] = machine()
    result["command"] = command("bench/optim_states.py")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def run_pair(name: str, args: argparse.Namespace, seed: int, base: list[str]) -> dict[str, Any]:
    tables, extra = HETERO[name]
    row = run(args.steps, seed, Path(args.runs) / f"{name.replace('/', '_')}-{seed}",
              [*base, f"--topology.replica={tables}", "--outer.algorithm=sparseloco", *extra])
    print(name, seed, row, flush=True)
    return row


def pair_row(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"replicas": name.split("/")[0].split("+"), "overrides": HETERO[name][1],
            "state_bytes_per_param": rows[0]["state_bytes_per_param"],
            "final_val_loss": [r["final_val_loss"] for r in rows], **_prefix("final_val_loss", rows),
            "step_s": [r["step_s"] for r in rows]}


def merge_pair(name: str, args: argparse.Namespace) -> None:
    """One heterogeneous row run on the results file's seeds and added to it."""
    result = json.loads(Path(args.out).read_text())
    base = [f"--data.cache_dir={args.data_cache}"]
    rows = [run_pair(name, args, seed, base) for seed in result["conditions"]["seeds"]]
    result["hetero"][name] = {**pair_row(name, rows), "command": command("bench/optim_states.py")}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


def _prefix(key: str, rows: list[dict[str, Any]]) -> dict[str, float]:
    return {f"{key}_{k}": v for k, v in mean_std([r[key] for r in rows]).items()}


def _torchao_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("torchao")


if __name__ == "__main__":
    main()
