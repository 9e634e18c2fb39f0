"""What a worker holds: its stage of the model, seen in the ordinary parameterisation.

A full replica's device and an uncompressed pipeline stage hold ordinary parameters
(``ExactView``). A compressed pipeline stage holds ``Z`` (``W = U·Z``) for attention-out and
MLP-down, and ``E_k`` beside a frozen token table ``T_fix`` for the embedding
(``parallel.subspace``); its ``SubspaceView`` materialises the ordinary weights for the outer
round (pseudo-gradients are exchanged in the ordinary parameterisation, so compressed and
uncompressed replicas share one round) and maps the global weights back onto the constraint.

Every stage of a compressed pipeline rebuilds boundaries with the same ``T_fix``, recomputed from
the global embedding each round (``T_fix = E − E·U·Uᵀ``) so that the compressed replica's embedding
equals the global one. The first stage owns the embedding's segment; the later stages follow the
global embedding through an ``EmbeddingShadow``: the first stage relays the round's aggregated
embedding contributions (``EmbeddingRelay``, a few KB of SparseLoCo codes), and every stage applies
the same deterministic outer step to its copy.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from comm.codecs import Codec
from comm.transport import Transport
from comm.wire import FrameLimits, FrameMeta, decode_frame, encode_frame
from distrain.config import Config
from distrain.layout import Layout, WorkerSlot
from distrain.model import build_model, initial_tensor
from distrain.outer import Weights, outer_sgd, owned_parameters
from distrain.topology import ReplicaSpec
from parallel.subspace import Subspace, compress_stage, make_basis, split_embedding

EMBEDDING = "tok_embeddings.weight"
_COUNT = struct.Struct("<I")


class ExactView:
    """The model's own parameters are the ordinary ones."""

    exact = True

    def __init__(self, model: nn.Module):
        self.params = owned_parameters(model)

    def read(self) -> Weights:
        return {n: p.detach().float() for n, p in self.params.items()}

    @torch.no_grad()
    def write(self, values: Weights, embedding: torch.Tensor | None = None) -> None:
        for n, p in self.params.items():
            p.copy_(values[n].to(p.device, p.dtype))


class SubspaceView:
    """A compressed stage: ordinary weights materialised (``U·Z``), written back onto the constraint."""

    exact = False

    def __init__(self, sub: Subspace):
        self.sub = sub

    def read(self) -> Weights:
        return {n: t.float() for n, t in self.sub.ordinary_parameters().items()}

    def write(self, values: Weights, embedding: torch.Tensor | None = None) -> None:
        self.sub.load_ordinary(values, embedding=embedding)


@dataclass
class BuiltStage:
    model: nn.Module
    view: ExactView | SubspaceView
    initial: Weights  # the unconstrained initial weights: what every replica's global weights start from
    sub: Subspace | None = None


def build_stage(cfg: Config, slot: WorkerSlot, rep: ReplicaSpec, device: torch.device) -> BuiltStage:
    """The layers ``slot`` holds, seeded by name; constrained when its pipeline is compressed."""
    model = build_model(cfg.model, *slot.layers, seed=cfg.run.seed).to(device)
    initial = {n: p.detach().float().clone() for n, p in owned_parameters(model).items()}
    if not rep.compressed:
        return BuiltStage(model, ExactView(model), initial)
    u = make_basis(cfg.model.dim, rep.compress_k, rep.compress_seed, device=device)
    table = None
    if not model.is_first:  # T_fix from the (seeded) initial embedding, as the first stage computes it
        e0 = initial_tensor(cfg.model, EMBEDDING, (cfg.model.vocab_size, cfg.model.dim), cfg.run.seed).to(device)
        table = split_embedding(e0, u)[1]
    sub = compress_stage(model, u, token_table=table, method=rep.compress_method)
    return BuiltStage(model, SubspaceView(sub), initial, sub)


def needs_embedding_shadow(cfg: Config, rep: ReplicaSpec, slot: WorkerSlot) -> bool:
    """A later stage of a compressed pipeline, in a run whose global weights move in rounds."""
    return rep.compressed and slot.stage > 0 and cfg.algorithm.rounds


def segment_shapes(cfg: Config, layout: Layout, g: int) -> dict[str, tuple[int, ...]]:
    """Every parameter shape of segment ``g`` (a catch-up frame's schema), without allocating it."""
    a, b = layout.segments[g]
    with torch.device("meta"):
        model = build_model(cfg.model, a, b)
    return {n: tuple(p.shape) for n, p in owned_parameters(model).items()}


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

    def __init__(self, codec: Codec, u: torch.Tensor, compressed: set[int], sides: dict[str, str]):
        self.codec, self.u, self.compressed, self.sides = codec, u, set(compressed), sides

    def __call__(self, name: str, kept: list[tuple[int, Any]], shape: tuple[int, ...],
                 device: torch.device) -> torch.Tensor:
        agg = self.codec.decode_aggregate([et for _, et in kept], shape, device=device)
        side = self.sides.get(name)
        free = [et for m, et in kept if m not in self.compressed]
        if side is None or not free or len(free) == len(kept):
            return agg
        out = self.codec.decode_aggregate(free, shape, device=device)
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
    return SpanSplit(codec, u, members, constrained_names(reps[0]))


