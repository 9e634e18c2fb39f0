"""How a compressed pipeline replica shares a round with unconstrained replicas.

Every stage of a compressed pipeline rebuilds boundaries with the same ``T_fix``, recomputed from
the global embedding each round (``T_fix = E − E·U·Uᵀ``) so that the compressed replica's embedding
equals the global one. The first stage owns the embedding's segment; the later stages follow the
global embedding through an ``EmbeddingShadow``: the first stage relays the round's aggregated
embedding contributions (``EmbeddingRelay``, a few KB of SparseLoCo codes), and every stage applies
the same outer step (``distrain.outer.step.OuterStep``) to its copy. The alternatives measured
against that reconciliation: ``project_global`` and the span-split aggregation (``SpanSplit``).
"""

from __future__ import annotations

import struct
from typing import Any, Callable

import torch

from distrain.comm.codecs import Codec, Merge
from distrain.comm.coords import CoordBound
from distrain.comm.transport import Transport
from distrain.comm.wire import FrameLimits, FrameMeta, decode_frame, encode_frame
from distrain.config import Config
from distrain.layout import Layout, WorkerSlot
from distrain.outer.base import Contribution, Contributions, Weights
from distrain.outer.build import coord_bound_from_config, outer_step_from_config
from distrain.outer.exchange import merge_of
from distrain.parallel.pipeline.subspace import make_basis
from distrain.topology import ReplicaSpec
from distrain.worker.stage import EMBEDDING

_COUNT = struct.Struct("<I")


def needs_embedding_shadow(cfg: Config, rep: ReplicaSpec, slot: WorkerSlot) -> bool:
    """A later stage of a compressed pipeline, in a run whose global weights move in rounds."""
    return rep.compressed and slot.stage > 0 and cfg.algorithm.rounds


def project_global(cfg: Config, rep: ReplicaSpec, device: torch.device) -> Callable[[Weights], None]:
    """``compress_sync = "project_global"``: W ← U·UᵀW for the constrained matrices (attention-out
    and MLP-down of every layer before the compressed pipeline's last boundary), node0-style."""
    u = make_basis(cfg.model.dim, rep.compress_k, rep.compress_seed, device=device)
    last = rep.bounds[-2]
    names = tuple(f"layers.{i}.{m}" for i in range(last) for m in ("attention.wo.weight", "feed_forward.w2.weight"))

    @torch.no_grad()
    def apply(weights: Weights) -> None:
        for n in names:
            if n in weights:
                w = weights[n]
                w.copy_(u.to(w) @ (u.T.to(w) @ w))

    return apply


def constrained_names(rep: ReplicaSpec) -> dict[str, str]:
    """What a compressed pipeline constrains, by ordinary name: attention-out and MLP-down before
    its last boundary (columns in span(U): "left") and the embedding (rows: "right")."""
    names = {f"layers.{i}.{m}": "left" for i in range(rep.bounds[-2])
             for m in ("attention.wo.weight", "feed_forward.w2.weight")}
    return {**names, EMBEDDING: "right"}


class SpanSplit:
    """``compress_sync = "split"``: for a constrained matrix, the aggregate's in-subspace part is
    everyone's mean and its out-of-subspace part the unconstrained replicas' mean only — a
    compressed replica cannot move W outside span(U), so its sparsified contribution there is noise
    and its absence of an update there is not a vote for zero."""

    def __init__(self, codec: Codec, u: torch.Tensor, compressed: set[int], sides: dict[str, str],
                 bound: CoordBound | None = None):
        self.codec, self.u, self.compressed, self.sides = codec, u, set(compressed), sides
        self.bound = bound  # the run's per-coordinate bound, on both aggregates

    def __call__(self, name: str, kept: list[tuple[int, Any]], shape: tuple[int, ...], device: torch.device,
                 merge: Merge | None = None) -> torch.Tensor:
        agg = self.codec.decode_aggregate([et for _, et in kept], shape, device=device, merge=merge, bound=self.bound)
        side = self.sides.get(name)
        free = [i for i, (m, _) in enumerate(kept) if m not in self.compressed]
        if side is None or not free or len(free) == len(kept):
            return agg
        sub = None if merge is None else Merge(tuple(merge.scales[i] for i in free), tuple(merge.weights[i] for i in free))
        out = self.codec.decode_aggregate([kept[i][1] for i in free], shape, device=device, merge=sub, bound=self.bound)
        u = self.u.to(device=device, dtype=agg.dtype)
        diff = agg - out
        return out + (u @ (u.T @ diff) if side == "left" else (diff @ u) @ u.T)


