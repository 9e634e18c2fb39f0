"""The configuration's sections as typed dataclasses, the model presets and the algorithm table.

Every section is a plain dataclass with defaults; ``Config`` holds them. What a replica is lives in
``distrain.config.replica``; how values are checked, in ``distrain.config.checks``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from distrain.config.replica import TopologyConfig

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
    # Start from these weights (continued pre-training): a Hugging Face LLaMA directory, a distrain run
    # directory (its newest checkpoint) or one of its checkpoints/step-N directories. Empty: seeded.
    init_from: str = ""


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


# The inner optimisers a replica may run: the name → what it stores per parameter is in distrain.optim.
INNER_OPTIMIZERS = ("adamw", "adamw8bit", "adamw4bit")


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
    # Inner optimiser: adamw (fp32 moments, 8 bytes of state per parameter) | adamw8bit | adamw4bit
    # (torchao's block-quantised moments, about 2 and 1 bytes: the `lowmem` extra). A replica table
    # may set its own (`optimizer`), so a worker with less memory can still hold a full replica.
    optimizer: str = "adamw"
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
    # How contributions of replicas that ran different step counts in a round are merged:
    # mean (as sent), steps (FedNova: each divided by its steps, the merge rescaled by the mean
    # count), tokens (weighted by the tokens each trained on).
    merge: str = "mean"
    dense_dtype: str = "fp32"  # DiLoCo wire dtype: fp32 | bf16
    apply_delay: int = 0  # 1: apply each aggregate one round late (overlap)
    robust_clip: float = 2.0  # clip a contribution above this multiple of the round's low-median norm (0: off)
    robust_reject: float = 10.0  # reject one above this multiple as an outlier
    robust_coord_clip: float = 1.5  # cut each value above this multiple of its chunk's robust scale (0: off)
    robust_min_selectors: int = 1  # coordinates fewer replicas selected are divided by R, not by their selectors
    robust_direction: bool = True  # set aside a contribution that pulls against the others' consensus
    robust_direction_cos: float = 0.0  # ... when its cosine to the sum of the others is below this

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
    # One backend per kind of group: the frames between replicas (bytes on slow links) and the tensors
    # inside a replica (DDP, ZeRO, Ulysses, plan broadcasts), so a GPU cluster runs gloo for the first
    # and NCCL for the second.
    byte_backend: str = "gloo"  # gloo | nccl
    device_backend: str = "auto"  # auto (nccl with CUDA, else gloo) | gloo | nccl
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
