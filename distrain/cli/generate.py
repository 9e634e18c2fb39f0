"""``distrain generate RUN_DIR --prompt TEXT``: sample text from a run's global weights (or an exported HF directory)."""

from __future__ import annotations

import argparse
import sys

from distrain.cli.command import ToolCommand


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, or a Hugging Face LLaMA directory")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--step", type=int, default=None, help="the run's checkpoint step (default: the newest)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))


def run(args: argparse.Namespace) -> int:
    from distrain.data.tokenizer import TokenizerError
    from distrain.inference import load_model, sample, text_ids
    from distrain.inner.devices import resolve_device
    from distrain.weights.source import WeightsError

    try:
        if args.max_new_tokens < 0 or args.top_k < 0 or args.temperature < 0:
            raise ValueError("--max-new-tokens, --top-k and --temperature must be >= 0")
        loaded = load_model(args.run_dir, args.step, resolve_device(args.device))
        new = sample(loaded.model, text_ids(loaded.tokenizer, args.prompt), args.max_new_tokens, args.temperature,
                     args.top_k, args.seed)
    except (WeightsError, TokenizerError, ValueError, OSError, RuntimeError) as e:
        print(f"distrain generate: {e}", file=sys.stderr)
        return 2
    print(args.prompt + loaded.tokenizer.decode(new))
    return 0


COMMAND = ToolCommand("sample text from a run's global weights", add_arguments, run)
