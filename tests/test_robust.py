"""Robust aggregation against hostile-but-valid frames: huge finite values, flipped exponent bits,
re-sent frames, header bombs. The round completes with the honest contributions, and the aggregate
equals (or, where an honest frame is clipped, stays within tolerance of) the honest-only aggregate."""

from __future__ import annotations

import math
import struct
import tracemalloc
import zlib

import msgpack
import numpy as np
import pytest
import torch

from distrain.comm.codecs import EncodedTensor, make_codec
from distrain.comm.errors import FrameError, MalformedHeaderError, OversizedFrameError, SchemaError
from distrain.comm.robust import (
    RobustPolicy,
    SenderMismatchError,
    check_sender,
    contribution_norm,
    decide,
    reference_norm,
    robust_aggregate_inputs,
    scale_contribution,
)
from distrain.comm.wire import PREFIX_SIZE, VERSION, FrameLimits, FrameMeta, decode_frame, encode_frame

SHAPES = {"layers.0.w": (96, 64), "layers.0.norm": (64,), "head": (67, 100)}
CODECS = [
    ("sparseloco", {}),
    ("sparseloco", {"quantizer": "symmetric"}),
    ("sparseloco", {"quantizer": "none", "value_dtype": "fp16"}),
    ("sparseloco", {"quantizer": "none", "value_dtype": "fp32"}),
    ("dense", {"dtype": "fp32"}),
    ("dense", {"dtype": "bf16"}),
]
F32_MAX = float(np.finfo(np.float32).max)


def pseudo_grads(seed: int, scale: float = 1e-2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * scale for n, s in SHAPES.items()}


def contributions(codec, n: int) -> list[dict[str, EncodedTensor]]:
    return [{k: codec.encode(k, t, {}) for k, t in pseudo_grads(seed).items()} for seed in range(n)]


def aggregate(codec, parts: list[dict[str, EncodedTensor]]) -> dict[str, torch.Tensor]:
    return {n: codec.decode_aggregate([p[n] for p in parts], s) for n, s in SHAPES.items()}


def value_buffer(codec) -> str:
    return "centroids" if codec.kind == "sparseloco" and codec.quantizer != "none" else "values"


def with_values(tensors: dict[str, EncodedTensor], name: str, buffer: str, values: np.ndarray) -> dict[str, EncodedTensor]:
    et = tensors[name]
    return {**tensors, name: EncodedTensor(et.shape, dict(et.meta), {**et.buffers, buffer: values})}


def huge(codec, tensors: dict[str, EncodedTensor], magnitude: float = 3e38) -> dict[str, EncodedTensor]:
    """The same contribution with one value buffer blown up to ``magnitude`` (finite, valid)."""
    buf = value_buffer(codec)
    v = tensors["layers.0.w"].buffers[buf]
    if codec.kind == "dense" and codec.dtype == "bf16":
        big = torch.full((v.size,), magnitude).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return with_values(tensors, "layers.0.w", buf, big.astype("<u2"))
    limit = float(np.finfo(v.dtype).max)
    return with_values(tensors, "layers.0.w", buf, np.full(v.shape, min(magnitude, limit), dtype=v.dtype))


def recrc(frame: bytes) -> bytes:
    """Recompute the prefix crc32 after tampering (what a hostile sender does)."""
    head = frame[: PREFIX_SIZE - 4]
    return head + struct.pack("<I", zlib.crc32(frame[PREFIX_SIZE:], zlib.crc32(head))) + frame[PREFIX_SIZE:]


def decode(frame: bytes, codec, worker: int | None = None):
    return decode_frame(frame, SHAPES, "run-a", 3, codec=codec, worker=worker)


# ----- norms ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,params", CODECS)
def test_norm_equals_the_decoded_values_norm(kind, params):
    codec = make_codec(kind, **params)
    (tensors,) = contributions(codec, 1)
    want = math.sqrt(sum(float(a.double().square().sum()) for a in aggregate(codec, [tensors]).values()))
    assert contribution_norm(codec, tensors) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("kind,params", CODECS)
def test_norm_of_huge_finite_values_does_not_overflow(kind, params):
    codec = make_codec(kind, **params)
    (tensors,) = contributions(codec, 1)
    norm = contribution_norm(codec, huge(codec, tensors))
    assert math.isfinite(norm) and norm > 1e4


