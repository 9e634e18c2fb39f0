"""Inner-loop training throughput (tokens/s) of model presets on this machine.

    python bench/train_throughput.py [--presets test 20m] [--steps 8] [--seq-len 256]

Random tokens: throughput does not depend on the data. Writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import command, machine

from distrain.config import ModelConfig, TrainConfig
from distrain.model import MODEL_PRESETS, build_model, count_parameters
from distrain.inner.devices import resolve_device
from distrain.inner.single import SingleSchedule

RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.json"


def measure(preset: str, vocab: int, seq_len: int, batch: int, steps: int, warmup: int) -> dict:
    cfg = ModelConfig(**{**MODEL_PRESETS[preset], "vocab_size": vocab, "max_seq_len": max(seq_len, 256)})
    device = resolve_device("auto")
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    gen = torch.Generator().manual_seed(0)

    def batch_fn():
        x = torch.randint(0, vocab, (batch, seq_len + 1), generator=gen)
        return x[:, :-1], x[:, 1:]

    trainer = SingleSchedule(model, TrainConfig(steps=steps + warmup, warmup_steps=1), batch_fn, device)
    for _ in range(warmup):
        trainer.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    reports = [trainer.train_step() for _ in range(steps)]
    float(torch.stack([torch.as_tensor(r.loss) for r in reports]).mean())  # the one read per round
    dt = time.perf_counter() - t0
    return {"params": count_parameters(model), "tokens_per_s": sum(r.tokens for r in reports) / dt,
            "seq_len": seq_len, "batch_size": batch, "vocab_size": vocab, "steps": steps,
            "host_syncs_per_step": host_syncs_per_step(trainer, steps) if device.type == "cuda" else None}


def host_syncs_per_step(trainer: SingleSchedule, steps: int) -> float:
    """Synchronising CUDA calls per inner step (torch's sync debug mode counts them as warnings);
    the inner step is meant to make none (the worker reads the round's loss once)."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["test", "tiny", "20m"])
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    models = {}
    for p in args.presets:
        models[p] = measure(p, args.vocab, args.seq_len, args.batch, args.steps, args.warmup)
        print(f"{p:>6}: {models[p]['params'] / 1e6:7.2f}M params  {models[p]['tokens_per_s']:10.0f} tokens/s", flush=True)
    out = {"models": models, "machine": machine(),
           "command": command("bench/train_throughput.py")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
