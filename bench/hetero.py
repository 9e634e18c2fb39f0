"""Heterogeneous replicas: full replicas beside pipeline replicas of weak workers, compressed or not.

    python bench/hetero.py                 # headline rows x 3 seeds, the k sweep, the reconciliation alternative
    python bench/hetero.py --quick         # fewer steps and seeds (a smoke run)

Every run is the simulation of 4 replicas of the embedded default's model (d = 128, 4 layers, vocab
4096) on the embedded corpus (the Python standard library), SparseLoCo every 15 inner steps, the
same steps and batches per replica — the same tokens for every run:

- all_full: 4 full replicas;
- all_compressed: 4 pipeline replicas of 2 stages, boundaries compressed to k coordinates;
- selective: 2 full replicas + 2 compressed pipeline replicas (selective compression);
- selective_uncompressed: 2 full + 2 pipeline replicas sending bf16 activations.

Pipeline stage workers compute at half speed on 50 Mbit/s links (5 ms), full replicas on 100 Mbit/s
(20 ms); 0.25 simulated seconds per inner step at speed 1 (the embedded default's topology). Reported per run: final validation loss (every
seed), boundary bytes per token and direction, pseudo-gradient bytes per replica per round, and
the simulated wall-clock. The k sweep repeats all_compressed and selective at k = d/8 … d/64; the
alternative row runs selective with ``topology.compress_sync = "project_global"`` (node0-style:
the global constrained matrices are projected onto span(U) after every outer step) against the
default ``project_start``. Writes bench/results/hetero.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import command, machine

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distrain.comm import boundary as bd  # noqa: E402
from distrain.config import load_config  # noqa: E402
from distrain.runtime.simulation import Simulation  # noqa: E402

RESULTS = REPO / "bench" / "results" / "hetero.json"
D_MODEL = 128
DEFAULT_K = D_MODEL // 32
PIPE = "kind='pipeline', stages=2, microbatches=4, speed=0.5, up_mbps=50.0, down_mbps=50.0, latency_ms=5.0"


def topology(run: str, k: int) -> str:
    comp = f", compress={{k={k}}}"
    return {
        "two_full": "[{count=2}]",
        "selective_int8": f"[{{count=2}}, {{count=2, {PIPE}, wire_dtype='int8'}}]",
        "selective_int4": f"[{{count=2}}, {{count=2, {PIPE}, wire_dtype='int4'}}]",
        "all_full": "[{count=4}]",
        "all_compressed": f"[{{count=4, {PIPE}{comp}}}]",
        "selective": f"[{{count=2}}, {{count=2, {PIPE}{comp}}}]",
        "selective_embedding": f"[{{count=2}}, {{count=2, {PIPE}, compress={{k={k}, basis='embedding'}}}}]",
        "selective_uncompressed": f"[{{count=2}}, {{count=2, {PIPE}}}]",
    }[run]


def simulate(out: Path, run: str, k: int, seed: int, steps: int, extra: list[str] = ()) -> dict:
    """One run of the setting; ``extra`` overrides come last (``--merge-formats`` pins equal steps)."""
    name = f"{run}_k{k}_s{seed}" + ("_" + "_".join(e.split("=")[-1] for e in extra) if extra else "")
    cfg = load_config("default", [
        f"--run.name={name}", f"--run.out_dir={out}", f"--run.seed={seed}", f"--train.steps={steps}",
        f"--train.eval_every={steps}", "--train.eval_batches=16", "--checkpoint.every=0",
        "--logging.progress=false", "--logging.tensorboard=false", "--logging.plots=false",
        "--runtime.torch_threads=1", f"--topology.replica={topology(run, k)}", *extra])
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        s = Simulation(cfg).run()
    finally:
        torch.set_num_threads(threads)
    row = {"final_val_loss": s.final_val_loss, "boundary_bytes_per_token": s.boundary_bytes_per_token,
           "pgrad_bytes_per_round": s.wire_bytes_per_replica_per_round, "sim_wallclock_s": s.sim_time_s,
           "pipeline_wait_share": s.pipeline_wait_share, "real_s": time.perf_counter() - t0}
    print(f"{name}: {json.dumps(row)}", flush=True)
    return row


def collect(rows: list[dict]) -> dict:
    out = {"final_val_loss": [r["final_val_loss"] for r in rows]}
    for key in ("boundary_bytes_per_token", "pgrad_bytes_per_round", "sim_wallclock_s", "pipeline_wait_share"):
        out[key] = statistics.fmean(r[key] for r in rows)
    return out


def mean(xs: list[float]) -> float:
    return statistics.fmean(xs)


def spread(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


PLOT = REPO / "docs" / "hetero_k_sweep.png"


def plot_sweep(result: dict) -> Path:
    """Final validation loss vs k for all_compressed and selective, with all_full as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(int(k) for k in result["k_sweep"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for run, style in (("all_compressed", "o-"), ("selective", "s-")):
        means = [result["k_sweep"][str(k)][run] for k in ks]
        seeds = [result["k_sweep"][str(k)][f"{run}_per_seed"] for k in ks]
        lo = [min(x) for x in seeds]
        hi = [max(x) for x in seeds]
        ax.plot(ks, means, style, label=run.replace("_", " "))
        ax.fill_between(ks, lo, hi, alpha=0.15)
    full = result["runs"]["all_full"]["final_val_loss"]
    ax.axhline(mean(full), color="k", ls="--", label=f"all full ({mean(full):.3f})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [f"{k} (d/{result['d_model'] // k})" for k in ks])
    ax.set_xlabel("boundary coordinates per token k")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"mean of {len(result['seeds'])} seeds, band: min-max", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)
    return PLOT


def tables(result: dict) -> str:
    """The results as markdown: headline runs (mean ± std over seeds), the k sweep, reconciliations."""
    full = mean(result["runs"]["all_full"]["final_val_loss"])
    bf16 = result["bf16_activation_bytes_per_token"]
    lines = ["| run | final val loss (mean ± std) | vs all full | per seed | boundary B/token/direction "
             "| below bf16 activations | pseudo-gradient B/replica/round | simulated wall-clock |",
             "|---|---|---|---|---|---|---|---|"]
    for run, v in result["runs"].items():
        losses = v["final_val_loss"]
        b = v["boundary_bytes_per_token"]
        lines.append(f"| {run} | {mean(losses):.4f} ± {spread(losses):.4f} | {mean(losses) / full - 1:+.1%} | "
                     f"{', '.join(f'{x:.3f}' for x in losses)} | {b:.2f} | "
                     f"{f'{bf16 / b:.1f}x' if b else '-'} | {v['pgrad_bytes_per_round']:,.0f} | {v['sim_wallclock_s']:.0f} s |")
    lines += ["", "| k | all_compressed | vs all full | selective | vs all full | selective closer |", "|---|---|---|---|---|---|"]
    for k in sorted(result["k_sweep"], key=int, reverse=True):
        row = result["k_sweep"][k]
        a, c = row["all_compressed"], row["selective"]
        lines.append(f"| {k} (d/{result['d_model'] // int(k)}) | {a:.4f} | {a / full - 1:+.1%} | {c:.4f} | "
                     f"{c / full - 1:+.1%} | {'yes' if abs(c - full) < abs(a - full) else 'no'} |")
    for key, title in (("reconciliation", f"k = {result['default_k']}"), ("reconciliation_d16", f"k = {result['d_model'] // 16}")):
        rec = result.get(key)
        if not rec:
            continue
        lines += ["", f"| selective, {title}: compress_sync | final val loss (mean ± std) | vs all full | per seed |",
                  "|---|---|---|---|"]
        for mode, losses in rec.items():
            if isinstance(losses, list):
                lines.append(f"| {mode} | {mean(losses):.4f} ± {spread(losses):.4f} | {mean(losses) / full - 1:+.1%} | "
                             f"{', '.join(f'{x:.3f}' for x in losses)} |")
    return "\n".join(lines)


def contribution(two_full: float, selective: float, uncompressed: float) -> float:
    """Share of the gain two uncompressed pipeline replicas bring over two full replicas alone that
    two pipeline replicas with another boundary format bring."""
    return (two_full - selective) / (two_full - uncompressed)


def merge_formats(args: argparse.Namespace) -> None:
    """Two full replicas alone, selective with bf16, subspace (k = d/32), int8 and int4 boundaries, all
    run again on the results file's seeds under this commit at equal steps (every replica runs H inner
    steps a round: ``straggler_policy = "wait"``), so the contribution of each format is measured
    against a reference of the same code; written under ``formats``."""
    result = json.loads(RESULTS.read_text())
    out = Path(args.out)
    seeds = result["seeds"]
    steps = int(result["setup"].split("inner steps")[0].split(",")[-1])
    equal_steps = ["--topology.straggler_policy=wait"]
    runs = {run: collect([simulate(out, run, k, s, steps, equal_steps) for s in seeds])
            for run, k in (("two_full", 0), ("selective_uncompressed", 0), ("selective", DEFAULT_K),
                           ("selective_int8", 0), ("selective_int4", 0))}
    two, unc = mean(runs["two_full"]["final_val_loss"]), mean(runs["selective_uncompressed"]["final_val_loss"])
    contrib = {}
    for run, label in (("selective", f"subspace k={DEFAULT_K}"), ("selective_int8", "int8"),
                       ("selective_int4", "int4"), ("selective_uncompressed", "bf16")):
        losses = runs[run]["final_val_loss"]
        contrib[label] = {"contribution": contribution(two, mean(losses), unc),
                          "per_seed": [contribution(t, s, u) for t, s, u in zip(
                              runs["two_full"]["final_val_loss"], losses, runs["selective_uncompressed"]["final_val_loss"])],
                          "bytes_per_token": runs[run]["boundary_bytes_per_token"],
                          "below_bf16": 256.0 / runs[run]["boundary_bytes_per_token"]}
    result["formats"] = {"setting": "the setting above, every replica H = 15 inner steps a round (straggler_policy wait)",
                         "runs": runs, "contribution": contrib, "command": command("bench/hetero.py"),
                         "machine": machine()}
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(contrib, indent=1))


def _simulate_job(out: str, run: str, k: int, seed: int, steps: int, extra: list[str]) -> dict:
    return {"run": run, "k": k, "seed": seed, **simulate(Path(out), run, k, seed, steps, extra)}


def simulate_all(jobs: list[tuple], workers: int) -> list[dict]:
    """``simulate`` for every (out, run, k, seed, steps, extra), ``workers`` at a time, each in a fresh
    process (a run sets process-wide torch threads), in the order given."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             max_tasks_per_child=1) as pool:
        return list(pool.map(_simulate_job, *zip(*jobs)))


def merge_basis(args: argparse.Namespace) -> None:
    """The subspace basis that follows the model (``compress.basis = "embedding"``: U rebuilt every
    round from the global embedding) against the seeded one, at d/32 and d/16, beside both
    references, all run again under this commit at equal steps; written under ``basis``."""
    result = json.loads(RESULTS.read_text())
    seeds = result["seeds"]
    steps = int(result["setup"].split("inner steps")[0].split(",")[-1])
    equal_steps = ["--topology.straggler_policy=wait"]
    plan = [("two_full", 0), ("selective_uncompressed", 0)] + [
        (run, k) for k in (DEFAULT_K, D_MODEL // 16) for run in ("selective", "selective_embedding")]
    jobs = [(args.out, run, k, s, steps, equal_steps) for run, k in plan for s in seeds]
    rows = simulate_all(jobs, args.jobs)
    runs = {f"{run}_k{k}" if k else run: collect([r for r in rows if (r["run"], r["k"]) == (run, k)])
            for run, k in plan}
    two, unc = runs["two_full"]["final_val_loss"], runs["selective_uncompressed"]["final_val_loss"]
    contrib = {}
    for name, row in runs.items():
        if name.startswith("selective_") and name != "selective_uncompressed":
            per_seed = [contribution(t, s, u) for t, s, u in zip(two, row["final_val_loss"], unc)]
            contrib[name] = {"contribution": contribution(mean(two), mean(row["final_val_loss"]), mean(unc)),
                             "per_seed": per_seed, "loss_vs_all_full": mean(row["final_val_loss"]) / mean(
                                 result["runs"]["all_full"]["final_val_loss"]) - 1,
                             "bytes_per_token": row["boundary_bytes_per_token"],
                             "below_bf16": 256.0 / row["boundary_bytes_per_token"]}
    result["basis"] = {"setting": "the setting above, every replica H = 15 inner steps a round (straggler_policy wait)",
                       "runs": runs, "contribution": contrib, "command": command("bench/hetero.py"),
                       "machine": machine()}
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(contrib, indent=1))


BOUNDS_OFF = ["--outer.robust_clip=0", "--outer.robust_coord_clip=0", "--outer.robust_direction=false"]


def merge_defences(args: argparse.Namespace) -> None:
    """What issue 21's bounds (the norm clip, the per-coordinate clip, the direction check) cost the
    compressed replicas: selective at d/32 (seeded basis) with them off, and int4 boundaries with them
    on and off, against the references of ``basis`` (same seeds, equal steps); under ``defences``."""
    result = json.loads(RESULTS.read_text())
    ref = result["basis"]["runs"]
    seeds, steps = result["seeds"], int(result["setup"].split("inner steps")[0].split(",")[-1])
    wait = ["--topology.straggler_policy=wait"]
    plan = {"subspace_d32_bounds_off": ("selective", DEFAULT_K, wait + BOUNDS_OFF),
            "int4": ("selective_int4", 0, wait), "int4_bounds_off": ("selective_int4", 0, wait + BOUNDS_OFF),
            "subspace_d32_coord_clip_off": ("selective", DEFAULT_K, wait + ["--outer.robust_coord_clip=0"])}
    done = result.get("defences", {}).get("runs", {})
    plan = {name: row for name, row in plan.items() if name not in done}  # a rerun adds only what is missing
    jobs = [(args.out, run, k, s, steps, extra) for run, k, extra in plan.values() for s in seeds]
    rows = simulate_all(jobs, args.jobs)
    two, unc = ref["two_full"]["final_val_loss"], ref["selective_uncompressed"]["final_val_loss"]
    out = {"subspace_d32": ref[f"selective_k{DEFAULT_K}"]["final_val_loss"], **done}
    for i, name in enumerate(plan):
        out[name] = [r["final_val_loss"] for r in rows[i * len(seeds):(i + 1) * len(seeds)]]
    contrib = {name: {"per_seed": [contribution(t, s, u) for t, s, u in zip(two, losses, unc)],
                      "contribution": contribution(mean(two), mean(losses), mean(unc))} for name, losses in out.items()}
    before = result.get("defences", {})
    commands = before.get("commands", [before["command"]] if "command" in before else []) + [command("bench/hetero.py")]
    result["defences"] = {"setting": "selective (2 full + 2 pipelines), references of 'basis'", "runs": out,
                          "contribution": contrib, "bounds_off": BOUNDS_OFF, "commands": commands, "machine": machine()}
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(contrib, indent=1))


def merge_split(args: argparse.Namespace) -> None:
    """The span-split reconciliation beside the two in the results file, on the same seeds."""
    result = json.loads(RESULTS.read_text())
    out = Path(args.out)
    seeds = result["seeds"]
    steps = int(result["setup"].split("inner steps")[0].split(",")[-1])
    for k, key in ((DEFAULT_K, "reconciliation"), (D_MODEL // 16, "reconciliation_d16")):
        row = result.setdefault(key, {})
        if key == "reconciliation_d16":
            row["project_start"] = result["k_sweep"][str(k)]["selective_per_seed"]
        row["split"] = [simulate(out, "selective", k, s, steps, ["--topology.compress_sync=split"])["final_val_loss"]
                        for s in seeds]
    full = mean(result["runs"]["all_full"]["final_val_loss"])
    result["summary"]["reconciliation_vs_all_full"] = {
        key: {mode: mean(v) / full - 1 for mode, v in result[key].items() if isinstance(v, list)}
        for key in ("reconciliation", "reconciliation_d16")}
    result["command"] += " ; " + command("bench/hetero.py")
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    plot_sweep(result)
    print(json.dumps(result["summary"]["reconciliation_vs_all_full"], indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sweep-seeds", type=int, default=3)
    ap.add_argument("--out", default="/tmp/distrain_bench_hetero")
    ap.add_argument("--table", action="store_true", help="print the results file as the BENCHMARKS tables")
    ap.add_argument("--merge-split", action="store_true",
                    help="add the 'split' reconciliation (selective, default k and d/16, all seeds) to an existing "
                         "results file")
    ap.add_argument("--merge-formats", action="store_true",
                    help="add two_full and selective with int8 / int4 boundaries (all seeds) and the contribution "
                         "of every format to an existing results file")
    ap.add_argument("--merge-basis", action="store_true",
                    help="add compress.basis = 'embedding' against the seeded basis at d/32 and d/16, beside both "
                         "references (all seeds, --jobs processes) to an existing results file")
    ap.add_argument("--merge-defences", action="store_true",
                    help="add selective at d/32 with issue 21's bounds off, and int4 with them on and off, against "
                         "--merge-basis's references")
    ap.add_argument("--jobs", type=int, default=2, help="parallel runs of --merge-basis / --merge-defences")
    args = ap.parse_args()
    if args.merge_defences:
        merge_defences(args)
        return
    if args.merge_basis:
        merge_basis(args)
        return
    if args.merge_formats:
        merge_formats(args)
        return
    if args.merge_split:
        merge_split(args)
        return
    if args.table:
        print(tables(json.loads(RESULTS.read_text())))
        return
    if args.quick:
        args.steps, args.seeds, args.sweep_seeds = 60, 1, 1
    out = Path(args.out)
    seeds = list(range(args.seeds))
    runs = {}
    for run in ("all_full", "all_compressed", "selective", "selective_uncompressed"):
        runs[run] = collect([simulate(out, run, DEFAULT_K, s, args.steps) for s in seeds])
    sweep = {}
    for k in (D_MODEL // 8, D_MODEL // 16, D_MODEL // 32, D_MODEL // 64):
        row = {}
        for run in ("all_compressed", "selective"):
            if k == DEFAULT_K and args.sweep_seeds <= args.seeds:
                losses = runs[run]["final_val_loss"][: args.sweep_seeds]
            else:
                losses = [simulate(out, run, k, s, args.steps)["final_val_loss"] for s in range(args.sweep_seeds)]
            row[run] = mean(losses)
            row[f"{run}_per_seed"] = losses
        sweep[str(k)] = row
    alternative = collect([simulate(out, "selective", DEFAULT_K, s, args.steps, ["--topology.compress_sync=project_global"])
                           for s in seeds])
    full = mean(runs["all_full"]["final_val_loss"])
    result = {
        "runs": runs,
        "k_sweep": sweep,
        "d_model": D_MODEL,
        "default_k": DEFAULT_K,
        "bf16_activation_bytes_per_token": float(2 * D_MODEL),
        "reconciliation": {
            "project_start": runs["selective"]["final_val_loss"],
            "project_global": alternative["final_val_loss"],
            "project_global_row": alternative,
        },
        "summary": {
            "boundary_reduction_vs_bf16": 2 * D_MODEL / runs["all_compressed"]["boundary_bytes_per_token"],
            "loss_vs_all_full": {r: mean(v["final_val_loss"]) / full - 1 for r, v in runs.items()},
            "loss_spread": {r: spread(v["final_val_loss"]) for r, v in runs.items()},
            "selective_closer_than_all_compressed_at_every_k": all(
                abs(v["selective"] - full) < abs(v["all_compressed"] - full) for v in sweep.values()),
            "selective_vs_all_full_at_d16": sweep[str(D_MODEL // 16)]["selective"] / full - 1,
        },
        "setup": f"4 replicas, {args.steps} inner steps each, batch 8x128, H=15, SparseLoCo, model d={D_MODEL} "
                 "4 layers vocab 4096, stdlib corpus; pipelines: 2 stages at half speed, 4 micro-batches, 1F1B, "
                 "50 Mbit/s 5 ms links; full replicas 100 Mbit/s 20 ms; 0.25 simulated s per inner step",
        "seeds": seeds,
        "machine": machine(),
        "command": command("bench/hetero.py"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    plot_sweep(result)
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
