"""``distrain plan-sp``: the adaptive SP plan of one batch sampled from a lengths file, and its speed-up.

Samples ``--batch`` lengths (with replacement, seeded by ``--seed``) from a file of one length per
line, plans them on ``--devices`` devices with ``distrain.parallel.sp_planner.plan_step`` and prints the plan
with its predicted step time, the best static degree (one degree for the whole run: it must hold
the file's longest length), the best homogeneous degree for this batch, and a lower bound on any
plan's step time (``distrain.parallel.sp_bounds.relaxed_lower_bound``).
``predicted_step_s`` is ``distrain.parallel.sp_cost.makespan`` of the printed plan (formula in that module).
Costs: ``--costs FILE`` (written by ``distrain profile-sp``), else the FlexSP reference's 7B/A100
coefficients.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from distrain.cli.command import ToolCommand


class LengthsFileError(ValueError):
    """A lengths file is missing, empty or has a line that is not a positive integer."""


def read_lengths(path: str | Path) -> np.ndarray:
    """One positive integer per line (blank lines skipped); errors name the line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise LengthsFileError(f"lengths file not found: {p}")
    lines = p.read_text().splitlines()
    keep = [(i, s.strip()) for i, s in enumerate(lines, 1) if s.strip()]
    if not keep:
        raise LengthsFileError(f"{p}: no lengths (one positive integer per line)")
    try:
        arr = np.array([s for _, s in keep]).astype(np.int64)
    except ValueError:
        arr = None
    if arr is None or arr.min() < 1:
        for i, s in keep:
            if not s.isdigit() or int(s) < 1:
                raise LengthsFileError(f"{p}: line {i} is {s!r}, not a positive integer length")
    return arr


def sample_lengths(lengths: np.ndarray, batch: int, seed: int) -> list[int]:
    if batch < 1:
        raise LengthsFileError(f"--batch must be >= 1, got {batch}")
    rng = np.random.default_rng(seed)
    return lengths[rng.integers(0, lengths.size, batch)].tolist()


def parse_speeds(text: str | None, n: int) -> list[float] | None:
    if not text:
        return None
    try:
        v = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LengthsFileError(f"--speeds must be comma-separated numbers, got {text!r}") from None
    if len(v) != n:
        raise LengthsFileError(f"--speeds has {len(v)} values for --devices {n}")
    if any(x <= 0 for x in v):
        raise LengthsFileError(f"--speeds must be positive, got {text!r}")
    return v


def plan_report(lengths: list[int], n_devices: int, costs, *, capacity: float | None, speeds: list[float] | None,
                degrees: list[int], longest: int, time_limit_s: float, solver: str = "auto") -> dict:
    """The plan-sp JSON object (contract in the README / issue 11)."""
    from distrain.parallel.sp.bounds import relaxed_lower_bound
    from distrain.parallel.sp.planner import best_homogeneous, plan_step

    plan = plan_step(lengths, n_devices, costs, degrees=degrees, speeds=speeds, capacity=capacity,
                     time_limit_s=time_limit_s, solver=solver)
    per_batch = best_homogeneous(lengths, n_devices, costs, degrees, speeds=speeds, capacity=capacity)
    static_degrees = [d for d in degrees if capacity is None or d * capacity >= longest]
    static = best_homogeneous(lengths, n_devices, costs, static_degrees, speeds=speeds, capacity=capacity)

    def entry(best):
        return {"degree": best[0], "predicted_step_s": best[1].predicted_step_s} if best else None

    return {
        "groups": plan.groups, "assignment": plan.assignment, "lengths": list(lengths),
        "costs": costs.to_dict(), "predicted_step_s": plan.predicted_step_s,
        "best_static": entry(static), "best_homogeneous_per_batch": entry(per_batch),
        "lower_bound_s": relaxed_lower_bound(lengths, costs, n_devices, degrees, speeds, capacity,
                                             upper=plan.predicted_step_s),
        "solve_s": plan.solve_s, "status": plan.status,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", required=True, help="file with one sequence length per line")
    p.add_argument("--devices", type=int, required=True, help="devices of the replica")
    p.add_argument("--batch", type=int, required=True, help="sequences per global batch (sampled with replacement)")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--capacity", type=float, default=None, help="tokens a device holds (default: unlimited)")
    p.add_argument("--speeds", default=None, help="relative speed per device, e.g. 1,1,0.5,0.5 (default: all 1)")
    p.add_argument("--costs", default=None, help="cost coefficients JSON from distrain profile-sp "
                                                 "(default: the FlexSP reference's 7B A100 values)")
    p.add_argument("--max-len", type=int, default=0, help="cut lengths at this maximum (data.max_doc_len; 0: no cut)")
    p.add_argument("--heads", type=int, default=0, help="query heads: group sizes must divide them (0: any size)")
    p.add_argument("--time-limit", type=float, default=1.0, help="planner seconds (default 1)")
    p.add_argument("--json", action="store_true", help="print the JSON object")


def run(args: argparse.Namespace) -> int:
    from distrain.parallel.sp.cost import REFERENCE_7B, CostModelError, SPCosts
    from distrain.parallel.sp.plan import PlanError
    from distrain.parallel.sp.planner import allowed_degrees

    try:
        if args.devices < 1:
            raise LengthsFileError(f"--devices must be >= 1, got {args.devices}")
        if args.capacity is not None and args.capacity <= 0:
            raise LengthsFileError(f"--capacity must be positive, got {args.capacity}")
        costs = SPCosts.load(args.costs) if args.costs else REFERENCE_7B
        pool = read_lengths(args.lengths)
        if args.max_len:
            pool = np.minimum(pool, args.max_len)
        lengths = sample_lengths(pool, args.batch, args.seed)
        speeds = parse_speeds(args.speeds, args.devices)
        degrees = allowed_degrees(args.heads, args.devices) if args.heads else list(range(1, args.devices + 1))
        report = plan_report(lengths, args.devices, costs, capacity=args.capacity, speeds=speeds, degrees=degrees,
                             longest=int(pool.max()), time_limit_s=args.time_limit)
    except (LengthsFileError, PlanError, CostModelError, FileNotFoundError, ValueError) as e:
        print(f"distrain plan-sp: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
        return 0
    print(format_report(report))
    return 0


def format_report(r: dict) -> str:
    sizes: dict[int, int] = {}
    for g in r["groups"]:
        sizes[len(g)] = sizes.get(len(g), 0) + 1
    m = r["predicted_step_s"]
    lines = [
        f"sequences {len(r['lengths'])}, tokens {sum(r['lengths']):,}, longest {max(r['lengths']):,}",
        "groups    " + ", ".join(f"{n}x{d}" for d, n in sorted(sizes.items(), reverse=True)),
        f"predicted step        {m:.4f} s  ({r['status']}, planned in {r['solve_s']:.2f} s)",
    ]
    for key, name in (("best_static", "best static degree"), ("best_homogeneous_per_batch", "best per-batch degree")):
        b = r[key]
        lines.append(f"{name:<21} {b['predicted_step_s']:.4f} s  (SP {b['degree']}: {b['predicted_step_s'] / m:.2f}x slower)"
                     if b else f"{name:<21} none fits")
    lines.append(f"lower bound           {r['lower_bound_s']:.4f} s  (plan is within {m / r['lower_bound_s'] - 1:.1%})")
    return "\n".join(lines)


COMMAND = ToolCommand("plan adaptive sequence parallelism for a batch sampled from a lengths file", add_arguments, run)
