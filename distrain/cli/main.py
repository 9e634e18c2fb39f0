"""``distrain`` command line: prepare, train, simulate; export, eval, generate; plot, compare, estimate, plan-sp,
profile-sp.

Every command that runs takes ``--config <file or preset>`` and any number of
``--section.key=value`` overrides; ``distrain <cmd> --help`` lists every key with its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Callable

from distrain.config import Config, ConfigError, ReplicaConfig, load_config
from distrain.cli.command import ToolCommand


def config_keys_help() -> str:
    lines = ["configuration keys (override with --section.key=value):"]

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, f"{prefix}{f.name}.")
            else:
                lines.append(f"  --{prefix}{f.name}={json.dumps(v)}")

    walk(Config(), "")
    lines += ["", "topology tables: each replica is a [[topology.replica]] table (or "
              "--topology.replica='[{...}, {...}]'); topology.replicas = N is N tables of defaults:"]
    for f in dataclasses.fields(ReplicaConfig):
        comment = _FIELD_COMMENTS.get(f.name, "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            default = dataclasses.asdict(default)
        lines.append(f"  {f.name} = {json.dumps(default)}  {comment}")
    lines.append("  per-worker keys (speed, up_mbps, down_mbps, latency_ms, cpus, gpus, memory_mb) take one number "
                 "for every worker or a list, one per worker")
    return "\n".join(lines)


_FIELD_COMMENTS = {
    "kind": "full (one worker or `devices` joined by a fast interconnect) | pipeline (stage workers)",
    "count": "identical replicas this table stands for",
    "devices": "full: processes of the replica",
    "parallel": "full: auto | single | ddp | deepspeed (inner steps over the devices)",
    "stages": "pipeline: a stage count (balanced split) or layer bounds [0, a, ..., n_layers]",
    "speed": "relative compute speed (1.0: network.step_time_s per step)",
    "up_mbps": "link up (default network.up_mbps)",
    "down_mbps": "link down (default network.down_mbps)",
    "latency_ms": "one-way latency (default network.latency_ms)",
    "cpus": "Ray bundle CPUs (default 1)",
    "gpus": "Ray bundle GPUs (default 0)",
    "memory_mb": "Ray memory reservation (default none)",
    "schedule": "pipeline: 1f1b | gpipe",
    "microbatches": "pipeline: micro-batches per step (0: automatic)",
    "wire_dtype": "pipeline: boundary values bf16 | fp32 | int8 | int4",
    "optimizer": "inner optimiser adamw | adamw8bit | adamw4bit (empty: train.optimizer)",
    "compress": "pipeline: \"auto\", or a subspace: k coordinates per token (0: none), method reparam | project, "
                "basis seeded | embedding (rebuilt every round from the global embedding)",
}


def _load(args: argparse.Namespace, overrides: list[str], default_config: str | None) -> Config:
    return load_config(args.config or default_config, overrides)


def cmd_prepare(cfg: Config) -> int:
    from distrain.runtime.common import prepare_data

    data = prepare_data(cfg, progress=cfg.logging.progress)
    print(json.dumps({k: str(v) for k, v in dataclasses.asdict(data).items()}, indent=1))
    return 0


def cmd_train(cfg: Config, faults: list[str] = ()) -> int:
    from distrain.runtime.faults import Fault
    from distrain.runtime.simulation import run_simulation

    summary = run_simulation(cfg, [Fault.parse(f) for f in faults])
    _print_summary(summary)
    return 0


def _print_summary(summary) -> None:
    from distrain.metrics import human_bytes

    rows = [
        ("run directory", str(summary.run_dir)),
        ("inner steps / rounds", f"{summary.steps} / {summary.rounds}"),
        ("tokens (all replicas)", f"{summary.tokens:,}"),
        ("validation loss", f"{summary.first_val_loss:.4f} -> {summary.final_val_loss:.4f}"),
    ]
    if summary.wire_bytes_per_replica_per_round:
        ratio = summary.dense_fp32_bytes_per_replica_per_round / summary.wire_bytes_per_replica_per_round
        rows += [
            ("bytes sent / replica / round", human_bytes(summary.wire_bytes_per_replica_per_round)),
            ("dense fp32 would be", f"{human_bytes(summary.dense_fp32_bytes_per_replica_per_round)} ({ratio:.0f}x more)"),
            ("simulated wall-clock", f"{summary.sim_time_s:.1f} s"),
            ("time inside inner steps", f"{summary.step_share:.1%}" + (
                " (per replica: " + " | ".join(f"{u:.1%}" for u in summary.replica_step_share) + ")"
                if len(summary.replica_step_share) > 1 else "")),
            ("compute utilisation", f"{summary.utilisation:.1%}"),
        ]
        if len(set(summary.replica_steps)) > 1:
            rows.append(("inner steps per replica", " | ".join(map(str, summary.replica_steps))))
        if summary.clipped:
            rows.append(("contributions clipped", str(summary.clipped)))
        if summary.set_aside:
            rows.append(("contributions set aside (direction)", str(summary.set_aside)))
        if len(summary.segment_bytes) > 1:
            rows.append(("pseudo-gradient bytes / segment", " | ".join(human_bytes(b) for b in summary.segment_bytes)))
    if summary.boundary_bytes_per_token:
        rows.append(("pipeline boundary", f"{summary.boundary_bytes_per_token:.2f} B/token per direction"))
        rows.append(("pipeline waits (bubble, transfers)", f"{summary.pipeline_wait_share:.1%} of its time"))
    rows.append(("real wall-clock", f"{summary.wall_s:.1f} s"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))


def _plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")


def cmd_plot(args: argparse.Namespace) -> int:
    from distrain.plots import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


# Tool commands by name. A module that adds one defines ``COMMAND = ToolCommand(...)`` and is
# listed in TOOL_MODULES (imported only when the parser is built, so its imports stay lazy).
TOOLS: dict[str, ToolCommand] = {"plot": ToolCommand("write PNG plots of a run directory", _plot_arguments, cmd_plot)}
TOOL_MODULES: dict[str, str] = {
    "export": "distrain.cli.export",
    "eval": "distrain.cli.evaluate",
    "generate": "distrain.cli.generate",
    "compare": "distrain.cli.compare",
    "estimate": "distrain.cli.estimate",
    "plan-sp": "distrain.cli.plan_sp",
    "profile-sp": "distrain.cli.profile_sp",
}


def tool_commands() -> dict[str, ToolCommand]:
    import importlib

    tools = dict(TOOLS)
    for name, module in TOOL_MODULES.items():
        tools[name] = importlib.import_module(module).COMMAND
    return tools


COMMANDS: dict[str, tuple[str, str | None, Callable[[Config], int]]] = {
    "prepare": ("tokenise a corpus into token shards (cached)", "default", cmd_prepare),
    "train": ("train one replica (AdamW) on the configured data", None, cmd_train),
    "simulate": ("simulate a multi-replica run (SparseLoCo by default) on one machine", "default", cmd_train),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (text, default, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text, epilog=config_keys_help(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", help=f"TOML file or preset name in configs/ (default: {default or 'built-in defaults'})")
        p.add_argument("-v", "--verbose", action="store_true")
        if fn is cmd_train:
            p.add_argument("--fault", action="append", default=[],
                           help="fault injection (repeatable): hostile:rank=R,round=N[,delay=FACTOR], "
                                "flip:rank=R,round=N[,factor=F] or "
                                "slow:rank=R,factor=F[,round=N] (tests, demos)")
    for name, tool in tool_commands().items():
        p = sub.add_parser(name, help=tool.help, description=tool.help)
        tool.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    tools = tool_commands()
    if args.command in tools:
        if rest:
            parser.error(f"unexpected arguments: {' '.join(rest)}")
        return tools[args.command].run(args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _, default, fn = COMMANDS[args.command]
    try:
        cfg = _load(args, rest, default)
    except ConfigError as e:
        print(f"distrain: config error: {e}", file=sys.stderr)
        return 2
    from distrain.runtime.resume import ResumeMismatchError

    try:
        if fn is cmd_train:
            from distrain.runtime.faults import Fault

            try:
                [Fault.parse(f) for f in args.fault]
            except ValueError as e:
                print(f"distrain: config error: {e}", file=sys.stderr)
                return 2
            return fn(cfg, args.fault)
        return fn(cfg)
    except ResumeMismatchError as e:
        print(f"distrain: cannot resume: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
