"""Typed run configuration: dataclass sections, TOML presets, ``--section.key=value`` overrides.

Unknown keys and wrong types are errors that name the key and where it came from, and every value
is checked when the config is loaded (ranges, combinations, files that must exist, devices that
must be present), so a typo in a preset never silently trains the wrong model and a bad value
never costs a tokenisation pass. The topology is a list of ``[[topology.replica]]`` tables
(``distrain.topology`` resolves them into workers); ``topology.replicas = N`` is the shorthand for
N identical single-device full replicas.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distrain.tomlconf import ConfigError, apply_table, nest, parse_override, source_of, to_toml

__all__ = ["ALGORITHMS", "Config", "ConfigError", "MODEL_PRESETS", "ReplicaConfig", "load_config", "save_config",
           "to_toml"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# Presets fill the model section; explicit model keys override them.
MODEL_PRESETS: dict[str, dict] = {
    # ~1M parameters at vocab 4096 (embedding dominated): unit tests and the embedded default.
    "test": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256),
    # ~6M: the embedded simulation default.
    "tiny": dict(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, max_seq_len=512),
    # ~20M at vocab 8192.
    "20m": dict(dim=384, n_layers=8, n_heads=6, n_kv_heads=2, max_seq_len=1024),
    "125m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, max_seq_len=2048),
    "512m": dict(dim=1536, n_layers=16, n_heads=12, n_kv_heads=4, max_seq_len=2048),
    "1b": dict(dim=2048, n_layers=18, n_heads=16, n_kv_heads=8, max_seq_len=2048),
}


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(where: str, value: str, allowed: tuple[str, ...]) -> None:
    _need(value in allowed, f"{where}: {value!r} is not one of {', '.join(allowed)}")


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
    # Document batches for adaptive sequence parallelism (issue 11; distrain.data.documents).
    sampler: str = "windows"  # windows (seq_len windows of the stream) | documents (whole documents)
    max_doc_len: int = 0  # documents: longer ones are cut into pieces of this many tokens (0: model.max_seq_len)
    batch_tokens: int = 0  # documents: token budget of one global batch (0: train.batch_size * max_doc_len)


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
    topk_warmup: list[int] = field(default_factory=list)  # sparseloco: k of the first rounds, one per round, then topk
    chunk: int = 64  # block side for 2-D tensors / chunk length for 1-D
    ef_beta: float = 0.95
    quantizer: str = "reference"  # reference | symmetric | none
    index_coding: str = "gaps"  # gaps (entropy-friendly, ~7.6 bits/index after zstd) | packed (12-bit fields)
    aggregation: str = "mean_selected"  # mean_selected | sum_over_r
    dense_dtype: str = "fp32"  # DiLoCo wire dtype: fp32 | bf16
    apply_delay: int = 0  # 1: apply each aggregate one round late (overlap)
    robust_clip: float = 2.0  # clip a contribution above this multiple of the round's low-median norm (0: off)
    robust_reject: float = 10.0  # reject one above this multiple as an outlier

    def topk_at(self, round_idx: int) -> int:
        """k of outer round ``round_idx`` (0-based): denser warm-up rounds release the error buffer
        faster while it holds most of the early progress; every replica derives the same k."""
        return self.topk_warmup[round_idx] if 0 <= round_idx < len(self.topk_warmup) else self.topk


@dataclass(frozen=True)
class Algorithm:
    """What an outer algorithm is, in one place: the runtime asks this table, never the name."""

    rounds: bool  # trains in rounds of H inner steps, then exchanges a pseudo-gradient
    per_step: bool  # synchronises gradients every inner step (the DDP baseline)
    defaults: dict[str, Any]  # its published outer hyper-parameters, unless the user sets them


ALGORITHMS: dict[str, Algorithm] = {
    "none": Algorithm(rounds=False, per_step=False, defaults={}),
    "ddp": Algorithm(rounds=False, per_step=True, defaults={}),
    # DiLoCo: outer SGD with Nesterov momentum 0.9, lr 0.7 (Douillard et al.)
    "diloco": Algorithm(rounds=True, per_step=False, defaults={"lr": 0.7, "momentum": 0.9, "nesterov": True}),
    # SparseLoCo: outer SGD without momentum, alpha = 1 (error feedback replaces momentum)
    "sparseloco": Algorithm(rounds=True, per_step=False, defaults={"lr": 1.0, "momentum": 0.0, "nesterov": False}),
}


@dataclass
class CompressConfig:
    """Subspace compression of a pipeline replica's boundaries (``[topology.replica.compress]``)."""

    k: int = 0  # coordinates per token at a boundary (0: send the d-dim activations uncompressed)
    method: str = "reparam"  # reparam (W = U·Z, Z trainable) | project (W ← U·UᵀW after every step)
    seed: int = 1337  # of U (d×k, orthonormal): the same on every worker


