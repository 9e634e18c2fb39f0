"""Outer optimisers over the simulated transport: the maths of one round, and bad frames."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distrain.comm.codecs import make_codec
from distrain.comm.simulated import SimulatedHub, SimulatedTransport, run_ranks
from distrain.comm.transport import Transport
from distrain.comm.wire import decode_frame, encode_frame
from distrain.comm.robust import RobustPolicy
from distrain.outer.base import owned_parameters
from distrain.outer.ddp import DDPOuter
from distrain.outer.pseudo_gradient import PseudoGradientOuter
from distrain.outer.step import OuterStep

R = 3


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)  # not the global RNG: replicas are threads
        self.w = nn.Parameter(torch.randn(64, 128, generator=g))
        self.b = nn.Parameter(torch.randn(100, generator=g))
        self.n = nn.Parameter(torch.ones(7))


def local_progress(model: Tiny, rank: int, round_idx: int) -> None:
    g = torch.Generator().manual_seed(1000 * rank + round_idx)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)


@torch.no_grad()
def sync_model(outer, model, round_idx):
    """What a worker does around an outer round: local weights in, the target loaded back."""
    params = owned_parameters(model)
    stats, target = outer.sync_round(round_idx, {n: p.detach().float() for n, p in params.items()})
    for n, p in params.items():
        p.copy_(target[n])
    outer.started(None)
    return stats


def sparse_codec(**kw):
    return make_codec("sparseloco", **{"topk": 64, "chunk": 64, "beta": 0.95, **kw})


def run_rounds(codec, rounds: int, lr=1.0, momentum=0.0, nesterov=False, apply_delay=0, wrap=None, policy=None,
               replicas=R, codec_at=None):
    hub = SimulatedHub(replicas, {"g": list(range(replicas))}, timeout_s=30)

    def body(t: SimulatedTransport):
        model = Tiny()
        transport = wrap(t) if wrap else t
        outer = PseudoGradientOuter(owned_parameters(model), codec, OuterStep(lr, momentum, nesterov, apply_delay),
                                    transport, "g", "run", t.rank, policy=policy, codec_at=codec_at)
        stats = []
        for r in range(rounds):
            local_progress(model, t.rank, r)
            stats.append(sync_model(outer, model, r))
        return {n: p.detach().clone() for n, p in model.named_parameters()}, outer, stats

    return run_ranks(hub, body, timeout_s=60)


def test_sparseloco_round_equals_reference_computation():
    codec = sparse_codec()
    results = run_rounds(codec, rounds=1)
    # every replica ends on the same global weights
    for params, _, _ in results[1:]:
        for n in params:
            assert torch.equal(params[n], results[0][0][n])
    # ... which are θ0 − α · aggregate(encode(θ0 − θ_r)) computed here by hand
    base = Tiny()
    theta0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    parts = {n: [] for n in theta0}
    for r in range(R):
        m = Tiny()
        local_progress(m, r, 0)
        state = {}
        for n, p in m.named_parameters():
            parts[n].append(codec.encode(n, theta0[n] - p.detach(), state))
    for n in theta0:
        expected = theta0[n] - codec.decode_aggregate(parts[n], tuple(theta0[n].shape))
        torch.testing.assert_close(results[0][0][n], expected, rtol=0, atol=0)
    stats = results[0][2][0]
    assert stats.contributors == R and stats.rejected == 0
    assert stats.dense_bytes == sum(p.numel() * 4 for p in base.parameters())
    assert stats.wire_bytes < stats.dense_bytes / 30  # tiny tensors: headers dominate


def test_error_feedback_is_kept_per_replica_and_differs():
    results = run_rounds(sparse_codec(), rounds=2)
    ef0 = results[0][1].codec_state["w"]
    ef1 = results[1][1].codec_state["w"]
    assert ef0.abs().sum() > 0 and not torch.equal(ef0, ef1)


def test_topk_warmup_sends_the_scheduled_k_each_round_and_counts_its_bytes():
    """Round r encodes with the schedule's k: the first round equals a plain round at k = 1024, the
    error buffer carries over between codecs, and the denser rounds cost more bytes on the wire."""
    ks = [1024, 256]
    codecs = {k: sparse_codec(topk=k) for k in (*ks, 64)}

    def schedule(r):
        return codecs[ks[r] if r < len(ks) else 64]

    first = run_rounds(codecs[64], rounds=1, codec_at=schedule)
    plain = run_rounds(codecs[1024], rounds=1)
    for n, p in plain[0][0].items():
        assert torch.equal(first[0][0][n], p)
    results = run_rounds(codecs[64], rounds=3, codec_at=schedule)
    warm, dense = results[0][2], plain[0][2]
    assert warm[0].wire_bytes == dense[0].wire_bytes  # same k, same deltas: the same frame
    assert warm[0].wire_bytes > warm[1].wire_bytes > warm[2].wire_bytes
    assert all(s.contributors == R and s.rejected == 0 for s in warm)
    for params, _, _ in results[1:]:  # every replica decoded every round's frames alike
        for n in params:
            assert torch.equal(params[n], results[0][0][n])
    # the last round is an ordinary k = 64 round on top of the warm-up's error buffers
    steady = [s.wire_bytes for s in run_rounds(codecs[64], rounds=3)[0][2]]
    assert abs(warm[2].wire_bytes - steady[2]) < 0.1 * steady[2]


def test_diloco_nesterov_matches_formula():
    codec = make_codec("dense", dtype="fp32")
    lr, mu = 0.7, 0.9
    results = run_rounds(codec, rounds=2, lr=lr, momentum=mu, nesterov=True)
    theta = {n: p.detach().clone() for n, p in Tiny().named_parameters()}
    models = [Tiny() for _ in range(R)]
    buf = {n: torch.zeros_like(t) for n, t in theta.items()}
    for rnd in range(2):
        deltas = {n: [] for n in theta}
        for r, m in enumerate(models):
            local_progress(m, r, rnd)
            for n, p in m.named_parameters():
                deltas[n].append(theta[n] - p.detach())
        for n in theta:
            g = torch.stack(deltas[n]).mean(0)
            buf[n] = mu * buf[n] + g
            theta[n] = theta[n] - lr * (g + mu * buf[n])
        for m in models:
            with torch.no_grad():
                for n, p in m.named_parameters():
                    p.copy_(theta[n])
    for n in theta:
        torch.testing.assert_close(results[0][0][n], theta[n], rtol=1e-6, atol=1e-6)


def test_apply_delay_applies_each_aggregate_one_round_late():
    codec = make_codec("dense", dtype="fp32")
    theta0 = {n: p.detach().clone() for n, p in Tiny().named_parameters()}
    results = run_rounds(codec, rounds=2, apply_delay=1)
    outer = results[0][1]
    # After round 0 nothing was applied; after round 1 exactly round 0's mean progress was.
    models = [Tiny() for _ in range(R)]
    for r, m in enumerate(models):
        local_progress(m, r, 0)
    mean0 = {n: torch.stack([theta0[n] - dict(m.named_parameters())[n].detach() for m in models]).mean(0)
             for n in theta0}
    for n in theta0:
        torch.testing.assert_close(outer.global_params[n], theta0[n] - mean0[n], rtol=1e-6, atol=1e-6)
    assert outer.step.pending is not None
    target = outer.flush()
    assert outer.step.pending is None
    for n, t in target.items():
        assert torch.equal(t, outer.global_params[n])


# --- bad frames: the round completes with the others ---------------------------------------------


class Corrupting(Transport):
    """Wraps a transport; replaces member 1's frame as received by everyone with ``mutate(frame)``."""

    def __init__(self, inner: SimulatedTransport, mutate):
        self.inner, self.mutate = inner, mutate
        self.previous: bytes | None = None

    rank = property(lambda self: self.inner.rank)
    world_size = property(lambda self: self.inner.world_size)

    def members(self, group):
        return self.inner.members(group)

    def all_gather_bytes(self, group, payload):
        frames = self.inner.all_gather_bytes(group, payload)
        bad = self.mutate(frames[1], self.previous)
        self.previous = frames[1]
        frames[1] = bad
        return frames

    def broadcast_bytes(self, group, payload, src):
        return self.inner.broadcast_bytes(group, payload, src)

    def barrier(self, group):
        self.inner.barrier(group)

    def send_bytes(self, dst, payload):
        self.inner.send_bytes(dst, payload)

    def recv_bytes(self, src):
        return self.inner.recv_bytes(src)


