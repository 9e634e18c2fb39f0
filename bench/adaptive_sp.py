"""Adaptive sequence parallelism: planned step time vs static and per-batch homogeneous SP, and the
cost model's accuracy on real gloo processes.

    python bench/adaptive_sp.py                       # the recorded run (a few minutes on 2 cores)
    python bench/adaptive_sp.py --batches 2 --no-write --profile runs/x/sp_profile.json   # quick

Step times are modelled with ``distrain.parallel.sp.cost`` (no GPUs here), with the FlexSP reference's
coefficients of a 7B GPT on A100s (fitted compute, all-to-all bandwidth measured per group size
with 8 GPUs a node: ~100 GB/s inside a node, 5-10 GB/s across) and its memory rule: 28 GB per GPU
for activations and ZeRO-3 model states (7.1B × 16 bytes / devices) at 4.48 MiB per token. The 32
heads of a 7B model allow group sizes 1, 2, 4, 8, 16, 32. Longest sequence: 16K / 32K / 128K tokens at
8 / 16 / 64 devices (the reference's 128K at 64). Batches: documents drawn from the distribution
(cut at the longest length) until 75 % of the replica's memory is used — what
``data.sampler = "documents"`` with ``data.batch_tokens`` produces.

Per case (means over ``--batches`` batches): the adaptive plan; the best *static* degree (one
degree for the whole run, so its groups must hold the longest possible sequence; the degree
with the best total over the batches); the best homogeneous degree chosen per batch; a lower bound
on any plan (``sp_bounds.relaxed_lower_bound``: the planning problem with fractional groups and
assignments); the planner's wall time (its time limit is ``--time-limit``). The
heterogeneous case halves the speed of devices 32..63 and compares with the plan made as if all
were equally fast (evaluated at the real speeds).

``cost_model_mape``: ``distrain profile-sp`` on 4 gloo processes (``tiny`` model, sequences up to
512 tokens), validated on plans it did not fit on.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from common import command, machine

from distrain.parallel.sp.bounds import relaxed_lower_bound
from distrain.parallel.sp.cost import REFERENCE_7B, makespan
from distrain.parallel.sp.planner import allowed_degrees, best_homogeneous, homogeneous_plan, plan_step

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "adaptive_sp.json"  # the schema, nothing else
DETAILS = ROOT / "bench" / "results" / "adaptive_sp_details.json"  # statuses, sizes, the profile's rows
WIKIPEDIA = ROOT.parent / "shared" / "data" / "seqlens" / "wikipedia.txt"
MAX_LEN = {8: 16_384, 16: 32_768, 64: 131_072}
HEADS = 32


def capacity_tokens(devices: int) -> int:
    """The reference's rule: (28 GiB - ZeRO-3 states of 7.1B params) / 4.48 MiB per token."""
    states_mb = 7.1174468994140625 * 16 / devices * 1024
    return int((28 * 1024 - states_mb) / 4.480441895)


def distribution(name: str, wikipedia: Path) -> np.ndarray:
    if name == "wikipedia":
        return np.loadtxt(wikipedia, dtype=np.int64)
    rng = np.random.default_rng(12345)  # heavy tail: 128 × (1 + Pareto(1.1)), median ~240, mean unbounded
    return (128 * (1 + rng.pareto(1.1, 1_000_000))).astype(np.int64)