def test_reference_is_the_low_median():
    assert reference_norm([1.0, 1e30]) == 1.0  # two contributors: the hostile one cannot drag it up
    assert reference_norm([3.0, 1.0, 2.0]) == 2.0
    assert reference_norm([4.0, 1.0, 3.0, 2.0]) == 2.0
    assert reference_norm([0.0, 5.0]) == 5.0  # an all-zero frame does not set the reference to 0
    assert reference_norm([]) == 0.0 and reference_norm([0.0]) == 0.0


def test_decisions_keep_clip_reject():
    decisions, ref = decide([(0, 1.0), (1, 1.5), (2, 3.0), (3, 50.0), (4, 1e20)])
    assert ref == 1.5
    assert [d.action for d in decisions] == ["keep", "keep", "keep", "reject", "reject"]
    assert "outlier" in decisions[3].reason and "absolute bound" in decisions[4].reason
    decisions, _ = decide([(0, 1.0), (1, 1.0), (2, 5.0)])
    assert decisions[2].action == "clip" and decisions[2].scale == pytest.approx(2.0 / 5.0)


def test_policy_is_validated():
    for bad in ({"clip_ratio": 0.5}, {"clip_ratio": 20.0}, {"max_norm": float("inf")}, {"max_norm": 1e31},
                {"reject_ratio": float("nan")}):
        with pytest.raises(ValueError, match="robust policy"):
            RobustPolicy(**bad)


# ----- hostile contributions -----------------------------------------------------------------------
@pytest.mark.parametrize("kind,params", CODECS)
@pytest.mark.parametrize("n_honest,n_hostile", [(1, 1), (3, 1), (3, 2)])
def test_huge_finite_frames_are_rejected_and_honest_aggregate_is_exact(kind, params, n_honest, n_hostile):
    codec = make_codec(kind, **params)
    honest = contributions(codec, n_honest + n_hostile)
    parts = [(m, t) for m, t in enumerate(honest[:n_honest])]
    parts += [(n_honest + i, huge(codec, honest[n_honest + i])) for i in range(n_hostile)]
    # Round-trip every contribution through a real frame: hostile values pass wire validation.
    framed = []
    for member, tensors in parts:
        frame = encode_frame(FrameMeta.for_codec("run-a", 3, member, codec), tensors)
        meta, decoded = decode(frame, codec, worker=member)
        framed.append((meta.worker, decoded))
    out = robust_aggregate_inputs(codec, framed)
    assert [m for m, _ in out.kept] == list(range(n_honest))
    assert len(out.rejected) == n_hostile and not out.clipped
    got = aggregate(codec, [t for _, t in out.kept])
    want = aggregate(codec, honest[:n_honest])
    for n in SHAPES:
        assert torch.isfinite(got[n]).all()
        assert torch.equal(got[n], want[n])


@pytest.mark.parametrize("dtype,bit", [("fp32", 30), ("bf16", 14)])
def test_flipped_exponent_bit_with_recomputed_crc(dtype, bit):
    codec = make_codec("dense", dtype=dtype)
    honest = contributions(codec, 4)
    frames = [encode_frame(FrameMeta.for_codec("run-a", 3, m, codec), t, compress=False) for m, t in enumerate(honest)]
    # Member 2 flips the top exponent bit of one value: ~1e-2 becomes ~1e36.
    hlen = struct.unpack_from("<I", frames[2], 8)[0]
    itemsize = 4 if dtype == "fp32" else 2
    pos = PREFIX_SIZE + hlen + 10 * itemsize + bit // 8
    bad = bytearray(frames[2])
    bad[pos] ^= 1 << (bit % 8)
    frames[2] = recrc(bytes(bad))
    decoded = []
    for m, f in enumerate(frames):
        meta, tensors = decode(f, codec, worker=m)  # passes validation: finite, crc right
        decoded.append((m, tensors))
    assert contribution_norm(codec, decoded[2][1]) > 1e30
    out = robust_aggregate_inputs(codec, decoded)
    assert [m for m, _ in out.kept] == [0, 1, 3] and out.rejected[0].startswith("member 2:")
    got = aggregate(codec, [t for _, t in out.kept])
    want = aggregate(codec, [honest[i] for i in (0, 1, 3)])
    assert all(torch.equal(got[n], want[n]) for n in SHAPES)


