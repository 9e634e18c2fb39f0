"""Hostile members that send valid frames under the norm clip: does the aggregation hold?

    python bench/hostile.py                 # aggregation level (R = 4, 5, 8) + 3 seeds of runs at R = 4
    python bench/hostile.py --quick         # 4 recorded rounds, 1 seed of 60 steps
    python bench/hostile.py --part agg      # the aggregation level only (a few minutes)
    python bench/hostile.py --part boundary # how fast a NaN / 1e30 pipeline boundary frame ends its replica's round

SparseLoCo on the embedded corpus with the embedded default's model (d = 128, 4 layers), H = 15.

**Aggregation level** (cheap, exact): an honest 8-replica run is recorded (every replica's real
encoded contribution, every round); each round is then aggregated by ``FrameExchange.settle`` —
what a round does after the transport — with the members 0..R−1 honest, with member R−1 absent, and
with member R−1 replaced by an attacker:
- ``flip``: its own frame negated and scaled to 1.9× the round's median norm (under the 2× clip);
- ``concentrated``: a valid frame whose centroids are [0, 0, 0, −1.9·median] with one non-zero
  code (the whole norm budget on one weight), the other tensors all zero.
Reported per R and configuration (``before``: the norm bound only, as before issue 21; ``now``: the
defaults): the per-round relative deviation ‖A_attacked − A_honest‖ / ‖A_honest‖ against the same
with the member absent (target ≤ 1.2×), the largest per-coordinate move under the concentrated
attack against the largest honest per-coordinate update (target ≤ 2×), how far the defaults move
an honest round from ``before``, and the rounds in which an honest member was set aside.

**Runs** (R = 4, ``--steps`` inner steps, one seed after the other): honest, and with replica 3
sending ``--fault=flip:rank=3,round=0`` (its own pseudo-gradient, negated, 1.9× its norm) every
round; the final validation loss (target: within 1 %), and the honest rounds in which any member
was set aside (target: none in ≥ 99 % of rounds). ``--variants before minsel2``: honest runs with
issue 21's checks off and with ``outer.robust_min_selectors = 2``, per seed. Writes
bench/results/hostile.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import command, machine

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distrain.comm.codecs import Codec, EncodedTensor  # noqa: E402
from distrain.comm.robust import RobustPolicy, contribution_norm  # noqa: E402
from distrain.config import Config, load_config  # noqa: E402
from distrain.outer.base import Contribution  # noqa: E402
from distrain.outer.build import codec_from_config, coord_bound_from_config, direction_from_config  # noqa: E402
from distrain.outer.exchange import FrameExchange  # noqa: E402
from distrain.runtime.faults import Fault  # noqa: E402
from distrain.runtime.simulation import Simulation  # noqa: E402

RESULTS = REPO / "bench" / "results" / "hostile.json"
# Honest runs with other settings: issue 21's checks off (as before it), and the lone-selector rule on.
VARIANTS = {"before": ["--outer.robust_coord_clip=0", "--outer.robust_direction=false"],
            "minsel2": ["--outer.robust_min_selectors=2"]}
Frame = dict[str, EncodedTensor]


def config(out: Path, name: str, seed: int, steps: int, replicas: int, extra: list[str] | None = None) -> Config:
    return load_config("default", [
        f"--run.name={name}_s{seed}", f"--run.out_dir={out}", f"--run.seed={seed}", f"--train.steps={steps}",
        f"--train.eval_every={steps}", "--train.eval_batches=16", "--checkpoint.every=0", "--logging.progress=false",
        "--logging.tensorboard=false", "--logging.plots=false", "--runtime.torch_threads=1",
        f"--topology.replica=[{{count={replicas}}}]", *(extra or [])])


def rounds_with_aside(run_dir: Path) -> tuple[int, int]:
    """(rounds in which the direction check set any member aside, rounds) from a run's records."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in recs if r.get("kind") == "train"]
    return sum(1 for r in train if r.get("down_weighted")), len(train)


