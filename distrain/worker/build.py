"""The one way every launch mode builds a worker: stage, segment syncs, data stream, inner schedule.

Every replica and stage starts from the same weights (each parameter seeded by its name), so the
modes agree without ever building the whole model, and simulation, torchrun and Ray end on the
same weights bit for bit.
"""

from __future__ import annotations

from distrain.comm.clock import ComputeClock
from distrain.comm.device_groups import DeviceGroups
from distrain.comm.transport import Transport
from distrain.config import Config
from distrain.data import DocumentSampler, PreparedData, TokenSampler, read_shard
from distrain.data.documents import document_lengths
from distrain.inner.build import WorkerEnv, build_schedule
from distrain.inner.devices import resolve_device
from distrain.layout import Layout, segment_of
from distrain.outer.base import OuterOptimizer
from distrain.outer.build import codec_from_config, make_outer
from distrain.worker.compressed import (
    EmbeddingRelay,
    EmbeddingShadow,
    SpanSplit,
    needs_embedding_shadow,
    project_global,
    span_split,
)
from distrain.worker.stage import BuiltStage, build_stage, initial_embedding
from distrain.worker.worker import Worker


def build_sampler(env: WorkerEnv, data: PreparedData) -> TokenSampler | DocumentSampler:
    """The worker's data stream: its shard of the training tokens, as windows or whole documents."""
    cfg = env.cfg
    shard, n_shards = env.layout.data_shard(env.rank)
    tokens = read_shard(data.train_path)
    if cfg.data.sampler == "documents":
        max_doc_len, batch_tokens = document_lengths(cfg.data, cfg.model.max_seq_len, cfg.train.batch_size)
        return DocumentSampler(tokens, data.eos_id, max_doc_len, batch_tokens, rank=shard, world_size=n_shards,
                               seed=cfg.run.seed)
    return TokenSampler(tokens, cfg.data.seq_len, cfg.train.batch_size, rank=shard, world_size=n_shards,
                        seed=cfg.run.seed)


def build_syncs(env: WorkerEnv, stage: BuiltStage, combine: SpanSplit | None) -> dict[int, OuterOptimizer]:
    """One outer optimiser per segment this worker owns, over that segment's initial weights."""
    cfg, layout = env.cfg, env.layout
    post_step = None
    if cfg.topology.compress_sync == "project_global":
        compressed = [r for r in layout.replicas if r.compressed]
        post_step = project_global(cfg, compressed[0], env.device) if compressed else None
    syncs: dict[int, OuterOptimizer] = {}
    for g in layout.owned_segments(env.rank):
        mine = {n: t.to(env.device) for n, t in stage.initial.items()
                if segment_of(n, layout.n_layers, layout.segments) == g}
        syncs[g] = make_outer(cfg, mine, env.rank, env.transport, layout.segment_group(g), g, post_step, combine)
    return syncs


def build_embedding_follow(env: WorkerEnv, combine: SpanSplit | None) -> tuple[EmbeddingShadow | None,
                                                                                 EmbeddingRelay | None]:
    """A compressed pipeline in a round-based run: the relay of the embedding's contributions
    (every stage) and the shadow of the global embedding (its later stages)."""
    cfg, rep = env.cfg, env.replica
    if not (rep.compressed and cfg.algorithm.rounds):
        return None, None
    codec = codec_from_config(cfg)
    shape = (cfg.model.vocab_size, cfg.model.dim)
    relay = EmbeddingRelay(env.transport, codec, shape, cfg.run_id(), env.rank, max_parts=env.layout.n_replicas)
    shadow = None
    if needs_embedding_shadow(cfg, rep, env.slot):
        e0 = initial_embedding(cfg).to(env.device)
        shadow = EmbeddingShadow(cfg, e0, codec, combine)
    return shadow, relay


def build_worker(cfg: Config, layout: Layout, rank: int, data: PreparedData, transport: Transport,
                 device_groups: DeviceGroups | None = None, clock: ComputeClock | None = None) -> Worker:
    """The worker of ``rank``: its stage of the model, its segments' outer optimisers, its data
    stream and its inner schedule."""
    env = WorkerEnv(cfg, layout, rank, resolve_device(cfg.run.device), transport, device_groups, clock)
    rep = env.replica
    stage = build_stage(cfg, env.slot, rep, env.device)
    combine = span_split(cfg, layout, codec_from_config(cfg), env.device) if cfg.algorithm.rounds else None
    syncs = build_syncs(env, stage, combine)
    sampler = build_sampler(env, data)
    grad_sync = syncs[0].grad_sync if cfg.algorithm.per_step and 0 in syncs else None
    schedule = build_schedule(env, stage.model, stage.sub, sampler, cfg.train, grad_sync)
    shadow, relay = build_embedding_follow(env, combine)
    worker = Worker(cfg, layout, rank, stage, schedule, syncs, sampler, shadow, relay)
    if not stage.view.exact:  # a compressed stage starts from the initial weights mapped onto its constraint
        worker.load_global(stage.initial)
    return worker
