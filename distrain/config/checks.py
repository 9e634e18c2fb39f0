"""Validation: every value and combination, checked when the config loads, before any work.

Each check raises a one-line ``ConfigError`` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import TYPE_CHECKING

from distrain.config.replica import CompressConfig, ReplicaConfig
from distrain.config.sections import ALGORITHMS, INNER_OPTIMIZERS, Config, ModelConfig
from distrain.config.tomlconf import ConfigError, choice, need, source_of

if TYPE_CHECKING:
    from distrain.weights.source import Source


# Validation: every value, before any work.
def validate(cfg: Config) -> None:
    """Raise a one-line ConfigError for the first invalid value or combination."""
    for check in (_check_run, _check_model, _check_data, _check_train, _check_outer, _check_topology,
                  _check_optimizers, _check_network, _check_checkpoint, _check_logging, _check_runtime):
        check(cfg)


def _check_run(cfg: Config) -> None:
    r = cfg.run
    choice("run.device", r.device, ("auto", "cpu", "cuda"))
    need(bool(r.name) and "/" not in r.name and r.name not in (".", ".."),
          f"run.name: {r.name!r} must be a plain directory name")
    if r.device == "cuda":
        import torch

        need(torch.cuda.is_available(), "run.device = 'cuda' but no CUDA device is available here")


def _check_model(cfg: Config) -> None:
    m = cfg.model
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len"):
        need(getattr(m, key) >= 1, f"model.{key} must be >= 1, got {getattr(m, key)}")
    need(m.vocab_size >= 0 and m.ffn_dim >= 0, "model.vocab_size and model.ffn_dim must be >= 0 (0: automatic)")
    need(m.dim % m.n_heads == 0, f"model.dim ({m.dim}) must be divisible by model.n_heads ({m.n_heads})")
    need(m.n_heads % m.n_kv_heads == 0,
          f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.n_kv_heads})")
    need((m.dim // m.n_heads) % 2 == 0, f"model.dim / model.n_heads = {m.dim // m.n_heads} must be even (RoPE)")
    need(m.rope_theta > 0 and m.norm_eps > 0 and m.init_std > 0,
          "model.rope_theta, model.norm_eps and model.init_std must be positive")
    if m.init_from:
        init_from_source(m)


def init_from_source(m: ModelConfig) -> Source:
    """``model.init_from``'s weights, checked against the configured model (shapes only, from metadata)."""
    from distrain.weights.source import WeightsError, check_fits, open_source

    try:
        source = open_source(m.init_from)
        check_fits(source, m)
    except WeightsError as e:
        raise ConfigError(f"model.init_from: {e}") from None
    return source


