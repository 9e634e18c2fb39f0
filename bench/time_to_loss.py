"""Time to loss: do weak workers make training faster? Simulated seconds to reach the loss of the fast replicas alone.

    python bench/time_to_loss.py                # every topology x policy x merge, 3 seeds (about an hour on 2 cores)
    python bench/time_to_loss.py --quick        # 120 steps, 1 seed: a smoke run
    python bench/time_to_loss.py --table        # the BENCHMARKS tables (and the plot) from the results file

Simulation of the embedded default's model and corpus (``configs/default.toml``: d = 128, 4 layers,
SparseLoCo every 15 inner steps, 0.25 simulated seconds per inner step at speed 1), the same
``train.steps`` for every run, validation every 3 rounds (45 steps). Topologies:

- ``full2``: 2 full replicas alone (the reference);
- ``full3``: 3 full-speed replicas (the ideal a weak replica is measured against);
- ``full2+pipe``: the embedded default of before — 2 full replicas + a 2-stage pipeline replica of
  half-speed workers on 50 Mbit/s links, k = d/32 subspace boundaries;
- ``full2+half``: 2 full + one uncompressed full replica at speed 0.5;
- ``full2+pipe-auto`` / ``full2+pipe-bf16``: that pipeline with ``compress = "auto"`` (int4 on its
  50 Mbit/s links: the embedded default now) / with uncompressed bf16 boundaries, window policy only;
- ``slow-int4`` / ``slow-k8`` / ``slow-k4`` / ``slow-bf16``: the slow-link setting, 2 full replicas +
  the pipeline on 20 Mbit/s, 50 ms links (bf16 boundaries would take 84 % of its compute): int4
  (what ``auto`` picks there), the d/16 subspace (what ``auto`` picked before it left subspaces to
  the user), the d/32 subspace, never compressed. There every format ran the same 163 pipeline steps:
  50 ms of latency per hop, not bytes, bounds the step, so compression cannot pay;
- ``thin-auto`` / ``thin-k8`` / ``thin-bf16``: a setting where bytes bound the step — the pipeline's
  links at 5 Mbit/s, 5 ms (bf16 boundaries would take 3.4× its compute, int4 0.87×): ``compress =
  "auto"`` (int4 there), always compressed to the d/16 subspace (16× fewer bytes than bf16), never
  compressed. These rows were run after issue 21's coordinate bounds, which change every run a
  little (``full2`` seed 0: 4.7265 against 4.7137 before), so they are measured against
  ``full2-now``, the reference run again on their code.

The last two run under ``straggler_policy`` = wait, fewer_steps, and window with each merge
(``outer.merge`` = mean, steps, tokens). Per run and seed: final validation loss, utilisation (the
share of worker time inside inner steps, and the compute-only share), simulated wall-clock, the
loss at the reference's final wall-clock, and the time-to-loss ratio: simulated seconds to reach
``full2``'s final validation loss of the same seed (linear between evaluations), over ``full2``'s
own; ``null`` when never reached (a miss). Writes bench/results/time_to_loss.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from common import command, machine

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results" / "time_to_loss.json"
PLOT = REPO / "docs" / "time_to_loss.png"
HALF = "{speed=0.5}"
PIPE = ('{{kind="pipeline", stages=2, microbatches=4, speed=0.5, up_mbps={mbps}, down_mbps={mbps}, '
        'latency_ms={ms}, compress={compress}}}')  # the embedded default's pipeline: 50 Mbit/s, 5 ms


def pipe(compress: str, mbps: float = 50.0, ms: float = 5.0) -> str:
    return "[{count=2}, " + PIPE.format(compress=compress, mbps=mbps, ms=ms) + "]"


TOPOLOGIES = {
    "full2": "[{count=2}]",
    "full3": "[{count=3}]",
    "full2+pipe": pipe("{k=4}"),  # the embedded default of before: k = d/32 subspace boundaries
    "full2+half": f"[{{count=2}}, {HALF}]",
    "full2+pipe-auto": pipe('"auto"'),
    "full2+pipe-bf16": pipe("{k=0}"),
    # the slow-link setting: the pipeline's links at 20 Mbit/s, 50 ms, where bf16 boundaries take 84 % of a step
    "slow-k8": pipe("{k=8}", 20.0, 50.0),
    "slow-k4": pipe("{k=4}", 20.0, 50.0),
    "slow-bf16": pipe("{k=0}", 20.0, 50.0),
    "slow-int4": pipe('{k=0}, wire_dtype="int4"', 20.0, 50.0),
    # the thin-link setting: 5 Mbit/s, 5 ms, where bytes (not latency) bound the pipeline's step
    "thin-auto": pipe('"auto"', 5.0, 5.0),
    "thin-k8": pipe("{k=8}", 5.0, 5.0),
    "thin-bf16": pipe("{k=0}", 5.0, 5.0),
}
POLICIES = [("wait", "mean"), ("fewer_steps", "mean"), ("window", "mean"), ("window", "steps"), ("window", "tokens")]


def runs() -> list[tuple[str, str, str, str]]:
    """(name, topology, policy, merge) of every run."""
    out = [("full2", "full2", "window", "mean"), ("full3", "full3", "window", "mean"),
           ("full2-now", "full2", "window", "mean")]
    for topo in ("full2+pipe", "full2+half"):
        for policy, merge in POLICIES:
            suffix = policy if policy != "window" else f"window-{merge}"
            out.append((f"{topo}/{suffix}", topo, policy, merge))
    for topo in ("full2+pipe-auto", "slow-int4", "slow-k8", "slow-k4", "slow-bf16", "full2+pipe-bf16",
                 "thin-auto", "thin-k8", "thin-bf16"):  # formats
        out.append((f"{topo}/window-mean", topo, "window", "mean"))
    return out


def reference_of(name: str) -> str:
    """The run a row's time to loss is measured against: ``full2`` on the same code."""
    return "full2-now" if name.startswith("thin-") or name == "full2-now" else "full2"