@pytest.mark.parametrize("kind,params", CODECS)
def test_moderately_large_frame_is_clipped_without_touching_received_buffers(kind, params):
    codec = make_codec(kind, **params)
    honest = contributions(codec, 3)
    buf = value_buffer(codec)
    big = {n: EncodedTensor(et.shape, dict(et.meta), dict(et.buffers)) for n, et in honest[2].items()}
    for n, et in big.items():  # 4x the honest values (exact in every wire dtype)
        v = et.buffers[buf]
        scaled = ((v.astype(np.uint32) + (2 << 7)).astype("<u2") if v.dtype == np.dtype("<u2")
                  else (v.astype(np.float64) * 4).astype(v.dtype))
        big = with_values(big, n, buf, scaled)
    before = {n: et.buffers[buf].copy() for n, et in big.items()}
    parts = [(0, honest[0]), (1, honest[1]), (2, big)]
    ref = reference_norm([contribution_norm(codec, t) for _, t in parts])
    out = robust_aggregate_inputs(codec, parts)
    assert len(out.kept) == 3 and len(out.clipped) == 1 and not out.rejected
    clipped = dict(out.kept)[2]
    rel = 1e-2 if kind == "dense" and params["dtype"] == "bf16" else 1e-3 if params.get("value_dtype") == "fp16" else 1e-6
    assert contribution_norm(codec, clipped) == pytest.approx(2.0 * ref, rel=rel)
    assert all(np.array_equal(big[n].buffers[buf], before[n]) for n in big)  # never mutated


@pytest.mark.parametrize("kind,params", CODECS)
def test_honest_rounds_are_untouched(kind, params):
    codec = make_codec(kind, **params)
    honest = contributions(codec, 4)
    out = robust_aggregate_inputs(codec, list(enumerate(honest)))
    assert len(out.kept) == 4 and not out.rejected and not out.clipped
    got, want = aggregate(codec, [t for _, t in out.kept]), aggregate(codec, honest)
    assert all(torch.equal(got[n], want[n]) for n in SHAPES)


@pytest.mark.parametrize("kind,params", CODECS)
def test_no_mix_of_hostile_magnitudes_overflows_the_aggregate(kind, params):
    """Whatever finite values arrive (even a hostile majority), the result decodes finite."""
    codec = make_codec(kind, **params)
    honest = contributions(codec, 6)
    rng = np.random.default_rng(0)
    magnitudes = [1.0, 1e3, 1e10, 1e17, 1e25, 1e30, 3e38]
    for trial in range(12):
        n = int(rng.integers(1, 7))
        parts = []
        for m in range(n):
            if rng.random() < 0.6:
                parts.append((m, huge(codec, honest[m], float(rng.choice(magnitudes)))))
            else:
                parts.append((m, honest[m]))
        out = robust_aggregate_inputs(codec, parts, RobustPolicy(max_norm=1e30))
        if out.kept:
            got = aggregate(codec, [t for _, t in out.kept])
            assert all(torch.isfinite(got[k]).all() for k in SHAPES), (trial, out.decisions)


def test_hostile_frame_moves_the_weights_only_within_the_honest_tolerance():
    """One outer step (θ −= α·agg) with 1 hostile of 4 replicas, robust vs honest-only."""
    codec = make_codec("sparseloco")
    honest = contributions(codec, 4)
    theta = {n: torch.zeros(s) for n, s in SHAPES.items()}
    want = {n: theta[n] - a for n, a in aggregate(codec, honest[:3]).items()}
    out = robust_aggregate_inputs(codec, [(0, honest[0]), (1, honest[1]), (2, honest[2]), (3, huge(codec, honest[3]))])
    got = {n: theta[n] - a for n, a in aggregate(codec, [t for _, t in out.kept]).items()}
    for n in SHAPES:
        assert torch.allclose(got[n], want[n], atol=0, rtol=0)
        assert float(got[n].abs().max()) < 1.0  # honest pseudo-gradients are ~1e-2


