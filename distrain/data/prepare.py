"""Turn a text source into train/validation token shards plus a tokenizer, cached by content key.

The source is read in three streaming passes so memory stays bounded by one encode batch, not by
the corpus: (1) count documents and their sizes, which fixes the seeded train/validation split by
document; (2) train the BPE on a seeded sample of *training* documents (validation text never
shapes the tokenizer); (3) encode in parallel batches and append ``doc + <eos>`` to the shard of
its split. The cache key hashes everything that changes the output, and ``manifest.json`` is
written last, so an interrupted run is simply redone and a finished one is never re-tokenized.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from distrain.config import DataConfig
from distrain.data.corpus import CorpusError, iter_documents, source_fingerprint
from distrain.data.shards import ShardFormatError, ShardWriter, read_header
from distrain.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

PREPARE_VERSION = 1  # bump when the output for the same inputs changes
TOKENIZER_SAMPLE_BYTES = 16_000_000  # BPE training text; merges barely change beyond this
_BATCH_BYTES = 4_000_000  # text per encode batch: large enough to keep the Rust threads busy
_BATCH_DOCS = 4096
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class PreparedData:
    train_path: Path
    val_path: Path
    tokenizer_path: Path
    vocab_size: int
    eos_id: int
    train_tokens: int
    val_tokens: int
    cached: bool = False  # True when loaded from the cache without reading the source


def _tokenizer_identity(data_cfg: DataConfig) -> dict[str, object]:
    if data_cfg.tokenizer:
        p = Path(data_cfg.tokenizer).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {p}")
        return {"file_sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    # vocab_size only shapes a tokenizer we train, so a user's tokenizer ignores it.
    return {"train": "bytelevel-bpe", "vocab_size": data_cfg.vocab_size, "sample_bytes": TOKENIZER_SAMPLE_BYTES}


def cache_key(data_cfg: DataConfig, seed: int) -> str:
    """Hash of everything that determines the prepared output."""
    ident = {
        "version": PREPARE_VERSION,
        "source": source_fingerprint(data_cfg.source),
        "tokenizer": _tokenizer_identity(data_cfg),
        "max_bytes": data_cfg.max_bytes,
        "val_fraction": data_cfg.val_fraction,
        "text_key": data_cfg.text_key,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def _check_cfg(data_cfg: DataConfig) -> None:
    if not 0.0 <= data_cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {data_cfg.val_fraction}")
    if data_cfg.max_bytes < 0:
        raise ValueError(f"data.max_bytes must be >= 0 (0: no cap), got {data_cfg.max_bytes}")


def split_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation documents: a seeded choice of round(n·fraction), at least one
    and at most n-1 when the fraction is positive."""
    if n_docs == 0:
        raise CorpusError("source has no documents (empty, or max_bytes too small)")
    if val_fraction == 0:
        return np.zeros(n_docs, dtype=bool)
    if n_docs < 2:
        raise CorpusError(
            "source has a single document; cannot split train/validation by document "
            "(set data.val_fraction = 0 or provide more documents)"
        )
    n_val = min(max(round(n_docs * val_fraction), 1), n_docs - 1)
    mask = np.zeros(n_docs, dtype=bool)
    mask[np.random.default_rng([seed, 1]).permutation(n_docs)[:n_val]] = True
    return mask


def _tokenizer_sample(sizes: np.ndarray, is_val: np.ndarray, seed: int) -> np.ndarray:
    """Mask of training documents, in seeded random order, up to TOKENIZER_SAMPLE_BYTES of text."""
    train_idx = np.flatnonzero(~is_val)
    order = np.random.default_rng([seed, 2]).permutation(train_idx)
    take = order[np.cumsum(sizes[order]) <= TOKENIZER_SAMPLE_BYTES]
    if take.size == 0:
        take = order[:1]  # one document larger than the budget
    mask = np.zeros(sizes.size, dtype=bool)
    mask[take] = True
    return mask