def _reencode(frame: bytes, change, codec=None) -> bytes:
    """Decode a valid frame, let ``change`` edit its buffers, and re-encode it with a valid crc."""
    shapes = {n: tuple(p.shape) for n, p in Tiny().named_parameters()}
    codec = codec or sparse_codec()
    meta, tensors = decode_frame(frame, shapes, "run", _round_of(frame), codec=codec)
    edited = {n: change(et) for n, et in tensors.items()}
    return encode_frame(meta, edited)


def _round_of(frame: bytes) -> int:
    from distrain.comm import wire

    prefix = wire.PREFIX.unpack_from(frame)
    header_len = prefix[4]
    import msgpack

    return msgpack.unpackb(frame[wire.PREFIX_SIZE:wire.PREFIX_SIZE + header_len], raw=False)["round"]


def _with_buffer(et, name, fill):
    from distrain.comm.codecs import EncodedTensor

    bufs = dict(et.buffers)
    arr = bufs[name].copy()
    arr[:] = fill
    bufs[name] = arr
    return EncodedTensor(shape=et.shape, meta=et.meta, buffers=bufs)


def _float_buffer(et):
    return next(n for n, b in et.buffers.items() if b.dtype.kind == "f")


def _index_buffer(et):
    return next(n for n in et.buffers if "idx" in n or "ind" in n)


