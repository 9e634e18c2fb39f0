"""Subspace compression of a pipeline replica's boundaries (Protocol Models / heterogeneous
low-bandwidth pre-training; DESIGN §1.2 and §2).

Why it is exact: with a fixed orthonormal U (d×k) and a frozen token table T_fix (V×d), the
residual stream of a sequence is ``x = T_fix[ids] + (something in span(U))`` as long as every
write into it lies in span(U): the embedding ``E = E_k·Uᵀ + T_fix`` and each layer's attention-out
(``attention.wo``) and MLP-down (``feed_forward.w2``) projections ``W = U·Z``. A boundary then
sends ``c = Uᵀ(x − T_fix[ids])`` (k numbers per token) and the receiver, which holds T_fix and
reads the same micro-batches, rebuilds ``x = U·c + T_fix[ids]`` exactly; backward sends
``∂L/∂c = Uᵀ·∂L/∂x``. Layers after the last boundary stay unconstrained.

Two ways to keep the constraint (``method``):
  * ``"reparam"`` (default): the constrained modules are swapped for ``SubspaceLinear`` (trainable
    Z, k×in) and ``SubspaceEmbedding`` (trainable E_k, V×k, plus T_fix): the constraint holds
    under any optimiser, and the optimiser sees k/d of those matrices' parameters.
  * ``"project"`` (node0-style): modules stay ordinary; ``Subspace.after_step()`` projects
    ``W ← U·UᵀW`` and ``E ← T_fix + (E − T_fix)·U·Uᵀ`` after every optimiser step.

The basis: ``make_basis`` (seeded, fixed for the run) or ``embedding_basis`` (the global
embedding's top-k principal directions, rebuilt at every round start by the worker that holds the
stage; ``Subspace.rebase`` swaps it in before ``load_ordinary`` maps the global weights onto it).

Pseudo-gradients are exchanged in the ordinary parameterisation: ``Subspace.ordinary_parameters``
materialises ``wo.weight = U·Z`` and ``tok_embeddings.weight = E_k·Uᵀ + T_fix`` under the ordinary
names, and ``Subspace.load_ordinary`` maps ordinary (e.g. global) weights onto the constraint
(``Z = UᵀW``, ``E_k = E·U``, ``T_fix = E − E·U·Uᵀ``, so the embedding is kept exactly).

The stage is duck-typed (this package never imports ``distrain``): it has ``is_first``,
``is_last``, ``cfg`` (``dim``, ``vocab_size``, ``tie_embeddings``), ``layers`` (a ModuleDict keyed by
global layer index, blocks with ``attention.wo`` and ``feed_forward.w2``) and ``tok_embeddings`` on
the first stage. Compress a stage after moving it to its device and dtype.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

METHODS = ("reparam", "project")
EMBED = "tok_embeddings.weight"


def make_basis(dim: int, k: int, seed: int, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> Tensor:
    """U (dim×k) with orthonormal columns: QR of a seeded fp64 Gaussian drawn on the CPU.

    The signs are fixed (diag R > 0), so U is a function of (dim, k, seed) alone; every worker builds
    the same one. Bit-identity across different LAPACK builds is not guaranteed: every boundary
    frame carries the sender's ``basis_fingerprint`` and the receiver refuses one that is not its own.
    """
    if not 1 <= k <= dim:
        raise ValueError(f"subspace rank k must be in [1, {dim}] for model dim {dim}, got {k}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, k, generator=g, dtype=torch.float64))
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
    return q.to(dtype=dtype, device=device)


def embedding_basis(embedding: Tensor, k: int, reference: Tensor) -> Tensor:
    """U (d×k) spanning the top-k principal directions of the embedding's rows (a basis that follows
    the model: every stage of a compressed pipeline holds the global embedding), turned within that
    span to lie as close as possible to ``reference`` (the seeded basis; orthogonal Procrustes).

    Why turned: a stage's trainable ``Z`` (and its AdamW moments) are coordinates in U; a span that
    moves a little between rebuilds should move them a little, not permute or flip them as raw
    eigenvectors would. Why towards the seeded basis and not the previous U: U stays a function of
    (embedding, seed) alone, so a resumed run rebuilds the one the uninterrupted run had. fp64 on
    the CPU; compare fingerprints across workers (every boundary frame carries one).
    """
    d = embedding.shape[1]
    if not 1 <= k <= d or tuple(reference.shape) != (d, k):
        raise ValueError(f"embedding_basis: k = {k} and a reference of shape {tuple(reference.shape)} for an "
                         f"embedding of width {d}")
    e = embedding.detach().to("cpu", torch.float64)
    e = e - e.mean(0)
    vals, vecs = torch.linalg.eigh(e.T @ e)
    top = vecs[:, torch.argsort(vals, descending=True)[:k]]
    a, _, bt = torch.linalg.svd(top.T @ reference.detach().to("cpu", torch.float64))
    return (top @ (a @ bt)).to(dtype=reference.dtype, device=reference.device)


def basis_fingerprint(u: Tensor) -> int:
    """crc32 of U's fp64 bytes: workers of one replica must agree on it."""
    return zlib.crc32(u.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())


