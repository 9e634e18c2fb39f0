"""Typed run configuration: dataclass sections, TOML presets, ``--section.key=value`` overrides.

Unknown keys and wrong types are errors that name the key and where it came from, so a typo in a
preset never silently trains the wrong model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration value, key or file is invalid."""


@dataclass
class RunConfig:
    name: str = "default"
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class ModelConfig:
    preset: str = "test"
    vocab_size: int = 0  # 0: take it from the tokenizer
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 0  # 0: LLaMA rule (8/3·dim rounded up to multiple_of)
    multiple_of: int = 32
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02


@dataclass
class DataConfig:
    source: str = "stdlib"  # "stdlib" (embedded corpus) or a file / directory / .jsonl path
    tokenizer: str = ""  # path to a tokenizer.json; empty: train a byte-level BPE locally
    vocab_size: int = 4096  # size of a locally trained tokenizer
    cache_dir: str = ".cache/distrain"  # where prepared shards and tokenizers live
    seq_len: int = 128
    val_fraction: float = 0.02
    max_bytes: int = 32_000_000  # cap on raw text read from the source (0: no cap)
    text_key: str = "text"  # field of JSONL records


@dataclass
class ChunkwiseConfig:
    mode: str = "off"  # off | seco | spaco
    chunk_len: int = 0
    sparse_chunks: int = 0  # SpaCO: chunks that back-propagate (t)
    cap: float = 0.0  # SpaCO: cap on the n/t gradient scale (0: no cap)
    pad: bool = False  # pad sequences to a multiple of chunk_len instead of erroring
    sampling: str = "bernoulli"  # SpaCO chunk selection: bernoulli (unbiased) | uniform (exactly t, the paper's)


@dataclass
class TrainConfig:
    steps: int = 200  # inner optimiser steps per replica
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "auto"  # auto | fp32 | bf16
    eval_every: int = 50
    eval_batches: int = 8
    chunkwise: ChunkwiseConfig = field(default_factory=ChunkwiseConfig)


@dataclass
class OuterConfig:
    algorithm: str = "none"  # none | ddp | diloco | sparseloco
    inner_steps: int = 15  # H
    lr: float = 1.0  # outer learning rate alpha
    momentum: float = 0.0  # DiLoCo: 0.9 Nesterov
    nesterov: bool = False
    topk: int = 64  # per 4096-element chunk
    chunk: int = 64  # block side for 2-D tensors / chunk length for 1-D
    ef_beta: float = 0.95
    quantizer: str = "reference"  # reference | symmetric | none
    index_coding: str = "gaps"  # gaps (entropy-friendly, ~7.6 bits/index after zstd) | packed (12-bit fields)
    aggregation: str = "mean_selected"  # mean_selected | sum_over_r
    dense_dtype: str = "fp32"  # DiLoCo wire dtype: fp32 | bf16
    apply_delay: int = 0  # 1: apply each aggregate one round late (overlap)


@dataclass
class TopologyConfig:
    replicas: int = 1
    compute_speeds: list[float] = field(default_factory=list)  # relative speed per replica
    straggler_policy: str = "wait"  # wait | fewer_steps
    quorum: float = 1.0  # fraction of replicas a round needs
    round_timeout_s: float = 600.0


@dataclass
class NetworkConfig:
    up_mbps: float = 100.0
    down_mbps: float = 100.0
    latency_ms: float = 20.0
    step_time_s: float = 0.0  # simulated seconds per inner step at speed 1.0 (0: measured)


@dataclass
class CheckpointConfig:
    every: int = 0  # steps (or rounds for outer runs); 0: only at the end
    keep: int = 3
    resume: str = "none"  # none | auto | path to a step-N directory


@dataclass
class LoggingConfig:
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True
    plots: bool = True


# ---------------------------------------------------------------------------------------------
# [runtime] — added by issue 5 (torchrun / Ray launchers); validated by distrain.layout.check_runtime.
# How processes map onto replicas and machines. Simulation only reads ``torch_threads``.