@dataclass
class ReplicaConfig:
    """One ``[[topology.replica]]`` table: a full replica, or a pipeline replica of stage workers.

    Per-worker values (``speed``, links, Ray resources) are one number for every worker of the
    replica or a list with one entry per worker (a full replica's devices, a pipeline's stages);
    an empty list takes the default (speed 1, ``[network]`` links, 1 CPU, no GPU, no memory).
    """

    kind: str = "full"  # full | pipeline
    count: int = 1  # this table stands for `count` identical replicas
    devices: int = 1  # full: processes joined by a fast interconnect
    parallel: str = "auto"  # full: auto (single, or ddp when devices > 1; sp with documents) | single | ddp | deepspeed | sp
    stages: int | list[int] = 0  # pipeline: a stage count (balanced split) or layer bounds [0, a, ..., n_layers]
    speed: float | list[float] = field(default_factory=list)  # relative compute speed (1.0: network.step_time_s)
    up_mbps: float | list[float] = field(default_factory=list)  # default: network.up_mbps
    down_mbps: float | list[float] = field(default_factory=list)  # default: network.down_mbps
    latency_ms: float | list[float] = field(default_factory=list)  # default: network.latency_ms
    cpus: float | list[float] = field(default_factory=list)  # Ray bundle CPUs per worker (default 1)
    gpus: float | list[float] = field(default_factory=list)  # Ray bundle GPUs per worker (default 0)
    memory_mb: int | list[int] = field(default_factory=list)  # Ray memory reservation per worker (default none)
    schedule: str = "1f1b"  # pipeline: 1f1b (activations of at most ~stages micro-batches) | gpipe
    microbatches: int = 0  # pipeline: micro-batches per step, dividing batch_size·grad_accum (0: automatic)
    wire_dtype: str = "bf16"  # pipeline: boundary values bf16 | fp32
    compress: CompressConfig = field(default_factory=CompressConfig)
    sp_costs: str = ""  # parallel = "sp": cost-model JSON from `distrain profile-sp` (empty: reference GPU costs)
    sp_capacity: int = 0  # parallel = "sp": tokens one device holds (0: no memory cap)

    def workers(self, n_layers: int) -> int:
        """Workers of one replica of this table (devices, or stages)."""
        if self.kind == "full":
            return self.devices
        return self.stages if isinstance(self.stages, int) else len(self.stages) - 1

    def check(self, index: int, cfg: "Config") -> None:
        where = f"{source_of(self)} (replica table {index})"
        _choice(f"{where}: kind", self.kind, ("full", "pipeline"))
        _need(self.count >= 1, f"{where}: count must be >= 1, got {self.count}")
        _choice(f"{where}: parallel", self.parallel, ("auto", "single", "ddp", "deepspeed", "sp"))
        if self.parallel == "sp":
            _need(self.kind == "full", f"{where}: parallel = 'sp' is for kind = 'full'")
            _need(cfg.data.sampler == "documents", f"{where}: parallel = 'sp' plans whole documents: set "
                                                   "data.sampler = 'documents'")
        _need(not self.sp_costs or Path(self.sp_costs).is_file(), f"{where}: sp_costs: {self.sp_costs} is not a file")
        _need(self.sp_capacity >= 0, f"{where}: sp_capacity must be >= 0 (0: no cap), got {self.sp_capacity}")
        n_layers = cfg.model.n_layers
        if self.kind == "full":
            _need(self.devices >= 1, f"{where}: devices must be >= 1, got {self.devices}")
            _need(self.stages in (0, [], 1), f"{where}: stages is for kind = 'pipeline' (a full replica holds every layer)")
            if self.parallel == "single":
                _need(self.devices == 1, f"{where}: parallel = 'single' runs on one device, devices = {self.devices}; "
                                         "use parallel = 'ddp' or 'deepspeed'")
            if self.parallel in ("ddp", "deepspeed"):
                _need(self.devices >= 2, f"{where}: parallel = {self.parallel!r} needs devices >= 2")
        else:
            _need(self.devices == 1, f"{where}: devices is for kind = 'full'; a pipeline's workers are its stages")
            _need(self.parallel in ("auto", "single"), f"{where}: parallel is for kind = 'full'")
            if isinstance(self.stages, int):
                _need(2 <= self.stages <= n_layers,
                      f"{where}: stages = {self.stages} must be between 2 and model.n_layers = {n_layers}")
            else:
                b = self.stages
                _need(len(b) >= 3 and b[0] == 0 and b[-1] == n_layers and all(x < y for x, y in zip(b, b[1:])),
                      f"{where}: stages = {b} must be layer bounds [0, ..., {n_layers}], strictly increasing, "
                      "at least 2 stages")
            _need(not cfg.model.tie_embeddings, f"{where}: a pipeline puts the embedding and the head on different "
                                                "stages; model.tie_embeddings must be false")
            _choice(f"{where}: schedule", self.schedule, ("1f1b", "gpipe"))
            _choice(f"{where}: wire_dtype", self.wire_dtype, ("bf16", "fp32"))
            seqs = cfg.train.batch_size * cfg.train.grad_accum
            _need(self.microbatches >= 0 and (self.microbatches == 0 or seqs % self.microbatches == 0),
                  f"{where}: microbatches = {self.microbatches} must divide train.batch_size x train.grad_accum = "
                  f"{seqs} (0: automatic)")
            c = self.compress
            _need(0 <= c.k <= cfg.model.dim, f"{where}: compress.k = {c.k} must be in [0, model.dim = {cfg.model.dim}] "
                                             "(0: uncompressed)")
            _choice(f"{where}: compress.method", c.method, ("reparam", "project"))
        _need(self.kind == "pipeline" or (self.compress.k == 0 and self.microbatches == 0),
              f"{where}: compress and microbatches are for kind = 'pipeline'")
        n = self.workers(n_layers)
        for key in ("speed", "up_mbps", "down_mbps", "latency_ms", "cpus", "gpus", "memory_mb"):
            v = getattr(self, key)
            vals = v if isinstance(v, list) else [v]
            if isinstance(v, list) and v:
                _need(len(v) == n, f"{where}: {key} has {len(v)} entries for the replica's {n} workers "
                                   "(give one number for all, or one per worker)")
            lo_ok = (lambda x: x > 0) if key in ("speed", "up_mbps", "down_mbps") else (lambda x: x >= 0)
            _need(all(lo_ok(x) for x in vals), f"{where}: {key} must be "
                  f"{'positive' if key in ('speed', 'up_mbps', 'down_mbps') else 'non-negative'}, got {v}")