MUTATIONS = {
    "truncated": (lambda f, prev: f[: len(f) // 2], "TruncatedFrameError"),
    "bit-flipped": (lambda f, prev: f[:40] + bytes([f[40] ^ 0x10]) + f[41:], "ChecksumError"),
    "wrong-version": (lambda f, prev: f[:4] + bytes([f[4] + 7]) + f[5:], "UnsupportedVersionError"),
    "bad-magic": (lambda f, prev: b"XXXX" + f[4:], "BadMagicError"),
    "stale-round": (lambda f, prev: prev if prev is not None else f[:10], None),
    "nan-values": (lambda f, prev: _reencode(f, lambda et: _with_buffer(et, _float_buffer(et), float("nan"))),
                   "NonFiniteError"),
    "bad-indices": (lambda f, prev: _reencode(f, lambda et: _with_buffer(et, _index_buffer(et), 0xFF)),
                    "IndexRangeError"),
}


@pytest.mark.parametrize("kind", sorted(MUTATIONS))
def test_bad_frame_is_rejected_and_round_completes(kind, caplog):
    mutate, error = MUTATIONS[kind]
    results = run_rounds(sparse_codec(), rounds=2, wrap=lambda t: Corrupting(t, mutate))
    for params, outer, stats in results:
        s = stats[1]
        assert s.contributors == R - 1 and s.rejected == 1
        expected = error or ("StaleFrameError" if kind == "stale-round" else "")
        assert expected in s.reasons[0]
        for p in params.values():
            assert torch.isfinite(p).all()
    # the healthy replicas still agree with each other
    for n in results[0][0]:
        assert torch.equal(results[0][0][n], results[2][0][n])


def test_ddp_grad_sync_averages_gradients():
    hub = SimulatedHub(R, {"g": list(range(R))}, timeout_s=30)

    def body(t):
        model = Tiny()
        ddp = DDPOuter(owned_parameters(model), t, "g", "run", t.rank)
        g = torch.Generator().manual_seed(t.rank)
        noise = [torch.randn(p.shape, generator=g) for p in owned_parameters(model).values()]
        grads = [torch.full_like(p, float(t.rank + 1)) + n for p, n in zip(owned_parameters(model).values(), noise)]
        ddp.grad_sync(grads)
        stats, target = ddp.sync_round(0, {})
        assert target is None  # DDP syncs gradients, not weights
        return grads, stats

    results = run_ranks(hub, body)
    for grads, stats in results:
        for i, g in enumerate(grads):
            expected = 2.0 + sum(results_noise(r)[i] for r in range(R)) / R
            torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-6)
        assert stats.contributors == R and stats.wire_bytes > 0.8 * stats.dense_bytes  # dense fp32 (zstd takes ~10 %)


def results_noise(rank):
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(p.shape, generator=g) for p in owned_parameters(Tiny()).values()]