def row_of(name: str, seed: int, run_dir: Path, real_s: float | None = None) -> dict:
    """A finished run's figures and validation curve, from its run directory."""
    from distrain.metrics import read_metrics

    s = json.loads((run_dir / "summary.json").read_text())
    records = read_metrics(run_dir)
    curve = [[r["sim_time_s"], r["val_loss"]] for r in records if r.get("kind") == "val"]
    counts = [r["replica_steps"] for r in records if r.get("kind") == "train"]
    return {"name": name, "seed": seed, "final_val_loss": s["final_val_loss"], "sim_time_s": s["sim_time_s"],
            "step_share": s["step_share"], "compute_utilisation": s["utilisation"],
            "replica_step_share": s["replica_step_share"], "replica_steps": s["replica_steps"],
            "steps_per_round_last": counts[-1] if counts else [], "clipped": s["clipped"], "curve": curve,
            "real_s": s["wall_s"] if real_s is None else real_s}


def simulate(name: str, topo: str, policy: str, merge: str, seed: int, steps: int, out_dir: str,
             resume: bool = False) -> dict:
    """One simulated run (in its own process, one torch thread); its figures and validation curve.
    ``resume``: a run whose directory already holds its summary is read back, not run again."""
    from distrain.config import load_config
    from distrain.runtime.simulation import Simulation

    run_dir = Path(out_dir) / f"{name.replace('/', '_')}_s{seed}"
    if resume and (run_dir / "summary.json").is_file():
        return row_of(name, seed, run_dir)
    overrides = [
        f"--run.name={name.replace('/', '_')}_s{seed}", f"--run.out_dir={out_dir}", f"--run.seed={seed}",
        f"--train.steps={steps}", "--train.eval_every=45", "--checkpoint.every=0", "--logging.progress=false",
        "--logging.tensorboard=false", "--logging.plots=false", "--runtime.torch_threads=1",
        f"--topology.straggler_policy={policy}", f"--outer.merge={merge}",
    ]
    overrides.append(f"--topology.replica={TOPOLOGIES[topo]}")
    cfg = load_config("default", overrides)
    t0 = time.perf_counter()
    s = Simulation(cfg).run()
    return row_of(name, seed, s.run_dir, time.perf_counter() - t0)


def time_to(curve: list[list[float]], target: float) -> float | None:
    """Simulated seconds at which the validation curve first reaches ``target`` (linear between
    evaluations); None if it never does."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            if l0 <= target:
                return t0
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return curve[0][0] if curve and curve[0][1] <= target else None


def loss_at(curve: list[list[float]], when: float) -> float:
    """Validation loss at simulated time ``when`` (linear between evaluations; the last one after)."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if t0 <= when <= t1:
            return l0 + (l1 - l0) * (when - t0) / (t1 - t0) if t1 > t0 else l1
    return curve[-1][1]


def mean_std(xs: list[float | None]) -> tuple[float | None, float | None]:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    if not vals or len(vals) < len(xs):
        return None, None
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def summarise(rows: list[dict], seeds: list[int]) -> dict:
    by = {(r["name"], r["seed"]): r for r in rows}
    out: dict[str, dict] = {}
    for name, topo, policy, merge in runs():
        got = [by[(name, s)] for s in seeds if (name, s) in by]
        if not got:
            continue
        ratios, at_ref = [], []
        for r in got:
            ref = by[(reference_of(name), r["seed"])]
            t = time_to(r["curve"], ref["final_val_loss"])
            t_ref = time_to(ref["curve"], ref["final_val_loss"])
            ratios.append(None if t is None or not t_ref else t / t_ref)
            at_ref.append(loss_at(r["curve"], ref["sim_time_s"]))
        out[name] = {
            "topology": topo, "policy": policy, "aggregation": merge, "seeds": [r["seed"] for r in got],
            "final_val_loss": [r["final_val_loss"] for r in got], "utilisation": [r["step_share"] for r in got],
            "compute_utilisation": [r["compute_utilisation"] for r in got], "sim_time_s": [r["sim_time_s"] for r in got],
            "loss_at_reference_time": at_ref, "time_to_loss_ratio": ratios,
            "replica_utilisation": [r["replica_step_share"] for r in got],
            "steps_per_round": [r["steps_per_round_last"] for r in got], "clipped": [r["clipped"] for r in got],
            "curves": [r["curve"] for r in got],
        }
    return out