def _docs(data_cfg: DataConfig) -> Iterator[str]:
    return iter_documents(data_cfg.source, text_key=data_cfg.text_key, max_bytes=data_cfg.max_bytes)


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= _BATCH_BYTES or len(batch) >= _BATCH_DOCS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive lock so concurrent ranks preparing the same key wait and then hit the cache."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): atomic renames still keep files whole
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_cached(out: Path) -> PreparedData | None:
    mf = out / MANIFEST
    if not mf.is_file():
        return None
    try:
        m = json.loads(mf.read_text())
        data = PreparedData(
            train_path=out / m["train"], val_path=out / m["val"], tokenizer_path=out / m["tokenizer"],
            vocab_size=int(m["vocab_size"]), eos_id=int(m["eos_id"]),
            train_tokens=int(m["train_tokens"]), val_tokens=int(m["val_tokens"]), cached=True,
        )
        for path, n in ((data.train_path, data.train_tokens), (data.val_path, data.val_tokens)):
            h = read_header(path)
            if h.count != n or h.vocab_size != data.vocab_size:
                raise ShardFormatError(f"{path}: holds {h.count} tokens, manifest says {n}")
        if not data.tokenizer_path.is_file():
            raise FileNotFoundError(f"tokenizer missing: {data.tokenizer_path}")
    except (ValueError, KeyError, TypeError, OSError) as e:
        log.warning("prepared data in %s is unusable (%s); preparing it again", out, e)
        mf.unlink(missing_ok=True)
        return None
    return data


def _write_manifest(out: Path, data: PreparedData, data_cfg: DataConfig, seed: int) -> None:
    m = {
        "train": data.train_path.name, "val": data.val_path.name, "tokenizer": data.tokenizer_path.name,
        "vocab_size": data.vocab_size, "eos_id": data.eos_id,
        "train_tokens": data.train_tokens, "val_tokens": data.val_tokens,
        "version": PREPARE_VERSION, "seed": seed, "data": asdict(data_cfg),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", suffix=".tmp", dir=out)
    with os.fdopen(fd, "w") as f:
        json.dump(m, f, indent=2)
    os.replace(tmp, out / MANIFEST)


def prepare(data_cfg: DataConfig, seed: int, *, progress: bool = False) -> PreparedData:
    """Prepare (or load from ``data_cfg.cache_dir``) the shards and tokenizer for ``data_cfg``."""
    _check_cfg(data_cfg)
    out = Path(data_cfg.cache_dir).expanduser() / cache_key(data_cfg, seed)
    with _locked(out.with_name(out.name + ".lock")):
        cached = _load_cached(out)
        if cached is not None:
            return cached
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp"):  # left by a killed run; we hold the lock, so none is live
            stale.unlink(missing_ok=True)
        data = _build(data_cfg, seed, out, progress)
        _write_manifest(out, data, data_cfg, seed)
        return data


def _build(data_cfg: DataConfig, seed: int, out: Path, progress: bool) -> PreparedData:
    sizes = np.fromiter((len(d.encode("utf-8")) for d in _docs(data_cfg)), dtype=np.int64)
    is_val = split_documents(sizes.size, data_cfg.val_fraction, seed)

    if data_cfg.tokenizer:
        tok = Tokenizer.from_file(data_cfg.tokenizer)
    else:
        sample = _tokenizer_sample(sizes, is_val, seed)
        tok = Tokenizer.train((d for i, d in enumerate(_docs(data_cfg)) if i < sample.size and sample[i]), data_cfg.vocab_size)
    tok_path = out / "tokenizer.json"
    tok.save(tok_path)

    n_seen = 0
    with contextlib.ExitStack() as stack:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = stack.enter_context(tqdm(total=sizes.size, desc=f"tokenizing {data_cfg.source}", unit="doc"))
        train_w = stack.enter_context(ShardWriter(out / "train.bin", tok.vocab_size))
        val_w = stack.enter_context(ShardWriter(out / "val.bin", tok.vocab_size))
        for batch in _batches(_docs(data_cfg)):
            if n_seen + len(batch) > sizes.size:
                raise CorpusError(f"{data_cfg.source}: source changed while preparing (more documents than counted)")
            split: tuple[list[int], list[int]] = ([], [])
            for j, ids in enumerate(tok.encode_batch(batch)):
                buf = split[int(is_val[n_seen + j])]
                buf.extend(ids)
                buf.append(tok.eos_id)
            train_w.write(np.asarray(split[0], dtype=np.int64))
            val_w.write(np.asarray(split[1], dtype=np.int64))
            n_seen += len(batch)
            if bar is not None:
                bar.update(len(batch))
        if n_seen != sizes.size:
            raise CorpusError(f"{data_cfg.source}: source changed while preparing ({n_seen} documents, counted {sizes.size})")
    return PreparedData(
        train_path=out / "train.bin", val_path=out / "val.bin", tokenizer_path=tok_path,
        vocab_size=tok.vocab_size, eos_id=tok.eos_id, train_tokens=train_w.count, val_tokens=val_w.count,
    )