# ----- senders -------------------------------------------------------------------------------------
def test_a_member_resending_another_members_frame_is_rejected():
    codec = make_codec("sparseloco")
    honest = contributions(codec, 3)
    frames = [encode_frame(FrameMeta.for_codec("run-a", 3, m, codec), t) for m, t in enumerate(honest)]
    frames[2] = frames[0]  # member 2 replays member 0's frame
    kept = []
    for m, f in enumerate(frames):
        meta, tensors = decode(f, codec)
        try:
            check_sender(meta, m)
            kept.append((m, tensors))
        except SenderMismatchError as e:
            assert "names worker 0" in str(e) and "member 2" in str(e)
    assert [m for m, _ in kept] == [0, 1]
    with pytest.raises(SchemaError, match="worker 0"):  # the same check inside decode_frame
        decode(frames[2], codec, worker=2)
    assert issubclass(SenderMismatchError, FrameError)


def test_a_member_listed_twice_counts_once():
    codec = make_codec("dense")
    honest = contributions(codec, 2)
    out = robust_aggregate_inputs(codec, [(0, honest[0]), (1, honest[1]), (1, honest[1])])
    assert [m for m, _ in out.kept] == [0, 1] and "second contribution" in out.rejected[0]


def test_scale_contribution_zeroes_unused_centroids():
    codec = make_codec("sparseloco")
    (tensors,) = contributions(codec, 1)
    et = tensors["layers.0.norm"]
    cents = et.buffers["centroids"].copy()
    from distrain.comm.codecs.bitpack import unpack_bits

    codes = unpack_bits(et.buffers["codes"], codec.layout(et.shape).nnz, 2)
    unused = [c for c in range(4) if c not in set(codes.tolist())]
    if not unused:
        pytest.skip("every level used in this tensor")
    cents[unused[0]] = 3e38  # never decoded, but a hostile sender may put it there
    out = scale_contribution(codec, with_values(tensors, "layers.0.norm", "centroids", cents), 1.0)
    assert out["layers.0.norm"].buffers["centroids"][unused[0]] == 0.0


# ----- header bombs (bounded before msgpack builds anything big) ------------------------------------
def forge(header: bytes, payload: bytes = b"") -> bytes:
    head = struct.pack("<4sBBHIQ", b"DTRN", VERSION, 1, 0, len(header), len(payload))
    return head + struct.pack("<I", zlib.crc32(head + header + payload)) + header + payload


def peak_bytes(fn) -> tuple[int, Exception | None]:
    tracemalloc.start()
    err = None
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the caller checks the type
        err = e
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, err


def empty_map_bomb(nbytes: int, width: int = 1500) -> bytes:
    """A map whose 'tensors' is an array of arrays of ``width`` empty maps: ~1 Python dict per byte."""
    inner = b"\xdc" + struct.pack(">H", width) + b"\x80" * width
    k = max(1, (nbytes - 16) // len(inner))
    return b"\x81\xa7tensors\xdc" + struct.pack(">H", k) + inner * k


def test_4mib_header_of_empty_maps_is_rejected_cheaply():
    bomb = forge(empty_map_bomb(4 << 20))
    assert len(bomb) > 4_000_000
    peak, err = peak_bytes(lambda: decode_frame(bomb, SHAPES, "run-a", 3))
    assert isinstance(err, OversizedFrameError) and "expected tensors" in str(err)
    assert peak < 1 << 20  # was ~300 MB before the budget


def test_header_bomb_within_the_byte_budget_is_stopped_by_the_object_budget():
    expected = {f"layers.{i // 9}.block.param{i % 9}.weight": (64, 64) for i in range(1000)}
    bomb = forge(empty_map_bomb(400_000))  # fits the ~560 KB byte budget of 1000 tensors
    peak, err = peak_bytes(lambda: decode_frame(bomb, expected, "run-a", 3))
    assert isinstance(err, OversizedFrameError) and "msgpack objects" in str(err)
    assert peak < 6 << 20
    # Without the object budget the same bytes build ~400K dicts before the schema check rejects them.
    unbounded, err = peak_bytes(lambda: decode_frame(bomb, expected, "run-a", 3, FrameLimits(header_objects_per_tensor=10**9)))
    assert isinstance(err, SchemaError) and unbounded > 4 * peak


def test_deeply_nested_header_is_rejected_cheaply():
    bomb = forge(b"\x91" * 3000 + b"\x80")
    peak, err = peak_bytes(lambda: decode_frame(bomb, SHAPES, "run-a", 3))
    assert isinstance(err, MalformedHeaderError) and peak < 1 << 20


def test_large_real_headers_still_fit_the_budget():
    """A 72B-scale name list (80 layers × 9 tensors + 3) decodes: the budget is not too tight."""
    names = [f"layers.{i}.{p}" for i in range(80) for p in
             ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
              "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
              "attention_norm.weight", "ffn_norm.weight")] + ["tok_embeddings.weight", "norm.weight", "output.weight"]
    shapes = {n: ((8,) if n.endswith("norm.weight") else (8, 8)) for n in names}
    codec = make_codec("sparseloco")
    tensors = {n: codec.encode(n, torch.randn(s), {}) for n, s in shapes.items()}
    run = "a-rather-long-run-name-0123456789abcdef"
    frame = encode_frame(FrameMeta.for_codec(run, 3, 7, codec), tensors)
    meta, got = decode_frame(frame, shapes, run, 3, codec=codec)
    assert meta.worker == 7 and set(got) == set(names)