def simulate(cfg: Config, faults: list[Fault], record: dict[int, list[Frame]] | None = None) -> tuple[float, Path]:
    """One simulated run: its final validation loss and run directory. ``record``: every worker's
    encoded contribution of every round, by rank (honest copies, taken as they are sent)."""
    threads = torch.get_num_threads()
    try:
        sim = Simulation(cfg, faults)
        if record is not None:
            for w in sim.workers:
                w.inject(lambda codec, rank=w.rank: Recorder(codec, record.setdefault(rank, [])))
        summary = sim.run()
    finally:
        torch.set_num_threads(threads)
    return summary.final_val_loss, summary.run_dir


class Recorder:
    """A worker's codec that keeps a copy of every tensor it encodes (one dict per round)."""

    def __init__(self, inner: Codec, rounds: list[Frame]):
        self.inner, self.rounds = inner, rounds

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode(self, name: str, delta: torch.Tensor, state: Any) -> EncodedTensor:
        et = self.inner.encode(name, delta, state)
        if not self.rounds or name in self.rounds[-1]:
            self.rounds.append({})
        self.rounds[-1][name] = EncodedTensor(et.shape, dict(et.meta), {k: v.copy() for k, v in et.buffers.items()})
        return et


def boundary_fail_fast(out: Path) -> dict[str, Any]:
    """Real seconds of the round in which a pipeline stage receives a NaN (or 1e30) boundary frame,
    against the honest round before it: the replica must leave the round at once, not after the
    collective timeout (``topology.round_timeout_s``, 600 s)."""
    import time

    from distrain.metrics import read_metrics
    from distrain.runtime.simulation import SimulationPool
    from distrain.worker.worker import Worker

    rows: dict[str, Any] = {}
    original, worker_round = SimulationPool.run_round, Worker.run_round
    for label, value in (("nan", 0.0), ("1e30", 1e30)):
        seconds: list[float] = []
        ends: list[dict[int | str, float]] = []  # per round: its start, and seconds from it to each worker's exit

        def timed(self: SimulationPool, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            ends.append({"start": t0})
            try:
                return original(self, *args, **kwargs)
            finally:
                seconds.append(time.perf_counter() - t0)

        def worker_timed(self: Worker, *args: Any, **kwargs: Any) -> Any:
            try:
                return worker_round(self, *args, **kwargs)
            finally:
                ends[-1][self.rank] = time.perf_counter() - ends[-1]["start"]

        cfg = load_config("default", [
            f"--run.name=boundary_{label}", f"--run.out_dir={out}", "--train.steps=45", "--train.eval_every=45",
            "--checkpoint.every=0", "--logging.progress=false", "--logging.tensorboard=false",
            "--logging.plots=false", "--runtime.torch_threads=1", "--topology.round_timeout_s=600",
            "--topology.replica=[{count=1}, {kind='pipeline', stages=2, speed=0.5, compress={k=4}}]"])
        SimulationPool.run_round = timed  # type: ignore[method-assign]
        Worker.run_round = worker_timed  # type: ignore[method-assign]
        threads = torch.get_num_threads()
        try:
            sim = Simulation(cfg, [Fault("boundary", 1, 1, delay=value)])
            sim.run()
        finally:
            SimulationPool.run_round, Worker.run_round = original, worker_round  # type: ignore[method-assign]
            torch.set_num_threads(threads)
        left = [r for r in read_metrics(sim.run_dir) if r.get("event") == "left_round"]
        pipeline = [1, 2]  # ranks of the pipeline's two stages
        rows[label] = {"round_real_s": seconds, "honest_round_real_s": seconds[0], "bad_round_real_s": seconds[1],
                       "pipeline_left_after_s": max(ends[1][r] for r in pipeline),
                       "pipeline_round_0_s": max(ends[0][r] for r in pipeline),
                       "left": [{"round": r["round"], "why": r["why"]} for r in left]}
        print(label, rows[label], flush=True)
    return {"setup": "the embedded default's model, 1 full replica + a 2-stage pipeline (k = d/32), H = 15, 3 rounds; "
                     "from round 1 stage 0 sends every boundary frame as NaN (or x1e30); round_timeout_s = 600",
            **rows, "command": command("bench/hostile.py")}


# ----- attacks on one frame ------------------------------------------------------------------------
def flipped(frame: Frame, factor: float) -> Frame:
    """The same frame with every value multiplied by ``factor`` (< 0: sign flipped)."""
    return {n: EncodedTensor(et.shape, dict(et.meta),
                             {**et.buffers, "centroids": (et.buffers["centroids"].astype(np.float64) * factor)
                              .astype("<f4")}) for n, et in frame.items()}


def concentrated(frame: Frame, magnitude: float) -> Frame:
    """A valid frame with the whole norm budget on one weight: centroids [0, 0, 0, −magnitude] and
    one non-zero code in the first tensor; every other value zero."""
    out = {}
    for i, (n, et) in enumerate(frame.items()):
        codes = np.zeros_like(et.buffers["codes"])
        cents = np.zeros(4, dtype="<f4")
        if i == 0:
            codes[0], cents[3] = 3, -magnitude
        out[n] = EncodedTensor(et.shape, dict(et.meta), {**et.buffers, "codes": codes, "centroids": cents})
    return out


def flat(agg: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([agg[n].reshape(-1) for n in sorted(agg)]).double()


def aggregation_level(recorded: dict[int, list[Frame]], cfg: Config, sizes: list[int]) -> dict[str, Any]:
    """The attacks above on the recorded rounds, per R and configuration."""
    codec = codec_from_config(cfg)
    shapes = {n: et.shape for n, et in recorded[0][0].items()}
    policy = RobustPolicy(cfg.outer.robust_clip, cfg.outer.robust_reject)
    setups = {"before": (None, None), "now": (coord_bound_from_config(cfg), direction_from_config(cfg))}
    rounds = min(len(v) for v in recorded.values())
    out: dict[str, Any] = {}
    for r in sizes:
        for label, (bound, direction) in setups.items():
            ex = FrameExchange(codec, shapes, None, "bench", "bench", 0, torch.device("cpu"), policy,
                               bound=bound, direction=direction)
            rows = []
            sums = {"honest": 0.0, "flip": 0.0}
            for k in range(rounds):
                honest = [recorded[m][k] for m in range(r)]
                norms = [contribution_norm(codec, f) for f in honest]
                median = statistics.median(norms)

                def settle(frames: list[Frame], k: int = k) -> Any:
                    return ex.settle(k, [Contribution(m, f) for m, f in enumerate(frames)])

                got = settle(honest)
                a = flat(got.aggregate)
                absent = flat(settle(honest[:-1]).aggregate)
                flip_got = settle(honest[:-1] + [flipped(honest[-1], -1.9 * median / norms[-1])])
                flip = flat(flip_got.aggregate)
                conc = flat(settle(honest[:-1] + [concentrated(honest[-1], 1.9 * median)]).aggregate)
                sums["honest"] = sums["honest"] + a
                sums["flip"] = sums["flip"] + flip
                honest_max = float(a.abs().max())
                rows.append({
                    "dev_flip": float((flip - a).norm() / a.norm()),
                    "dev_absent": float((absent - a).norm() / a.norm()),
                    "conc_move": float(conc.abs().max()) / honest_max,
                    "conc_influence": float((conc - absent).abs().max()) / honest_max,
                    "honest_aside": sum(v.weight == 0 for v in got.directions),
                    "flip_aside": [int(v.member) for v in flip_got.directions if v.weight == 0],
                    "aggregate": a,
                })
            ratios = [x["dev_flip"] / x["dev_absent"] for x in rows]
            cum = torch.nn.functional.cosine_similarity(sums["flip"], sums["honest"], dim=0)
            out.setdefault(f"R={r}", {})[label] = {
                "rounds": rounds,
                "flip_deviation_mean": statistics.fmean(x["dev_flip"] for x in rows),
                "absent_deviation_mean": statistics.fmean(x["dev_absent"] for x in rows),
                "flip_ratio_mean": statistics.fmean(ratios),
                "flip_ratio_max": max(ratios),
                "flip_cumulative_cosine": float(cum),
                "flip_rounds_set_aside": sum(1 for x in rows if r - 1 in x["flip_aside"]),
                "concentrated_move_max": max(x["conc_move"] for x in rows),
                "concentrated_influence_max": max(x["conc_influence"] for x in rows),
                "honest_rounds_with_aside": sum(1 for x in rows if x["honest_aside"]),
                "_aggregates": [x["aggregate"] for x in rows],
            }
        now, before = out[f"R={r}"]["now"], out[f"R={r}"]["before"]
        moved = [float((a - b).norm() / b.norm()) for a, b in zip(now["_aggregates"], before["_aggregates"])]
        now["honest_change_vs_before_mean"] = statistics.fmean(moved)
        now["honest_change_vs_before_max"] = max(moved)
        for v in out[f"R={r}"].values():
            del v["_aggregates"]
        print(f"R={r}: " + json.dumps(out[f"R={r}"]), flush=True)
    return out


def table(result: dict[str, Any]) -> str:
    """The markdown table of docs/BENCHMARKS.md from a results file."""
    lines = ["| attack | R | setting | deviation / absent (mean, max per round) | flipper set aside | "
             "cumulative cosine to honest | concentrated: largest move / largest honest update | "
             "honest rounds with a member set aside |", "|---|---|---|---|---|---|---|---|"]
    agg = result.get("aggregation", {})
    for key in ("R=4", "R=5", "R=8"):
        for label, v in agg.get(key, {}).items():
            lines.append(f"| sign flip 1.9x / concentrated | {key[2:]} | {label} | {v['flip_deviation_mean']:.3f} / "
                         f"{v['absent_deviation_mean']:.3f} = {v['flip_ratio_mean']:.2f}x, {v['flip_ratio_max']:.2f}x | "
                         f"{v['flip_rounds_set_aside']} of {v['rounds']} | {v['flip_cumulative_cosine']:.3f} | "
                         f"{v['concentrated_move_max']:.2f}x (attacker's own: {v['concentrated_influence_max']:.2f}x) | "
                         f"{v['honest_rounds_with_aside']} of {v['rounds']} |")
    runs = result.get("runs")
    if runs:
        lines += ["", "| seed | honest final val loss | replica 3 flips (1.9x) | gap |"
                  + "".join(f" honest, {v} |" for v in runs.get("honest_variants", {})),
                  "|---|---|---|---|" + "---|" * len(runs.get("honest_variants", {}))]
        for i, (h, f, g) in enumerate(zip(runs["honest_final_val_loss"], runs["flip_final_val_loss"],
                                          runs["relative_gap"])):
            extra = "".join(f" {v['final_val_loss'][i]:.4f} ({v['relative_to_default'][i]:+.2%}) |"
                            if i < len(v["final_val_loss"]) else " — |" for v in runs.get("honest_variants", {}).values())
            lines.append(f"| {i} | {h:.4f} | {f:.4f} | {g:+.2%} |{extra}")
        lines.append(f"| mean ± std | | | **{runs['mean_gap']:+.2%} ± {runs['gap_spread']:.2%}** |"
                     + " |" * len(runs.get("honest_variants", {})))
        lines.append(f"\nHonest R = 4 rounds with a member set aside: {runs['honest_rounds_with_aside']} of "
                     f"{runs['honest_rounds']}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--part", choices=("agg", "runs", "boundary", "all"), default="all")
    ap.add_argument("--steps", type=int, default=300, help="inner steps of the R = 4 runs")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--agg-rounds", type=int, default=10, help="rounds of the recorded 8-replica run")
    ap.add_argument("--variants", nargs="*", default=[], choices=list(VARIANTS),
                    help="honest R = 4 runs with other settings, per seed (is an honest run unchanged?)")
    ap.add_argument("--variant-seeds", type=int, default=None, help="run the variants on the first N seeds only")
    ap.add_argument("--out", default="/tmp/distrain_bench_hostile")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the results file and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(RESULTS.read_text())))
        return
    if args.quick:
        args.steps, args.seeds, args.agg_rounds = 60, 1, 4
    out = Path(args.out)
    result: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    result.pop("machine", None)
    old = ("honest_final_val_loss", "hostile_final_val_loss", "relative_gap", "mean_gap", "gap_spread", "target", "setup")
    if "hostile_final_val_loss" in result:  # the file of the earlier (1e30 frames) benchmark
        result = {"huge_1e30_earlier": {k: result.pop(k) for k in old if k in result}, **result}
    if args.part in ("agg", "all"):
        h = 15
        cfg = config(out, "recorded8", 0, args.agg_rounds * h, 8)
        recorded: dict[int, list[Frame]] = {}
        loss, run_dir = simulate(cfg, [], recorded)
        aside, total = rounds_with_aside(run_dir)
        result["aggregation"] = {
            "setup": f"an honest SparseLoCo run of 8 replicas ({args.agg_rounds} rounds of H = {h}, default model "
                     "d = 128, 4 layers), every round's real frames aggregated by FrameExchange.settle with member "
                     "R-1 honest, absent, sign-flipped at 1.9x the round's median norm, or concentrated "
                     "(centroids [0,0,0,-1.9 median], one non-zero code)",
            "recorded_run": {"final_val_loss": loss, "rounds_with_aside": aside, "rounds": total},
            **aggregation_level(recorded, cfg, [4, 5, 8]),
            "command": command("bench/hostile.py"),
        }
    if args.part in ("boundary", "all"):
        result["boundary"] = boundary_fail_fast(out)
    if args.part in ("runs", "all"):
        honest, flip, aside, total = [], [], 0, 0
        variants: dict[str, list[float]] = {v: [] for v in args.variants}
        for s in range(args.seeds):
            for v in args.variants if args.variant_seeds is None or s < args.variant_seeds else ():
                loss, _ = simulate(config(out, f"honest_{v}", s, args.steps, 4, VARIANTS[v]), [])
                variants[v].append(loss)
                print(f"honest {v} seed {s}: {loss:.4f}", flush=True)
            loss, run_dir = simulate(config(out, "honest", s, args.steps, 4), [])
            a, t = rounds_with_aside(run_dir)
            aside, total = aside + a, total + t
            honest.append(loss)
            print(f"honest seed {s}: {loss:.4f} (rounds with a member set aside: {a} of {t})", flush=True)
            loss, _ = simulate(config(out, "flip", s, args.steps, 4), [Fault.parse("flip:rank=3,round=0")])
            flip.append(loss)
            print(f"flip seed {s}: {loss:.4f}", flush=True)
        gaps = [a / h - 1 for a, h in zip(flip, honest)]
        result["runs"] = {
            "setup": f"SparseLoCo defaults, 4 full replicas, {args.steps} inner steps each, H = 15, model d = 128 "
                     "4 layers vocab 4096, stdlib corpus; replica 3 sends its own pseudo-gradient negated at 1.9x "
                     "its norm from round 0 (--fault=flip:rank=3,round=0)",
            "honest_final_val_loss": honest, "flip_final_val_loss": flip, "relative_gap": gaps,
            "mean_gap": statistics.fmean(gaps), "gap_spread": statistics.stdev(gaps) if len(gaps) > 1 else 0.0,
            "honest_rounds_with_aside": aside, "honest_rounds": total, "target": "within 1 %",
            "command": command("bench/hostile.py"),
            "honest_variants": {v: {"settings": VARIANTS[v], "final_val_loss": losses,
                                    "relative_to_default": [a / h - 1 for a, h in zip(losses, honest)],
                                    "seeds": len(losses)}
                                for v, losses in variants.items()},
        }
    result["machine"] = machine()
    result["command"] = command("bench/hostile.py")  # the last part run; each part keeps its own
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k in ("runs",)}, indent=1))


if __name__ == "__main__":
    main()