def batches(pool: np.ndarray, max_len: int, budget: int, n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        draw = np.minimum(pool[rng.integers(0, pool.size, 20_000)], max_len)
        out.append(draw[: max(1, int(np.searchsorted(np.cumsum(draw), budget, side="right")))].tolist())
    return out


def run_case(lengths_batches: list[list[int]], n: int, max_len: int, time_limit: float,
             speeds: list[float] | None = None) -> dict:
    costs, cap = REFERENCE_7B, capacity_tokens(n)
    degrees = allowed_degrees(HEADS, n)
    static_degrees = [d for d in degrees if d * cap >= max_len]
    rows = []
    for b in lengths_batches:
        t0 = time.perf_counter()
        plan = plan_step(b, n, costs, degrees=degrees, speeds=speeds, capacity=cap, time_limit_s=time_limit)
        wall = time.perf_counter() - t0
        static = {}
        for d in static_degrees:
            h = homogeneous_plan(b, n, costs, d, speeds=speeds, capacity=cap)
            static[d] = h.predicted_step_s if h is not None else math.inf
        per_batch = best_homogeneous(b, n, costs, degrees, speeds=speeds, capacity=cap)
        greedy = plan_step(b, n, costs, degrees=degrees, speeds=speeds, capacity=cap, solver="greedy")
        row = {"adaptive": plan.predicted_step_s, "static": static, "per_batch": per_batch[1].predicted_step_s,
               "greedy": greedy.predicted_step_s, "greedy_wall": greedy.solve_s,
               "lower": relaxed_lower_bound(b, costs, n, degrees, speeds, cap, upper=plan.predicted_step_s),
               "wall": wall, "status": plan.status,
               "sizes": sorted((len(g) for g in plan.groups), reverse=True)}
        if speeds is not None:
            blind = plan_step(b, n, costs, degrees=degrees, capacity=cap, time_limit_s=time_limit)
            row["oblivious"] = makespan(blind.groups, blind.assignment, b, costs, speeds, n)
        rows.append(row)
    best_d = min(static_degrees, key=lambda d: sum(r["static"][d] for r in rows))
    mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    out = {"adaptive_s": mean("adaptive"), "best_static_s": float(np.mean([r["static"][best_d] for r in rows])),
           "best_static_degree": int(best_d), "per_batch_homogeneous_s": mean("per_batch"),
           "lower_bound_s": mean("lower"), "plan_wall_s": mean("wall")}
    if speeds is not None:
        out["speed_oblivious_s"] = mean("oblivious")
    out["_detail"] = {"plan_wall_max_s": max(r["wall"] for r in rows), "statuses": [r["status"] for r in rows],
                      "candidates_only_s": mean("greedy"), "candidates_only_wall_s": mean("greedy_wall"),
                      "milp_improved_batches": sum(r["adaptive"] < r["greedy"] * (1 - 1e-9) for r in rows),
                      "tokens_mean": float(np.mean([sum(b) for b in lengths_batches])),
                      "sequences_mean": float(np.mean([len(b) for b in lengths_batches])),
                      "capacity_tokens": cap, "max_len": max_len,
                      "group_sizes_first_batch": rows[0]["sizes"]}
    return out


def profile_mape(profile_path: str | None) -> tuple[float, dict]:
    if profile_path:
        r = json.loads(Path(profile_path).read_text())
    else:
        from distrain.config import load_config
        from distrain.cli.profile_sp import profile

        cfg = load_config(None, ["--model.preset=tiny"])
        r = profile(cfg, 4, max_len=512, validate=10, repeats=7)
    return float(r["mape"]), r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=8, help="batches per case (default 8)")
    p.add_argument("--time-limit", type=float, default=0.8, help="planner seconds per batch (default 0.8)")
    p.add_argument("--profile", help="sp_profile.json of an earlier distrain profile-sp run (default: run one)")
    p.add_argument("--wikipedia", default=str(WIKIPEDIA))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()

    cases, details = {}, {}
    for dist in ("wikipedia", "heavytail"):
        pool = distribution(dist, Path(args.wikipedia))
        for n in (8, 16, 64):
            bs = batches(pool, MAX_LEN[n], int(0.75 * n * capacity_tokens(n)), args.batches, seed=n)
            res = run_case(bs, n, MAX_LEN[n], args.time_limit)
            details[f"{dist}-{n}"] = res.pop("_detail")
            cases[f"{dist}-{n}"] = res
            print(f"{dist}-{n}: {json.dumps(res)}", flush=True)
    pool = distribution("wikipedia", Path(args.wikipedia))
    bs = batches(pool, MAX_LEN[64], int(0.75 * 64 * capacity_tokens(64)), args.batches, seed=64)
    res = run_case(bs, 64, MAX_LEN[64], args.time_limit, speeds=[1.0] * 32 + [0.5] * 32)
    details["wikipedia-64-halfspeed"] = res.pop("_detail")
    cases["wikipedia-64-halfspeed"] = res
    print(f"wikipedia-64-halfspeed: {json.dumps(res)}", flush=True)

    mape, prof = profile_mape(args.profile)
    print(f"cost model MAPE over {len(prof['validation'])} plans on {prof['devices']} gloo processes: {mape:.1%}")
    out = {"cases": cases, "cost_model_mape": mape, "machine": machine(), "command": command("bench/adaptive_sp.py")}
    extra = {"cases": details, "profile": {k: prof[k] for k in ("costs", "devices", "degrees", "max_len", "validation",
                                                                 "profile_s", "samples")}}
    if not args.no_write:
        RESULTS.write_text(json.dumps(out, indent=1) + "\n")
        DETAILS.write_text(json.dumps(extra, indent=1) + "\n")
        print(f"wrote {RESULTS} and {DETAILS}")


if __name__ == "__main__":
    main()
