"""What every launch mode shares around the loop: run directory, data, the resume point."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from distrain.config import Config, save_config
from distrain.data import PreparedData, TokenSampler, prepare, read_shard
from distrain.worker.initial import warn_on_another_tokenizer

Batch = tuple[torch.Tensor, torch.Tensor]


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.run.out_dir) / cfg.run.name


def setup_run_dir(cfg: Config) -> Path:
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.toml")
    return run_dir


def prepare_data(cfg: Config, progress: bool = False) -> PreparedData:
    """Tokenise the configured source (cached) and fix the model's vocabulary size from it."""
    data = prepare(cfg.data, cfg.run.seed, progress=progress)
    if cfg.model.vocab_size and cfg.model.vocab_size < data.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {data.vocab_size}")
    if not cfg.model.vocab_size:
        cfg.model.vocab_size = data.vocab_size
    warn_on_another_tokenizer(cfg, data.tokenizer_path)
    return data


def keep_tokenizer(run_dir: Path, data: PreparedData) -> None:
    """Copy the run's tokenizer into its directory, so ``distrain export``/``eval``/``generate`` find it
    there whatever becomes of the data cache (written atomically; unchanged content is left alone)."""
    kept = Path(run_dir) / "tokenizer.json"
    text = data.tokenizer_path.read_bytes()
    if kept.is_file() and kept.read_bytes() == text:
        return
    tmp = kept.with_name(f".tokenizer.json.{os.getpid()}.tmp")
    tmp.write_bytes(text)
    os.replace(tmp, kept)


def validation_batches(cfg: Config, data: PreparedData) -> list[Batch]:
    val = TokenSampler(read_shard(data.val_path), cfg.data.seq_len, cfg.train.batch_size, 0, 1, cfg.run.seed)
    return val.val_batches(cfg.train.eval_batches)


def apply_torch_threads(cfg: Config) -> None:
    """``runtime.torch_threads`` > 0 pins torch's intra-op threads: results depend on it bit-wise."""
    if cfg.runtime.torch_threads > 0:
        torch.set_num_threads(cfg.runtime.torch_threads)


def wanted_resume_step(cfg: Config) -> int | None:
    """``checkpoint.resume`` as a path to a ``step-N`` directory: that step (None for none/auto)."""
    if cfg.checkpoint.resume in ("none", "auto"):
        return None
    name = Path(cfg.checkpoint.resume).name
    if not name.startswith("step-") or not name[5:].isdigit():
        raise ValueError(f"checkpoint.resume: {cfg.checkpoint.resume} is not a step-N checkpoint directory")
    return int(name[5:])


def newest_common_step(steps_per_rank: list[list[int]], exclude: set[int] = frozenset()) -> int | None:
    """The newest step every process sees a checkpoint of (the agreed resume point), or None."""
    if not steps_per_rank:
        return None
    common = set(steps_per_rank[0]).intersection(*map(set, steps_per_rank[1:])) - set(exclude)
    return max(common) if common else None
