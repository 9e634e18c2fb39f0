"""Heterogeneous replicas in one SparseLoCo run (simulation): per-segment rounds, compressed
pipeline replicas beside full ones, the constraint after every round, boundary bytes."""

from __future__ import annotations

import pytest
import torch

from distrain.layout import Layout
from distrain.runtime.simulation import Simulation
from distrain.parallel.pipeline.subspace import basis_fingerprint, embedding_basis, make_basis

COMMON = ["--outer.algorithm=sparseloco", "--train.steps=9", "--outer.inner_steps=3", "--train.eval_every=9",
          "--runtime.torch_threads=1"]



def planned(sim: Simulation, round_idx: int):
    """The loop's step plan for ``round_idx`` (every replica here runs at the same speed: H steps each)."""
    h = sim.loop.h
    return sim.loop.planner.plan(round_idx, float(round_idx * h), [])

def weights(worker) -> dict[str, torch.Tensor]:
    return worker.global_state()


def test_per_segment_rounds_equal_one_whole_model_round(tiny_config, monkeypatch):
    """All replicas full: cutting the outer round into two segments (two frames, two groups)
    gives exactly the weights of one round over the whole model."""
    whole = Simulation(tiny_config(*COMMON, "--topology.replicas=3", "--run.name=whole"))
    whole.run()
    original = Layout.from_config.__func__
    monkeypatch.setattr(Layout, "from_config", classmethod(lambda cls, cfg: cls(original(cls, cfg).replicas,
                                                                            cfg.model.n_layers, extra_cuts=(1,))))
    cut = Simulation(tiny_config(*COMMON, "--topology.replicas=3", "--run.name=cut"))
    assert cut.pool.layout.segments == [(0, 1), (1, 2)]
    cut.run()
    for a, b in zip(whole.workers, cut.workers):
        wa, wb = weights(a), weights(b)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        assert len(b.syncs) == 2 and len(a.syncs) == 1


@pytest.mark.parametrize("method,sync,basis", [("reparam", "project_start", "seeded"),
                                               ("project", "project_start", "seeded"), ("reparam", "split", "seeded"),
                                               ("reparam", "project_start", "embedding"),
                                               ("project", "project_start", "embedding")])
def test_mixed_topology_keeps_the_constraint_and_the_full_replicas_on_the_global_weights(tiny_config, method, sync,
                                                                                          basis):
    """Two full replicas and a 2-stage compressed pipeline (k = 8 of d = 64): after every outer
    round the full replicas hold the global weights and the compressed stages satisfy
    ‖(I − UUᵀ)W‖/‖W‖ ≤ 1e-6 for attention-out and MLP-down. With ``basis = "embedding"`` U is
    rebuilt every round from the global embedding, the same on both stages."""
    cfg = tiny_config(*COMMON, "--topology.replica=[{count=2}, {kind='pipeline', stages=2, "
                               f"compress={{k=8, method='{method}', basis='{basis}'}}}}]",
                      f"--run.name=mixed_{method}_{sync}_{basis}", f"--topology.compress_sync={sync}")
    sim = Simulation(cfg)
    pool = sim.pool
    full, stage0, stage1 = pool.workers[0], pool.workers[2], pool.workers[3]
    for r in range(3):
        pool.run_round(r, planned(sim, r))
        glob = {**weights(stage0), **weights(stage1)}
        assert weights(full).keys() == glob.keys()
        assert all(torch.equal(weights(full)[k], v) for k, v in glob.items())  # one set of global weights
        for n, p in full.model.state_dict().items():
            if n in glob:
                assert torch.equal(p, glob[n]), n  # the full replica starts the next round from them
        assert stage0.sub.max_residual() <= 1e-6
        u = make_basis(64, 8, 1337)
        if basis == "embedding":
            rebuilt = embedding_basis(glob["tok_embeddings.weight"], 8, u)
            assert float((rebuilt - u).abs().max()) > 0.1  # it moved off the seeded basis
            u = rebuilt
        assert torch.equal(stage0.sub.u, u) and torch.equal(stage1.sub.u, u)  # every stage: one basis
        assert stage0.sub.fingerprint == stage1.sub.fingerprint == basis_fingerprint(u)
        local = stage0.view.read()
        for name in ("layers.0.attention.wo.weight", "layers.0.feed_forward.w2.weight"):
            w = local[name]
            assert float((w - u @ (u.T @ w)).norm() / w.norm()) <= 1e-6
            # and it started from the global weights mapped onto the constraint
            g = glob[name]
            torch.testing.assert_close(w, u @ (u.T @ g), rtol=0, atol=1e-6)
        # T_fix of both stages is recomputed from the same global embedding: the compressed
        # replica's embedding equals the global one
        e = glob["tok_embeddings.weight"]
        torch.testing.assert_close(local["tok_embeddings.weight"], e, rtol=0, atol=1e-6)
        torch.testing.assert_close(stage1.sub.token_table, stage0.sub.token_table, rtol=0, atol=0)
    pool.close()


