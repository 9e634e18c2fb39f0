"""Atomic checkpoints: ``checkpoints/step-N/`` (state.pt + meta.json) and a ``latest`` pointer.

A checkpoint directory only appears under its final name once fully written and fsynced, so a
crash mid-write leaves a temp directory, never a half checkpoint. Each state file carries its
sha256 in meta.json; a corrupt or truncated one — or a meta.json of the wrong shape — is detected
on load and the previous good checkpoint is used instead, with a warning naming what was wrong.

Resuming with another configuration is refused before any state is loaded into a model: a
checkpoint written with ``config=cfg.to_dict()`` stores it in meta.json, and ``load_latest`` /
``resolve_resume`` given the current ``config`` compare the two (``comparable_config``: everything
except the keys a resume may change, ``RESUME_MAY_CHANGE``) and raise a ``CheckpointError`` that
names every differing key. The ``latest`` pointer is a hint: the newest checkpoint that verifies is
used, and a pointer that is missing, names an older or absent step, or escapes the directory is
reported, not followed.
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
from typing import Any, Iterable, Mapping

import torch

FORMAT_VERSION = 1
STATE_FILE = "state.pt"
META_FILE = "meta.json"
LATEST = "latest"
_STEP_RE = re.compile(r"^step-(\d+)$")
CONFIG_KEY = "config"  # meta.json: the run's configuration as nested tables (Config.to_dict())
# Dotted keys (a key covers everything below it) that may differ between a checkpoint and the
# configuration resuming it: the run length and evaluation schedule, names and places, logging,
# checkpointing, the device and thread count, timeouts, and the weights a fresh run would start from.
RESUME_MAY_CHANGE: tuple[str, ...] = (
    "train.steps", "train.eval_every", "train.eval_batches", "logging", "checkpoint", "run.name",
    "run.out_dir", "run.device", "runtime.torch_threads", "topology.round_timeout_s", "model.init_from",
)

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


def save_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int = 3,
                    config: Mapping[str, Any] | None = None) -> Path:
    """Write ``state`` as ``ckpt_dir/step-<step>`` atomically, move ``latest``, prune old ones.

    ``config``: the run's configuration as nested dicts (``cfg.to_dict()``), stored in meta.json so
    a resume can name what differs."""
    if config is not None:
        meta = {**meta, CONFIG_KEY: json.loads(json.dumps(dict(config)))}  # JSON-clean copy, fails early
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


def _check_meta(path: Path, meta: Any) -> dict[str, Any]:
    """meta.json must be a table with an int step and the checksum fields; else CheckpointError."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / META_FILE}: metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path / META_FILE}: 'step' must be a non-negative integer, got {step!r}")
    m = _STEP_RE.match(path.name)
    if m and int(m.group(1)) != step:
        raise CheckpointError(f"{path / META_FILE}: says step {step} but the directory is {path.name}")
    if not isinstance(meta.get("state_sha256"), str) or isinstance(meta.get("state_bytes"), bool) \
            or not isinstance(meta.get("state_bytes"), int):
        raise CheckpointError(f"{path / META_FILE}: 'state_sha256' (str) and 'state_bytes' (int) are required")
    if CONFIG_KEY in meta and not isinstance(meta[CONFIG_KEY], dict):
        raise CheckpointError(f"{path / META_FILE}: '{CONFIG_KEY}' must be a table, got {type(meta[CONFIG_KEY]).__name__}")
    return meta