def split_embedding(embedding: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """(E_k, T_fix) with ``E_k·Uᵀ + T_fix == E``: T_fix takes E's part outside span(U)."""
    e_k = embedding @ u
    return e_k, embedding - e_k @ u.T


def constraint_residual(weight: Tensor, u: Tensor) -> float:
    """‖(I − UUᵀ)·W‖ / ‖W‖ for a matrix writing into the residual stream (out dim = d)."""
    w = weight.detach().to(torch.float64)
    u = u.to(torch.float64)
    norm = float(w.norm())
    return float((w - u @ (u.T @ w)).norm()) / norm if norm else 0.0


def to_coords(x: Tensor, ids: Tensor, u: Tensor, token_table: Tensor) -> Tensor:
    """Boundary send: ``c = Uᵀ(x − T_fix[ids])`` per token, (B, T, d) → (B, T, k)."""
    return (x - F.embedding(ids, token_table)) @ u


def from_coords(c: Tensor, ids: Tensor, u: Tensor, token_table: Tensor) -> Tensor:
    """Boundary receive: ``x = U·c + T_fix[ids]``; autograd gives ``∂L/∂c = Uᵀ∂L/∂x``."""
    return c @ u.T + F.embedding(ids, token_table)


class SubspaceLinear(nn.Module):
    """``y = x·(U·Z)ᵀ`` without forming U·Z: two thin matmuls (in → k → d)."""

    def __init__(self, u: Tensor, z: Tensor) -> None:
        super().__init__()
        self.z = nn.Parameter(z)
        self.register_buffer("u", u, persistent=False)

    @property
    def weight(self) -> Tensor:
        """The ordinary (d×in) weight this module represents."""
        return self.u @ self.z

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.z), self.u)


class SubspaceEmbedding(nn.Module):
    """``E[ids] = E_k[ids]·Uᵀ + T_fix[ids]`` with T_fix frozen (a buffer, shared with the boundary)."""

    def __init__(self, u: Tensor, e_k: Tensor, token_table: Tensor) -> None:
        super().__init__()
        self.e_k = nn.Parameter(e_k)
        self.register_buffer("u", u, persistent=False)
        self.register_buffer("t_fix", token_table, persistent=False)

    @property
    def weight(self) -> Tensor:
        return self.e_k @ self.u.T + self.t_fix

    def forward(self, ids: Tensor) -> Tensor:
        return F.linear(F.embedding(ids, self.e_k), self.u) + F.embedding(ids, self.t_fix)


def _linear_names(i: int) -> tuple[str, str]:
    return f"layers.{i}.attention.wo", f"layers.{i}.feed_forward.w2"


def _get(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted)


