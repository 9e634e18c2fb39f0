"""Atomic checkpoint directories: ``checkpoints/step-N/`` (manifest.json + safetensors parts) and ``latest``.

A checkpoint is written into a temp directory by whoever holds the state (one process, or every
rank of a job, each writing its own parts: ``write_part``), then committed once (``commit_step``):
the manifest names every part with its size and sha256, is fsynced, and the directory is renamed
to its final name — so a crash mid-write leaves a temp directory, never a half checkpoint, and a
part another process never wrote makes the commit fail. Tensors are stored as safetensors (no
pickle anywhere: reading a forged file can only fail), small state as JSON in the part's header.

On load every part is verified against the manifest (size, checksum) before it is decoded; a
corrupt or truncated part, a manifest of the wrong shape or a path that escapes the directory is a
``CheckpointError`` naming what is wrong (in one line), and the caller falls back to an older step.
The ``latest`` pointer is a hint: the newest step directory is tried first, and a pointer that is
missing, names an older or absent step, or escapes the directory is reported, not followed.
Directories of the per-rank format of earlier versions (``checkpoints/rank-K/step-N``) are refused
with one line (``OLD_FORMAT``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
LATEST = "latest"
STEP_RE = re.compile(r"^step-(\d+)$")
_REL_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_META_KEY = "distrain"  # the part's JSON state, in the safetensors header's __metadata__
OLD_FORMAT = ("holds per-rank checkpoints (checkpoints/rank-K/step-N) of an earlier distrain version, which this "
              "version neither resumes nor reads: resume or export it with the version that wrote it")

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt, forged or of an unknown format."""


@dataclass
class Part:
    """One file of a checkpoint: tensors by name, and small JSON-able state beside them."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def encode_part(part: Part) -> bytes:
    """safetensors bytes: the tensors (contiguous CPU copies) and ``meta`` as JSON in the header."""
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in part.tensors.items()}
    return st_save(tensors, metadata={_META_KEY: json.dumps(part.meta, sort_keys=True)})


def decode_part(data: bytes, where: str) -> Part:
    """The inverse of ``encode_part``; anything malformed is a CheckpointError naming ``where``."""
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        meta = json.loads(header.get("__metadata__", {}).get(_META_KEY, "{}"))
        tensors = st_load(data)
    except Exception as e:  # noqa: BLE001 - a part that does not decode is unusable, whatever the reason
        raise CheckpointError(f"{where}: not a readable safetensors part ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: its state must be a JSON object, got {type(meta).__name__}")
    return Part(tensors, meta)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def check_rel(rel: Any) -> str:
    """A part's path inside the step directory: relative, no ``..``, plain characters (a forged
    manifest must not make a reader open files elsewhere)."""
    if not isinstance(rel, str) or not _REL_RE.match(rel) or any(p in (".", "..") for p in rel.split("/")):
        raise CheckpointError(f"part path {str(rel)[:80]!r} is not a plain relative path")
    return rel


# ----- writing ------------------------------------------------------------------------------------
def begin_step(ckpt_dir: Path, step: int) -> Path:
    """A fresh temp directory for the checkpoint of ``step`` (every writer puts its parts there)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f".tmp-step-{step}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    return tmp


def write_part(tmp: Path, rel: str, part: Part) -> dict[str, Any]:
    """Write one part into the temp directory (fsynced); its manifest entry (size, sha256)."""
    check_rel(rel)
    data = encode_part(part)
    path = Path(tmp) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    _write_synced(partial, data)
    os.replace(partial, path)
    _fsync_dir(path.parent)
    return {"sha256": _sha256(data), "bytes": len(data)}


def commit_step(ckpt_dir: Path, tmp: Path, step: int, manifest: dict[str, Any], files: dict[str, dict[str, Any]],
                keep: int = 3) -> Path:
    """Make the checkpoint in ``tmp`` the step's: every listed part present with its size, the
    manifest written and fsynced, the directory renamed, ``latest`` moved, old steps pruned.
    On any failure the temp directory is removed and nothing else changes."""
    ckpt_dir, tmp = Path(ckpt_dir), Path(tmp)
    final = ckpt_dir / f"step-{step}"
    try:
        for rel, entry in files.items():
            p = tmp / check_rel(rel)
            if not p.is_file() or p.stat().st_size != entry["bytes"]:
                raise CheckpointError(f"{p}: part missing or of the wrong size at commit")
        full = {**manifest, "format_version": FORMAT_VERSION, "step": step, "files": dict(sorted(files.items()))}
        _write_synced(tmp / MANIFEST, json.dumps(full, indent=1, sort_keys=True).encode())
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


