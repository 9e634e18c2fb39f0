"""``distrain profile-sp``: fit the adaptive-SP cost model on this machine, and check it.

Starts ``--devices`` gloo processes on 127.0.0.1 (one per device of a replica), builds the
configured model in each, and measures (``distrain.parallel.sp.profile``): forward + backward of fixed
packs of sequences in every allowed group size (all groups at once), the all-to-all bandwidth
per group size, and activation bytes per token. It fits alpha1, alpha2, beta1 and the bandwidths
by least squares, then checks the fit: ``--validate`` batches (lengths drawn from ``--lengths``, or
a synthetic heavy-tailed set) are planned with the fitted costs, run, and timed; the mean absolute
percentage error of predicted vs measured step time is reported.

Writes ``<run dir>/sp_costs.json`` (pass it to ``distrain plan-sp --costs``) and
``<run dir>/sp_profile.json`` (every sample, the bandwidths, the validation rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from distrain.cli.command import ToolCommand


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compositions(max_len: int) -> list[list[int]]:
    """Packs one group runs per profiled pass: single sequences over a range of lengths, and mixes,
    so that the quadratic, the linear and the fixed cost can be told apart."""
    m = max_len
    c = [[max(1, m // 16)], [max(1, m // 8)], [max(1, m // 4)], [max(1, m // 2)], [m],
         [max(1, m // 16)] * 8, [max(1, m // 4)] * 3, [m, max(1, m // 2), max(1, m // 8)]]
    return c


def _pool(lengths_file: str | None, max_len: int, seed: int) -> np.ndarray:
    if lengths_file:
        from distrain.cli.plan_sp import read_lengths

        return np.minimum(read_lengths(lengths_file), max_len)
    rng = np.random.default_rng([seed, 7])  # heavy tail: Pareto(1.2) from 16 tokens
    return np.minimum(16 * (1 + rng.pareto(1.2, 100_000)), max_len).astype(np.int64)


def _worker(rank: int, world: int, port: int, opts: dict, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=opts["timeout"]))
        result = _profile(rank, world, opts)
        if rank == 0:
            Path(out_dir, "profile.json").write_text(json.dumps(result))
    except Exception:
        Path(out_dir, f"error-{rank}.txt").write_text(traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _profile(rank: int, world: int, opts: dict) -> dict:
    import torch

    from distrain.config import ModelConfig
    from distrain.model import build_model
    from distrain.parallel.sp.cost import SPCosts, alltoall_bytes_per_token, makespan, mape
    from distrain.parallel.sp.plan import SPPlan, broadcast_json, broadcast_plan
    from distrain.parallel.sp.planner import allowed_degrees, homogeneous_plan, plan_step
    from distrain.parallel.sp.profile import (
        activation_bytes_per_token,
        alltoall_gbps,
        fit_costs,
        homogeneous_groups,
        model_bytes_per_token,
        time_plans,
    )
    from distrain.parallel.sp.ulysses import GroupCache

    torch.manual_seed(opts["seed"])
    mcfg = ModelConfig(**opts["model"])
    model = build_model(mcfg)
    vocab, max_len, reps = mcfg.vocab_size, opts["max_len"], opts["repeats"]
    degrees = allowed_degrees(mcfg.n_heads, world)
    cache = GroupCache()
    cache.precreate([tuple(g) for d in degrees if d > 1 for g in homogeneous_groups(world, d)])
    t0 = time.perf_counter()
    items, shapes = [], []  # (plan, lengths) to time; (composition, degree) of the profiled ones
    for d in degrees:
        groups = homogeneous_groups(world, d)
        fillers = [[i] for i in range(len(groups) * d, world)]  # leftover devices stay busy, as in training
        for comp in compositions(max_len):
            small = [max(1, -(-n // d)) for n in comp]  # a filler's share: about one device's part of comp
            plan = SPPlan(groups + fillers, [j for j in range(len(groups)) for _ in comp] +
                          [len(groups) + j for j in range(len(fillers)) for _ in small], 0.0)
            items.append((plan, comp * len(groups) + small * len(fillers)))
            shapes.append((comp, d))
    nominal = model_bytes_per_token(model)
    a = next(iter(model.layers.values())).attention
    measured = {}
    for d in degrees:
        if d > 1:  # effective: K/V heads replicated beyond n_kv_heads cost bytes the nominal figure omits
            raw = alltoall_gbps(rank, world, d, cache)
            measured[d] = raw * nominal / alltoall_bytes_per_token(len(model.layers), a.n_heads, a.n_kv_heads,
                                                                    a.head_dim, 4, degree=d)
    memory = activation_bytes_per_token(model, (max(2, max_len // 4), max_len), vocab) if rank == 0 else 0.0

    def fit(times: list[float]) -> tuple[SPCosts, list]:
        # the step's makespan per sample, not each group's time: with more processes than cores, which
        # group the scheduler favours varies from run to run, the time all of them take does not
        samples = [(c, d, t) for (c, d), t in zip(shapes, times)]
        got = fit_costs(samples, nominal, measured, memory).to_dict() if rank == 0 else None
        return SPCosts.from_dict(broadcast_json(got, 0)), samples

    # A quick fit (one run each) chooses the validation plans; then the profiled and the validation
    # plans are timed together, interleaved, and the final fit never sees the validation plans.
    prelim, _ = fit(time_plans(model, items, rank, cache, vocab, repeats=1))
    pool = _pool(opts["lengths"], max_len, opts["seed"])
    cap = max(1, max_len // 2)  # memory for half the longest sequence: long ones need groups
    rng = np.random.default_rng([opts["seed"], 11])
    checks = []
    for i in range(opts["validate"]):
        draw = pool[rng.integers(0, pool.size, 4 * world * max_len)]
        lengths = draw[: max(1, int(np.searchsorted(np.cumsum(draw), 0.7 * world * cap)))].tolist()
        plan = None
        if rank == 0:
            if i % 3 == 2:  # every third: a homogeneous plan, so the check covers plans of every shape
                d = degrees[(i // 3) % len(degrees)]
                plan = homogeneous_plan(lengths, world, prelim, d, capacity=cap) or \
                    plan_step(lengths, world, prelim, degrees=degrees, capacity=cap, time_limit_s=1.0)
            else:
                plan = plan_step(lengths, world, prelim, degrees=degrees, capacity=cap, time_limit_s=1.0)
        checks.append((broadcast_plan(plan, 0), lengths))
    times = time_plans(model, items + checks, rank, cache, vocab, repeats=reps)
    costs, samples = fit(times[:len(items)])
    profile_s = time.perf_counter() - t0
    rows = []
    for (plan, lengths), t in zip(checks, times[len(items):]):
        predicted = makespan(plan.groups, plan.assignment, lengths, costs, None, world)
        rows.append({"groups": plan.groups, "tokens": int(sum(lengths)), "sequences": len(lengths),
                     "predicted_s": predicted, "measured_s": t})
    err = mape([r["predicted_s"] for r in rows], [r["measured_s"] for r in rows]) if rows else None
    return {"costs": costs.to_dict(), "devices": world, "degrees": degrees, "max_len": max_len, "repeats": reps,
            "model": dataclasses.asdict(mcfg), "threads": opts["threads"],
            "samples": [{"lengths": c, "degree": d, "seconds": t} for c, d, t in samples],
            "measured_alltoall_gbps": {str(k): v for k, v in measured.items()},
            "validation": rows, "mape": err, "validation_capacity_tokens": cap, "profile_s": profile_s}


def profile(cfg: Any, devices: int, *, max_len: int = 0, lengths: str | None = None, repeats: int = 5,
            validate: int = 6, threads: int = 1, timeout_s: float = 1800.0) -> dict:
    """Run the profile on ``devices`` local gloo processes; returns what rank 0 measured."""
    import tempfile

    import torch.multiprocessing as mp

    m = dataclasses.asdict(cfg.model)
    m["vocab_size"] = cfg.model.vocab_size or cfg.data.vocab_size
    max_len = max_len or cfg.model.max_seq_len
    m["max_seq_len"] = max(m["max_seq_len"], max_len)
    m.pop("preset", None)
    opts = {"model": m, "max_len": max_len, "lengths": lengths, "repeats": repeats, "validate": validate,
            "threads": threads, "seed": cfg.run.seed, "timeout": max(60.0, timeout_s)}
    with tempfile.TemporaryDirectory(prefix="profile-sp-") as out:
        ctx = mp.start_processes(_worker, args=(devices, _free_port(), opts, out), nprocs=devices, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"profile-sp did not finish within {timeout_s:.0f} s")
        except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:  # died without writing its error
            errors = sorted(Path(out).glob("error-*.txt"))
            raise RuntimeError(errors[0].read_text() if errors else f"a profile-sp process died: {e}") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join(5)
        errors = sorted(Path(out).glob("error-*.txt"))
        if errors:
            raise RuntimeError(f"profile-sp process failed:\n{errors[0].read_text()}")
        return json.loads(Path(out, "profile.json").read_text())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file or preset name in configs/ (default: built-in defaults)")
    p.add_argument("--model", help="model preset (overrides the config's model.preset)")
    p.add_argument("--devices", type=int, default=4, help="processes, one per device of the replica (default 4)")
    p.add_argument("--max-len", type=int, default=0, help="longest profiled sequence (default model.max_seq_len)")
    p.add_argument("--lengths", help="lengths file the validation batches are drawn from (default: synthetic heavy tail)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement, the fastest counts (default 5)")
    p.add_argument("--validate", type=int, default=6, help="plans run to check the fit (default 6; 0: none)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1; 0: torch's default)")
    p.add_argument("--run-dir", help="where sp_costs.json and sp_profile.json go (default <run.out_dir>/<run.name>)")
    p.add_argument("--output", help="also write the costs JSON here")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before every process is stopped")
    p.add_argument("--json", action="store_true", help="print the profile JSON")


def run(args: argparse.Namespace) -> int:
    from distrain.config import ConfigError, load_config

    try:
        overrides = [f"--model.preset={args.model}"] if args.model else []
        cfg = load_config(args.config, overrides)
        if args.devices < 1 or args.repeats < 1 or args.validate < 0 or args.max_len < 0:
            raise ValueError("--devices and --repeats must be >= 1, --validate and --max-len >= 0")
        result = profile(cfg, args.devices, max_len=args.max_len, lengths=args.lengths, repeats=args.repeats,
                         validate=args.validate, threads=args.threads, timeout_s=args.timeout)
    except (ConfigError, ValueError, FileNotFoundError, TimeoutError, RuntimeError) as e:
        print(f"distrain profile-sp: {e}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir) if args.run_dir else Path(cfg.run.out_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    costs = json.dumps(result["costs"], indent=1) + "\n"
    (run_dir / "sp_costs.json").write_text(costs)
    (run_dir / "sp_profile.json").write_text(json.dumps(result, indent=1) + "\n")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(costs)
    if args.json:
        print(json.dumps(result))
        return 0
    c = result["costs"]
    print(f"alpha1 {c['alpha1']:.3e} s/token^2, alpha2 {c['alpha2']:.3e} s/token, beta1 {c['beta1']:.4f} s")
    print("all-to-all GB/s " + ", ".join(f"{d}: {v:.3g}" for d, v in c["alltoall_gbps"].items()))
    print(f"activation memory {c['memory_per_token'] / 1024:.1f} KiB/token")
    if result["mape"] is not None:
        print(f"predicted vs measured step time over {len(result['validation'])} plans: "
              f"{result['mape']:.1%} mean absolute error")
    print(f"wrote {run_dir / 'sp_costs.json'} and {run_dir / 'sp_profile.json'}")
    return 0


COMMAND = ToolCommand("fit the adaptive SP cost model on local gloo processes and check it", add_arguments, run)
