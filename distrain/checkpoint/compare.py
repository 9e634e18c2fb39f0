"""Which configurations may resume a checkpoint: everything but ``RESUME_MAY_CHANGE`` must match.

A checkpoint stores the run's configuration (``cfg.to_dict()``) in its manifest; a resume compares
it with the current one and refuses — naming every differing key — before any state is loaded.
The topology may change (replicas added or removed, a pipeline split moved): a checkpoint holds
the global weights once and per-replica state by content, so a resume regroups them
(``distrain.runtime.resume``).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable, Mapping

from distrain.checkpoint.store import CheckpointError

CONFIG_KEY = "config"  # manifest.json: the run's configuration as nested tables (Config.to_dict())
# Dotted keys (a key covers everything below it) that may differ between a checkpoint and the
# configuration resuming it: the run length and evaluation schedule, names and places, logging,
# checkpointing, the device and thread count, timeouts, the weights a fresh run would start from,
# and the topology (its replicas and their splits).
RESUME_MAY_CHANGE: tuple[str, ...] = (
    "train.steps", "train.eval_every", "train.eval_batches", "logging", "checkpoint", "run.name",
    "run.out_dir", "run.device", "runtime.torch_threads", "topology.round_timeout_s", "model.init_from",
    "topology.replica", "topology.replicas",
)

log = logging.getLogger(__name__)


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


def check_config(where: str, saved: Mapping[str, Any] | None, config: Mapping[str, Any] | None,
                 may_change: Iterable[str] = RESUME_MAY_CHANGE) -> None:
    """Raise CheckpointError naming every differing key when ``config`` cannot resume the checkpoint
    at ``where`` written with ``saved``."""
    if config is None:
        return
    if saved is None:
        log.warning("%s stores no configuration: cannot check that it fits this config", where)
        return
    diff = config_differences(saved, config, may_change)
    if diff:
        shown = "; ".join(diff[:12]) + (f"; and {len(diff) - 12} more" if len(diff) > 12 else "")
        raise CheckpointError(f"{where} was written with another configuration: {shown}")
