"""One hostile replica out of four: does robust aggregation keep the run on course?

    python bench/hostile.py             # 3 seeds, 300 inner steps per replica
    python bench/hostile.py --quick     # 1 seed, 60 steps

SparseLoCo on the embedded corpus with the embedded default's model (d = 128, 4 layers), 4 full
replicas, H = 15. In the attacked run replica 3 sends, from round 0 on, frames that are valid and
finite but whose values are 1e30 times too large (``--fault=hostile:rank=3,round=0``); robust
aggregation (``outer.robust_clip`` / ``robust_reject``) rejects them. Reported per seed: the final
validation loss of the honest run and of the attacked run, and their relative gap. Writes
bench/results/hostile.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from common import command, machine

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distrain.config import load_config  # noqa: E402
from distrain.runtime.faults import Fault  # noqa: E402
from distrain.runtime.simulation import Simulation  # noqa: E402

RESULTS = REPO / "bench" / "results" / "hostile.json"


def run(out: Path, name: str, seed: int, steps: int, faults: list[Fault]) -> float:
    cfg = load_config("default", [
        f"--run.name={name}_s{seed}", f"--run.out_dir={out}", f"--run.seed={seed}", f"--train.steps={steps}",
        f"--train.eval_every={steps}", "--train.eval_batches=16", "--checkpoint.every=0", "--logging.progress=false",
        "--logging.tensorboard=false", "--logging.plots=false", "--runtime.torch_threads=1",
        "--topology.replica=[{count=4}]"])
    threads = torch.get_num_threads()
    try:
        loss = Simulation(cfg, faults).run().final_val_loss
    finally:
        torch.set_num_threads(threads)
    print(f"{name} seed {seed}: {loss:.4f}", flush=True)
    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="/tmp/distrain_bench_hostile")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.seeds = 60, 1
    out = Path(args.out)
    honest = [run(out, "honest", s, args.steps, []) for s in range(args.seeds)]
    attacked = [run(out, "hostile", s, args.steps, [Fault.parse("hostile:rank=3,round=0")]) for s in range(args.seeds)]
    gaps = [a / h - 1 for a, h in zip(attacked, honest)]
    result = {
        "honest_final_val_loss": honest,
        "hostile_final_val_loss": attacked,
        "relative_gap": gaps,
        "mean_gap": statistics.fmean(gaps),
        "gap_spread": statistics.stdev(gaps) if len(gaps) > 1 else 0.0,
        "target": "within 2 %",
        "setup": f"SparseLoCo, 4 full replicas, {args.steps} inner steps each, H=15, model d=128 4 layers vocab 4096, "
                 "stdlib corpus; replica 3 sends frames x1e30 from round 0 (valid, finite)",
        "machine": machine(),
        "command": command("bench/hostile.py"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("mean_gap", "gap_spread")}, indent=1))


if __name__ == "__main__":
    main()