def _check_data(cfg: Config) -> None:
    d = cfg.data
    need(d.seq_len >= 1, f"data.seq_len must be >= 1, got {d.seq_len}")
    need(d.seq_len <= cfg.model.max_seq_len,
          f"data.seq_len ({d.seq_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})")
    need(0 < d.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    need(d.max_bytes >= 0, f"data.max_bytes must be >= 0 (0: no cap), got {d.max_bytes}")
    if d.source != "stdlib":
        need(Path(d.source).exists(), f"data.source: {d.source} does not exist (give a file, a directory, "
                                       "a .jsonl file, or 'stdlib')")
        from distrain.data.corpus import CorpusError, check_source

        try:
            check_source(d.source)
        except CorpusError as e:
            raise ConfigError(f"data.source: {e}") from None
    if d.tokenizer:
        need(Path(d.tokenizer).is_file(), f"data.tokenizer: {d.tokenizer} is not a file (a HF tokenizer.json)")
    else:
        need(d.vocab_size >= 257, f"data.vocab_size must be >= 257 (every byte + end of text), got {d.vocab_size}")
    # -- document batches (issue 11: data.sampler, data.max_doc_len, data.batch_tokens) --
    choice("data.sampler", d.sampler, ("windows", "documents"))
    need(d.max_doc_len >= 0, f"data.max_doc_len must be >= 0 (0: model.max_seq_len), got {d.max_doc_len}")
    need(d.max_doc_len <= cfg.model.max_seq_len,
          f"data.max_doc_len ({d.max_doc_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})")
    need(d.batch_tokens >= 0, f"data.batch_tokens must be >= 0 (0: train.batch_size * max_doc_len), got {d.batch_tokens}")
    longest = d.max_doc_len or cfg.model.max_seq_len
    need(not d.batch_tokens or d.batch_tokens >= longest,
          f"data.batch_tokens ({d.batch_tokens}) must be >= the longest piece, data.max_doc_len ({longest})")
    if d.sampler == "documents":
        need(cfg.train.chunkwise.mode == "off", "data.sampler = 'documents' does not combine with train.chunkwise")
        for i, r in enumerate(cfg.topology.tables()):  # document batches are run by adaptive-SP replicas
            need(r.kind == "full" and r.parallel in ("auto", "sp", "single"),
                  f"{source_of(r)} (replica table {i}): data.sampler = 'documents' runs on full replicas with "
                  "parallel = 'sp' (or one device); pipelines and ddp/deepspeed replicas read windows")


def _check_train(cfg: Config) -> None:
    t = cfg.train
    for key in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches"):
        need(getattr(t, key) >= 1, f"train.{key} must be >= 1, got {getattr(t, key)}")
    need(t.lr > 0, f"train.lr must be positive, got {t.lr}")
    need(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    need(t.warmup_steps >= 0 and t.weight_decay >= 0 and t.grad_clip >= 0,
          "train.warmup_steps, train.weight_decay and train.grad_clip must be >= 0")
    need(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, f"train.beta1/beta2 must be in [0, 1), got {t.beta1}, {t.beta2}")
    choice("train.precision", t.precision, ("auto", "fp32", "bf16"))
    choice("train.optimizer", t.optimizer, INNER_OPTIMIZERS)
    cw = t.chunkwise
    choice("train.chunkwise.mode", cw.mode, ("off", "seco", "spaco"))
    choice("train.chunkwise.sampling", cw.sampling, ("bernoulli", "uniform"))
    if cw.mode != "off":
        need(cw.chunk_len >= 1, "train.chunkwise.chunk_len must be >= 1 when train.chunkwise.mode is not off")
        need(cw.pad or cfg.data.seq_len % cw.chunk_len == 0,
              f"data.seq_len ({cfg.data.seq_len}) is not a multiple of train.chunkwise.chunk_len ({cw.chunk_len}); "
              "set train.chunkwise.pad = true to pad")
        if cw.mode == "spaco":
            need(cw.sparse_chunks >= 1, "train.chunkwise.sparse_chunks (t) must be >= 1 for spaco")
        need(not cw.cap or cw.cap >= 1, f"train.chunkwise.cap must be 0 (no cap) or >= 1, got {cw.cap}")


def _check_outer(cfg: Config) -> None:
    o = cfg.outer
    choice("outer.algorithm", o.algorithm, tuple(ALGORITHMS))
    choice("outer.quantizer", o.quantizer, ("reference", "symmetric", "none"))
    choice("outer.index_coding", o.index_coding, ("gaps", "packed"))
    choice("outer.aggregation", o.aggregation, ("mean_selected", "sum_over_r"))
    choice("outer.merge", o.merge, ("mean", "steps", "tokens"))
    choice("outer.dense_dtype", o.dense_dtype, ("fp32", "bf16"))
    need(o.inner_steps >= 1, f"outer.inner_steps must be >= 1, got {o.inner_steps}")
    need(o.lr > 0, f"outer.lr must be positive, got {o.lr}")
    need(0 <= o.momentum < 1, f"outer.momentum must be in [0, 1), got {o.momentum}")
    need(1 <= o.chunk <= 4096, f"outer.chunk must be in [1, 4096], got {o.chunk}")
    need(1 <= o.topk <= min(4096, o.chunk * o.chunk),
          f"outer.topk must be in [1, {min(4096, o.chunk * o.chunk)}] (the elements of a {o.chunk}x{o.chunk} block), "
          f"got {o.topk}")
    for k in o.topk_warmup:
        need(isinstance(k, int) and 1 <= k <= min(4096, o.chunk * o.chunk),
              f"outer.topk_warmup: {k!r} must be an integer in [1, {min(4096, o.chunk * o.chunk)}]")
    if o.topk_warmup:
        need(o.algorithm == "sparseloco", f"outer.topk_warmup is for outer.algorithm = 'sparseloco', "
                                           f"not {o.algorithm!r}")
        need(not any(r.kind == "pipeline" and (r.subspace.k or r.compress == "auto") for r in cfg.topology.tables()),
              "outer.topk_warmup does not combine with compressed pipeline replicas yet (their span-split "
              "aggregation and embedding relay decode with one fixed k)")
    need(o.index_coding != "gaps" or o.chunk <= 256,
          f"outer.index_coding = 'gaps' stores 16-bit gaps: outer.chunk must be <= 256, got {o.chunk}")
    need(0 <= o.ef_beta <= 1, f"outer.ef_beta must be in [0, 1], got {o.ef_beta}")
    need(o.apply_delay in (0, 1), f"outer.apply_delay must be 0 or 1, got {o.apply_delay}")
    need(o.robust_clip == 0 or 1 <= o.robust_clip <= o.robust_reject,
          f"outer.robust_clip must be 0 (off) or in [1, outer.robust_reject = {o.robust_reject}], got {o.robust_clip}")
    need(o.robust_coord_clip == 0 or 1 <= o.robust_coord_clip < math.inf,
          f"outer.robust_coord_clip must be 0 (off) or a finite number >= 1, got {o.robust_coord_clip}")
    need(isinstance(o.robust_min_selectors, int) and not isinstance(o.robust_min_selectors, bool)
          and o.robust_min_selectors >= 1,
          f"outer.robust_min_selectors must be an integer >= 1 (1: off), got {o.robust_min_selectors!r}")
    need(-1 <= o.robust_direction_cos <= 1,
          f"outer.robust_direction_cos must be in [-1, 1], got {o.robust_direction_cos}")


def _check_topology(cfg: Config) -> None:
    t = cfg.topology
    need(t.replicas >= 0, f"topology.replicas must be >= 1 (or 0 with replica tables), got {t.replicas}")
    if t.replica:
        n = sum(r.count for r in t.replica)
        need(t.replicas in (0, n), f"topology.replicas = {t.replicas} but the [[topology.replica]] tables describe "
                                   f"{n} replicas; drop topology.replicas or make them agree")
    for i, table in enumerate(t.tables()):
        check_replica(table, i, cfg)
    choice("topology.straggler_policy", t.straggler_policy, ("window", "fewer_steps", "wait"))
    choice("topology.step_times", t.step_times, ("measured", "configured"))
    need(t.window_s >= 0, f"topology.window_s must be >= 0 (0: H x the fastest replica's step time), got {t.window_s}")
    need(t.grace_s > 0, f"topology.grace_s must be positive, got {t.grace_s}")
    need(t.grace_s <= t.round_timeout_s, f"topology.grace_s ({t.grace_s}) must not exceed topology.round_timeout_s "
                                         f"({t.round_timeout_s})")
    need(not t.step_plan or Path(t.step_plan).is_file(),
         f"topology.step_plan: {t.step_plan} is not a file (give a run's metrics.jsonl to replay its step counts)")
    need(not t.step_plan or t.straggler_policy == "window", "topology.step_plan replays a window run: set "
                                                            "topology.straggler_policy = 'window'")
    choice("topology.compress_sync", t.compress_sync, ("project_start", "split", "project_global"))
    compressed = {(r.subspace.k, r.subspace.seed, str(r.stages)) for r in t.tables()
                  if r.kind == "pipeline" and r.subspace.k}
    if t.compress_sync != "project_start":
        need(not any(r.kind == "pipeline" and r.subspace.k and r.subspace.basis != "seeded" for r in t.tables()),
             f"topology.compress_sync = {t.compress_sync!r} reconciles on the seeded basis: it does not combine "
             "with compress.basis = 'embedding' (use project_start)")
        need(len(compressed) <= 1, f"topology.compress_sync = {t.compress_sync!r} works with one subspace: every "
                                    "compressed pipeline needs the same compress.k, seed and stages")
    need(0 < t.quorum <= 1, f"topology.quorum must be in (0, 1], got {t.quorum}")
    need(t.round_timeout_s > 0, f"topology.round_timeout_s must be positive, got {t.round_timeout_s}")
    algo, tables = cfg.algorithm, t.tables()
    if t.n_replicas > 1:
        need(algo.rounds or algo.per_step, "outer.algorithm = 'none' trains one replica; set topology.replicas = 1 "
                                            "or pick ddp, diloco or sparseloco")
    big = [i for i, r in enumerate(tables) if r.kind == "pipeline" or r.devices > 1]
    if big and t.n_replicas > 1:
        need(algo.rounds, f"replica table {big[0]} has several workers: outer.algorithm must be diloco or "
                           "sparseloco (the outer round runs per segment)")
    if any(r.kind == "full" and r.devices > 1 for r in tables):
        need(cfg.train.chunkwise.mode == "off", "multi-device replicas do not combine with train.chunkwise yet")
    if t.straggler_policy == "fewer_steps":
        need(algo.rounds, "topology.straggler_policy = 'fewer_steps' needs outer.algorithm = diloco or sparseloco")


def _check_optimizers(cfg: Config) -> None:
    """A quantised-state optimiser that some replica runs needs torchao (an optional extra, imported
    only by the replicas that run one): its absence is one line now, not a traceback mid-run."""
    for i, table in enumerate(cfg.topology.tables()):
        name = table.optimizer or cfg.train.optimizer
        if name != "adamw" and importlib.util.find_spec("torchao") is None:
            key = f"{source_of(table)} (replica table {i}): optimizer" if table.optimizer else "train.optimizer"
            raise ConfigError(f"{key} = {name!r} needs torchao: pip install 'distrain[lowmem]'")


def _check_network(cfg: Config) -> None:
    n = cfg.network
    need(n.up_mbps > 0 and n.down_mbps > 0, f"network.up_mbps/down_mbps must be positive, got {n.up_mbps}, "
                                             f"{n.down_mbps}")
    need(n.latency_ms >= 0 and n.step_time_s >= 0, "network.latency_ms and network.step_time_s must be >= 0")


def _check_checkpoint(cfg: Config) -> None:
    c = cfg.checkpoint
    need(c.every >= 0, f"checkpoint.every must be >= 0 (0: only at the end), got {c.every}")
    need(c.keep >= 1, f"checkpoint.keep must be >= 1, got {c.keep}")
    if c.resume not in ("none", "auto"):
        need(Path(c.resume).is_dir(), f"checkpoint.resume: {c.resume} is not a checkpoint directory "
                                       "(give none, auto, or a step-N directory)")
        from distrain.checkpoint import CheckpointError, check_checkpoint_dir

        try:
            check_checkpoint_dir(Path(c.resume))
        except CheckpointError as e:
            raise ConfigError(f"checkpoint.resume: {e} (give none, auto, or a step-N directory)") from None


def _check_logging(cfg: Config) -> None:
    need(cfg.logging.log_every >= 1, f"logging.log_every must be >= 1, got {cfg.logging.log_every}")


def _check_runtime(cfg: Config) -> None:
    rt = cfg.runtime
    need(rt.torch_threads >= 0, "runtime.torch_threads must be >= 0 (0: torch's default)")
    choice("runtime.byte_backend", rt.byte_backend, ("gloo", "nccl"))
    choice("runtime.device_backend", rt.device_backend, ("auto", "gloo", "nccl"))
    need(rt.zero_stage in (1, 2), f"runtime.zero_stage must be 1 or 2, got {rt.zero_stage}")
    choice("runtime.placement_strategy", rt.placement_strategy, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    need(rt.max_restarts >= 0, "runtime.max_restarts must be >= 0")


def check_replica(table: ReplicaConfig, index: int, cfg: Config) -> None:
    """One ``[[topology.replica]]`` table against the rest of the config."""
    where = f"{source_of(table)} (replica table {index})"
    choice(f"{where}: kind", table.kind, ("full", "pipeline"))
    need(table.count >= 1, f"{where}: count must be >= 1, got {table.count}")
    choice(f"{where}: parallel", table.parallel, ("auto", "single", "ddp", "deepspeed", "sp"))
    if table.parallel == "sp":
        need(table.kind == "full", f"{where}: parallel = 'sp' is for kind = 'full'")
        need(cfg.data.sampler == "documents", f"{where}: parallel = 'sp' plans whole documents: set "
                                               "data.sampler = 'documents'")
    need(not table.sp_costs or Path(table.sp_costs).is_file(), f"{where}: sp_costs: {table.sp_costs} is not a file")
    need(table.sp_capacity >= 0, f"{where}: sp_capacity must be >= 0 (0: no cap), got {table.sp_capacity}")
    if table.optimizer:
        choice(f"{where}: optimizer", table.optimizer, INNER_OPTIMIZERS)
    need(table.parallel != "deepspeed" or (table.optimizer or cfg.train.optimizer) == "adamw",
          f"{where}: parallel = 'deepspeed' partitions AdamW's fp32 moments itself (ZeRO); its optimizer must "
          f"be 'adamw', not {table.optimizer or cfg.train.optimizer!r}")
    n_layers = cfg.model.n_layers
    if table.kind == "full":
        need(table.devices >= 1, f"{where}: devices must be >= 1, got {table.devices}")
        need(table.stages in (0, [], 1), f"{where}: stages is for kind = 'pipeline' (a full replica holds every layer)")
        if table.parallel == "single":
            need(table.devices == 1, f"{where}: parallel = 'single' runs on one device, devices = {table.devices}; "
                                     "use parallel = 'ddp' or 'deepspeed'")
        if table.parallel in ("ddp", "deepspeed"):
            need(table.devices >= 2, f"{where}: parallel = {table.parallel!r} needs devices >= 2")
    else:
        need(table.devices == 1, f"{where}: devices is for kind = 'full'; a pipeline's workers are its stages")
        need(table.parallel in ("auto", "single"), f"{where}: parallel is for kind = 'full'")
        if isinstance(table.stages, int):
            need(2 <= table.stages <= n_layers,
                  f"{where}: stages = {table.stages} must be between 2 and model.n_layers = {n_layers}")
        else:
            b = table.stages
            need(len(b) >= 3 and b[0] == 0 and b[-1] == n_layers and all(x < y for x, y in zip(b, b[1:])),
                  f"{where}: stages = {b} must be layer bounds [0, ..., {n_layers}], strictly increasing, "
                  "at least 2 stages")
        need(not cfg.model.tie_embeddings, f"{where}: a pipeline puts the embedding and the head on different "
                                            "stages; model.tie_embeddings must be false")
        choice(f"{where}: schedule", table.schedule, ("1f1b", "gpipe"))
        choice(f"{where}: wire_dtype", table.wire_dtype, ("bf16", "fp32", "int8", "int4"))
        seqs = cfg.train.batch_size * cfg.train.grad_accum
        need(table.microbatches >= 0 and (table.microbatches == 0 or seqs % table.microbatches == 0),
              f"{where}: microbatches = {table.microbatches} must divide train.batch_size x train.grad_accum = "
              f"{seqs} (0: automatic)")
        c = table.subspace
        if isinstance(table.compress, str):
            need(table.compress == "auto", f"{where}: compress = {table.compress!r}: give a table "
                                           "({k = ..., method = ...}) or \"auto\"")
            need(cfg.network.step_time_s > 0, f"{where}: compress = \"auto\" weighs boundary transfers against "
                                              "compute: set network.step_time_s (seconds per inner step at speed 1)")
        need(0 <= c.k <= cfg.model.dim, f"{where}: compress.k = {c.k} must be in [0, model.dim = {cfg.model.dim}] "
                                         "(0: uncompressed)")
        choice(f"{where}: compress.method", c.method, ("reparam", "project"))
        choice(f"{where}: compress.basis", c.basis, ("seeded", "embedding"))
        need(c.basis == "seeded" or cfg.algorithm.rounds, f"{where}: compress.basis = 'embedding' follows the global "
                                                          "embedding round by round: it needs an outer algorithm "
                                                          "with rounds (sparseloco, diloco)")
    need(table.kind == "pipeline" or (table.compress == CompressConfig() and table.microbatches == 0),
          f"{where}: compress and microbatches are for kind = 'pipeline'")
    n = table.workers(n_layers)
    for key in ("speed", "up_mbps", "down_mbps", "latency_ms", "cpus", "gpus", "memory_mb"):
        v = getattr(table, key)
        vals = v if isinstance(v, list) else [v]
        if isinstance(v, list) and v:
            need(len(v) == n, f"{where}: {key} has {len(v)} entries for the replica's {n} workers "
                               "(give one number for all, or one per worker)")
        lo_ok = (lambda x: x > 0) if key in ("speed", "up_mbps", "down_mbps") else (lambda x: x >= 0)
        need(all(lo_ok(x) for x in vals), f"{where}: {key} must be "
              f"{'positive' if key in ('speed', 'up_mbps', 'down_mbps') else 'non-negative'}, got {v}")
