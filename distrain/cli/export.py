"""``distrain export RUN_DIR [--step N] --out DIR``: a run's global weights as a Hugging Face LLaMA directory."""

from __future__ import annotations

import argparse
import sys

from distrain.cli.command import ToolCommand


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (runs/<name>) with checkpoints")
    p.add_argument("--step", type=int, default=None, help="the checkpoint step to export (default: the newest)")
    p.add_argument("--out", required=True, help="directory for config.json, model.safetensors and the tokenizer")


def run(args: argparse.Namespace) -> int:
    from distrain.weights.export import export_run
    from distrain.weights.source import WeightsError

    try:
        done = export_run(args.run_dir, args.out, args.step)
    except (WeightsError, OSError) as e:
        print(f"distrain export: {e}", file=sys.stderr)
        return 2
    print(f"exported step {done.source.step} of {done.source.root} ({done.parameters:,} parameters) to {done.out}")
    for path in done.files:
        print(path)
    return 0


COMMAND = ToolCommand("write a run's global weights as a Hugging Face LLaMA directory (safetensors)",
                      add_arguments, run)