@dataclass
class RuntimeConfig:
    torch_threads: int = 0  # torch intra-op threads per worker (0: torch's default); 1 for bit-equal modes
    backend: str = "auto"  # torchrun process group: auto (nccl with CUDA, else gloo) | gloo | nccl
    replica_devices: list[int] = field(default_factory=list)  # processes per replica under torchrun (empty: 1 each)
    replica_parallel: str = "ddp"  # inner steps of a multi-process replica: ddp | deepspeed
    zero_stage: int = 2  # DeepSpeed ZeRO stage (1 or 2) when replica_parallel = "deepspeed"
    worker_cpus: list[float] = field(default_factory=list)  # Ray: CPUs of each worker's bundle (empty: 1 each)
    worker_gpus: list[float] = field(default_factory=list)  # Ray: GPUs of each worker's bundle (empty: 0 each)
    worker_memory_mb: list[int] = field(default_factory=list)  # Ray: memory reserved per worker (empty: none)
    placement_strategy: str = "PACK"  # Ray placement group: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    max_restarts: int = 3  # Ray: how often a worker actor that died is restarted (then it catches up)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # issue 5

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Hash of the parts that define the training trajectory (not names or logging)."""
        d = self.to_dict()
        for k in ("run", "logging", "checkpoint", "runtime"):
            d.pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Building a Config from dictionaries with strict checking


def _check_value(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected a boolean, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_value(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for alt in typing.get_args(tp):
            if alt is type(None) and value is None:
                return None
            try:
                return _check_value(value, alt, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    raise ConfigError(f"{where}: unsupported type {tp}")


def _apply(obj: Any, data: dict[str, Any], source: str, prefix: str = "") -> None:
    """Set dataclass fields of ``obj`` from ``data``, recursing into nested sections."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: [{prefix.rstrip('.')}] must be a table, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown key '{dotted}' (known here: {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, source, f"{dotted}.")
        else:
            setattr(obj, key, _check_value(value, hints[key], f"{source}: '{dotted}'"))


def _parse_override(arg: str) -> tuple[list[str], Any]:
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"override {arg!r}: expected --section.key=value")
    key, raw = arg[2:].split("=", 1)
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {arg!r}: expected --section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words are strings: --run.name=foo
    return parts, value


