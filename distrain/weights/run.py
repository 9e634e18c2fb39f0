"""A run's global weights, read from its checkpoints (``checkpoints/step-N``).

A checkpoint holds each segment's global weights once (``global/segment-G.safetensors``), always in
the ordinary parameterisation — a compressed pipeline stage's too, whose own model holds ``U·Z``
factors instead — so a model trained with compressed replicas reads back as an ordinary,
unconstrained one. Runs whose outer step moves no global weights (``none``, ``ddp``) store their
replicas' weights there, which are identical after every step. Parts are verified (size, sha256)
and read as safetensors; nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from distrain.checkpoint import (
    OLD_FORMAT,
    CheckpointError,
    is_old_format,
    list_checkpoints,
    read_manifest,
    read_part,
)
from distrain.weights.shapes import MODEL_FIELDS, parameter_shapes

TOKENIZER = "tokenizer.json"  # the run's tokenizer, kept in its directory
GLOBAL_PREFIX = "global/"


class RunWeightsError(ValueError):
    """A run directory holds no usable checkpoint of its global weights."""


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def is_run_dir(path: Path) -> bool:
    """A distrain run: it has a ``checkpoints`` directory (whose steps ``choose_step`` looks at; one
    of the old per-rank format is refused there in one line)."""
    return checkpoints_dir(path).is_dir()


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps the run checkpointed, newest first."""
    ckpt = checkpoints_dir(run_dir)
    if is_old_format(ckpt):
        raise RunWeightsError(f"{ckpt} {OLD_FORMAT}")
    return [int(p.name.split("-", 1)[1]) for p in list_checkpoints(ckpt)]


def choose_step(run_dir: Path, step: int | None = None) -> int:
    """``step`` when the run checkpointed it, else the newest step; a RunWeightsError otherwise."""
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise RunWeightsError(f"{run_dir} holds no checkpoint (checkpoints/step-N)")
    if step is None:
        return steps[0]
    if step not in steps:
        raise RunWeightsError(f"{run_dir} has no checkpoint of step {step} (steps: {', '.join(map(str, steps))})")
    return step


def _manifest(run_dir: Path, step: int) -> dict[str, Any]:
    try:
        return read_manifest(checkpoints_dir(run_dir) / f"step-{step}")
    except CheckpointError as e:
        raise RunWeightsError(f"unusable checkpoint: {e}") from None


def run_config(run_dir: Path, step: int) -> dict[str, Any]:
    """The configuration a checkpoint was written with (its manifest), as nested tables."""
    cfg = _manifest(run_dir, step).get("config")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        return cfg
    raise RunWeightsError(f"{run_dir}: the checkpoint of step {step} records no configuration")


def model_fields(run_dir: Path, step: int) -> dict[str, Any]:
    """The model settings of a run's checkpoint (with the vocabulary its tokenizer fixed)."""
    model = run_config(run_dir, step)["model"]
    missing = [k for k in MODEL_FIELDS if k not in model]
    if missing or not model.get("vocab_size"):
        raise RunWeightsError(f"{run_dir}: the checkpoint's model settings lack {', '.join(missing) or 'vocab_size'}")
    return {k: model[k] for k in MODEL_FIELDS}


def global_weights(run_dir: Path, step: int, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The run's global weights at ``step`` by parameter name (fp32, CPU); only ``names`` when given."""
    wanted = set(parameter_shapes(model_fields(run_dir, step))) if names is None else set(names)
    path = checkpoints_dir(run_dir) / f"step-{step}"
    manifest = _manifest(run_dir, step)
    found: dict[str, torch.Tensor] = {}
    for rel in sorted(r for r in manifest["files"] if r.startswith(GLOBAL_PREFIX)):
        try:
            part = read_part(path, manifest, rel)
        except CheckpointError as e:
            raise RunWeightsError(f"unusable checkpoint: {e}") from None
        found.update({k[len("weight/"):]: t for k, t in part.tensors.items()
                      if k.startswith("weight/") and k[len("weight/"):] in wanted})
    missing = sorted(wanted - set(found))
    if missing:
        raise RunWeightsError(f"{run_dir}: the checkpoint of step {step} holds no global value of {missing[0]}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return {n: found[n].detach().to("cpu", torch.float32) for n in sorted(wanted)}


def run_tokenizer(run_dir: Path, step: int) -> Path | None:
    """The run's ``tokenizer.json``: kept in the run directory, or (older runs) found in the data
    cache by the manifest of the data settings the run was prepared with."""
    kept = Path(run_dir) / TOKENIZER
    if kept.is_file():
        return kept
    cfg = run_config(run_dir, step)
    data, seed = cfg.get("data", {}), cfg.get("run", {}).get("seed")
    cache = Path(str(data.get("cache_dir", ""))).expanduser()
    if not data or not cache.is_dir():
        return None
    for manifest in sorted(cache.glob("*/manifest.json")):
        try:
            m = json.loads(manifest.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(m, dict) and m.get("data") == data and m.get("seed") == seed:
            tok = manifest.parent / str(m.get("tokenizer", TOKENIZER))
            if tok.is_file():
                return tok
    return None