# --- hostile (valid, finite) frames: robust aggregation keeps the round on the honest ones ----------


class Hostile(Corrupting):
    """Member 1's frame, as received by everyone, replaced by ``mutate(frame, frames)``."""

    def all_gather_bytes(self, group, payload):
        frames = self.inner.all_gather_bytes(group, payload)
        frames[1] = self.mutate(frames[1], frames)
        return frames


def _dense(values_change):
    def change(frame, frames):
        return _reencode(frame, lambda et: _scaled_values(et, values_change), codec=make_codec("dense", dtype="fp32"))
    return change


def _scaled_values(et, change):
    from distrain.comm.codecs import EncodedTensor

    bufs = {k: change(v.copy()) if v.dtype.kind == "f" else v for k, v in et.buffers.items()}
    return EncodedTensor(shape=et.shape, meta=et.meta, buffers=bufs)


def _flip_exponent(v):
    bits = v.view("<u4")
    bits[0] ^= 0x40000000  # the top exponent bit of a small value: ~2^128 times larger, still finite
    return v


HOSTILE = {
    "huge-centroids": (sparse_codec, lambda f, frames: _reencode(f, lambda et: _with_buffer(et, "centroids", 3e38))),
    "flipped-exponent": (lambda: make_codec("dense", dtype="fp32"), _dense(_flip_exponent)),
    "huge-dense": (lambda: make_codec("dense", dtype="fp32"), _dense(lambda v: v * 1e30)),
    "resent-other-members-frame": (sparse_codec, lambda f, frames: frames[0]),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_hostile_frame_cannot_move_the_weights_or_abort_the_round(kind):
    """4 replicas, member 1 hostile every round: the rounds complete, everyone stays finite and in
    sync, and the weights equal a run in which member 1's frame never arrived."""
    make, mutate = HOSTILE[kind]
    policy = RobustPolicy()
    hostile = run_rounds(make(), rounds=3, wrap=lambda t: Hostile(t, mutate), policy=policy, replicas=4)
    missing = run_rounds(make(), rounds=3, wrap=lambda t: Hostile(t, lambda f, frames: None), policy=policy,
                         replicas=4)
    for params, _, stats in hostile:
        assert all(s.contributors == 3 and s.rejected == 1 for s in stats), [s.reasons for s in stats]
        assert all(torch.isfinite(p).all() for p in params.values())
    for (params, outer, _), (ref, ref_outer, _) in zip(hostile, missing):
        for n in params:
            assert torch.equal(outer.global_params[n], ref_outer.global_params[n]), n
    if kind == "resent-other-members-frame":
        assert "names worker 0" in hostile[0][2][0].reasons[0] or "worker 0" in hostile[0][2][0].reasons[0]


def test_moderately_large_contributions_are_clipped_not_dropped():
    """A frame 4x the others' norm is scaled to 2x the reference: it still counts, bounded."""
    policy = RobustPolicy(clip_ratio=2.0, reject_ratio=10.0)
    big = run_rounds(make_codec("dense", dtype="fp32"), rounds=1, policy=policy, replicas=4,
                     wrap=lambda t: Hostile(t, _dense(lambda v: v * 4.0)))
    honest = run_rounds(make_codec("dense", dtype="fp32"), rounds=1, policy=policy, replicas=4)
    unbounded = run_rounds(make_codec("dense", dtype="fp32"), rounds=1, policy=None, replicas=4,
                           wrap=lambda t: Hostile(t, _dense(lambda v: v * 4.0)))
    s = big[0][2][0]
    assert s.contributors == 4 and s.rejected == 0
    n = "w"
    g_big, g_honest, g_unb = big[0][1].global_params[n], honest[0][1].global_params[n], unbounded[0][1].global_params[n]
    assert 0 < (g_big - g_honest).norm() < (g_unb - g_honest).norm()


def test_with_no_usable_contribution_the_step_is_skipped_not_raised():
    policy = RobustPolicy()
    results = run_rounds(sparse_codec(), rounds=1, policy=policy,
                         wrap=lambda t: _AllBad(t))
    for params, outer, stats in results:
        assert stats[0].contributors == 0 and stats[0].rejected == R
        for n, p in params.items():
            assert torch.equal(p, Tiny().state_dict()[n])  # back on the (unchanged) global weights


class _AllBad(Corrupting):
    def __init__(self, inner):
        super().__init__(inner, None)

    def all_gather_bytes(self, group, payload):
        return [b"XXXX" + f[4:] for f in self.inner.all_gather_bytes(group, payload)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("algo", ["sparseloco", "diloco"])
def test_a_whole_outer_round_on_cuda_equals_the_cpu_round(algo):
    """Weights on the GPU: the aggregate lands on their device and the round ends where the CPU round does."""
    codec = sparse_codec() if algo == "sparseloco" else make_codec("dense", dtype="fp32")
    momentum, nesterov, lr = (0.0, False, 1.0) if algo == "sparseloco" else (0.9, True, 0.7)

    def run(device):
        hub = SimulatedHub(R, {"g": list(range(R))}, timeout_s=60)

        def body(t):
            model = Tiny()
            local_progress(model, t.rank, 0)
            model = model.to(device)
            outer = PseudoGradientOuter(owned_parameters(model), codec, OuterStep(lr, momentum, nesterov), t, "g",
                                        "run", t.rank, policy=RobustPolicy())
            stats = [sync_model(outer, model, r) for r in range(2)]
            assert all(g.device.type == torch.device(device).type for g in outer.global_params.values())
            return {n: p.detach().cpu() for n, p in model.named_parameters()}, stats

        return run_ranks(hub, body, timeout_s=120)

    gpu, cpu = run("cuda"), run("cpu")
    for (pg, sg), (pc, sc) in zip(gpu, cpu):
        assert [s.contributors for s in sg] == [R, R]
        for n in pc:
            torch.testing.assert_close(pg[n], pc[n], rtol=1e-5, atol=1e-6)


def test_after_a_resume_every_outer_tensor_is_on_the_weights_device():
    """A checkpoint loads to the CPU; the outer state must follow the weights (on a GPU, ``base −
    local`` would otherwise mix devices). Checked through the device parameter: the weights here
    live on the meta device, the checkpoint on the CPU."""
    codec = make_codec("sparseloco", topk=4, chunk=8)
    hub = SimulatedHub(1, {"g": [0]}, timeout_s=5)
    weights = {"w": torch.zeros(8, 8, device="meta")}
    outer = PseudoGradientOuter(weights, codec, OuterStep(0.7, 0.9, True, delay=1), hub.transport(0), "g", "run", 0)
    cpu = {"w": torch.ones(8, 8)}
    outer.reset_to(cpu)  # the global weights, then the shared and own state, as a resume restores them
    outer.load_shared({"momentum": cpu, "pending": cpu})
    outer.load_own({"ef": cpu, "anchor": cpu, "start": cpu}, {})
    tensors = [*outer.global_params.values(), *outer.codec_state.values(), *outer.anchor.values(),
               *outer.start.values(), *outer.step.momentum_buf.values(), *outer.step.pending.values()]
    assert len(tensors) == 6 and all(t.device.type == "meta" and t.dtype == torch.float32 for t in tensors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_resumed_outer_optimiser_steps_on_cuda():
    codec = make_codec("sparseloco", topk=4, chunk=8)
    hub = SimulatedHub(1, {"g": [0]}, timeout_s=5)
    outer = PseudoGradientOuter({"w": torch.zeros(8, 8, device="cuda")}, codec, OuterStep(1.0, 0.0, False),
                                hub.transport(0), "g", "run", 0)
    outer.reset_to({"w": torch.ones(8, 8)})
    outer.load_shared({"momentum": {"w": torch.ones(8, 8)}})
    outer.load_own({"ef": {"w": torch.ones(8, 8)}}, {})
    stats, target = outer.sync_round(0, {"w": torch.zeros(8, 8, device="cuda")})
    assert target["w"].is_cuda and stats.contributors == 1
