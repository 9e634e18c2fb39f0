"""AdamW-DDP vs DiLoCo vs SparseLoCo (and SparseLoCo variants) at equal tokens, in simulation.

    python bench/sparseloco_vs_diloco.py                            # the recorded configuration
    python bench/sparseloco_vs_diloco.py --sizes 5m --seeds 0 --steps 60 --out /tmp/x.json  # a quick look
    python bench/sparseloco_vs_diloco.py --plot-only                # redraw the plot from the results

Same model, data, seeds and tokens for every run of a size; R replicas, H inner steps per round.
Every (size, run) is trained once per seed, and the figures are reported as mean ± sample standard
deviation over the seeds (one seed is an anecdote: seed-to-seed spread is of the order of the gaps
measured). Reports the final validation loss and the bytes each replica puts on the wire per round
(frames: headers, scales and zstd included) next to what dense fp32 would send, and how often
robust aggregation clipped or rejected an honest contribution.

Writes bench/results/sparseloco_vs_diloco.json after every run (``--merge`` keeps and extends
what is there, seed by seed), draws docs/sparseloco_vs_diloco.png (validation loss vs tokens and
vs bytes sent, mean over seeds with a min–max band) and prints a markdown table per size.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from common import command, machine

from distrain.config import load_config
from distrain.metrics import read_metrics
from distrain.runtime.simulation import Simulation

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "sparseloco_vs_diloco.json"
PLOT = ROOT / "docs" / "sparseloco_vs_diloco.png"

# Model sizes: overrides and the inner steps per replica recorded for each.
SIZES: dict[str, dict[str, Any]] = {
    # the 1.8M model: cheap screening of variants (recorded results use 5m and 20m)
    "2m": {"model": ["--model.dim=128", "--model.n_layers=4", "--model.n_heads=4", "--model.n_kv_heads=2"],
           "steps": 300},
    "5m": {"model": ["--model.dim=256", "--model.n_layers=4", "--model.n_heads=4", "--model.n_kv_heads=2"],
           "steps": 300},
    "20m": {"model": ["--model.dim=512", "--model.n_layers=6", "--model.n_heads=8", "--model.n_kv_heads=2"],
            "steps": 90},
}

SPARSE = ["--outer.algorithm=sparseloco"]
NOROBUST = ["--outer.robust_clip=0", "--outer.robust_coord_clip=0", "--outer.robust_direction=false"]
RUNS: dict[str, list[str]] = {
    "ddp": ["--outer.algorithm=ddp"],
    "diloco": ["--outer.algorithm=diloco"],  # its published defaults: lr 0.7, Nesterov 0.9
    "sparseloco": SPARSE,  # the defaults of distrain.config (alpha 1, beta 0.95, k 64/4096, ...)
    # -- robust aggregation off (it is on by default): does it touch honest runs?
    "diloco_norobust": ["--outer.algorithm=diloco", *NOROBUST],
    "sparseloco_norobust": SPARSE + NOROBUST,
    # -- issue 21's checks inside the clip, each off alone / the lone-selector rule on
    "sparseloco_nocoordclip": SPARSE + ["--outer.robust_coord_clip=0"],
    "sparseloco_nodirection": SPARSE + ["--outer.robust_direction=false"],
    "sparseloco_minsel2": SPARSE + ["--outer.robust_min_selectors=2"],
    # -- the paper's configuration, each knob changed alone
    "sparseloco_reference": SPARSE + ["--outer.quantizer=reference", "--outer.aggregation=mean_selected",
                                      "--outer.lr=1.0", "--outer.ef_beta=0.95", "--outer.topk=64"],
    "sparseloco_symmetric": SPARSE + ["--outer.quantizer=symmetric"],
    "sparseloco_sum_over_r": SPARSE + ["--outer.aggregation=sum_over_r"],
    "sparseloco_packed": SPARSE + ["--outer.index_coding=packed"],
    "sparseloco_beta0.9": SPARSE + ["--outer.ef_beta=0.9"],
    "sparseloco_beta0.99": SPARSE + ["--outer.ef_beta=0.99"],
    "sparseloco_k96": SPARSE + ["--outer.topk=96"],
    "sparseloco_alpha1.5": SPARSE + ["--outer.lr=1.5"],
    "sparseloco_alpha2": SPARSE + ["--outer.lr=2.0"],
    # -- denser first rounds (the error buffer releases k/4096 per round; bytes counted as sent)
    "sparseloco_warmup1": SPARSE + ["--outer.topk_warmup=[256]"],
    "sparseloco_warmup2": SPARSE + ["--outer.topk_warmup=[256, 128]"],
    "sparseloco_warmup3": SPARSE + ["--outer.topk_warmup=[512, 256, 128]"],
    "sparseloco_warmup128x2": SPARSE + ["--outer.topk_warmup=[128, 128]"],
}
# The runs drawn in the plot (when present), in this order.
PLOTTED = ["ddp", "diloco", "sparseloco", "sparseloco_warmup128x2"]


def overrides(size: str, steps: int, replicas: int, inner_steps: int, eval_every: int, out_dir: str) -> list[str]:
    """The overrides every run of ``size`` shares."""
    return [
        "--model.preset=test", *SIZES[size]["model"],
        "--data.source=stdlib", "--data.vocab_size=4096", "--data.seq_len=128",
        f"--train.steps={steps}", "--train.batch_size=8", "--train.lr=2e-3", "--train.warmup_steps=30",
        f"--train.eval_every={eval_every}", "--train.eval_batches=16",
        f"--topology.replicas={replicas}", "--topology.replica=[]", f"--outer.inner_steps={inner_steps}",
        f"--logging.log_every={inner_steps}", "--logging.progress=false", "--logging.tensorboard=false",
        "--logging.plots=false", f"--run.out_dir={out_dir}", "--network.step_time_s=0.25",
        "--runtime.torch_threads=1",
    ]


class RobustCounter(logging.Handler):
    """Counts the outer optimiser's robust-aggregation warnings (clipped / rejected contributions)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.clipped = 0
        self.rejected = 0

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        self.clipped += "clipped to" in msg
        self.rejected += any(w in msg for w in ("outlier", "absolute bound", "non-finite norm", "rejected frame"))