def _set(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


@dataclass
class Subspace:
    """A compressed stage's constraint: U, T_fix, which modules are constrained, and how.

    T_fix is updated in place (``load_ordinary``), so the embedding module and the boundary
    helpers always read the same table.
    """

    stage: Any
    u: Tensor
    token_table: Tensor
    method: str
    modules: tuple[str, ...]  # constrained module paths, e.g. "layers.0.attention.wo"
    embed: bool
    _ordinary: tuple[str, ...] = field(default=(), repr=False)
    _fingerprint: int | None = field(default=None, repr=False)

    # -- boundaries -------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return self.u.shape[1]

    @property
    def fingerprint(self) -> int:
        """``basis_fingerprint(U)``, which every compressed boundary frame carries and its receiver checks."""
        if self._fingerprint is None:
            self._fingerprint = basis_fingerprint(self.u)
        return self._fingerprint

    def rebase(self, u: Tensor) -> None:
        """Use a new basis from now on (``embedding_basis``): every constrained module reads it; call
        ``load_ordinary`` next, which maps the (global) weights and T_fix onto the new constraint."""
        if tuple(u.shape) != tuple(self.u.shape):
            raise ValueError(f"a new basis must be {tuple(self.u.shape)}, got {tuple(u.shape)}")
        u = u.to(self.u)
        self.u = u
        self._fingerprint = None
        for m in self.modules + (("tok_embeddings",) if self.embed else ()):
            module = _get(self.stage, m)
            if isinstance(module, (SubspaceLinear, SubspaceEmbedding)):
                module.u = u

    def to_coords(self, x: Tensor, ids: Tensor) -> Tensor:
        return to_coords(x, ids, self.u.to(x.dtype), self.token_table.to(x.dtype))

    def from_coords(self, c: Tensor, ids: Tensor) -> Tensor:
        return from_coords(c, ids, self.u.to(c.dtype), self.token_table.to(c.dtype))

    # -- ordinary parameterisation ----------------------------------------------------------
    def constrained_names(self) -> tuple[str, ...]:
        """Ordinary parameter names under the constraint."""
        return tuple(f"{m}.weight" for m in self.modules) + ((EMBED,) if self.embed else ())

    def ordinary_parameters(self) -> dict[str, Tensor]:
        """Every parameter of the stage under its ordinary name (constrained ones materialised), detached."""
        with torch.no_grad():
            out = {}
            for name, p in self.stage.named_parameters():
                if self.method == "reparam" and name.endswith((".z", ".e_k")):
                    mod = name.rpartition(".")[0]
                    out[f"{mod}.weight"] = _get(self.stage, mod).weight.detach().clone()
                else:
                    out[name] = p.detach().clone()
            return out

    def load_ordinary(self, params: Mapping[str, Tensor], *, embedding: Tensor | None = None) -> None:
        """Map ordinary weights (e.g. the global ones at a round start) onto the constraint.

        Constrained matrices become ``U·UᵀW``; the first stage's embedding is kept exactly and T_fix
        recomputed from it. A stage without the embedding passes the global ``embedding`` to
        recompute its T_fix the same way (else its T_fix is left as is).
        """
        want = set(self._ordinary)
        if set(params) != want:
            missing, extra = sorted(want - set(params)), sorted(set(params) - want)
            raise KeyError(f"ordinary parameters do not match the stage: missing {missing}, unexpected {extra}")
        if embedding is not None and self.embed:
            raise ValueError("this stage holds the embedding: it recomputes T_fix from params, not embedding=")
        u = self.u
        with torch.no_grad():
            if self.embed or embedding is not None:
                e = params[EMBED] if self.embed else embedding
                e = e.to(self.token_table)
                e_k, t_fix = split_embedding(e, u.to(e.dtype))
                self.token_table.copy_(t_fix)
                if self.embed and self.method == "reparam":
                    self.stage.tok_embeddings.e_k.copy_(e_k)
                elif self.embed:
                    self.stage.tok_embeddings.weight.copy_(e)
            for name, p in self.stage.named_parameters():
                mod = name.rpartition(".")[0]
                if self.method == "reparam" and name.endswith((".z", ".e_k")):
                    if name.endswith(".z"):
                        w = params[f"{mod}.weight"].to(p)
                        p.copy_(u.T.to(w.dtype) @ w)
                elif mod in self.modules:  # project: ordinary module under the constraint
                    w = params[name].to(p)
                    p.copy_(u.to(w.dtype) @ (u.T.to(w.dtype) @ w))
                elif not (self.embed and name == EMBED):
                    p.copy_(params[name])

    def after_step(self) -> None:
        """Call after every optimiser step: ``project`` restores the constraint; ``reparam`` needs nothing."""
        if self.method != "project":
            return
        u = self.u
        with torch.no_grad():
            for m in self.modules:
                w = _get(self.stage, m).weight
                w.copy_(u @ (u.T @ w))
            if self.embed:
                e = self.stage.tok_embeddings.weight
                e.copy_(self.token_table + ((e - self.token_table) @ u) @ u.T)

    def max_residual(self) -> float:
        """Largest ‖(I − UUᵀ)·W‖/‖W‖ over the constrained matrices (embedding: of E − T_fix)."""
        params = self.ordinary_parameters()
        res = [constraint_residual(params[f"{m}.weight"], self.u) for m in self.modules]
        if self.embed:
            res.append(constraint_residual((params[EMBED] - self.token_table).T, self.u))
        return max(res, default=0.0)


def compress_stage(
    stage: Any,
    u: Tensor,
    *,
    layers: Iterable[int] | None = None,
    embed: bool | None = None,
    token_table: Tensor | None = None,
    method: str = "reparam",
) -> Subspace:
    """Constrain a built stage in place and return its ``Subspace``.

    Defaults: every layer of a stage that is not the last (layers after the last boundary stay
    free), and the embedding on the first stage of a split model. The current weights are mapped
    onto the constraint (``Z = UᵀW``; the embedding is kept exactly, T_fix = E − E·U·Uᵀ) unless
    ``token_table`` is given, which every stage without the embedding needs (it is then used as
    T_fix, and a first stage projects its embedding onto it).
    """
    if method not in METHODS:
        raise ValueError(f"subspace method {method!r} is not one of {', '.join(METHODS)}")
    cfg = stage.cfg
    if u.dim() != 2 or u.shape[0] != cfg.dim or not 1 <= u.shape[1] <= cfg.dim:
        raise ValueError(f"U must be (dim={cfg.dim}, k), got {tuple(u.shape)}")
    if getattr(cfg, "tie_embeddings", False):
        raise ValueError("subspace compression does not support tied embeddings (the head would be constrained)")
    own = [int(i) for i in stage.layers.keys()]
    layers = tuple(own if not stage.is_last else ()) if layers is None else tuple(sorted(set(int(i) for i in layers)))
    embed = (stage.is_first and not stage.is_last) if embed is None else bool(embed)
    if not set(layers) <= set(own):
        raise ValueError(f"layers {sorted(set(layers) - set(own))} are not on this stage (it holds {own})")
    if not stage.is_last and (set(layers) != set(own) or (stage.is_first and not embed)):
        raise ValueError("a stage that sends a boundary must constrain all its layers (and the embedding on the "
                         "first stage), else x − T_fix[ids] leaves span(U)")
    if embed and not stage.is_first:
        raise ValueError("embed=True on a stage without the embedding")
    dtype, device = next(stage.parameters()).dtype, next(stage.parameters()).device
    u = u.to(dtype=dtype, device=device)
    ordinary = tuple(name for name, _ in stage.named_parameters())
    if token_table is None:
        if not embed:
            raise ValueError("a stage without the embedding needs token_table= (T_fix, V×d) to rebuild boundaries")
        token_table = split_embedding(stage.tok_embeddings.weight.detach(), u)[1]
    if tuple(token_table.shape) != (cfg.vocab_size, cfg.dim):
        raise ValueError(f"token_table must be (vocab={cfg.vocab_size}, dim={cfg.dim}), got {tuple(token_table.shape)}")
    token_table = token_table.detach().to(dtype=dtype, device=device).clone()
    modules = tuple(m for i in layers for m in _linear_names(i))
    sub = Subspace(stage, u, token_table, method, modules, embed, ordinary)
    with torch.no_grad():
        for m in modules:
            w = _get(stage, m).weight
            if method == "reparam":
                _set(stage, m, SubspaceLinear(u, (u.T @ w).detach().clone()))
        if embed:
            e = stage.tok_embeddings.weight
            e_k = (e - token_table) @ u
            if method == "reparam":
                _set(stage, "tok_embeddings", SubspaceEmbedding(u, e_k.detach().clone(), token_table))
            else:
                e.copy_(token_table + e_k @ u.T)
    sub.after_step()  # project: put the free matrices onto the constraint now
    return sub