class EmbeddingShadow:
    """A later compressed stage's copy of the global embedding, stepped like the first stage's."""

    def __init__(self, cfg: Config, initial: torch.Tensor, codec: Codec, combine: SpanSplit | None = None):
        o = cfg.outer
        self.combine = combine
        self.lr, self.momentum, self.nesterov, self.delay = o.lr, o.momentum, o.nesterov, o.apply_delay
        self.codec = codec
        self.weight = {EMBEDDING: initial.detach().float().clone()}
        self.momentum_buf: Weights = {}
        self.pending: Weights | None = None

    @property
    def embedding(self) -> torch.Tensor:
        return self.weight[EMBEDDING]

    def aggregate(self, kept: list[tuple[int, Any]], device: torch.device) -> Weights | None:
        """The embedding's aggregate from the relayed contributions, as the first stage computed it."""
        if not kept:
            return None
        shape = tuple(self.embedding.shape)
        if self.combine is not None:
            return {EMBEDDING: self.combine(EMBEDDING, kept, shape, device)}
        return {EMBEDDING: self.codec.decode_aggregate([et for _, et in kept], shape, device=device)}

    def receive(self, agg: Weights | None, round_idx: int) -> None:
        if self.delay:
            outer_sgd(self.weight, self.pending, self.momentum_buf, self.lr, self.momentum, self.nesterov, round_idx)
            self.pending = agg
        else:
            outer_sgd(self.weight, agg, self.momentum_buf, self.lr, self.momentum, self.nesterov, round_idx)

    def flush(self) -> None:
        outer_sgd(self.weight, self.pending, self.momentum_buf, self.lr, self.momentum, self.nesterov, -1)
        self.pending = None

    def reset_to(self, embedding: torch.Tensor) -> None:
        self.weight = {EMBEDDING: embedding.detach().float().clone().to(self.embedding.device)}
        self.pending = None

    def state_dict(self) -> dict[str, Any]:
        return {"weight": self.weight, "momentum": self.momentum_buf, "pending": self.pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weight = {k: v.float().clone() for k, v in state["weight"].items()}
        self.momentum_buf = {k: v.float().clone() for k, v in state["momentum"].items()}
        self.pending = None if state["pending"] is None else {k: v.float().clone() for k, v in state["pending"].items()}


class EmbeddingRelay:
    """The round's aggregated embedding contributions from a compressed pipeline's first stage
    to its later stages: the contributing members, then one validated wire frame per contribution."""

    def __init__(self, transport: Transport, codec: Codec, shape: tuple[int, ...], run_id: str, rank: int,
                 max_parts: int):
        self.transport, self.codec, self.shape = transport, codec, tuple(shape)
        self.run_id, self.rank, self.max_parts = run_id, rank, max_parts

    def send(self, dsts: list[int], kept: list[tuple[int, Any]], round_idx: int) -> int:
        frames = [encode_frame(FrameMeta.for_codec(self.run_id, round_idx, self.rank, self.codec), {EMBEDDING: et})
                  for _, et in kept]
        head = _COUNT.pack(len(kept)) + struct.pack(f"<{len(kept)}I", *(m for m, _ in kept))
        sent = 0
        for dst in dsts:
            self.transport.send_bytes(dst, head)
            for f in frames:
                self.transport.send_bytes(dst, f)
            sent += len(head) + sum(len(f) for f in frames)
        return sent

    def receive(self, src: int, round_idx: int) -> list[tuple[int, Any]]:
        """The contributing (member, encoded embedding) pairs the first stage aggregated."""
        head = self.transport.recv_bytes(src)
        (n,) = _COUNT.unpack_from(head) if len(head) >= _COUNT.size else (-1,)
        if not 0 <= n <= self.max_parts or len(head) != _COUNT.size + 4 * n:
            raise ValueError(f"embedding relay from rank {src}: a header of {len(head)} bytes for {n} contributions "
                             f"(at most {self.max_parts})")
        members = struct.unpack_from(f"<{n}I", head, _COUNT.size)
        shapes = {EMBEDDING: self.shape}
        kept = []
        for m in members:
            _, tensors = decode_frame(self.transport.recv_bytes(src), shapes, self.run_id, round_idx,
                                      FrameLimits(), codec=self.codec, worker=src)
            kept.append((int(m), tensors[EMBEDDING]))
        return kept
