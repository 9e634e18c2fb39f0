"""What a worker holds: its stage of the model, seen in the ordinary parameterisation.

A full replica's device and an uncompressed pipeline stage hold ordinary parameters
(``ExactView``). A compressed pipeline stage holds ``Z`` (``W = U·Z``) for attention-out and
MLP-down, and ``E_k`` beside a frozen token table ``T_fix`` for the embedding
(``distrain.parallel.pipeline.subspace``); its ``SubspaceView`` materialises the ordinary weights
for the outer round (pseudo-gradients are exchanged in the ordinary parameterisation, so compressed
and uncompressed replicas share one round) and maps the global weights back onto the constraint.
How such a replica meets the others in a round: ``distrain.worker.compressed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distrain.config import Config
from distrain.layout import Layout, WorkerSlot
from distrain.model import build_model
from distrain.outer.base import Weights, owned_parameters
from distrain.parallel.pipeline.subspace import (
    Subspace,
    compress_stage,
    embedding_basis,
    make_basis,
    split_embedding,
)
from distrain.topology import ReplicaSpec
from distrain.worker.initial import initial_weights, start_from_init

EMBEDDING = "tok_embeddings.weight"


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
    """A compressed stage: ordinary weights materialised (``U·Z``), written back onto the constraint.

    With ``follow`` (``compress.basis = "embedding"``), every write first rebuilds U from the global
    embedding it brings (the first stage's own, a later stage's shadow copy), so U follows the model
    round by round and is the same function of the same weights on every stage of the replica.
    """

    exact = False

    def __init__(self, sub: Subspace, follow: Tensor | None = None):
        self.sub = sub
        self.seeded = follow  # the seeded U the rebuilt ones are turned towards (None: U stays fixed)

    def read(self) -> Weights:
        return {n: t.float() for n, t in self.sub.ordinary_parameters().items()}

    def write(self, values: Weights, embedding: torch.Tensor | None = None) -> None:
        e = values.get(EMBEDDING) if self.sub.embed else embedding
        if self.seeded is not None and e is not None:
            self.sub.rebase(embedding_basis(e, self.sub.k, self.seeded))
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
    start_from_init(cfg, model)
    initial = {n: p.detach().float().clone() for n, p in owned_parameters(model).items()}
    if not rep.compressed:
        return BuiltStage(model, ExactView(model), initial)
    u = make_basis(cfg.model.dim, rep.compress_k, rep.compress_seed, device=device)
    table = None
    if not model.is_first:  # T_fix from the (seeded) initial embedding, as the first stage computes it
        e0 = initial_embedding(cfg).to(device)
        table = split_embedding(e0, u)[1]
    sub = compress_stage(model, u, token_table=table, method=rep.compress_method)
    follow = u.clone() if rep.compress_basis == "embedding" else None
    return BuiltStage(model, SubspaceView(sub, follow), initial, sub)


def initial_embedding(cfg: Config) -> torch.Tensor:
    """The global embedding a run starts from (a compressed pipeline's later stages build T_fix from it)."""
    return initial_weights(cfg, {EMBEDDING: (cfg.model.vocab_size, cfg.model.dim)})[EMBEDDING]


def segment_shapes(cfg: Config, layout: Layout, g: int) -> dict[str, tuple[int, ...]]:
    """Every parameter shape of segment ``g`` (a catch-up frame's schema), without allocating it."""
    a, b = layout.segments[g]
    with torch.device("meta"):
        model = build_model(cfg.model, a, b)
    return {n: tuple(p.shape) for n, p in owned_parameters(model).items()}