def _nest(parts: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {parts[-1]: value}
    for p in reversed(parts[:-1]):
        out = {p: out}
    return out


def resolve_config_path(path: str | Path) -> Path:
    """Accept a path or the name of a preset in configs/ (with or without .toml)."""
    p = Path(path)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.toml"):
        if cand.is_file():
            return cand
    raise ConfigError(f"config file not found: {path} (looked in . and {CONFIG_DIR})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults ← model preset ← TOML file ← overrides, each checked strictly."""
    from distrain.model import MODEL_PRESETS

    cfg = Config()
    layers: list[tuple[str, dict[str, Any]]] = []
    if path is not None:
        p = resolve_config_path(path)
        try:
            layers.append((str(p), tomllib.loads(p.read_text())))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from e
    for arg in overrides or []:
        parts, value = _parse_override(arg)
        layers.append((f"override {arg}", _nest(parts, value)))

    # The model preset is applied first so explicit model keys win over it.
    preset = cfg.model.preset
    for _, d in layers:
        preset = d.get("model", {}).get("preset", preset) if isinstance(d.get("model"), dict) else preset
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"model.preset: unknown preset {preset!r} (known: {', '.join(MODEL_PRESETS)})")
    _apply(cfg.model, MODEL_PRESETS[preset], f"model preset {preset!r}", "model.")
    cfg.model.preset = preset

    for source, d in layers:
        _apply(cfg, d, source)
    validate(cfg)
    return cfg


_CHOICES = {
    ("run", "device"): {"auto", "cpu", "cuda"},
    ("train", "precision"): {"auto", "fp32", "bf16"},
    ("outer", "algorithm"): {"none", "ddp", "diloco", "sparseloco"},
    ("outer", "quantizer"): {"reference", "symmetric", "none"},
    ("outer", "index_coding"): {"gaps", "packed"},
    ("outer", "aggregation"): {"mean_selected", "sum_over_r"},
    ("outer", "dense_dtype"): {"fp32", "bf16"},
    ("topology", "straggler_policy"): {"wait", "fewer_steps"},
}


def validate(cfg: Config) -> None:
    for (section, key), allowed in _CHOICES.items():
        v = getattr(getattr(cfg, section), key)
        if v not in allowed:
            raise ConfigError(f"{section}.{key}: {v!r} is not one of {sorted(allowed)}")
    cw = cfg.train.chunkwise
    if cw.mode not in {"off", "seco", "spaco"}:
        raise ConfigError(f"train.chunkwise.mode: {cw.mode!r} is not one of off, seco, spaco")
    if cw.sampling not in {"bernoulli", "uniform"}:
        raise ConfigError(f"train.chunkwise.sampling: {cw.sampling!r} is not one of bernoulli, uniform")
    if cw.mode != "off":
        if cw.chunk_len < 1:
            raise ConfigError("train.chunkwise.chunk_len must be >= 1 when train.chunkwise.mode is not off")
        if not cw.pad and cfg.data.seq_len % cw.chunk_len:
            raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) is not a multiple of train.chunkwise.chunk_len "
                              f"({cw.chunk_len}); set train.chunkwise.pad = true to pad")
        if cw.mode == "spaco" and cw.sparse_chunks < 1:
            raise ConfigError("train.chunkwise.sparse_chunks (t) must be >= 1 for spaco")
        if cw.cap and cw.cap < 1:
            raise ConfigError(f"train.chunkwise.cap must be 0 (no cap) or >= 1, got {cw.cap}")
    m = cfg.model
    if m.dim % m.n_heads:
        raise ConfigError(f"model.dim ({m.dim}) must be divisible by model.n_heads ({m.n_heads})")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.n_kv_heads})")
    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
    for name in ("steps", "batch_size", "grad_accum"):
        if getattr(cfg.train, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1")
    if cfg.topology.replicas < 1:
        raise ConfigError("topology.replicas must be >= 1")
    if cfg.topology.compute_speeds and len(cfg.topology.compute_speeds) != cfg.topology.replicas:
        raise ConfigError(
            f"topology.compute_speeds has {len(cfg.topology.compute_speeds)} entries for "
            f"{cfg.topology.replicas} replicas"
        )
    if any(s <= 0 for s in cfg.topology.compute_speeds):
        raise ConfigError("topology.compute_speeds must be positive")
    if cfg.outer.algorithm != "none" and cfg.outer.inner_steps < 1:
        raise ConfigError("outer.inner_steps must be >= 1")
    if not 0 < cfg.topology.quorum <= 1:
        raise ConfigError("topology.quorum must be in (0, 1]")
    check_runtime(cfg)


PARALLEL_CHOICES = ("ddp", "deepspeed")
BACKENDS = ("auto", "gloo", "nccl")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def check_runtime(cfg: Config) -> None:
    """Errors that name the key for a ``[runtime]`` section that cannot describe this topology."""
    rt, R = cfg.runtime, cfg.topology.replicas
    if rt.torch_threads < 0:
        raise ConfigError("runtime.torch_threads must be >= 0 (0: torch's default)")
    if rt.backend not in BACKENDS:
        raise ConfigError(f"runtime.backend: {rt.backend!r} is not one of {list(BACKENDS)}")
    if rt.replica_devices and len(rt.replica_devices) != R:
        raise ConfigError(f"runtime.replica_devices has {len(rt.replica_devices)} entries for {R} replicas")
    if any(d < 1 for d in rt.replica_devices):
        raise ConfigError("runtime.replica_devices entries must be >= 1")
    if rt.replica_parallel not in PARALLEL_CHOICES:
        raise ConfigError(f"runtime.replica_parallel: {rt.replica_parallel!r} is not one of {list(PARALLEL_CHOICES)}")
    if rt.zero_stage not in (1, 2):
        raise ConfigError(f"runtime.zero_stage must be 1 or 2, got {rt.zero_stage}")
    for key in ("worker_cpus", "worker_gpus", "worker_memory_mb"):
        vals = getattr(rt, key)
        if vals and len(vals) != R:
            raise ConfigError(f"runtime.{key} has {len(vals)} entries for {R} replicas (one per Ray worker)")
        if any(v < 0 for v in vals):
            raise ConfigError(f"runtime.{key} entries must be >= 0")
    if rt.max_restarts < 0:
        raise ConfigError("runtime.max_restarts must be >= 0")
    if rt.placement_strategy not in PLACEMENT_STRATEGIES:
        raise ConfigError(f"runtime.placement_strategy: {rt.placement_strategy!r} is not one of {list(PLACEMENT_STRATEGIES)}")



def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as TOML (readable, and loadable again with load_config)."""
    path.write_text(to_toml(cfg.to_dict()))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)


def to_toml(d: dict[str, Any], prefix: str = "") -> str:
    lines: list[str] = []
    scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in d.items() if isinstance(v, dict)}
    if prefix and scalars:
        lines.append(f"[{prefix}]")
    for k, v in scalars.items():
        lines.append(f"{k} = {_toml_value(v)}")
    if scalars:
        lines.append("")
    for k, v in tables.items():
        lines.append(to_toml(v, f"{prefix}.{k}" if prefix else k))
    return "\n".join(lines)