def test_boundary_bytes_are_2k_per_token_and_direction_plus_framing(tiny_config):
    k, mb = 8, 2  # batch 4 sequences of 32 tokens, 2 micro-batches of 2 sequences
    cfg = tiny_config(*COMMON, "--train.steps=3", f"--topology.replica=[{{}}, {{kind='pipeline', stages=2, "
                      f"microbatches={mb}, compress={{k={k}}}}}]", "--run.name=bytes")
    sim = Simulation(cfg)
    reports = sim.pool.run_round(0, planned(sim, 0))
    rep = next(r for r in reports if r.rank == 1)  # the first stage: sends forward, receives backward
    positions = 3 * 4 * 32
    assert rep.extra["positions"] == positions
    messages = 3 * mb  # one per micro-batch per step, in each direction
    assert rep.extra["boundary_bytes"] == 2 * k * positions + 40 * messages  # its forward sends
    last = next(r for r in reports if r.rank == 2)
    assert last.extra["boundary_bytes"] == 2 * k * positions + 40 * messages  # the backward ones
    sim.pool.close()


def test_a_lone_pipeline_replica_trains_without_an_outer_algorithm(tiny_config):
    """A model no single worker holds, trained by a 2-stage pipeline alone (compressed, k = 16)."""
    s = Simulation(tiny_config("--train.steps=30", "--train.lr=3e-3", "--train.eval_every=30",
                               "--topology.replica=[{kind='pipeline', stages=2, compress={k=16}}]",
                               "--run.name=lone")).run()
    assert s.final_val_loss < s.first_val_loss - 0.5


def test_project_global_puts_every_replica_on_the_subspace(tiny_config):
    cfg = tiny_config(*COMMON, "--topology.replica=[{}, {kind='pipeline', stages=2, compress={k=8}}]",
                      "--topology.compress_sync=project_global", "--run.name=projglobal")
    sim = Simulation(cfg)
    sim.pool.run_round(0, planned(sim, 0))
    u = make_basis(64, 8, 1337)
    glob = weights(sim.pool.workers[0])
    w = glob["layers.0.attention.wo.weight"]
    assert float((w - u @ (u.T @ w)).norm() / w.norm()) <= 1e-6
    free = glob["layers.1.attention.wo.weight"]  # after the last boundary: unconstrained
    assert float((free - u @ (u.T @ free)).norm() / free.norm()) > 0.5
    sim.pool.close()


def test_span_split_lets_compressed_replicas_vote_only_inside_the_subspace():
    """agg = P·mean(all) + (I − P)·mean(unconstrained) for a constrained matrix; others: mean(all)."""
    from distrain.comm.codecs import make_codec
    from distrain.worker.compressed import SpanSplit

    codec = make_codec("dense", dtype="fp32")
    torch.manual_seed(0)
    u = make_basis(16, 4, 1)
    w = [torch.randn(16, 8) for _ in range(3)]
    kept = [(m, codec.encode("x", t, {})) for m, t in zip((0, 1, 7), w)]
    split = SpanSplit(codec, u, compressed={7}, sides={"wo": "left", "emb": "right"})
    p = u @ u.T
    want = p @ (sum(w) / 3) + (torch.eye(16) - p) @ ((w[0] + w[1]) / 2)
    torch.testing.assert_close(split("wo", kept, (16, 8), torch.device("cpu")), want, rtol=1e-5, atol=1e-6)
    e = [torch.randn(8, 16) for _ in range(3)]
    kept_e = [(m, codec.encode("x", t, {})) for m, t in zip((0, 1, 7), e)]
    want_e = (sum(e) / 3) @ p + ((e[0] + e[1]) / 2) @ (torch.eye(16) - p)
    torch.testing.assert_close(split("emb", kept_e, (8, 16), torch.device("cpu")), want_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split("other", kept, (16, 8), torch.device("cpu")), sum(w) / 3, rtol=1e-6, atol=1e-7)
    only_full = [k for k in kept if k[0] != 7]  # no compressed contribution: the plain mean
    torch.testing.assert_close(split("wo", only_full, (16, 8), torch.device("cpu")), (w[0] + w[1]) / 2)


