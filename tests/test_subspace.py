"""Subspace compression: basis, exact boundaries, materialise ↔ constrain, reparam and project."""

from __future__ import annotations

import pytest
import torch

from distrain.config import ModelConfig
from distrain.model import Transformer
from distrain.parallel.pipeline import subspace as ss

D, K, V = 32, 8, 96


def cfg(**kw) -> ModelConfig:
    base = dict(dim=D, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=V, max_seq_len=32, multiple_of=16)
    return ModelConfig(**{**base, **kw})


def model(start=0, end=None, seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg(**kw), start, end).double()


def ids(b=2, t=12, seed=1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def basis(seed=5) -> torch.Tensor:
    return ss.make_basis(D, K, seed, dtype=torch.float64)


def test_basis_is_orthonormal_and_a_function_of_the_seed():
    u = basis()
    assert u.shape == (D, K)
    assert torch.allclose(u.T @ u, torch.eye(K, dtype=torch.float64), atol=1e-14)
    assert torch.equal(u, basis()) and ss.basis_fingerprint(u) == ss.basis_fingerprint(basis())
    assert not torch.allclose(u, basis(6)) and ss.basis_fingerprint(u) != ss.basis_fingerprint(basis(6))
    assert ss.make_basis(D, K, 5).dtype == torch.float32
    with pytest.raises(ValueError):
        ss.make_basis(D, D + 1, 0)


def test_split_embedding_recombines_exactly_and_t_fix_is_orthogonal_to_u():
    e = torch.randn(V, D, dtype=torch.float64)
    u = basis()
    e_k, t_fix = ss.split_embedding(e, u)
    assert e_k.shape == (V, K) and t_fix.shape == (V, D)
    assert torch.allclose(e_k @ u.T + t_fix, e, atol=1e-14)
    assert (t_fix @ u).abs().max() < 1e-13


def test_reparam_stage_computes_the_same_function_as_its_materialised_weights():
    m = model()
    sub = ss.compress_stage(m, basis(), layers=range(3), embed=True)
    x = ids()
    out = m(x)
    plain = model(seed=99)  # different init, then overwritten with the materialised weights
    plain.load_state_dict(sub.ordinary_parameters(), strict=True)
    assert torch.allclose(plain(x), out, atol=1e-12)
    # names: the ordinary ones, nothing extra; constrained modules swapped
    assert set(sub.ordinary_parameters()) == set(dict(model().named_parameters()))
    assert isinstance(m.layers["0"].attention.wo, ss.SubspaceLinear)
    assert isinstance(m.layers["3"].feed_forward.w2, torch.nn.Linear)
    assert "layers.2.feed_forward.w2.weight" in sub.constrained_names()
    assert "layers.3.attention.wo.weight" not in sub.constrained_names()


def test_compressing_keeps_the_embedding_and_projects_constrained_matrices():
    m = model()
    before = {k: v.clone() for k, v in m.named_parameters()}
    u = basis()
    sub = ss.compress_stage(m, u, layers=range(3), embed=True)
    after = sub.ordinary_parameters()
    assert torch.allclose(after["tok_embeddings.weight"], before["tok_embeddings.weight"], atol=1e-14)
    w = before["layers.1.attention.wo.weight"]
    assert torch.allclose(after["layers.1.attention.wo.weight"], u @ (u.T @ w), atol=1e-14)
    assert torch.equal(after["layers.3.attention.wo.weight"], before["layers.3.attention.wo.weight"])
    assert torch.equal(after["layers.1.attention.wq.weight"], before["layers.1.attention.wq.weight"])
    assert sub.max_residual() <= 1e-12
    assert ss.constraint_residual(w, u) > 0.5  # a random matrix is far from span(U): the check can fail


def test_boundary_reconstruction_is_exact_in_fp64_and_needs_the_constraint():
    u = basis()
    x = ids()
    first = model(0, 2)
    free_h = first(x)
    sub = ss.compress_stage(first, u)  # first stage of a split model: its layers and the embedding
    h = first(x)
    c = sub.to_coords(h, x)
    assert c.shape == (*x.shape, K)
    rebuilt = sub.from_coords(c, x)
    assert (rebuilt - h).abs().max() <= 1e-12 * h.abs().max()
    # the unconstrained stage's output is not representable: reconstruction error is large
    free = ss.from_coords(ss.to_coords(free_h, x, u, sub.token_table), x, u, sub.token_table)
    assert (free - free_h).abs().max() > 1e-3 * free_h.abs().max()


def test_coordinate_gradient_is_u_transposed_times_the_hidden_gradient():
    u, x = basis(), ids()
    t_fix = torch.randn(V, D, dtype=torch.float64)
    c = torch.randn(*x.shape, K, dtype=torch.float64, requires_grad=True)
    h = ss.from_coords(c, x, u, t_fix)
    g = torch.randn_like(h)
    h.backward(g)
    assert torch.allclose(c.grad, g @ u, atol=1e-14)


def test_load_ordinary_round_trips_and_maps_global_weights_onto_the_constraint():
    u = basis()
    m = model()
    sub = ss.compress_stage(m, u, layers=range(3), embed=True)
    own = sub.ordinary_parameters()
    sub.load_ordinary(own)  # materialise → constrain → materialise is the identity
    for k, v in sub.ordinary_parameters().items():
        assert torch.allclose(v, own[k], atol=1e-14), k
    glob = {k: torch.randn_like(v) for k, v in own.items()}  # "global" weights, off the constraint
    sub.load_ordinary(glob)
    got = sub.ordinary_parameters()
    for k, v in got.items():
        if k in sub.constrained_names() and k != ss.EMBED:
            assert torch.allclose(v, u @ (u.T @ glob[k]), atol=1e-13), k
            assert ss.constraint_residual(v, u) <= 1e-6
        else:  # free parameters, and the embedding (its out-of-span part moves into T_fix)
            assert torch.allclose(v, glob[k], atol=1e-13), k
    assert torch.allclose(sub.token_table, glob[ss.EMBED] - (glob[ss.EMBED] @ u) @ u.T, atol=1e-13)
    assert torch.allclose(m.tok_embeddings.t_fix, sub.token_table)  # one table, shared
    with pytest.raises(KeyError, match="missing"):
        sub.load_ordinary({k: v for k, v in glob.items() if k != "norm.weight"})


def test_later_stage_rebuilds_t_fix_from_the_global_embedding():
    u = basis()
    glob_e = torch.randn(V, D, dtype=torch.float64)
    second = model(2, 4)
    sub = ss.compress_stage(second, u, token_table=torch.zeros(V, D, dtype=torch.float64))
    assert sub.modules == ()  # the last stage stays unconstrained
    sub.load_ordinary(sub.ordinary_parameters(), embedding=glob_e)
    assert torch.allclose(sub.token_table, ss.split_embedding(glob_e, u)[1], atol=1e-14)


def test_reparam_keeps_the_constraint_under_adamw():
    m = model()
    u = basis()
    sub = ss.compress_stage(m, u, layers=range(3), embed=True)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        m(ids()).square().mean().backward()
        opt.step()
    assert sub.max_residual() <= 1e-6


def test_project_method_restores_the_constraint_after_an_adamw_step():
    m = model()
    u = basis()
    sub = ss.compress_stage(m, u, layers=range(3), embed=True, method="project")
    assert isinstance(m.layers["0"].attention.wo, torch.nn.Linear)  # no module swap
    assert sub.max_residual() <= 1e-12
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    opt.zero_grad()
    m(ids()).square().mean().backward()
    opt.step()
    assert sub.max_residual() > 1e-3  # AdamW leaves span(U) ...
    sub.after_step()
    assert sub.max_residual() <= 1e-6  # ... and the projection brings it back
    for name in sub.constrained_names():
        if name != ss.EMBED:
            assert ss.constraint_residual(dict(m.named_parameters())[name], u) <= 1e-6


def test_project_and_reparam_agree_on_the_ordinary_weights_and_boundaries():
    u, x = basis(), ids()
    a, b = model(0, 2), model(0, 2)
    sa = ss.compress_stage(a, u)
    sb = ss.compress_stage(b, u, method="project")
    for k, v in sa.ordinary_parameters().items():
        assert torch.allclose(v, sb.ordinary_parameters()[k], atol=1e-14), k
    assert torch.allclose(sa.to_coords(a(x), x), sb.to_coords(b(x), x), atol=1e-12)


def test_compress_stage_rejects_inconsistent_requests():
    u = basis()
    with pytest.raises(ValueError, match="all its layers"):
        ss.compress_stage(model(0, 2), u, layers=[0])
    with pytest.raises(ValueError, match="token_table"):
        ss.compress_stage(model(2, 4), u)
    with pytest.raises(ValueError, match="not on this stage"):
        ss.compress_stage(model(2, 4), u, layers=[0], token_table=torch.zeros(V, D))
    with pytest.raises(ValueError, match="U must be"):
        ss.compress_stage(model(0, 2), torch.zeros(D + 1, K))
    with pytest.raises(ValueError, match="method"):
        ss.compress_stage(model(0, 2), u, method="other")
    with pytest.raises(ValueError, match="tied"):
        ss.compress_stage(model(tie_embeddings=True), u, layers=range(3), embed=True)


def test_embedding_basis_spans_the_top_principal_directions_turned_towards_the_reference():
    """U spans the embedding's top-k principal directions, is orthonormal, is the member of that span
    closest to the seeded basis (UᵀU_ref symmetric, positive definite: orthogonal Procrustes), and is
    a function of the span alone: the embedding's rows in another order give the same U."""
    g = torch.Generator().manual_seed(3)
    scales = torch.linspace(3.0, 0.1, D, dtype=torch.float64)
    e = torch.randn(V, D, generator=g, dtype=torch.float64) * scales + 0.5
    ref = basis()
    u = ss.embedding_basis(e, K, ref)
    assert torch.allclose(u.T @ u, torch.eye(K, dtype=torch.float64), atol=1e-12)
    centred = e - e.mean(0)
    vals, vecs = torch.linalg.eigh(centred.T @ centred)
    top = vecs[:, torch.argsort(vals, descending=True)[:K]]
    assert torch.allclose(u @ u.T, top @ top.T, atol=1e-10)  # the same span
    m = u.T @ ref
    assert torch.allclose(m, m.T, atol=1e-12) and float(torch.linalg.eigvalsh(m).min()) > 0
    assert float((u - ref).norm()) < float((top - ref).norm())  # nearer the seeded basis than raw eigenvectors
    assert torch.equal(ss.embedding_basis(e, K, ref), u)  # deterministic
    assert torch.allclose(ss.embedding_basis(e[torch.randperm(V, generator=g)], K, ref), u, atol=1e-10)
    with pytest.raises(ValueError, match="k = 40"):
        ss.embedding_basis(e, 40, ref)


@pytest.mark.parametrize("method", ss.METHODS)
def test_rebase_keeps_boundaries_exact_and_the_constraint_on_the_new_basis(method):
    """A stage rebuilt on a new U (and the weights mapped onto it) rebuilds its boundary exactly,
    satisfies ‖(I − UUᵀ)W‖/‖W‖ < 1e-6 on the new U, and its frames carry the new fingerprint."""
    x = ids()
    first = model(0, 2)
    sub = ss.compress_stage(first, basis(), method=method)
    ordinary = sub.ordinary_parameters()
    old = sub.fingerprint
    new = ss.embedding_basis(ordinary[ss.EMBED], K, basis())
    sub.rebase(new)
    sub.load_ordinary(ordinary)
    assert torch.equal(sub.u, new) and sub.fingerprint == ss.basis_fingerprint(new) != old
    assert sub.max_residual() < 1e-6
    h = first(x)
    assert (sub.from_coords(sub.to_coords(h, x), x) - h).abs().max() <= 1e-12 * h.abs().max()
    assert torch.allclose(sub.ordinary_parameters()[ss.EMBED], ordinary[ss.EMBED], atol=1e-12)  # kept exactly
    with pytest.raises(ValueError, match="new basis must be"):
        sub.rebase(new[:, :3])