def test_header_bomb_error_is_a_frame_error_not_a_crash():
    bad = forge(msgpack.packb({"run": "x" * 600}))  # string longer than max_name_len
    with pytest.raises(MalformedHeaderError):
        decode_frame(bad, SHAPES, "run-a", 3)


# ----- inside the clip: per-coordinate bounds and the direction check (issue 21) --------------------
from distrain.comm.coords import CoordBound, bounded_mean, chunk_scales, clip_parts  # noqa: E402
from distrain.comm.direction import DirectionPolicy, direction_check, gram, loo_cosines  # noqa: E402
from distrain.comm.kernels.geometry import chunk_layout  # noqa: E402
from distrain.outer.base import Contribution, RoundStats  # noqa: E402
from distrain.outer.exchange import FrameExchange  # noqa: E402

# Exact values on the wire (fp32, no quantizer), 12 elements in 3 chunks of 4, top-2 per chunk.
EXACT = dict(topk=2048, chunk=4, quantizer="none", value_dtype="fp32", index_coding="packed")
HONEST = [[1, .5, 0, 0, 1, .5, 0, 0, .5, .25, 0, 0],
          [1, 0, .5, 0, 1, 0, .5, 0, .5, .25, 0, 0],
          [1, 0, 0, .5, 1, 0, 0, .5, .5, .25, 0, 0]]
# The whole budget (1.8x the honest norm 1.68: under the 2x norm clip) on coordinate 11, which no
# honest member selects (the attacker's other picks are zeros).
CONCENTRATED = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -3]


def exact_frames(rows: list[list[float]]) -> list[dict[str, EncodedTensor]]:
    codec = make_codec("sparseloco", **EXACT)
    return [{"w": codec.encode("w", torch.tensor(r, dtype=torch.float32), {})} for r in rows]


def settle(rows_or_frames, bound=None, direction=None, codec=None, shapes=None):
    codec = codec or make_codec("sparseloco", **EXACT)
    frames = rows_or_frames if isinstance(rows_or_frames[0], dict) else exact_frames(rows_or_frames)
    ex = FrameExchange(codec, shapes or {"w": (12,)}, None, "g", "run", 0, torch.device("cpu"), RobustPolicy(),
                       bound=bound, direction=direction)
    return ex.settle(0, [Contribution(m, f) for m, f in enumerate(frames)])


def test_coord_bound_rejects_bad_settings():
    for bad in (dict(clip=0.5), dict(clip=float("nan")), dict(clip=True), dict(min_selectors=0),
                dict(min_selectors=1.5), dict(chunk=0)):
        with pytest.raises(ValueError):
            CoordBound(**bad)
    assert not CoordBound(0, 1).active and CoordBound(0, 2).active and CoordBound(1.5, 1).active
    for bad in (-1.5, 2.0, float("nan"), True):
        with pytest.raises(ValueError):
            DirectionPolicy(bad)


