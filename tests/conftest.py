"""Shared fixtures: a tiny local corpus and configs small enough for 2 CPU cores."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from distrain.config import Config, load_config

WORDS = ("the model trains on data across slow links while replicas exchange sparse updates "
         "every round and error feedback keeps what was not sent for later rounds").split()


def make_corpus(root: Path, n_docs: int = 60, seed: int = 0) -> Path:
    """Documents with learnable structure (a noisy cycle over a small vocabulary)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        i = rng.randrange(len(WORDS))
        words = []
        for _ in range(rng.randint(80, 200)):
            i = (i + 1) % len(WORDS) if rng.random() < 0.85 else rng.randrange(len(WORDS))
            words.append(WORDS[i])
        (root / f"doc{d:03d}.txt").write_text(" ".join(words) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture
def tiny_config(tiny_corpus, data_cache, tmp_path):
    """A factory for configs of a ~50K-parameter model on the tiny corpus; overrides as CLI strings."""

    def make(*overrides: str) -> Config:
        base = [
            f"--data.source={tiny_corpus}", f"--data.cache_dir={data_cache}", "--data.vocab_size=320",
            "--data.seq_len=32", "--data.val_fraction=0.1", "--model.dim=64", "--model.n_layers=2",
            "--model.n_heads=4", "--model.n_kv_heads=2", "--model.max_seq_len=64", "--train.batch_size=4",
            "--train.warmup_steps=2", "--train.eval_batches=2", f"--run.out_dir={tmp_path / 'runs'}",
            "--logging.progress=false", "--logging.tensorboard=false", "--logging.plots=false",
            "--network.step_time_s=0.1",
        ]
        return load_config(None, base + list(overrides))

    return make
