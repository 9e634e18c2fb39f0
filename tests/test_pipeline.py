"""Pipeline replicas: schedules, equality with the unsplit model, compression, chunk-wise stages.

The transport is an in-test fake with exactly the calls the pipeline may use (``send_bytes``,
``recv_bytes``, ``all_gather_bytes``): threads and FIFO queues, sends never block, and a receive
that would complete a cycle of stages waiting on each other raises at once (the gloo deadlock).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import defaultdict, deque
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distrain.comm import boundary as bd
from distrain.comm.errors import BoundaryRejectedError, CommError, FutureFrameError, MagnitudeError
from distrain.comm.simulated import SimulatedHub, run_ranks
from distrain.config import ChunkwiseConfig, ModelConfig
from distrain.model import Transformer
from distrain.parallel.pipeline import step as pp
from distrain.parallel.pipeline import schedule as sch
from distrain.parallel.pipeline import subspace as ss
from distrain.parallel.chunkwise import chunkwise_backward, plan_chunks, select_chunks

D, V = 32, 96


class Deadlock(CommError):
    pass


class Hub:
    """Point-to-point queues and all-gathers between threads; ``fail`` wakes every waiter."""

    def __init__(self, groups: dict[str, list[int]], timeout: float = 30.0) -> None:
        self.cv = threading.Condition()
        self.queues: dict[tuple[int, int], deque] = defaultdict(deque)
        self.waiting: dict[int, int] = {}
        self.groups, self.timeout = groups, timeout
        self.gather: dict[tuple[str, int], dict[int, bytes]] = defaultdict(dict)
        self.rounds: dict[tuple[str, int], int] = defaultdict(int)
        self.log: list[tuple[int, int, int]] = []  # (src, dst, bytes)
        self.failed: BaseException | None = None

    def endpoint(self, rank: int) -> "Endpoint":
        return Endpoint(self, rank)

    def _wait(self, ready) -> None:
        if not self.cv.wait_for(lambda: ready() or self.failed is not None, self.timeout):
            raise CommError("fake transport timed out")
        if self.failed is not None and not ready():
            raise CommError(f"another stage failed: {self.failed!r}")


class Endpoint:
    def __init__(self, hub: Hub, rank: int) -> None:
        self.hub, self.rank = hub, rank

    def send_bytes(self, dst: int, payload: bytes) -> None:
        assert isinstance(payload, bytes)
        with self.hub.cv:
            self.hub.queues[(self.rank, dst)].append(payload)
            self.hub.log.append((self.rank, dst, len(payload)))
            self.hub.cv.notify_all()

    def recv_bytes(self, src: int) -> bytes:
        h = self.hub
        with h.cv:
            q = h.queues[(src, self.rank)]
            if not q:
                h.waiting[self.rank] = src
                r, seen = src, {self.rank}
                while r in h.waiting and not h.queues[(h.waiting[r], r)]:
                    if h.waiting[r] in seen:
                        h.failed = Deadlock(f"ranks {sorted(seen | {r})} wait on each other")
                        h.cv.notify_all()
                        raise h.failed
                    seen.add(r)
                    r = h.waiting[r]
                try:
                    h._wait(lambda: bool(q))
                finally:
                    del h.waiting[self.rank]
            return q.popleft()

    def all_gather_bytes(self, group: str, payload: bytes) -> list[bytes | None]:
        h = self.hub
        members = h.groups[group]
        with h.cv:
            rnd = h.rounds[(group, self.rank)]
            h.rounds[(group, self.rank)] += 1
            slot = h.gather[(group, rnd)]
            slot[self.rank] = payload
            h.cv.notify_all()
            h._wait(lambda: len(slot) == len(members))
            return [slot[r] for r in members]


def run_threads(fns: list) -> list:
    """Run one callable per stage in threads; re-raise the first failure."""
    results, errors = [None] * len(fns), [None] * len(fns)

    def target(i):
        try:
            results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors[i] = e
            hub = getattr(fns[i], "hub", None)
            if hub is not None:
                with hub.cv:
                    hub.failed = hub.failed or e
                    hub.cv.notify_all()

    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a stage thread hung"
    first = next((e for e in errors if e is not None and not isinstance(e, CommError)), None)
    first = first or next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results


# -- models ------------------------------------------------------------------------------------

def mcfg(n_layers=4) -> ModelConfig:
    return ModelConfig(dim=D, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=V, max_seq_len=32,
                       multiple_of=16)


def full_model(n_layers=4, seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(mcfg(n_layers)).double()


def split(full: Transformer, bounds: list[int]) -> list[Transformer]:
    stages = []
    sd = full.state_dict()
    for a, b in zip(bounds, bounds[1:]):
        st = Transformer(full.cfg, a, b).double()
        st.load_state_dict({k: v for k, v in sd.items() if k in st.state_dict()}, strict=True)
        stages.append(st)
    return stages


def micro_batches(n=3, b=2, t=16, seed=3, ignore=False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in range(n):
        ids = torch.randint(0, V, (b, t), generator=g)
        tgt = torch.randint(0, V, (b, t), generator=g)
        if ignore:  # uneven counts per micro-batch: the step's mean is over all its tokens
            tgt[:, : 2 * m + 1] = -100
        out.append((ids, tgt))
    return out


def reference(full, mbs, clip=0.0):
    """One unsplit backward over the concatenated micro-batches: mean over every target token."""
    full.zero_grad(set_to_none=True)
    ids = torch.cat([i for i, _ in mbs])
    tgt = torch.cat([t for _, t in mbs])
    logits = full(ids)
    loss = F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1), ignore_index=-100)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(full.parameters(), clip if clip > 0 else float("inf"))
    return float(loss.detach()), float(norm), {k: p.grad.clone() for k, p in full.named_parameters()}


def run_pipeline(stages, mbs, *, schedule="1f1b", subs=None, wire="fp64", clip=0.0, step=4, chunkwise=None,
                 seeds=None, steps=None, on_compute=None):
    n = len(stages)
    ranks = tuple(range(10, 10 + n))  # transport ranks need not be stage indices
    hub = Hub({"replica": list(ranks)})
    fns = []
    for s, st in enumerate(stages):
        def fn(s=s, st=st):
            gen = torch.Generator().manual_seed(seeds) if seeds is not None else None
            return pp.pipeline_step(st, mbs, hub.endpoint(ranks[s]), pp.StagePlace(ranks, s, "replica"),
                                    step=step if steps is None else steps[s], schedule=schedule,
                                    subspace=subs[s] if subs else None, wire_dtype=wire, grad_clip=clip,
                                    chunkwise=chunkwise, chunk_generator=gen,
                                    on_compute=(lambda k, m, dt, s=s: on_compute(s, k, m)) if on_compute else None)
        fn.hub = hub
        fns.append(fn)
    return run_threads(fns), hub


def stage_grads(stages) -> dict[str, torch.Tensor]:
    return {k: p.grad for st in stages for k, p in st.named_parameters()}


def assert_grads_equal(got, want, tol=1e-10):
    assert set(got) == set(want)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=tol, atol=tol), (k, (got[k] - want[k]).abs().max())


# -- schedules -----------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", sch.SCHEDULES)
def test_schedules_cannot_deadlock_and_respect_their_activation_bound(schedule):
    for n_stages in range(1, 7):
        for n_micro in range(1, 10):
            orders = [sch.stage_ops(schedule, n_stages, s, n_micro) for s in range(n_stages)]
            sch.check_deadlock_free(orders)
            for s, ops in enumerate(orders):
                assert sorted(ops) == sorted([sch.Op("F", m) for m in range(n_micro)] +
                                             [sch.Op("B", m) for m in range(n_micro)])
                assert sch.peak_live(ops) == sch.live_bound(schedule, n_stages, s, n_micro)
                if schedule == "1f1b":
                    assert sch.peak_live(ops) <= n_stages
                else:
                    assert sch.peak_live(ops) == n_micro


def test_deadlock_check_catches_neighbours_waiting_on_each_other():
    orders = [sch.stage_ops("1f1b", 2, s, 2) for s in range(2)]
    orders[0] = [sch.Op("F", 0), sch.Op("B", 0), sch.Op("F", 1), sch.Op("B", 1)]  # stage 1 needs F1 first
    orders[1] = [sch.Op("F", 0), sch.Op("F", 1), sch.Op("B", 0), sch.Op("B", 1)]
    with pytest.raises(RuntimeError, match="deadlock"):
        sch.check_deadlock_free(orders)
    with pytest.raises(RuntimeError, match="reads micro-batch"):
        sch.check_deadlock_free([[sch.Op("F", 0), sch.Op("F", 1)], [sch.Op("F", 1), sch.Op("F", 0)]])


def test_fake_transport_detects_two_stages_receiving_from_each_other():
    hub = Hub({})
    a, b = hub.endpoint(0), hub.endpoint(1)
    fa, fb = (lambda: a.recv_bytes(1)), (lambda: b.recv_bytes(0))
    fa.hub = fb.hub = hub
    with pytest.raises(CommError):
        run_threads([fa, fb])
    assert isinstance(hub.failed, Deadlock)


# -- uncompressed pipelines equal the unsplit model -------------------------------------------------

@pytest.mark.parametrize("schedule", sch.SCHEDULES)
@pytest.mark.parametrize("bounds", [[0, 2, 4], [0, 1, 3, 4]], ids=["2stages", "3stages"])
@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_uncompressed_pipeline_equals_unsplit_model(schedule, bounds, clip):
    full = full_model()
    stages = split(full, bounds)
    mbs = micro_batches(n=4, ignore=True)
    loss, norm, want = reference(full, mbs, clip)
    results, hub = run_pipeline(stages, mbs, schedule=schedule, clip=clip)
    assert_grads_equal(stage_grads(stages), want)
    n = len(stages)
    for s, r in enumerate(results):  # every stage knows the replica's loss, norm and clip factor
        assert r.loss == pytest.approx(loss, rel=1e-12)
        assert r.grad_norm == pytest.approx(norm, rel=1e-10)
        assert r.tokens == sum(int((t != -100).sum()) for _, t in mbs)
        assert r.peak_live == sch.live_bound(schedule, n, s, 4)
        assert r.clip_coef == (1.0 if clip == 0 else pytest.approx(clip / (norm + 1e-6)))
    if clip:
        assert results[0].clip_coef < 0.5  # the clip really bites, so equality above tests it
    # forward frames only go s → s+1, backward frames s+1 → s, one per micro-batch each
    assert sorted((s, d) for s, d, _ in hub.log) == sorted(
        [(10 + s, 11 + s) for s in range(n - 1)] * 4 + [(11 + s, 10 + s) for s in range(n - 1)] * 4)


def test_1f1b_holds_fewer_activations_than_gpipe_with_many_micro_batches():
    full = full_model()
    mbs = micro_batches(n=6)
    peaks = {}
    for schedule in sch.SCHEDULES:
        results, _ = run_pipeline(split(full, [0, 1, 3, 4]), mbs, schedule=schedule)
        peaks[schedule] = [r.peak_live for r in results]
    assert peaks == {"gpipe": [6, 6, 6], "1f1b": [3, 2, 1]}


def test_bf16_wire_stays_close_and_results_report_time_and_bytes():
    full = full_model()
    mbs = micro_batches(n=2)
    _, _, want = reference(full, mbs)
    stages = split(full, [0, 2, 4])
    calls = []
    results, hub = run_pipeline(stages, mbs, wire="bf16", on_compute=lambda s, k, m: calls.append((s, k, m)))
    for k, g in stage_grads(stages).items():
        assert torch.allclose(g, want[k], rtol=5e-2, atol=5e-3 * want[k].abs().max()), k
    r0 = results[0]
    assert r0.bytes_sent["forward"] == 2 * bd.message_bytes(2, 16, D, "bf16") == results[1].bytes_recv["forward"]
    assert r0.bytes_sent["backward"] == 0 and results[1].bytes_sent["backward"] == r0.bytes_recv["backward"]
    assert r0.boundary_bytes_per_token() == pytest.approx(2 * D + bd.FRAME_BYTES / 32)
    assert all(r.total_s >= r.compute_s > 0 and r.wait_s >= 0 and r.codec_s > 0 for r in results)
    assert r0.bubble_fraction == pytest.approx(1 / 3)
    assert sorted(calls) == sorted((s, k, m) for s in range(2) for k in "FB" for m in range(2))


@pytest.mark.parametrize("wire,tol", [("int8", 0.03), ("int4", 0.3)])
def test_quantised_wire_keeps_gradients_close_and_sends_the_quantised_bytes(wire, tol):
    """Unconstrained stages that send int8/int4 activations: the gradients stay within the
    quantisation's relative error of the unsplit model's, and each message is exactly the format's
    size (values plus one fp16 scale per token plus framing)."""
    full = full_model()
    mbs = micro_batches(n=2)
    _, _, want = reference(full, mbs)
    stages = split(full, [0, 2, 4])
    results, _ = run_pipeline(stages, mbs, wire=wire)
    got = stage_grads(stages)
    for k in want:
        rel = (got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-12)
        assert rel < tol, (k, float(rel))
    assert results[0].bytes_sent["forward"] == 2 * bd.message_bytes(2, 16, D, wire)
    assert bd.message_bytes(2, 16, D, wire) < bd.message_bytes(2, 16, D, "bf16")


# -- compressed pipelines equal the reparametrised single-process model ----------------------------

K = 4


def compressed(full: Transformer, bounds: list[int], method="reparam", table="split"):
    """Compressed stages and the whole reparametrised model. table "split": T_fix = E − E·U·Uᵀ (⊥ U);
    "random": a seeded Gaussian T_fix as ProtocolNanoGPT uses (not ⊥ U, so c = Uᵀ(x − T_fix[ids]) matters)."""
    u = ss.make_basis(D, K, seed=11, dtype=torch.float64)
    if table == "split":
        t_fix = ss.split_embedding(full.tok_embeddings.weight.detach(), u)[1]
    else:
        t_fix = 0.02 * torch.randn(V, D, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    given = None if table == "split" else t_fix
    stages = split(full, bounds)
    subs = [ss.compress_stage(st, u, token_table=given if st.is_first else t_fix, method=method) for st in stages]
    ref = split(full, [0, full.cfg.n_layers])[0]
    ss.compress_stage(ref, u, layers=range(bounds[-2]), embed=True, token_table=given, method=method)
    return stages, subs, ref


@pytest.mark.parametrize("schedule", sch.SCHEDULES)
@pytest.mark.parametrize("bounds", [[0, 2, 4], [0, 1, 3, 4]], ids=["2stages", "3stages"])
@pytest.mark.parametrize("table", ["split", "random"])
def test_compressed_pipeline_equals_the_reparametrised_model(schedule, bounds, table):
    stages, subs, ref = compressed(full_model(), bounds, table=table)
    mbs = micro_batches(n=3, ignore=True)
    loss, norm, want = reference(ref, mbs, clip=0.05)
    results, _ = run_pipeline(stages, mbs, schedule=schedule, subs=subs, clip=0.05)
    assert_grads_equal(stage_grads(stages), want)
    assert results[-1].loss == pytest.approx(loss, rel=1e-12)
    assert results[0].grad_norm == pytest.approx(norm, rel=1e-10)
    assert any(k.endswith(".z") for k in want) and "tok_embeddings.e_k" in want


def test_compressed_boundary_sends_exactly_2k_bytes_per_token_plus_framing():
    stages, subs, _ = compressed(full_model(), [0, 1, 3, 4])
    mbs = micro_batches(n=3, b=2, t=16)
    results, hub = run_pipeline(stages, mbs, subs=subs, wire="bf16")
    per_msg = 40 + 2 * 16 * 2 * K
    assert {n for _, _, n in hub.log} == {per_msg}  # every message, both directions
    positions = 3 * 2 * 16
    for s, r in enumerate(results):
        fwd = 3 * per_msg if s < 2 else 0
        bwd = 3 * per_msg if s > 0 else 0
        assert r.bytes_sent == {"forward": fwd, "backward": bwd}
        if s < 2:
            assert (r.bytes_sent["forward"] - 3 * bd.FRAME_BYTES) / positions == 2 * K
    # against bf16 activations of the same pipeline: d/k times fewer payload bytes
    plain, hub2 = run_pipeline(split(full_model(), [0, 1, 3, 4]), mbs, wire="bf16")
    assert {n for _, _, n in hub2.log} == {40 + 2 * 16 * 2 * D}


def test_project_method_pipeline_equals_the_projected_stages_composed_in_one_process():
    """With "project" the weights are ordinary, so a boundary's backward (∂L/∂c = Uᵀ∂L/∂x) drops the
    out-of-span part of ∂L/∂x that the unsplit model would propagate: the reference is the stages
    composed in one process through x ← U·Uᵀ(x − T_fix[ids]) + T_fix[ids] at each boundary."""
    full = full_model()
    stages, subs, whole = compressed(full, [0, 1, 3, 4], method="project")
    ref, ref_subs, _ = compressed(full, [0, 1, 3, 4], method="project")
    mbs = micro_batches(n=2, ignore=True)
    n_tok = sum(int((t != -100).sum()) for _, t in mbs)
    for ids, tgt in mbs:
        h = ref[0](ids)
        for st, sub in zip(ref[1:], ref_subs[1:]):
            h = st(sub.from_coords(sub.to_coords(h, ids), ids))
        (F.cross_entropy(h.reshape(-1, V), tgt.reshape(-1), ignore_index=-100, reduction="sum") / n_tok).backward()
    run_pipeline(stages, mbs, subs=subs)
    assert_grads_equal(stage_grads(stages), stage_grads(ref))
    _, _, unsplit = reference(whole, mbs)  # the same weights unsplit: the boundaries really drop a part
    for name in ("layers.0.attention.wo.weight", "tok_embeddings.weight"):  # the matrices writing out of span
        got = stage_grads(stages)[name]
        assert (got - unsplit[name]).abs().max() > 1e-3 * got.abs().max(), name


# -- chunk-wise stages inside the pipeline ------------------------------------------------------------

@pytest.mark.parametrize("schedule", sch.SCHEDULES)
def test_seco_stages_give_the_unsplit_gradients(schedule):
    full = full_model()
    stages = split(full, [0, 1, 3, 4])
    mbs = micro_batches(n=3, ignore=True)
    loss, _, want = reference(full, mbs)
    cw = ChunkwiseConfig(mode="seco", chunk_len=4)
    results, _ = run_pipeline(stages, mbs, schedule=schedule, chunkwise=cw)
    assert_grads_equal(stage_grads(stages), want)
    assert results[0].loss == pytest.approx(loss, rel=1e-12)


def test_seco_inside_a_compressed_pipeline_gives_the_reparametrised_gradients():
    stages, subs, ref = compressed(full_model(), [0, 2, 4])
    mbs = micro_batches(n=2)
    _, _, want = reference(ref, mbs)
    run_pipeline(stages, mbs, subs=subs, chunkwise=ChunkwiseConfig(mode="seco", chunk_len=8))
    assert_grads_equal(stage_grads(stages), want)


def test_spaco_stages_equal_whole_model_spaco_with_the_same_chunks():
    full = full_model()
    stages = split(full, [0, 2, 4])
    mbs = micro_batches(n=3)
    cw = ChunkwiseConfig(mode="spaco", chunk_len=4, sparse_chunks=2)
    gen = torch.Generator().manual_seed(7)
    n_tok = sum(t.numel() for _, t in mbs)
    full.zero_grad(set_to_none=True)
    chunks = [select_chunks(plan_chunks(16, cw).n_chunks, cw, gen) for _ in mbs]
    for (ids, tgt), ch in zip(mbs, chunks):
        chunkwise_backward(full, ids, tgt, cw, loss_scale=tgt.numel() / n_tok, chunks=ch)
    want = {k: p.grad.clone() for k, p in full.named_parameters()}
    run_pipeline(stages, mbs, chunkwise=cw, seeds=7)
    assert_grads_equal(stage_grads(stages), want)
    assert any(len(c) < 4 for c in chunks)  # SpaCO really skipped chunks


# -- failures --------------------------------------------------------------------------------------

def test_a_stage_on_another_step_is_rejected_not_trained_on():
    stages = split(full_model(), [0, 2, 4])
    with pytest.raises(BoundaryRejectedError, match="stage 1 rejected the forward boundary frame of step 4, "
                                                    "micro-batch 0 from stage 0: FutureFrameError") as info:
        run_pipeline(stages, micro_batches(n=2), steps=[5, 4])
    assert isinstance(info.value.__cause__, FutureFrameError)


@pytest.mark.parametrize("direction", [bd.FORWARD, bd.BACKWARD])
def test_boundary_frames_out_of_bounds_are_rejected(direction):
    """Valid and finite is not enough: a 1e30 frame, or one far above what the link carried."""
    bounds = bd.BoundaryBounds(ratio=1e3, abs_cap=1e6, warmup=2)
    honest = torch.randn(2, 8, 16)
    for step in range(3):
        bounds.check(honest * (1 + 0.1 * step), src=3, direction=direction, step=step, micro=0)
    with pytest.raises(MagnitudeError, match="exceeds the absolute cap"):
        bounds.check(torch.full((2, 8, 16), 1e30), 3, direction, 3, 0)
    with pytest.raises(MagnitudeError, match="running scale"):
        bounds.check(honest * 5e4, 3, direction, 3, 0)  # under the cap, but 5e4 x the link's usual scale
    bounds.check(honest * 5e4, 4, direction, 3, 0)  # another link has no history yet: only the cap applies
    bounds.check(honest * 2, 3, direction, 3, 0)  # honest drift passes


def test_norm_records_are_validated():
    def rec(stage, sq, loss, vote=0):
        return pp._STAT.pack(stage, sq, loss, vote)

    with pytest.raises(CommError, match="missing"):
        pp._parse_stats([rec(0, 1.0, float("nan")), None], 2)
    with pytest.raises(CommError, match="bad clip-norm record"):
        pp._parse_stats([rec(0, 1.0, 0.0), rec(0, 1.0, 0.0)], 2)
    with pytest.raises(CommError, match="bad clip-norm record"):
        pp._parse_stats([rec(0, float("nan"), 0.0), rec(1, 1.0, 0.0)], 2)
    with pytest.raises(CommError, match="bad clip-norm record"):
        pp._parse_stats([rec(0, 1.0, 0.0), rec(1, 1.0, 0.0, vote=7)], 2)  # a vote is 0 or 1
    with pytest.raises(CommError, match="bytes"):
        pp._parse_stats([b"x", rec(1, 1.0, 0.0)], 2)
    assert pp._parse_stats([rec(1, 2.0, 3.0, 1), rec(0, 1.0, float("nan"))], 2)[1] == (2.0, 3.0, True)


def test_bad_placement_is_an_error():
    stages = split(full_model(), [0, 2, 4])
    hub = Hub({"r": [0, 1]})
    with pytest.raises(ValueError, match="first/last"):
        pp.pipeline_step(stages[1], micro_batches(1), hub.endpoint(0), pp.StagePlace((0, 1), 0, "r"), step=0)
    with pytest.raises(ValueError, match="group"):
        pp.pipeline_step(stages[0], micro_batches(1), hub.endpoint(0), pp.StagePlace((0, 1), 0), step=0)
    with pytest.raises(ValueError, match="schedule"):
        sch.stage_ops("zb", 2, 0, 1)


def test_single_stage_needs_no_transport_and_equals_the_model():
    full = full_model()
    mbs = micro_batches(n=2)
    loss, norm, want = reference(full, mbs, clip=0.1)
    (stage,) = split(full, [0, 4])
    r = pp.pipeline_step(stage, mbs, None, pp.StagePlace((0,), 0), step=0, grad_clip=0.1)
    assert_grads_equal(stage_grads([stage]), want)
    assert r.loss == pytest.approx(loss, rel=1e-12) and r.grad_norm == pytest.approx(norm, rel=1e-10)


def test_runs_over_the_simulated_transport():
    """The same step over distrain.comm.simulated (the real in-process transport, not the fake above)."""
    full = full_model()
    stages, subs, ref = compressed(full, [0, 1, 3, 4])
    mbs = micro_batches(n=3)
    loss, norm, want = reference(ref, mbs, clip=0.05)
    hub = SimulatedHub(3, {"replica": [0, 1, 2]})
    results = run_ranks(hub, lambda t: pp.pipeline_step(
        stages[t.rank], mbs, t, pp.StagePlace((0, 1, 2), t.rank, "replica"), step=0, subspace=subs[t.rank],
        wire_dtype="fp64", grad_clip=0.05))
    assert_grads_equal(stage_grads(stages), want)
    assert all(r.loss == pytest.approx(loss, rel=1e-12) and r.grad_norm == pytest.approx(norm, rel=1e-10)
               for r in results)


GLOO_SCRIPT = r'''
import os, sys
import torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
from distrain.comm.torch_transport import TorchTransport, init_process_group
from distrain.parallel.pipeline import step as pp
from test_pipeline import compressed, full_model, micro_batches, reference, split

init_process_group("gloo", timeout_s=60)
rank = int(os.environ["RANK"])
t = TorchTransport({"replica": [0, 1, 2]}, timeout_s=60)
for schedule in ("gpipe", "1f1b"):
    for comp in (False, True):
        full = full_model()
        stages, subs, ref = compressed(full, [0, 1, 3, 4]) if comp else (split(full, [0, 1, 3, 4]), None, full)
        mbs = micro_batches(n=5, ignore=True)
        loss, norm, want = reference(ref, mbs, clip=0.05)
        for step in range(2):
            stages[rank].zero_grad(set_to_none=True)
            r = pp.pipeline_step(stages[rank], mbs, t, pp.StagePlace((0, 1, 2), rank, "replica"), step=step,
                                 schedule=schedule, subspace=subs[rank] if subs else None, wire_dtype="fp64",
                                 grad_clip=0.05)
        err = max(float((p.grad - want[k]).abs().max()) for k, p in stages[rank].named_parameters())
        assert err < 1e-10 and abs(r.loss - loss) < 1e-10 and abs(r.grad_norm - norm) < 1e-10, (schedule, comp, err)
t.flush()  # every send has left before the process group goes
import torch.distributed as dist
dist.destroy_process_group()
open(os.path.join(sys.argv[2], f"ok-{rank}"), "w").write("OK")
'''


@pytest.mark.slow
def test_three_stages_over_gloo_match_the_reference(tmp_path):
    """Real torch.distributed point-to-point (gloo, 3 processes): no deadlock, same gradients."""
    tests = Path(__file__).resolve().parent
    script = tmp_path / "gloo_pipeline.py"
    script.write_text(GLOO_SCRIPT)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tests.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
                           str(script), str(tests), str(tmp_path)], cwd=tests.parent, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("ok-*")) == ["ok-0", "ok-1", "ok-2"]