def run_once(size: str, name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one (size, run, seed); its figures and its validation curve."""
    steps = args.steps or SIZES[size]["steps"]
    base = overrides(size, steps, args.replicas, args.inner_steps, args.eval_every, args.out_dir)
    cfg = load_config(None, base + RUNS[name] + [f"--run.seed={seed}", f"--run.name={size}-{name}-s{seed}"])
    counter = RobustCounter()
    outer_log = logging.getLogger("distrain.outer")  # the exchange logs below it
    outer_log.addHandler(counter)
    t0 = time.perf_counter()
    try:
        s = Simulation(cfg).run()
    finally:
        outer_log.removeHandler(counter)
    val = [r for r in read_metrics(s.run_dir) if r.get("kind") == "val"]
    return {
        "final_val_loss": s.final_val_loss,
        "first_val_loss": s.first_val_loss,
        "tokens": s.tokens,
        "rounds": s.rounds,
        "wire_bytes_per_replica_per_round": s.wire_bytes_per_replica_per_round,
        "dense_fp32_bytes_per_replica_per_round": s.dense_fp32_bytes_per_replica_per_round,
        "sim_time_s": s.sim_time_s,
        "utilisation": s.utilisation,
        "real_s": time.perf_counter() - t0,
        "robust_clipped": counter.clipped,
        "robust_rejected": counter.rejected,
        "curve": {"tokens": [r["tokens"] for r in val], "bytes_sent": [r["bytes_sent"] for r in val],
                  "val_loss": [r["val_loss"] for r in val]},
        "command": command("bench/sparseloco_vs_diloco.py"),
    }


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(per_seed: dict[str, dict[str, Any]], overrides_: list[str]) -> dict[str, Any]:
    """One run's entry: the old single-seed fields, with losses as per-seed lists and their spread."""
    seeds = sorted(per_seed, key=int)
    rows = [per_seed[s] for s in seeds]
    losses = [r["final_val_loss"] for r in rows]
    mean, std = mean_std(losses)
    wire = statistics.fmean(r["wire_bytes_per_replica_per_round"] for r in rows)
    dense = rows[0]["dense_fp32_bytes_per_replica_per_round"]
    return {
        "seeds": [int(s) for s in seeds],
        "final_val_loss": losses,
        "final_val_loss_mean": mean,
        "final_val_loss_std": std,
        "tokens": rows[0]["tokens"],
        "wire_bytes_per_replica_per_round": wire,
        "dense_fp32_bytes_per_replica_per_round": dense,
        "compression_vs_dense_fp32": dense / max(1.0, wire),
        "sim_time_s": statistics.fmean(r["sim_time_s"] for r in rows),
        "utilisation": statistics.fmean(r["utilisation"] for r in rows),
        "real_s": [r["real_s"] for r in rows],
        "robust_clipped": sum(r["robust_clipped"] for r in rows),
        "robust_rejected": sum(r["robust_rejected"] for r in rows),
        "overrides": overrides_,
        "per_seed": per_seed,
    }


def compare_to_diloco(runs: dict[str, dict[str, Any]]) -> None:
    """Loss and bytes relative to DiLoCo: per seed (same seed, same data), then mean ± std."""
    base = runs.get("diloco")
    if base is None:
        return
    for r in runs.values():
        common = [s for s in r["per_seed"] if s in base["per_seed"]]
        rel = [r["per_seed"][s]["final_val_loss"] / base["per_seed"][s]["final_val_loss"] - 1 for s in common]
        if rel:
            r["loss_vs_diloco"], r["loss_vs_diloco_std"] = mean_std(rel)
            r["loss_vs_diloco_seeds"] = [int(s) for s in common]
        r["bytes_below_diloco"] = base["wire_bytes_per_replica_per_round"] / max(1.0, r["wire_bytes_per_replica_per_round"])


def merge_into(results: dict[str, Any], other: dict[str, Any]) -> None:
    """Add every (size, run, seed) of ``other`` to ``results`` (``other`` wins on a clash)."""
    for size, block in other.get("sizes", {}).items():
        mine = results["sizes"].setdefault(size, {k: v for k, v in block.items() if k != "runs"})
        runs = mine.setdefault("runs", {})
        for name, run in block["runs"].items():
            per_seed = {**runs.get(name, {}).get("per_seed", {}), **run["per_seed"]}
            runs[name] = summarise(per_seed, run["overrides"])
        compare_to_diloco(runs)
    for key in ("machine", "command"):
        results.setdefault(key, other.get(key))


def table(size: str, runs: dict[str, dict[str, Any]]) -> str:
    lines = [f"\n{size}:", "| run | seeds | final val loss (mean ± std) | vs DiLoCo (same seed) | wire bytes / replica / "
             "round | × below dense fp32 | sim wall-clock (s) | utilisation |", "|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        rel = (f"{r['loss_vs_diloco']:+.2%} ± {r['loss_vs_diloco_std']:.2%}" if "loss_vs_diloco" in r else "")
        lines.append(f"| {name} | {len(r['seeds'])} | {r['final_val_loss_mean']:.4f} ± {r['final_val_loss_std']:.4f} | "
                     f"{rel} | {r['wire_bytes_per_replica_per_round']:,.0f} | {r['compression_vs_dense_fp32']:.1f} | "
                     f"{r['sim_time_s']:.0f} | {r['utilisation']:.2f} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Validation loss vs tokens and vs bytes sent per replica, one row per size; mean over seeds
    with a min–max band (every seed of a run is evaluated at the same steps)."""
    from distrain.plots import pyplot

    plt = pyplot()
    sizes = [s for s in results["sizes"] if any(n in results["sizes"][s]["runs"] for n in PLOTTED)]
    fig, axes = plt.subplots(len(sizes), 2, figsize=(11, 4 * len(sizes)), squeeze=False)
    for row, size in zip(axes, sizes):
        block = results["sizes"][size]
        for name in PLOTTED:
            run = block["runs"].get(name)
            if run is None:
                continue
            curves = [run["per_seed"][str(s)]["curve"] for s in run["seeds"]]
            # points by token count: the mean over the seeds evaluated there
            at: dict[int, list[tuple[float, float]]] = {}
            for c in curves:
                for t, b, v in zip(c["tokens"], c["bytes_sent"], c["val_loss"]):
                    at.setdefault(t, []).append((b, v))
            tokens = sorted(at)
            losses = [[v for _, v in at[t]] for t in tokens]
            mean = [statistics.fmean(v) for v in losses]
            lo, hi = [min(v) for v in losses], [max(v) for v in losses]
            label = (f"{name} ({len(curves)} seed{'s' * (len(curves) > 1)}, "
                     f"{run['wire_bytes_per_replica_per_round'] / 1e6:.3g} MB/round)")
            for ax, key in zip(row, ("tokens", "bytes_sent")):
                x = [float(t) for t in tokens] if key == "tokens" else [statistics.fmean(b for b, _ in at[t])
                                                                        for t in tokens]
                keep = [i for i, xi in enumerate(x) if key == "tokens" or xi > 0]  # 0 bytes: not on a log axis
                x, m, a, b = ([seq[i] for i in keep] for seq in (x, mean, lo, hi))
                (line,) = ax.plot(x, m, label=label, marker=".")
                ax.fill_between(x, a, b, color=line.get_color(), alpha=0.2)
        row[0].set_xlabel("tokens (all replicas)")
        row[1].set_xlabel("bytes sent per replica (log)")
        row[1].set_xscale("log")
        for ax, what in zip(row, ("tokens", "bytes")):
            ax.set_ylabel("validation loss")
            ax.set_title(f"{size}: {block['params'] / 1e6:.1f}M params, {block['replicas']} replicas, "
                         f"H={block['inner_steps']}, loss vs {what}")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
        lows = [min(run["per_seed"][str(s)]["curve"]["val_loss"]) for name, run in block["runs"].items()
                if name in PLOTTED for s in run["seeds"]]
        for ax in row:  # the first evaluations (loss ~8) would flatten the interesting part
            ax.set_ylim(min(lows) - 0.1, min(lows) + 2.0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["5m", "20m"], choices=list(SIZES))
    ap.add_argument("--runs", nargs="+", default=["ddp", "diloco", "sparseloco"], choices=list(RUNS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=0, help="inner steps per replica (0: the size's recorded value)")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--inner-steps", type=int, default=15)
    ap.add_argument("--eval-every", type=int, default=30)
    ap.add_argument("--out-dir", default="/tmp/distrain-bench")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--plot", type=Path, default=PLOT)
    ap.add_argument("--merge", action="store_true", help="keep the runs and seeds already in --out")
    ap.add_argument("--plot-only", action="store_true", help="redraw --plot from --out, train nothing")
    ap.add_argument("--merge-from", nargs="+", type=Path, default=[],
                    help="add the seeds of these result files (runs made in separate processes) to --out")
    args = ap.parse_args()

    keep = args.merge or args.plot_only or args.merge_from
    results = json.loads(args.out.read_text()) if keep and args.out.is_file() else {}
    results.setdefault("sizes", {})
    for path in args.merge_from:
        merge_into(results, json.loads(path.read_text()))
    if not args.plot_only:
        cmd = command("bench/sparseloco_vs_diloco.py")
        for size in args.sizes:
            block = results["sizes"].setdefault(size, {})
            block.update(model=SIZES[size]["model"], steps=args.steps or SIZES[size]["steps"],
                         replicas=args.replicas, inner_steps=args.inner_steps)
            block.setdefault("runs", {})
            for seed in args.seeds:
                for name in args.runs:
                    r = run_once(size, name, seed, args)
                    per_seed = block["runs"].get(name, {}).get("per_seed", {})
                    per_seed[str(seed)] = r
                    block["runs"][name] = summarise(per_seed, RUNS[name])
                    block["params"] = int(r["dense_fp32_bytes_per_replica_per_round"] // 4)
                    compare_to_diloco(block["runs"])
                    print(f"{size:>4} {name:>24} seed {seed}: val {r['final_val_loss']:.4f}  wire/round "
                          f"{r['wire_bytes_per_replica_per_round']:,.0f} B  clipped {r['robust_clipped']}  "
                          f"{r['real_s']:.0f} s", flush=True)
                    results.update(machine=machine(), command=cmd)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(results, indent=1) + "\n")
    if args.merge_from:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    for size, block in results["sizes"].items():
        print(table(size, block["runs"]))
    if results["sizes"]:
        plot(results, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
