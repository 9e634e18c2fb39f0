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


class EmbeddingShadow:
    """A later compressed stage's copy of the global embedding, stepped like the first stage's."""

    def __init__(self, cfg: Config, initial: torch.Tensor, codec: Codec):
        o = cfg.outer
        self.lr, self.momentum, self.nesterov, self.delay = o.lr, o.momentum, o.nesterov, o.apply_delay
        self.codec = codec
        self.weight = {EMBEDDING: initial.detach().float().clone()}
        self.momentum_buf: Weights = {}
        self.pending: Weights | None = None

    @property
    def embedding(self) -> torch.Tensor:
        return self.weight[EMBEDDING]

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
    to its later stages: a count, then one validated wire frame per contribution."""

    def __init__(self, transport: Transport, codec: Codec, shape: tuple[int, ...], run_id: str, rank: int,
                 max_parts: int):
        self.transport, self.codec, self.shape = transport, codec, tuple(shape)
        self.run_id, self.rank, self.max_parts = run_id, rank, max_parts

    def send(self, dsts: list[int], parts: list[Any], round_idx: int) -> int:
        frames = [encode_frame(FrameMeta.for_codec(self.run_id, round_idx, self.rank, self.codec), {EMBEDDING: et})
                  for et in parts]
        sent = 0
        for dst in dsts:
            self.transport.send_bytes(dst, _COUNT.pack(len(frames)))
            for f in frames:
                self.transport.send_bytes(dst, f)
            sent += _COUNT.size + sum(len(f) for f in frames)
        return sent

    def receive(self, src: int, round_idx: int, device: torch.device) -> Weights | None:
        head = self.transport.recv_bytes(src)
        if len(head) != _COUNT.size:
            raise ValueError(f"embedding relay from rank {src}: a count of {len(head)} bytes")
        (n,) = _COUNT.unpack(head)
        if n > self.max_parts:
            raise ValueError(f"embedding relay from rank {src}: {n} contributions, at most {self.max_parts} exist")
        shapes = {EMBEDDING: self.shape}
        parts = []
        for _ in range(n):
            _, tensors = decode_frame(self.transport.recv_bytes(src), shapes, self.run_id, round_idx,
                                      FrameLimits(), codec=self.codec, worker=src)
            parts.append(tensors[EMBEDDING])
        if not parts:
            return None
        return {EMBEDDING: self.codec.decode_aggregate(parts, self.shape, device=device)}