def check_checkpoint_dir(path: Path) -> int:
    """The step of the checkpoint directory ``path`` after checking its shape (name, files, metadata)
    without reading the state: what a run checks of ``checkpoint.resume`` before it creates anything."""
    path = Path(path)
    if not _STEP_RE.match(path.name):
        raise CheckpointError(f"{path} is not a step-N checkpoint directory")
    meta_path = path / META_FILE
    if not meta_path.is_file() or not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path} holds no checkpoint (no {META_FILE} and {STATE_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{meta_path}: unreadable metadata ({e})") from None
    return int(_check_meta(path, meta)["step"])


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load one checkpoint directory, verifying metadata shape, format version, size and checksum first."""
    path = Path(path)
    meta_path, state_path = path / META_FILE, path / STATE_FILE
    if not meta_path.is_file() or not state_path.is_file():
        raise CheckpointError(f"{path}: missing {META_FILE} or {STATE_FILE}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{meta_path}: unreadable metadata ({e})") from e
    meta = _check_meta(path, meta)
    size = state_path.stat().st_size
    if size != meta["state_bytes"]:
        raise CheckpointError(f"{state_path}: truncated ({size} bytes, metadata says {meta['state_bytes']})")
    if _sha256(state_path) != meta["state_sha256"]:
        raise CheckpointError(f"{state_path}: checksum mismatch (corrupt file)")
    try:
        state = torch.load(state_path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CheckpointError(f"{state_path}: cannot be loaded ({e})") from e
    return LoadedCheckpoint(path, meta["step"], state, meta)


# ----- configuration comparison --------------------------------------------------------------------
def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def comparable_config(config: Mapping[str, Any], may_change: Iterable[str] = RESUME_MAY_CHANGE) -> dict[str, Any]:
    """The configuration as dotted keys, without those a resume may change (and what lies below them)."""
    skip = tuple(may_change)
    return {k: v for k, v in _flatten(config).items()
            if not any(k == s or k.startswith(s + ".") for s in skip)}


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       may_change: Iterable[str] = RESUME_MAY_CHANGE) -> list[str]:
    """``key: saved (checkpoint) vs current (config)`` for every comparable key that differs."""
    a, b = comparable_config(saved, may_change), comparable_config(current, may_change)
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            fa = "absent" if va is missing else json.dumps(va)
            fb = "absent" if vb is missing else json.dumps(vb)
            out.append(f"{key}: {fa} (checkpoint) vs {fb} (config)")
    return out


def check_config(loaded: LoadedCheckpoint, config: Mapping[str, Any] | None,
                 may_change: Iterable[str] = RESUME_MAY_CHANGE) -> None:
    """Raise CheckpointError naming every differing key when ``config`` cannot resume ``loaded``."""
    if config is None:
        return
    saved = loaded.meta.get(CONFIG_KEY)
    if saved is None:
        log.warning("%s stores no configuration (older checkpoint): cannot check that it fits this config", loaded.path)
        return
    diff = config_differences(saved, config, may_change)
    if diff:
        shown = "; ".join(diff[:12]) + (f"; and {len(diff) - 12} more" if len(diff) > 12 else "")
        raise CheckpointError(f"{loaded.path} was written with another configuration: {shown}")


# ----- choosing the checkpoint to resume -----------------------------------------------------------
def _pointer_note(ckpt_dir: Path, candidates: list[Path]) -> tuple[Path | None, str | None]:
    """(checkpoint the ``latest`` pointer names, or None; why it is not usable, or None)."""
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None, f"{ckpt_dir}: no '{LATEST}' pointer"
    try:
        text = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{pointer}: unreadable ({e})"
    if not _STEP_RE.match(text):
        return None, f"{pointer} names {text[:80]!r}, which is not a step-N directory of {ckpt_dir}"
    named = ckpt_dir / text
    if named not in candidates:
        return None, f"{pointer} names {text}, which does not exist"
    return named, None


def load_latest(ckpt_dir: Path, map_location: str | torch.device = "cpu",
                config: Mapping[str, Any] | None = None) -> LoadedCheckpoint | None:
    """The newest checkpoint that verifies; falls back past corrupt ones, warning about each.

    The ``latest`` pointer is checked, not trusted: when it is missing, unusable, or names an older
    step than the newest good checkpoint, a warning says so and the newest good one is used.
    ``config`` (current ``cfg.to_dict()``): raise CheckpointError when the checkpoint's differs.
    Returns None when there is no checkpoint at all; raises CheckpointError when checkpoints exist
    but none of them is usable.
    """
    ckpt_dir = Path(ckpt_dir)
    candidates = list_checkpoints(ckpt_dir)
    if not candidates:
        return None
    named, problem = _pointer_note(ckpt_dir, candidates)
    errors = []
    for path in candidates:
        try:
            loaded = read_checkpoint(path, map_location)
        except CheckpointError as e:
            log.warning("skipping unusable checkpoint: %s", e)
            errors.append(str(e))
            continue
        if problem is not None:
            log.warning("%s; using the newest good checkpoint %s", problem, path.name)
        elif named is not None and named != path:
            if _step_of(named) < loaded.step:
                log.warning("%s names %s, but %s is newer and verifies; using %s", ckpt_dir / LATEST, named.name,
                            path.name, path.name)
        check_config(loaded, config)
        return loaded
    raise CheckpointError("no usable checkpoint in " + str(ckpt_dir) + ": " + "; ".join(errors))


def _step_of(path: Path) -> int:
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else -1


def resolve_resume(resume: str, ckpt_dir: Path, map_location: str | torch.device = "cpu",
                   config: Mapping[str, Any] | None = None) -> LoadedCheckpoint | None:
    """``none`` → None; ``auto`` → newest good checkpoint (or None); a path → exactly that one.

    ``config``: the current ``cfg.to_dict()``; a checkpoint written with another configuration
    (outside ``RESUME_MAY_CHANGE``) raises CheckpointError naming the differing keys."""
    if resume == "none":
        return None
    if resume == "auto":
        return load_latest(ckpt_dir, map_location, config)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.resume: {resume} is not a checkpoint directory")
    loaded = read_checkpoint(path, map_location)
    check_config(loaded, config)
    return loaded


def resume_line(loaded: LoadedCheckpoint) -> str:
    """The one line a resumed run prints (always, not only with -v)."""
    extra = "".join(f", {k} {loaded.meta[k]}" for k in ("round", "tokens") if k in loaded.meta)
    return f"resumed from {loaded.path} (step {loaded.step}{extra})"
