"""Loading a config: defaults ← model preset ← TOML file ← overrides ← algorithm defaults; then checked.

Unknown keys and wrong types are errors that name the key and where it came from; keys that no
longer exist name the form that replaced them.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from distrain.config.checks import init_from_source, validate
from distrain.config.sections import ALGORITHMS, MODEL_PRESETS, Config
from distrain.config.tomlconf import ConfigError, apply_table, nest, parse_override, to_toml


def config_dir() -> Path:
    """The presets: ``configs/`` beside the source tree's ``distrain/``, or ``distrain/configs`` installed."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


# ---------------------------------------------------------------------------------------------
# Keys that no longer exist, and the form that replaced them.
_TABLE = "give each replica its own [[topology.replica]] table"
REMOVED: dict[str, str] = {
    "topology.compute_speeds": f"{_TABLE} with its speed, e.g. --topology.replica='[{{speed=1.0}}, {{speed=0.5}}]'",
    "runtime.replica_devices": f"{_TABLE} with its devices, e.g. --topology.replica='[{{devices=2}}, {{devices=1}}]'",
    "runtime.replica_parallel": "set parallel in the replica's [[topology.replica]] table, e.g. "
                                "--topology.replica='[{devices=2, parallel=\"deepspeed\"}, {}]'",
    "runtime.worker_cpus": f"{_TABLE} with its Ray resources, e.g. --topology.replica='[{{cpus=2.0}}, {{cpus=1.0}}]'",
    "runtime.worker_gpus": f"{_TABLE} with its Ray resources, e.g. --topology.replica='[{{gpus=1.0}}, {{}}]'",
    "runtime.worker_memory_mb": f"{_TABLE} with its Ray resources, e.g. --topology.replica='[{{memory_mb=512}}, {{}}]'",
    "runtime.backend": "set runtime.byte_backend (the frames between replicas, default gloo) and "
                       "runtime.device_backend (inside a replica, default NCCL with CUDA)",
}


def resolve_config_path(path: str | Path) -> Path:
    """Accept a path or the name of a preset in configs/ (with or without .toml)."""
    p = Path(path)
    if p.is_file():
        return p
    for cand in (config_dir() / p, config_dir() / f"{p}.toml"):
        if cand.is_file():
            return cand
    raise ConfigError(f"config file not found: {path} (looked in . and {config_dir()})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults ← model preset ← TOML file ← overrides ← algorithm defaults for unset keys; checked."""
    cfg = Config()
    layers: list[tuple[str, dict[str, Any]]] = []
    if path is not None:
        p = resolve_config_path(path)
        try:
            layers.append((str(p), tomllib.loads(p.read_text())))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from e
    for arg in overrides or []:
        parts, value = parse_override(arg)
        layers.append((f"override {arg}", nest(parts, value)))

    # The model preset is applied first so explicit model keys win over it.
    preset = cfg.model.preset
    for _, d in layers:
        preset = d.get("model", {}).get("preset", preset) if isinstance(d.get("model"), dict) else preset
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"model.preset: unknown preset {preset!r} (known: {', '.join(MODEL_PRESETS)})")
    apply_table(cfg.model, MODEL_PRESETS[preset], f"model preset {preset!r}", "model.")
    cfg.model.preset = preset

    explicit: set[str] = set()
    for source, d in layers:
        apply_table(cfg, d, source, removed=REMOVED.get, explicit=explicit)
    if "topology.replica" in explicit and not cfg.topology.replica and not cfg.topology.replicas:
        raise ConfigError("topology.replica: an empty list of replica tables; give at least one "
                          "[[topology.replica]] table, or topology.replicas = N")
    if cfg.outer.algorithm in ALGORITHMS:
        for key, value in ALGORITHMS[cfg.outer.algorithm].defaults.items():
            if f"outer.{key}" not in explicit:
                setattr(cfg.outer, key, value)
    validate(cfg)
    if cfg.model.init_from and not cfg.model.vocab_size:  # the weights fix the vocabulary, not the tokenizer
        cfg.model.vocab_size = init_from_source(cfg.model).fields["vocab_size"]
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as TOML (readable, and loadable again with load_config)."""
    path.write_text(to_toml(cfg.to_dict()))


