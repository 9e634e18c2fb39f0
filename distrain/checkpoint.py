"""Atomic checkpoints: ``checkpoints/step-N/`` (state.pt + meta.json) and a ``latest`` pointer.

A checkpoint directory only appears under its final name once fully written and fsynced, so a
crash mid-write leaves a temp directory, never a half checkpoint. Each state file carries its
sha256 in meta.json; a corrupt or truncated one is detected on load and the previous good
checkpoint is used instead, with a warning naming what was wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
STATE_FILE = "state.pt"
META_FILE = "meta.json"
LATEST = "latest"
_STEP_RE = re.compile(r"^step-(\d+)$")

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or of an unknown format."""


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    state: dict[str, Any]
    meta: dict[str, Any]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int = 3) -> Path:
    """Write ``state`` as ``ckpt_dir/step-<step>`` atomically, move ``latest``, prune old ones."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step}"
    tmp = ckpt_dir / f".tmp-step-{step}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        state_path = tmp / STATE_FILE
        with open(state_path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        full_meta = {**meta, "format_version": FORMAT_VERSION, "step": step, "state_sha256": _sha256(state_path),
                     "state_bytes": state_path.stat().st_size}
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=1, sort_keys=True))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer_tmp = ckpt_dir / f".{LATEST}.tmp-{os.getpid()}"
    pointer_tmp.write_text(final.name + "\n")
    os.replace(pointer_tmp, ckpt_dir / LATEST)
    _fsync_dir(ckpt_dir)
    _prune(ckpt_dir, keep)
    return final


def _prune(ckpt_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(ckpt_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoint directories, newest step first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load one checkpoint directory, verifying format version, size and checksum first."""
    meta_path, state_path = path / META_FILE, path / STATE_FILE
    if not meta_path.is_file() or not state_path.is_file():
        raise CheckpointError(f"{path}: missing {META_FILE} or {STATE_FILE}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable metadata ({e})") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    size = state_path.stat().st_size
    if size != meta.get("state_bytes"):
        raise CheckpointError(f"{state_path}: truncated ({size} bytes, metadata says {meta.get('state_bytes')})")
    if _sha256(state_path) != meta.get("state_sha256"):
        raise CheckpointError(f"{state_path}: checksum mismatch (corrupt file)")
    try:
        state = torch.load(state_path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CheckpointError(f"{state_path}: cannot be loaded ({e})") from e
    return LoadedCheckpoint(path, int(meta["step"]), state, meta)


def load_latest(ckpt_dir: Path, map_location: str | torch.device = "cpu") -> LoadedCheckpoint | None:
    """The newest checkpoint that verifies; falls back past corrupt ones, warning about each.

    Returns None when there is no checkpoint at all; raises CheckpointError when checkpoints exist
    but none of them is usable.
    """
    candidates = list_checkpoints(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        named = ckpt_dir / pointer.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    if not candidates:
        return None
    errors = []
    for path in candidates:
        try:
            return read_checkpoint(path, map_location)
        except CheckpointError as e:
            log.warning("skipping unusable checkpoint: %s", e)
            errors.append(str(e))
    raise CheckpointError("no usable checkpoint in " + str(ckpt_dir) + ": " + "; ".join(errors))


def resolve_resume(resume: str, ckpt_dir: Path, map_location: str | torch.device = "cpu") -> LoadedCheckpoint | None:
    """``none`` → None; ``auto`` → newest good checkpoint (or None); a path → exactly that one."""
    if resume == "none":
        return None
    if resume == "auto":
        return load_latest(ckpt_dir, map_location)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.resume: {resume} is not a checkpoint directory")
    return read_checkpoint(path, map_location)
