"""A run's global weights, read from its checkpoints (``checkpoints/rank-K/step-N``).

Every worker checkpoints the global weights of the segments it syncs (``worker.outer[g].global``),
always in the ordinary parameterisation — a compressed pipeline stage's too, whose own model holds
``U·Z`` factors instead — so a model trained with compressed replicas reads back as an ordinary,
unconstrained one. Runs whose outer step moves no global weights (``none``, ``ddp``) keep them in
their replicas' models, which are identical after every step. Ranks are read in order until every
parameter is found: usually rank 0 alone, a full replica holding every segment.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from distrain.checkpoint import (
    META_FILE,
    CheckpointError,
    list_checkpoints,
    read_checkpoint,
)
from distrain.weights.shapes import MODEL_FIELDS, parameter_shapes

_RANK_RE = re.compile(r"^rank-(\d+)$")
TOKENIZER = "tokenizer.json"  # the run's tokenizer, kept in its directory


class RunWeightsError(ValueError):
    """A run directory holds no usable checkpoint of its global weights."""


def rank_dirs(run_dir: Path) -> list[Path]:
    """``checkpoints/rank-K`` directories of a run, by rank."""
    root = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _RANK_RE.match(p.name))] \
        if root.is_dir() else []
    return [p for _, p in sorted(found)]


def is_run_dir(path: Path) -> bool:
    return bool(rank_dirs(path))


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps checkpointed by every rank of the run, newest first."""
    ranks = rank_dirs(run_dir)
    per_rank = [{int(p.name.split("-", 1)[1]) for p in list_checkpoints(r)} for r in ranks]
    return sorted(set.intersection(*per_rank), reverse=True) if per_rank else []


def choose_step(run_dir: Path, step: int | None = None) -> int:
    """``step`` when every rank checkpointed it, else the newest such step; a RunWeightsError otherwise."""
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise RunWeightsError(f"{run_dir} holds no checkpoint (checkpoints/rank-K/step-N) of every rank")
    if step is None:
        return steps[0]
    if step not in steps:
        raise RunWeightsError(f"{run_dir} has no checkpoint of step {step} (steps: {', '.join(map(str, steps))})")
    return step


def run_config(run_dir: Path, step: int) -> dict[str, Any]:
    """The configuration a checkpoint was written with (meta.json), as nested tables."""
    for ranks in rank_dirs(run_dir):
        meta = ranks / f"step-{step}" / META_FILE
        try:
            cfg = json.loads(meta.read_text()).get("config")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue
        if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
            return cfg
    raise RunWeightsError(f"{run_dir}: no checkpoint of step {step} records its configuration")


def model_fields(run_dir: Path, step: int) -> dict[str, Any]:
    """The model settings of a run's checkpoint (with the vocabulary its tokenizer fixed)."""
    model = run_config(run_dir, step)["model"]
    missing = [k for k in MODEL_FIELDS if k not in model]
    if missing or not model.get("vocab_size"):
        raise RunWeightsError(f"{run_dir}: the checkpoint's model settings lack {', '.join(missing) or 'vocab_size'}")
    return {k: model[k] for k in MODEL_FIELDS}


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A replica's model state by parameter name (a wrapper's ``module.`` prefix dropped)."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def global_weights(run_dir: Path, step: int, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The run's global weights at ``step`` by parameter name (fp32, CPU); only ``names`` when given."""
    wanted = set(parameter_shapes(model_fields(run_dir, step))) if names is None else set(names)
    found: dict[str, torch.Tensor] = {}
    for ranks in rank_dirs(run_dir):
        try:
            worker = read_checkpoint(ranks / f"step-{step}").state["worker"]
            outer = worker["outer"]
        except (CheckpointError, KeyError, TypeError) as e:
            raise RunWeightsError(f"{ranks / f'step-{step}'}: unusable checkpoint ({e})") from None
        for seg in outer.values():
            if isinstance(seg, dict) and isinstance(seg.get("global"), dict):
                found.update({n: t for n, t in seg["global"].items() if n in wanted})
        if outer and not any(isinstance(s, dict) and "global" in s for s in outer.values()):
            model = _strip(worker.get("trainer", {}).get("model", {}))  # no round: the replicas' weights are global
            found.update({n: t for n, t in model.items() if n in wanted and n not in found})
        if wanted <= set(found):
            break
    missing = sorted(wanted - set(found))
    if missing:
        raise RunWeightsError(f"{run_dir}: the checkpoints of step {step} hold no global value of {missing[0]}"
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