def span_split(cfg: Config, layout: Layout, codec: Codec, device: torch.device) -> SpanSplit | None:
    """The run's span-split aggregation, when ``compress_sync = "split"`` and a pipeline is compressed."""
    reps = [r for r in layout.replicas if r.compressed]
    if cfg.topology.compress_sync != "split" or not reps:
        return None
    u = make_basis(cfg.model.dim, reps[0].compress_k, reps[0].compress_seed, device=device)
    members = {w.rank for w in layout.workers if layout.replicas[w.replica].compressed}
    return SpanSplit(codec, u, members, constrained_names(reps[0]), coord_bound_from_config(cfg))


class EmbeddingShadow:
    """A later compressed stage's copy of the global embedding, stepped like the first stage's."""

    def __init__(self, cfg: Config, initial: torch.Tensor, codec: Codec, combine: SpanSplit | None = None):
        self.combine = combine
        self.codec = codec
        self.merge = cfg.outer.merge
        self.bound = coord_bound_from_config(cfg)  # the first stage's per-coordinate bound
        self.step = outer_step_from_config(cfg)
        self.weight = {EMBEDDING: initial.detach().float().clone()}

    @property
    def embedding(self) -> torch.Tensor:
        return self.weight[EMBEDDING]

    def aggregate(self, kept: Contributions, device: torch.device) -> Weights | None:
        """The embedding's aggregate from the relayed contributions, as the first stage computed it."""
        if not kept:
            return None
        shape = tuple(self.embedding.shape)
        merge = merge_of(self.merge, kept)
        if self.combine is not None:
            return {EMBEDDING: self.combine(EMBEDDING, [(c.member, c.tensors[EMBEDDING]) for c in kept], shape, device,
                                            merge)}
        return {EMBEDDING: self.codec.decode_aggregate([c.tensors[EMBEDDING] for c in kept], shape, device=device,
                                                       merge=merge, bound=self.bound)}

    def receive(self, kept: Contributions, round_idx: int) -> None:
        """The relayed contributions of ``round_idx``: aggregated and stepped as the first stage did."""
        self.step.take(self.weight, self.aggregate(kept, self.embedding.device), round_idx)

    def flush(self) -> None:
        self.step.flush(self.weight)

    def reset_to(self, embedding: torch.Tensor) -> None:
        self.weight = {EMBEDDING: embedding.detach().float().clone().to(self.embedding.device)}
        self.step.pending = None

    def load_shared(self, tables: dict[str, Weights]) -> None:
        """The global embedding's momentum and pending aggregate (segment 0's outer state, which this
        copy steps identically): a checkpoint holds them once, with the global weights."""
        device = self.embedding.device

        def pick(table: Weights | None) -> Weights | None:
            if not table or EMBEDDING not in table:
                return None
            return {EMBEDDING: table[EMBEDDING].to(device=device, dtype=torch.float32, copy=True)}

        self.step.momentum_buf = pick(tables.get("momentum")) or {}
        self.step.pending = pick(tables.get("pending"))


class EmbeddingRelay:
    """The round's aggregated embedding contributions from a compressed pipeline's first stage
    to its later stages: the contributing members, then one validated wire frame per contribution
    (stating the contributor's work, which the merge weighs)."""

    def __init__(self, transport: Transport, codec: Codec, shape: tuple[int, ...], run_id: str, rank: int,
                 max_parts: int):
        self.transport, self.codec, self.shape = transport, codec, tuple(shape)
        self.run_id, self.rank, self.max_parts = run_id, rank, max_parts

    def send(self, dsts: list[int], kept: Contributions, round_idx: int) -> int:
        frames = [encode_frame(FrameMeta.for_codec(self.run_id, round_idx, self.rank, self.codec, c.steps, c.tokens),
                               {EMBEDDING: c.tensors[EMBEDDING]}) for c in kept]
        head = _COUNT.pack(len(kept)) + struct.pack(f"<{len(kept)}I", *(c.member for c in kept))
        sent = 0
        for dst in dsts:
            self.transport.send_bytes(dst, head)
            for f in frames:
                self.transport.send_bytes(dst, f)
            sent += len(head) + sum(len(f) for f in frames)
        return sent

    def receive(self, src: int, round_idx: int) -> Contributions:
        """The contributions (of the embedding only) the first stage aggregated."""
        head = self.transport.recv_bytes(src)
        (n,) = _COUNT.unpack_from(head) if len(head) >= _COUNT.size else (-1,)
        if not 0 <= n <= self.max_parts or len(head) != _COUNT.size + 4 * n:
            raise ValueError(f"embedding relay from rank {src}: a header of {len(head)} bytes for {n} contributions "
                             f"(at most {self.max_parts})")
        members = struct.unpack_from(f"<{n}I", head, _COUNT.size)
        shapes = {EMBEDDING: self.shape}
        kept = []
        for m in members:
            meta, tensors = decode_frame(self.transport.recv_bytes(src), shapes, self.run_id, round_idx,
                                         FrameLimits(), codec=self.codec, worker=src)
            kept.append(Contribution(int(m), tensors, meta.steps, meta.tokens))
        return kept