def abort_step(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def _prune(ckpt_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(ckpt_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


# ----- reading ------------------------------------------------------------------------------------
def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoint directories, newest step first (not yet verified)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def is_old_format(ckpt_dir: Path) -> bool:
    """``checkpoints/`` holds the per-rank layout of earlier versions (and no step directory)."""
    ckpt_dir = Path(ckpt_dir)
    return ckpt_dir.is_dir() and not list_checkpoints(ckpt_dir) and any(
        p.is_dir() and re.match(r"^(rank-\d+|coordinator)$", p.name) for p in ckpt_dir.iterdir())


def checkpoint_steps(ckpt_dir: Path) -> list[int]:
    """Steps checkpointed in ``ckpt_dir``, newest first, with a warning when ``latest`` disagrees;
    a CheckpointError for a directory of the old per-rank format."""
    ckpt_dir = Path(ckpt_dir)
    if is_old_format(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir} {OLD_FORMAT}")
    found = list_checkpoints(ckpt_dir)
    if found:
        problem = _pointer_note(ckpt_dir, found)
        if problem:
            log.warning("%s; trying the newest checkpoint %s first", problem, found[0].name)
    return [int(STEP_RE.match(p.name).group(1)) for p in found]  # type: ignore[union-attr]


def _pointer_note(ckpt_dir: Path, candidates: list[Path]) -> str | None:
    """Why the ``latest`` pointer does not name the newest checkpoint, or None."""
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return f"{ckpt_dir}: no '{LATEST}' pointer"
    try:
        text = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        return f"{pointer}: unreadable ({e})"
    if not STEP_RE.match(text):
        return f"{pointer} names {text[:80]!r}, which is not a step-N directory of {ckpt_dir}"
    if ckpt_dir / text not in candidates:
        return f"{pointer} names {text}, which does not exist"
    if ckpt_dir / text != candidates[0]:
        return f"{pointer} names {text}, but {candidates[0].name} is newer"
    return None


def _int(meta: dict[str, Any], key: str, where: Path) -> int:
    v = meta.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise CheckpointError(f"{where}: '{key}' must be a non-negative integer, got {v!r}")
    return v


def check_manifest(path: Path, manifest: Any) -> dict[str, Any]:
    """manifest.json must be a table of the current format, for this step, listing its parts."""
    where = path / MANIFEST
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{where}: the manifest must be a JSON object, got {type(manifest).__name__}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    step = _int(manifest, "step", where)
    m = STEP_RE.match(path.name)
    if m and int(m.group(1)) != step:
        raise CheckpointError(f"{where}: says step {step} but the directory is {path.name}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{where}: 'files' must be a table of parts")
    for rel, entry in files.items():
        check_rel(rel)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                or not _SHA_RE.match(entry["sha256"]):
            raise CheckpointError(f"{where}: part {rel} needs a sha256 (64 hex digits)")
        _int(entry, "bytes", where)
    if "config" in manifest and not isinstance(manifest["config"], dict):
        raise CheckpointError(f"{where}: 'config' must be a table, got {type(manifest['config']).__name__}")
    return manifest


def read_manifest(path: Path) -> dict[str, Any]:
    """The verified manifest of the checkpoint directory ``path``; every part it lists must exist
    with its size (checksums are verified when a part is read)."""
    path = Path(path)
    where = path / MANIFEST
    if not where.is_file():
        raise CheckpointError(f"{path} holds no checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(where.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{where}: unreadable manifest ({e})") from None
    manifest = check_manifest(path, manifest)
    for rel, entry in manifest["files"].items():
        p = path / rel
        if not p.is_file():
            raise CheckpointError(f"{p}: missing")
        size = p.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{p}: truncated ({size} bytes, the manifest says {entry['bytes']})")
    return manifest


def read_part(path: Path, manifest: dict[str, Any], rel: str) -> Part:
    """One part of the checkpoint at ``path``, verified (size, sha256) before it is decoded."""
    entry = manifest["files"].get(check_rel(rel))
    if entry is None:
        raise CheckpointError(f"{path / MANIFEST}: lists no part {rel}")
    p = Path(path) / rel
    try:
        data = p.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{p}: unreadable ({e})") from None
    if len(data) != entry["bytes"]:
        raise CheckpointError(f"{p}: truncated ({len(data)} bytes, the manifest says {entry['bytes']})")
    if _sha256(data) != entry["sha256"]:
        raise CheckpointError(f"{p}: checksum mismatch (corrupt file)")
    return decode_part(data, str(p))


def check_checkpoint_dir(path: Path) -> int:
    """The step of the checkpoint directory ``path`` after checking its shape (name, manifest, parts
    present) without reading tensors: what a run checks of ``checkpoint.resume`` before it starts."""
    path = Path(path)
    if not STEP_RE.match(path.name):
        raise CheckpointError(f"{path} is not a step-N checkpoint directory")
    if path.parent.name.startswith("rank-") or is_old_format(path.parent.parent):
        raise CheckpointError(f"{path.parent.parent} {OLD_FORMAT}")
    return int(read_manifest(path)["step"])


def read_all(path: Path) -> dict[str, Part]:
    """Every part of the checkpoint at ``path``, verified (tools and tests; a resume reads only its own)."""
    manifest = read_manifest(path)
    return {rel: read_part(path, manifest, rel) for rel in manifest["files"]}