def fmt(xs: list, digits: int = 3, pct: bool = False) -> str:
    m, s = mean_std(xs)
    if m is None:
        misses = sum(1 for x in xs if x is None)
        return f"miss ({misses}/{len(xs)} seeds)" if misses else "n/a"
    if pct:
        return f"{100 * m:.1f} % ± {100 * s:.1f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def table(res: dict) -> str:
    runs_ = res["runs"]
    lines = ["| run | policy | merge | final val loss | time-to-loss ratio (per seed) | loss at full2's end | "
             "utilisation (in steps) | compute share | simulated s | steps/round |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs_.items():
        per_seed = ", ".join("miss" if x is None else f"{x:.3f}" for x in r["time_to_loss_ratio"])
        ratio = fmt(r["time_to_loss_ratio"])
        lines.append(f"| {name} | {r['policy']} | {r['aggregation']} | {fmt(r['final_val_loss'])} | {ratio} ({per_seed}) "
                     f"| {fmt(r['loss_at_reference_time'])} | {fmt(r['utilisation'], pct=True)} | "
                     f"{fmt(r['compute_utilisation'], pct=True)} | {fmt(r['sim_time_s'], 1)} | "
                     f"{'/'.join(map(str, r['steps_per_round'][0]))} |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [  # (title, reference, runs)
        ("full2+pipe (50 Mbit/s)", "full2", ["full3", "full2+pipe/wait", "full2+pipe/fewer_steps", "full2+pipe/window-mean",
                                              "full2+pipe-auto/window-mean", "full2+pipe-bf16/window-mean"]),
        ("full2+half", "full2", ["full3", "full2+half/wait", "full2+half/fewer_steps", "full2+half/window-mean"]),
        ("thin links (5 Mbit/s, 5 ms)", "full2-now", ["thin-auto/window-mean", "thin-k8/window-mean",
                                                       "thin-bf16/window-mean"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(19, 4.8))
    seed = res["runs"]["full2"]["seeds"][0]
    for ax, (title, reference, names) in zip(axes, panels):
        for name in [reference, *names]:
            if name not in res["runs"]:
                continue
            curve = res["runs"][name]["curves"][0]
            ax.plot([c[0] for c in curve], [c[1] for c in curve], label=name,
                    linestyle="--" if "/" not in name else "-")
        ax.set_xlabel("simulated seconds")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{title} against {reference} (seed {seed})")
        ax.set_ylim(top=6.0)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--quick", action="store_true", help="120 steps, 1 seed")
    p.add_argument("--jobs", type=int, default=2, help="simulations at once (one torch thread each)")
    p.add_argument("--only", default="", help="comma-separated run names (default: all)")
    p.add_argument("--out-dir", default="/tmp/distrain_time_to_loss")
    p.add_argument("--resume", action="store_true", help="read back runs whose directories hold a summary")
    p.add_argument("--table", action="store_true", help="print the tables from the results file and redraw the plot")
    args = p.parse_args()
    if args.table:
        res = json.loads(RESULTS.read_text())
        print(table(res))
        plot(res, PLOT)
        return 0
    steps, seeds = (120, [0]) if args.quick else (args.steps, list(range(args.seeds)))
    only = args.only.split(",") if args.only else []
    todo = [r for r in runs() if not only or r[0] in only or r[0] in {reference_of(n) for n in only}]
    jobs = [(name, topo, policy, merge, seed, steps, args.out_dir, args.resume)
            for name, topo, policy, merge in todo for seed in seeds]
    rows = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for row in pool.map(simulate, *zip(*jobs)):
            print(f"{row['name']} seed {row['seed']}: loss {row['final_val_loss']:.4f} sim {row['sim_time_s']:.1f}s "
                  f"in steps {row['step_share']:.1%} ({row['real_s']:.0f}s real)", flush=True)
            rows.append(row)
    res = {"runs": summarise(rows, seeds), "steps": steps, "machine": machine(), "command": command("bench/time_to_loss.py")}
    if not args.quick:
        RESULTS.write_text(json.dumps(res, indent=1))
        plot(res, PLOT)
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