def test_chunk_scale_is_the_low_median_of_the_contributions_present():
    lay = chunk_layout((12,), 4, 2048)
    parts = [(torch.tensor([0, 5]), torch.tensor([1.0, -2.0])),
             (torch.tensor([1, 6]), torch.tensor([-3.0, 4.0])),
             (torch.tensor([2, 7]), torch.tensor([0.0, 100.0]))]
    # chunk 0: maxima 1, 3 (the third has only a zero there: not counted) -> low median 1;
    # chunk 1: 2, 4, 100 -> 4; chunk 2: nobody -> 0
    assert chunk_scales(parts, lay).tolist() == [1.0, 4.0, 0.0]
    clipped, cut = clip_parts(parts, lay, 1.5)
    assert [v.tolist() for _, v in clipped] == [[1.0, -2.0], [-1.5, 4.0], [0.0, 6.0]] and cut == 2


def test_concentrated_attack_is_bounded_per_coordinate():
    """Before: coordinate 11 moves by the attacker's full -3 (a lone selector is a full vote), 3x
    the largest honest update (1). With the bound: cut to 1.5 x the chunk's scale 0.5 = 0.75."""
    honest = settle(HONEST).aggregate["w"]
    assert honest.abs().max() == 1.0
    plain = settle(HONEST + [CONCENTRATED]).aggregate["w"]
    assert plain[11] == -3.0 and settle(HONEST + [CONCENTRATED]).clipped == 0
    bounded = settle(HONEST + [CONCENTRATED], bound=CoordBound(1.5, 1)).aggregate["w"]
    assert bounded[11] == -0.75 and bounded.abs().max() <= 2 * honest.abs().max()
    # coordinates 0 and 4: three honest 1s and the attacker's selected zero -> 3/4
    assert bounded[0] == bounded[4] == 0.75


def test_a_coordinate_only_one_member_selected_is_weighted_sum_over_r():
    bounded = settle(HONEST + [CONCENTRATED], bound=CoordBound(1.5, 2)).aggregate["w"]
    assert bounded[11] == -0.75 / 4  # one selector: sum / R
    assert bounded[0] == 0.75  # four selectors: their mean, as before
    assert bounded[1] == 0.25  # h0 (0.5) and the attacker's selected zero: two selectors -> (0.5 + 0) / 2
    assert bounded[2] == 0.5 / 4  # h1 alone
    no_clip = settle(HONEST + [CONCENTRATED], bound=CoordBound(0, 2)).aggregate["w"]
    assert no_clip[11] == -3.0 / 4


def test_honest_contributions_pass_the_bound_unchanged():
    """Real 2-bit frames of honest (random) pseudo-gradients: the bounded aggregate is the codec's own,
    bit for bit, and the direction check sets nobody aside."""
    codec = make_codec("sparseloco")
    frames = contributions(codec, 4)
    got = settle(frames, CoordBound(1.5, 1), DirectionPolicy(-0.5), codec, SHAPES)
    plain = aggregate(codec, frames)
    assert all(torch.equal(got.aggregate[n], plain[n]) for n in SHAPES)
    assert [v.weight for v in got.directions] == [1.0] * 4


def test_sign_flip_under_the_clip_is_set_aside():
    """Dense fp32 (exact). The flipped member (-1.9 x [1, 0, 0, 0]) has cosine -3/sqrt(12) to the others'
    sum [3, 1, 1, 1]; it is set aside and the aggregate is the honest members' mean, exactly as if it
    were absent. Without the direction check the coordinate bound alone cuts it to -1.5."""
    codec = make_codec("dense", dtype="fp32")
    rows = [[1, 0, 1, 0], [1, 1, 0, 0], [1, 0, 0, 1], [-1.9, 0, 0, 0]]
    frames = [{"w": codec.encode("w", torch.tensor(r, dtype=torch.float32), {})} for r in rows]
    shapes = {"w": (4,)}
    got = settle(frames, CoordBound(1.5, 1), DirectionPolicy(0.0), codec, shapes)
    assert [v.weight for v in got.directions] == [1.0, 1.0, 1.0, 0.0]
    assert got.directions[3].cosine == pytest.approx(-3 / math.sqrt(12))
    assert got.directions[0].cosine == pytest.approx(2 / math.sqrt(12))  # [1,0,1,0] vs [2,1,0,1]
    absent = settle(frames[:3], CoordBound(1.5, 1), DirectionPolicy(0.0), codec, shapes)
    assert torch.equal(got.aggregate["w"], absent.aggregate["w"])
    assert got.aggregate["w"].tolist() == pytest.approx([1, 1 / 3, 1 / 3, 1 / 3])
    assert [c.member for c in got.kept] == [0, 1, 2]
    only_bound = settle(frames, CoordBound(1.5, 1), None, codec, shapes).aggregate["w"]
    assert only_bound.tolist() == pytest.approx([(3 - 1.5) / 4, 0.25, 0.25, 0.25])


