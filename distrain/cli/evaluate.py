"""``distrain eval RUN_DIR --data FILE``: perplexity of a run's global weights (or an exported HF
directory's) on a text file, tokenised with the run's tokenizer."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distrain.cli.command import ToolCommand


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, or a Hugging Face LLaMA directory")
    p.add_argument("--data", required=True, help="a UTF-8 text file, scored as one document")
    p.add_argument("--step", type=int, default=None, help="the run's checkpoint step (default: the newest)")
    p.add_argument("--seq-len", type=int, default=0, help="window length (default: the run's data.seq_len)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))


def run(args: argparse.Namespace) -> int:
    from distrain.data.tokenizer import TokenizerError
    from distrain.inference import load_model, score, text_ids
    from distrain.inner.devices import resolve_device
    from distrain.weights.source import WeightsError

    try:
        if args.seq_len < 0 or args.batch_size < 1:
            raise ValueError("--seq-len must be >= 0 and --batch-size >= 1")
        path = Path(args.data)
        if not path.is_file():
            raise ValueError(f"--data {args.data} is not a file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--data {args.data} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        loaded = load_model(args.run_dir, args.step, resolve_device(args.device))
        result = score(loaded.model, text_ids(loaded.tokenizer, text), args.seq_len or loaded.source.seq_len,
                       args.batch_size)
    except (WeightsError, TokenizerError, ValueError, OSError, RuntimeError) as e:
        print(f"distrain eval: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"source": str(loaded.source.root), "step": loaded.source.step, "data": str(path),
                      "loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens}, indent=1))
    return 0


COMMAND = ToolCommand("perplexity of a run's global weights on a text file", add_arguments, run)