@dataclass
class TopologyConfig:
    replicas: int = 0  # shorthand: N identical single-device full replicas (0: from the tables, or 1)
    replica: list[ReplicaConfig] = field(default_factory=list)  # [[topology.replica]] tables
    straggler_policy: str = "wait"  # wait | fewer_steps
    quorum: float = 1.0  # fraction of replicas a round needs
    round_timeout_s: float = 600.0
    # How a compressed pipeline replica meets unconstrained replicas in one round:
    # project_start: it starts each round from the global weights mapped onto its constraint and
    #   measures its pseudo-gradient from there; split: the same, and for constrained matrices the
    #   compressed replicas vote only on the in-subspace part of the aggregate (the rest is the
    #   unconstrained replicas' mean); project_global: the global weights themselves are projected
    #   onto the constraint after every outer step (node0-style), for every replica.
    compress_sync: str = "project_start"

    def tables(self) -> list[ReplicaConfig]:
        """The replica tables, the shorthand expanded."""
        return self.replica or [ReplicaConfig(count=max(1, self.replicas))]

    @property
    def n_replicas(self) -> int:
        return sum(t.count for t in self.tables())


@dataclass
class NetworkConfig:
    up_mbps: float = 100.0  # default link of every worker (a replica table may override it)
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


@dataclass
class RuntimeConfig:
    """How processes run (torchrun, Ray); the topology says what they are."""

    torch_threads: int = 0  # torch intra-op threads per worker (0: torch's default); 1 for bit-equal modes
    backend: str = "auto"  # torchrun process group: auto (nccl with CUDA, else gloo) | gloo | nccl
    zero_stage: int = 2  # DeepSpeed ZeRO stage (1 or 2) of replicas with parallel = "deepspeed"
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
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @property
    def algorithm(self) -> Algorithm:
        return ALGORITHMS[self.outer.algorithm]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_id(self) -> str:
        """What every frame of this run carries (frames of another run are rejected)."""
        return f"{self.run.name}-{self.hash()}"

    def hash(self) -> str:
        """Hash of the parts that define the training trajectory (not names or logging)."""
        d = self.to_dict()
        for k in ("run", "logging", "checkpoint", "runtime"):
            d.pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


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
}


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
    if cfg.outer.algorithm in ALGORITHMS:
        for key, value in ALGORITHMS[cfg.outer.algorithm].defaults.items():
            if f"outer.{key}" not in explicit:
                setattr(cfg.outer, key, value)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as TOML (readable, and loadable again with load_config)."""
    path.write_text(to_toml(cfg.to_dict()))


# ---------------------------------------------------------------------------------------------
# Validation: every value, before any work.
def validate(cfg: Config) -> None:
    """Raise a one-line ConfigError for the first invalid value or combination."""
    for check in (_check_run, _check_model, _check_data, _check_train, _check_outer, _check_topology,
                  _check_network, _check_checkpoint, _check_logging, _check_runtime):
        check(cfg)


def _check_run(cfg: Config) -> None:
    r = cfg.run
    _choice("run.device", r.device, ("auto", "cpu", "cuda"))
    _need(bool(r.name) and "/" not in r.name and r.name not in (".", ".."),
          f"run.name: {r.name!r} must be a plain directory name")
    if r.device == "cuda":
        import torch

        _need(torch.cuda.is_available(), "run.device = 'cuda' but no CUDA device is available here")


def _check_model(cfg: Config) -> None:
    m = cfg.model
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len"):
        _need(getattr(m, key) >= 1, f"model.{key} must be >= 1, got {getattr(m, key)}")
    _need(m.vocab_size >= 0 and m.ffn_dim >= 0, "model.vocab_size and model.ffn_dim must be >= 0 (0: automatic)")
    _need(m.dim % m.n_heads == 0, f"model.dim ({m.dim}) must be divisible by model.n_heads ({m.n_heads})")
    _need(m.n_heads % m.n_kv_heads == 0,
          f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.n_kv_heads})")
    _need((m.dim // m.n_heads) % 2 == 0, f"model.dim / model.n_heads = {m.dim // m.n_heads} must be even (RoPE)")
    _need(m.rope_theta > 0 and m.norm_eps > 0 and m.init_std > 0,
          "model.rope_theta, model.norm_eps and model.init_std must be positive")


def _check_data(cfg: Config) -> None:
    d = cfg.data
    _need(d.seq_len >= 1, f"data.seq_len must be >= 1, got {d.seq_len}")
    _need(d.seq_len <= cfg.model.max_seq_len,
          f"data.seq_len ({d.seq_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})")
    _need(0 < d.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    _need(d.max_bytes >= 0, f"data.max_bytes must be >= 0 (0: no cap), got {d.max_bytes}")
    if d.source != "stdlib":
        _need(Path(d.source).exists(), f"data.source: {d.source} does not exist (give a file, a directory, "
                                       "a .jsonl file, or 'stdlib')")
    if d.tokenizer:
        _need(Path(d.tokenizer).is_file(), f"data.tokenizer: {d.tokenizer} is not a file (a HF tokenizer.json)")
    else:
        _need(d.vocab_size >= 257, f"data.vocab_size must be >= 257 (every byte + end of text), got {d.vocab_size}")
    # -- document batches (issue 11: data.sampler, data.max_doc_len, data.batch_tokens) --
    _choice("data.sampler", d.sampler, ("windows", "documents"))
    _need(d.max_doc_len >= 0, f"data.max_doc_len must be >= 0 (0: model.max_seq_len), got {d.max_doc_len}")
    _need(d.max_doc_len <= cfg.model.max_seq_len,
          f"data.max_doc_len ({d.max_doc_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})")
    _need(d.batch_tokens >= 0, f"data.batch_tokens must be >= 0 (0: train.batch_size * max_doc_len), got {d.batch_tokens}")
    longest = d.max_doc_len or cfg.model.max_seq_len
    _need(not d.batch_tokens or d.batch_tokens >= longest,
          f"data.batch_tokens ({d.batch_tokens}) must be >= the longest piece, data.max_doc_len ({longest})")
    if d.sampler == "documents":
        _need(cfg.train.chunkwise.mode == "off", "data.sampler = 'documents' does not combine with train.chunkwise")
        for i, r in enumerate(cfg.topology.tables()):  # document batches are run by adaptive-SP replicas
            _need(r.kind == "full" and r.parallel in ("auto", "sp", "single"),
                  f"{source_of(r)} (replica table {i}): data.sampler = 'documents' runs on full replicas with "
                  "parallel = 'sp' (or one device); pipelines and ddp/deepspeed replicas read windows")


def _check_train(cfg: Config) -> None:
    t = cfg.train
    for key in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches"):
        _need(getattr(t, key) >= 1, f"train.{key} must be >= 1, got {getattr(t, key)}")
    _need(t.lr > 0, f"train.lr must be positive, got {t.lr}")
    _need(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    _need(t.warmup_steps >= 0 and t.weight_decay >= 0 and t.grad_clip >= 0,
          "train.warmup_steps, train.weight_decay and train.grad_clip must be >= 0")
    _need(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, f"train.beta1/beta2 must be in [0, 1), got {t.beta1}, {t.beta2}")
    _choice("train.precision", t.precision, ("auto", "fp32", "bf16"))
    cw = t.chunkwise
    _choice("train.chunkwise.mode", cw.mode, ("off", "seco", "spaco"))
    _choice("train.chunkwise.sampling", cw.sampling, ("bernoulli", "uniform"))
    if cw.mode != "off":
        _need(cw.chunk_len >= 1, "train.chunkwise.chunk_len must be >= 1 when train.chunkwise.mode is not off")
        _need(cw.pad or cfg.data.seq_len % cw.chunk_len == 0,
              f"data.seq_len ({cfg.data.seq_len}) is not a multiple of train.chunkwise.chunk_len ({cw.chunk_len}); "
              "set train.chunkwise.pad = true to pad")
        if cw.mode == "spaco":
            _need(cw.sparse_chunks >= 1, "train.chunkwise.sparse_chunks (t) must be >= 1 for spaco")
        _need(not cw.cap or cw.cap >= 1, f"train.chunkwise.cap must be 0 (no cap) or >= 1, got {cw.cap}")


def _check_outer(cfg: Config) -> None:
    o = cfg.outer
    _choice("outer.algorithm", o.algorithm, tuple(ALGORITHMS))
    _choice("outer.quantizer", o.quantizer, ("reference", "symmetric", "none"))
    _choice("outer.index_coding", o.index_coding, ("gaps", "packed"))
    _choice("outer.aggregation", o.aggregation, ("mean_selected", "sum_over_r"))
    _choice("outer.dense_dtype", o.dense_dtype, ("fp32", "bf16"))
    _need(o.inner_steps >= 1, f"outer.inner_steps must be >= 1, got {o.inner_steps}")
    _need(o.lr > 0, f"outer.lr must be positive, got {o.lr}")
    _need(0 <= o.momentum < 1, f"outer.momentum must be in [0, 1), got {o.momentum}")
    _need(1 <= o.chunk <= 4096, f"outer.chunk must be in [1, 4096], got {o.chunk}")
    _need(1 <= o.topk <= min(4096, o.chunk * o.chunk),
          f"outer.topk must be in [1, {min(4096, o.chunk * o.chunk)}] (the elements of a {o.chunk}x{o.chunk} block), "
          f"got {o.topk}")
    for k in o.topk_warmup:
        _need(isinstance(k, int) and 1 <= k <= min(4096, o.chunk * o.chunk),
              f"outer.topk_warmup: {k!r} must be an integer in [1, {min(4096, o.chunk * o.chunk)}]")
    if o.topk_warmup:
        _need(o.algorithm == "sparseloco", f"outer.topk_warmup is for outer.algorithm = 'sparseloco', "
                                           f"not {o.algorithm!r}")
        _need(not any(r.kind == "pipeline" and r.compress.k for r in cfg.topology.tables()),
              "outer.topk_warmup does not combine with compressed pipeline replicas yet (their span-split "
              "aggregation and embedding relay decode with one fixed k)")
    _need(o.index_coding != "gaps" or o.chunk <= 256,
          f"outer.index_coding = 'gaps' stores 16-bit gaps: outer.chunk must be <= 256, got {o.chunk}")
    _need(0 <= o.ef_beta <= 1, f"outer.ef_beta must be in [0, 1], got {o.ef_beta}")
    _need(o.apply_delay in (0, 1), f"outer.apply_delay must be 0 or 1, got {o.apply_delay}")
    _need(o.robust_clip == 0 or 1 <= o.robust_clip <= o.robust_reject,
          f"outer.robust_clip must be 0 (off) or in [1, outer.robust_reject = {o.robust_reject}], got {o.robust_clip}")


def _check_topology(cfg: Config) -> None:
    t = cfg.topology
    _need(t.replicas >= 0, f"topology.replicas must be >= 1 (or 0 with replica tables), got {t.replicas}")
    if t.replica:
        n = sum(r.count for r in t.replica)
        _need(t.replicas in (0, n), f"topology.replicas = {t.replicas} but the [[topology.replica]] tables describe "
                                   f"{n} replicas; drop topology.replicas or make them agree")
    for i, table in enumerate(t.tables()):
        table.check(i, cfg)
    _choice("topology.straggler_policy", t.straggler_policy, ("wait", "fewer_steps"))
    _choice("topology.compress_sync", t.compress_sync, ("project_start", "split", "project_global"))
    compressed = {(r.compress.k, r.compress.seed, str(r.stages)) for r in t.tables()
                  if r.kind == "pipeline" and r.compress.k}
    if t.compress_sync != "project_start":
        _need(len(compressed) <= 1, f"topology.compress_sync = {t.compress_sync!r} works with one subspace: every "
                                    "compressed pipeline needs the same compress.k, seed and stages")
    _need(0 < t.quorum <= 1, f"topology.quorum must be in (0, 1], got {t.quorum}")
    _need(t.round_timeout_s > 0, f"topology.round_timeout_s must be positive, got {t.round_timeout_s}")
    algo, tables = cfg.algorithm, t.tables()
    if t.n_replicas > 1:
        _need(algo.rounds or algo.per_step, "outer.algorithm = 'none' trains one replica; set topology.replicas = 1 "
                                            "or pick ddp, diloco or sparseloco")
    big = [i for i, r in enumerate(tables) if r.kind == "pipeline" or r.devices > 1]
    if big and t.n_replicas > 1:
        _need(algo.rounds, f"replica table {big[0]} has several workers: outer.algorithm must be diloco or "
                           "sparseloco (the outer round runs per segment)")
    if any(r.kind == "full" and r.devices > 1 for r in tables):
        _need(cfg.train.chunkwise.mode == "off", "multi-device replicas do not combine with train.chunkwise yet")
    if t.straggler_policy == "fewer_steps":
        _need(algo.rounds, "topology.straggler_policy = 'fewer_steps' needs outer.algorithm = diloco or sparseloco")


def _check_network(cfg: Config) -> None:
    n = cfg.network
    _need(n.up_mbps > 0 and n.down_mbps > 0, f"network.up_mbps/down_mbps must be positive, got {n.up_mbps}, "
                                             f"{n.down_mbps}")
    _need(n.latency_ms >= 0 and n.step_time_s >= 0, "network.latency_ms and network.step_time_s must be >= 0")


def _check_checkpoint(cfg: Config) -> None:
    c = cfg.checkpoint
    _need(c.every >= 0, f"checkpoint.every must be >= 0 (0: only at the end), got {c.every}")
    _need(c.keep >= 1, f"checkpoint.keep must be >= 1, got {c.keep}")
    if c.resume not in ("none", "auto"):
        _need(Path(c.resume).is_dir(), f"checkpoint.resume: {c.resume} is not a checkpoint directory "
                                       "(give none, auto, or a step-N directory)")


def _check_logging(cfg: Config) -> None:
    _need(cfg.logging.log_every >= 1, f"logging.log_every must be >= 1, got {cfg.logging.log_every}")


def _check_runtime(cfg: Config) -> None:
    rt = cfg.runtime
    _need(rt.torch_threads >= 0, "runtime.torch_threads must be >= 0 (0: torch's default)")
    _choice("runtime.backend", rt.backend, ("auto", "gloo", "nccl"))
    _need(rt.zero_stage in (1, 2), f"runtime.zero_stage must be 1 or 2, got {rt.zero_stage}")
    _choice("runtime.placement_strategy", rt.placement_strategy, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    _need(rt.max_restarts >= 0, "runtime.max_restarts must be >= 0")