def test_direction_check_spares_an_honest_outlier_and_sets_aside_a_minority_only():
    # an orthogonal (unrelated, not opposed) member: cosine exactly 0, kept
    g = [[1, .5, .5, 0], [.5, 1, .5, 0], [.5, .5, 1, 0], [0, 0, 0, 1]]
    v = direction_check(["a", "b", "c", "d"], g, DirectionPolicy(0.0))
    assert [x.weight for x in v] == [1, 1, 1, 1] and v[3].cosine == 0.0
    # two of four opposed: at most (4 - 1) // 2 = 1 set aside, the most opposed (ties: the first)
    g = [[1, .5, -1, -1], [.5, 1, -1, -1], [-1, -1, 1, 1], [-1, -1, 1, 1]]
    assert [x.weight for x in direction_check(range(4), g)].count(0.0) == 1
    # two members that disagree give no consensus: nobody set aside, nothing judged
    v = direction_check([0, 1], [[1, -1], [-1, 1]])
    assert [x.weight for x in v] == [1, 1] and all(math.isnan(x.cosine) for x in v)
    assert loo_cosines([[1, 0, 0], [0, 1, 0], [0, 0, 0]], [0, 1, 2])[2] != loo_cosines([[1]], [0]).get(1, 0)


def test_gram_of_sparse_contributions():
    parts = [[(torch.tensor([0, 2]), torch.tensor([1.0, 2.0])), (torch.tensor([2, 3]), torch.tensor([3.0, -1.0]))],
             [(torch.tensor([1]), torch.tensor([5.0])), (torch.tensor([0]), torch.tensor([7.0]))]]
    g = gram(parts, [4, 2])
    # tensor 0: <a,a> = 5, <b,b> = 10, <a,b> = 6; tensor 1: 25, 49, 0
    assert g == [[30.0, 6.0], [6.0, 59.0]]


def test_direction_verdicts_reach_the_round_stats_and_the_metrics_record():
    from distrain.runtime.records import direction_record
    from distrain.worker.worker import RoundReport

    stats = RoundStats(3, 10, 40, 3, 0, senders=[0, 1, 2, 3], cosines=[0.2, 0.3, None, -0.5],
                       weights=[1.0, 1.0, 1.0, 0.0])
    assert stats.set_aside == [3]
    report = RoundReport(0, 0, 3, 15, 45, 100, 4.0, 1e-3, 1.0, outer=[stats])
    again = RoundReport.from_dict(msgpack.unpackb(msgpack.packb(report.to_dict())))
    assert again.outer[0] == stats
    other = RoundStats(3, 10, 40, 3, 0, segment=0, senders=[0, 1, 2, 3], cosines=[0.2, 0.3, None, -0.5],
                       weights=[1.0, 1.0, 1.0, 0.0])
    rec = direction_record([stats, other])  # two workers of one segment: counted once
    assert rec == {"sender_cosine": {"0": {"0": 0.2, "1": 0.3, "2": None, "3": -0.5}}, "down_weighted": ["0:3"]}
    assert direction_record([RoundStats(3, 10, 40, 3, 0)]) == {}


def test_bounded_mean_is_the_plain_mean_without_bounds():
    parts = [(torch.tensor([0, 2]), torch.tensor([1.0, 2.0])), (torch.tensor([2, 3]), torch.tensor([3.0, -1.0]))]
    assert bounded_mean(parts, 5, (1.0, 1.0), "mean_selected", 1, torch.device("cpu")).tolist() == [1, 0, 2.5, -1, 0]
    assert bounded_mean(parts, 5, (1.0, 1.0), "mean_selected", 2, torch.device("cpu")).tolist() == [.5, 0, 2.5, -.5, 0]
    assert bounded_mean(parts, 5, (1.0, 3.0), "sum_over_r", 1, torch.device("cpu")).tolist() == [.25, 0, 2.75, -.75, 0]