def test_chunkwise_training_inside_a_compressed_pipeline_stage(tiny_config):
    """SeCO inside the stages of a compressed pipeline replica, beside a full replica: the run
    trains (chunk-wise backward composes with the pipeline's boundaries)."""
    s = Simulation(tiny_config(*COMMON, "--train.steps=12", "--train.eval_every=12", "--train.lr=3e-3",
                               "--train.chunkwise.mode=seco", "--train.chunkwise.chunk_len=8",
                               "--topology.replica=[{}, {kind='pipeline', stages=2, compress={k=16}}]",
                               "--run.name=seco_pipe")).run()
    assert s.final_val_loss < s.first_val_loss - 0.3


def test_stages_that_rebuild_different_bases_are_stopped_by_the_first_frame(tiny_config, monkeypatch):
    """Two stages of one compressed pipeline that disagree on a rebuilt U (as different LAPACK builds
    could): the first boundary frame names both fingerprints, the replica leaves every round, and the
    full replica trains on."""
    from distrain.metrics import read_metrics
    from distrain.worker.stage import SubspaceView

    write = SubspaceView.write

    def skewed(self, values, embedding=None):  # the later stage turns its rebuilt U a little
        write(self, values, embedding)
        if not self.sub.embed:
            q, _ = torch.linalg.qr(self.sub.u + 1e-6 * torch.ones_like(self.sub.u))
            self.sub.rebase(q)

    monkeypatch.setattr(SubspaceView, "write", skewed)
    cfg = tiny_config(*COMMON, "--topology.replica=[{}, {kind='pipeline', stages=2, compress={k=8, "
                               "basis='embedding'}}]", "--run.name=skewed_basis")
    summary = Simulation(cfg).run()
    left = [r for r in read_metrics(summary.run_dir) if r.get("event") == "left_round"]
    assert [r["round"] for r in left] == [0, 1, 2]
    for r in left:
        assert "BasisMismatchError: boundary frame was built on subspace basis" in r["why"], r["why"]
        assert "the stages disagree on U" in r["why"]
    assert summary.final_val_loss < summary.first_val_loss  # the full replica trained on


@pytest.mark.parametrize("value", [0.0, 1e30])
def test_a_bad_boundary_frame_ends_its_replicas_round_at_once(tiny_config, value, capsys):
    """From round 1 the pipeline's first stage sends boundary frames of NaN (or 1e30): the second
    stage rejects the first one, the replica leaves the round at once (not after the 600 s
    collective timeout) with one line naming the stage, step and reason, the full replica completes
    every round, and the pipeline rejoins from the global weights."""
    import time

    from distrain.metrics import read_metrics
    from distrain.runtime.faults import Fault

    cfg = tiny_config(*COMMON, "--topology.replica=[{}, {kind='pipeline', stages=2, compress={k=8}}]",
                      f"--run.name=badboundary{int(value > 0)}", "--topology.round_timeout_s=600.0")
    sim = Simulation(cfg, faults=[Fault("boundary", 1, 1, delay=value)])
    t0 = time.monotonic()
    summary = sim.run()
    assert time.monotonic() - t0 < 60  # seconds, not the collective timeout
    rows = read_metrics(sim.run_dir)
    left = [r for r in rows if r.get("event") == "left_round"]
    assert [r["round"] for r in left] == [1, 2]  # every round from 1 on (the fault stays)
    reason = "NonFiniteError" if value == 0.0 else "MagnitudeError"
    for r in left:  # its steps of round 1 never happened: it fails at step 3 again in round 2
        assert r["why"].startswith("BoundaryRejectedError: stage 1 rejected the forward boundary frame of step 3, "
                                   f"micro-batch 0 from stage 0: {reason}"), r["why"]
    said = [line for line in capsys.readouterr().out.splitlines() if "left the round" in line]
    assert len(said) == 2 and said[0].startswith("round 1: replica 1 left the round: BoundaryRejectedError")
    assert [r["replicas"] for r in rows if r.get("kind") == "train"] == [2, 1, 1]
    assert summary.final_val_loss < summary.first_val_loss  # the full replica trained on
