"""AdamW-DDP vs DiLoCo vs SparseLoCo (and SparseLoCo variants) at equal tokens, in simulation.

    python bench/sparseloco_vs_diloco.py                 # the recorded configuration
    python bench/sparseloco_vs_diloco.py --steps 60      # a quick look

Same model, data, seeds and tokens for every run; R replicas, H inner steps per round. Reports the
final validation loss and the bytes each replica puts on the wire per round (frames: headers,
scales and zstd included) next to what dense fp32 would send. Writes
bench/results/sparseloco_vs_diloco.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import command, machine

from distrain.config import load_config
from distrain.runtime.simulation import Simulation

RESULTS = Path(__file__).resolve().parent / "results" / "sparseloco_vs_diloco.json"

RUNS: dict[str, list[str]] = {
    "ddp": ["--outer.algorithm=ddp"],
    "diloco": ["--outer.algorithm=diloco", "--outer.lr=0.7", "--outer.momentum=0.9", "--outer.nesterov=true"],
    "sparseloco": ["--outer.algorithm=sparseloco", "--outer.lr=1.0", "--outer.quantizer=reference",
                   "--outer.aggregation=mean_selected"],
    "sparseloco_packed": ["--outer.algorithm=sparseloco", "--outer.lr=1.0", "--outer.quantizer=reference",
                          "--outer.aggregation=mean_selected", "--outer.index_coding=packed"],
    "sparseloco_symmetric": ["--outer.algorithm=sparseloco", "--outer.lr=1.0", "--outer.quantizer=symmetric",
                             "--outer.aggregation=mean_selected"],
    "sparseloco_sum_over_r": ["--outer.algorithm=sparseloco", "--outer.lr=1.0", "--outer.quantizer=reference",
                              "--outer.aggregation=sum_over_r"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="inner steps per replica")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--inner-steps", type=int, default=15)
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--out-dir", default="/tmp/distrain-bench")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--merge", action="store_true", help="keep the other runs already in --out")
    args = ap.parse_args()

    common = [
        "--model.preset=test", "--model.dim=256", "--model.n_layers=4", "--model.n_heads=4", "--model.n_kv_heads=2",
        "--data.source=stdlib", "--data.vocab_size=4096", "--data.seq_len=128",
        f"--train.steps={args.steps}", "--train.batch_size=8", "--train.lr=2e-3", "--train.warmup_steps=30",
        f"--train.eval_every={args.steps}", "--train.eval_batches=16",
        f"--topology.replicas={args.replicas}", f"--outer.inner_steps={args.inner_steps}",
        f"--logging.log_every={args.inner_steps}", "--logging.progress=false", "--logging.tensorboard=false",
        "--logging.plots=false", f"--run.out_dir={args.out_dir}", "--network.step_time_s=0.25",
    ]
    results = json.loads(args.out.read_text())["runs"] if args.merge and args.out.is_file() else {}
    for name in args.runs:
        cfg = load_config(None, common + RUNS[name] + [f"--run.name={name}"])
        t0 = time.perf_counter()
        s = Simulation(cfg).run()
        results[name] = {
            "final_val_loss": s.final_val_loss,
            "tokens": s.tokens,
            "wire_bytes_per_replica_per_round": s.wire_bytes_per_replica_per_round,
            "dense_fp32_bytes_per_replica_per_round": s.dense_fp32_bytes_per_replica_per_round,
            "compression_vs_dense_fp32": s.dense_fp32_bytes_per_replica_per_round / max(1.0, s.wire_bytes_per_replica_per_round),
            "sim_time_s": s.sim_time_s,
            "utilisation": s.utilisation,
            "real_s": time.perf_counter() - t0,
        }
        print(f"{name:>24}: val {s.final_val_loss:.4f}  wire/round {s.wire_bytes_per_replica_per_round:,.0f} B  "
              f"({results[name]['compression_vs_dense_fp32']:.1f}x < fp32)  {time.perf_counter() - t0:.0f} s", flush=True)

    cmd = command("bench/sparseloco_vs_diloco.py")
    for name in args.runs:
        results[name]["command"] = cmd
    out = {"runs": results, "machine": machine(), "command": cmd}
    if "diloco" in results:
        base = results["diloco"]
        for r in results.values():
            r["loss_vs_diloco"] = r["final_val_loss"] / base["final_val_loss"] - 1
            r["bytes_below_diloco"] = base["wire_bytes_per_replica_per_round"] / max(1.0, r["wire_bytes_per_replica_per_round"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print("\n| run | final val loss | vs DiLoCo | wire bytes / replica / round | × below dense fp32 | sim wall-clock (s) | utilisation |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['final_val_loss']:.4f} | {r.get('loss_vs_diloco', 0):+.2%} | "
              f"{r['wire_bytes_per_replica_per_round']:,.0f} | {r['compression_vs_dense_fp32']:.1f} | "
              f"{r['sim_time_s']:.0f} | {r['utilisation']:.2f} |")


if __name__ == "__main__":
    main()
