"""``distrain estimate``: project a run to internet scale without training.

Same pieces as the simulator, no model in memory: the parameter shapes come from ``build_model``
on the meta device; the bytes of a frame from the real codec and ``distrain.comm.wire.encode_frame``; the
seconds from ``distrain.comm.network.Link.transfer_s`` and the relay all-gather of ``distrain.comm.network`` (each
replica uploads its frame once and downloads the R − 1 others, full duplex, a barrier per
collective; with ``outer.apply_delay = 1`` the all-gather runs behind the next round's compute).

Frame bytes = prefix + msgpack header + zstd(payload). The header is measured by encoding the
frame (with one-element stand-in buffers for a large model: the offsets then encode in fewer
bytes, < 10 bytes per buffer, nothing next to the payload). The payload is data dependent under
zstd — SparseLoCo's gap-coded indices (~7.6 bits/index instead of 16 raw) most of all, dense
values a little — so it is estimated by encoding synthetic contributions through the real codec
and zstd (``Synthetic``: Gaussian gradients; pseudo-gradients as differences of two fp32 weights,
whose low mantissa bits are zero): the whole model when it is small (≤ ``FULL_ENCODE_LIMIT``
elements), else one 2048×2048 sample whose compressed/raw ratio scales every tensor's exact raw
size (``codec.payload_nbytes``). ``estimate_config`` also reads which token ids the training data
never contains (their embedding rows get no gradient and compress to almost nothing) and follows
the learning-rate schedule round by round. Measured against the simulator on small runs: SparseLoCo
and DDP frames within 0.5 %, DiLoCo fp32 +1 %, DiLoCo bf16 +4 % (AdamW's first rounds move
weights by nearly ±lr·h, a narrower spread of exponents than the Gaussian model's); ``raw`` (no
compression) is reported too, as the upper bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from distrain.comm.codecs import Codec, EncodedTensor, make_codec
from distrain.comm.codecs.base import WIRE_DTYPES
from distrain.comm.network import Link
from distrain.comm.wire import FrameMeta, encode_frame
from distrain.cli.command import ToolCommand
from distrain.config import MODEL_PRESETS, ModelConfig

ALGORITHMS = ("ddp", "diloco", "sparseloco")
FULL_ENCODE_LIMIT = 1 << 22  # elements: encode the whole synthetic pseudo-gradient below this
SAMPLE_SHAPE = (2048, 2048)
# Shapes of published runs the projection compares with (LLaMA-style, untied embeddings).
SCALE_PRESETS: dict[str, dict[str, int]] = {
    # Covenant-72B (SparseLoCo over the internet, 2026): 72.7B parameters, 80 layers, 64 heads.
    "72b": {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "ffn_dim": 28672,
            "vocab_size": 262144, "max_seq_len": 2048},
}


class EstimateError(ValueError):
    """An estimate cannot be made from these inputs (unknown preset, non-positive times, ...)."""


# ----- model shapes --------------------------------------------------------------------------------
def model_config(preset: str | None = None, params: float | None = None, vocab_size: int = 32000,
                 **overrides: int) -> ModelConfig:
    """A model preset (``distrain.model`` presets or ``SCALE_PRESETS``) or a parameter count.

    A parameter count picks the LLaMA-like shape closest to it: dim a multiple of 128, layers =
    dim / 102.4 (80 at 8192), ffn 3.5·dim, heads dim/128, kv heads heads/8, untied embeddings.
    """
    if (preset is None) == (params is None):
        raise EstimateError("give a model preset or a parameter count (not both)")
    if preset is not None:
        table = SCALE_PRESETS.get(preset) or MODEL_PRESETS.get(preset)
        if table is None:
            known = ", ".join(sorted(set(MODEL_PRESETS) | set(SCALE_PRESETS)))
            raise EstimateError(f"unknown model preset {preset!r} (known: {known})")
        fields = {**table, **overrides}
        if "vocab_size" not in fields or not fields["vocab_size"]:
            fields["vocab_size"] = vocab_size
        return dataclasses.replace(ModelConfig(), preset=preset if preset in MODEL_PRESETS else "test", **fields)
    if not params or params < 1e5:
        raise EstimateError(f"parameter count must be at least 1e5, got {params!r}")
    best: ModelConfig | None = None
    for dim in range(256, 65536 + 1, 128):
        heads = dim // 128
        kv = max(d for d in range(1, max(1, heads // 8) + 1) if heads % d == 0)
        base = max(2, round(dim / 102.4))
        for layers in range(max(2, base - 3), base + 4):  # the layer count absorbs the dim grid's steps
            cfg = dataclasses.replace(ModelConfig(), dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                                      ffn_dim=int(3.5 * dim), vocab_size=vocab_size, **overrides)
            if best is None or abs(count_params(cfg) - params) < abs(count_params(best) - params):
                best = cfg
        if count_params(best) > params and count_params(cfg) > 2 * params:
            break
    assert best is not None
    return best


def count_params(cfg: ModelConfig) -> int:
    """Parameters of the LLaMA-style model (closed form; equals ``model_shapes``' total)."""
    head_dim = cfg.dim // cfg.n_heads
    kv = cfg.n_kv_heads * head_dim
    ffn = cfg.ffn_dim
    per_layer = 2 * cfg.dim * cfg.dim + 2 * cfg.dim * kv + 3 * cfg.dim * ffn + 2 * cfg.dim
    emb = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    return cfg.n_layers * per_layer + emb + cfg.dim


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Trainable parameter shapes by name (tied ones once), built on the meta device: no memory."""
    from distrain.model import build_model
    from distrain.outer.base import owned_parameters

    if not cfg.vocab_size:
        raise EstimateError("model.vocab_size is 0 (taken from the tokenizer at run time): give it explicitly")
    with torch.device("meta"):
        model = build_model(cfg)
    return {n: tuple(p.shape) for n, p in owned_parameters(model).items()}


# ----- bytes of one frame --------------------------------------------------------------------------
@dataclass(frozen=True)
class FrameBytes:
    """One replica's frame for one sync: prefix + header, raw payload, expected zstd payload."""

    header: int
    payload_raw: int
    payload: float
    method: str

    @property
    def total(self) -> float:
        return self.header + self.payload

    @property
    def total_raw(self) -> int:
        return self.header + self.payload_raw


@dataclass(frozen=True)
class Synthetic:
    """How one sync's synthetic contribution is drawn, so that zstd sees what it would see.

    A gradient (DDP) is Gaussian noise of ``delta_std``. A pseudo-gradient is a difference of two
    fp32 weights, Δ = fl(θ − fl(θ − u)) with θ ~ N(0, ``weight_std``) (norm gains: θ = 1) and
    u ~ N(0, ``delta_std``): the low mantissa bits of Δ are zero, worth ~3 % of dense fp32 bytes.
    ``idle``: rows no gradient reaches (input-embedding rows of tokens the data never contains):
    zero in a gradient, only weight decay in a pseudo-gradient, θ − fl(θ·(1 − ``idle_decay``)).
    """

    delta_std: float = 1e-3
    weight_std: float | None = None  # None: a gradient
    idle: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    idle_decay: float = 0.0

    def draw(self, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        u = torch.randn(shape, generator=g) * self.delta_std
        if self.weight_std is None:
            t = u
        else:
            theta = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * self.weight_std
            t = theta - (theta - u)
        rows = self.idle.get(name)
        if rows is not None and len(rows):
            idx = torch.as_tensor(rows, dtype=torch.long)
            if self.weight_std is None or not self.idle_decay:
                t[idx] = 0.0
            else:
                theta = torch.randn((len(idx), *shape[1:]), generator=g) * self.weight_std
                t[idx] = theta - theta * (1.0 - self.idle_decay)
        return t


def _header_bytes(codec: Codec, shapes: Mapping[str, tuple[int, ...]], run_id: str) -> int:
    """Prefix + header of a frame for ``shapes``, measured on encode_frame with stand-in buffers."""
    stand_in, raw = {}, 0
    for name, shape in shapes.items():
        bufs = {b: np.zeros(1, dtype=WIRE_DTYPES[spec.dtype]) for b, spec in codec.buffer_layout(shape).items()}
        raw += sum(b.nbytes for b in bufs.values())
        stand_in[name] = EncodedTensor(tuple(shape), codec.expected_meta(shape), bufs)
    frame = encode_frame(FrameMeta.for_codec(run_id, 0, 0, codec), stand_in, compress=False)
    # Real offsets and lengths need up to 8 more bytes each in msgpack than the stand-ins' small ones.
    return len(frame) - raw + 8 * sum(len(codec.buffer_layout(s)) for s in shapes.values())


def frame_bytes(codec: Codec, shapes: Mapping[str, tuple[int, ...]], run_id: str = "run-0123456789abcdef",
                seeds: int = 2, synthetic: Synthetic | None = None) -> FrameBytes:
    """Expected bytes of one frame of ``codec`` over ``shapes`` (see the module docstring);
    ``synthetic``: what the contribution looks like to zstd (default: Gaussian noise)."""
    raw = sum(codec.payload_nbytes(s) for s in shapes.values())
    numel = sum(math.prod(s) for s in shapes.values())
    synthetic = synthetic or Synthetic()
    if numel <= FULL_ENCODE_LIMIT:
        sizes, header = [], 0
        for seed in range(seeds):
            enc = {n: codec.encode(n, synthetic.draw(n, s, seed * 7919 + i), {})
                   for i, (n, s) in enumerate(shapes.items())}
            meta = FrameMeta.for_codec(run_id, 0, 0, codec)
            header = len(encode_frame(meta, enc, compress=False)) - raw
            sizes.append(len(encode_frame(meta, enc)))
        return FrameBytes(header, raw, float(np.mean(sizes)) - header, "whole model encoded (synthetic Gaussian)")
    sample = codec.encode("sample", synthetic.draw("sample", SAMPLE_SHAPE, 0), {})
    plain = b"".join(np.ascontiguousarray(b).tobytes() for b in sample.buffers.values())
    import zstandard

    ratio = len(zstandard.ZstdCompressor(level=3).compress(plain)) / len(plain)
    return FrameBytes(_header_bytes(codec, shapes, run_id), raw, raw * ratio,
                      f"zstd ratio {ratio:.3f} of a {SAMPLE_SHAPE[0]}x{SAMPLE_SHAPE[1]} synthetic sample")


def sparseloco_defaults() -> dict[str, Any]:
    """The codec parameters a run gets by default (``[outer]`` defaults: gap-coded indices)."""
    from distrain.config import OuterConfig

    o = OuterConfig()
    return {"topk": o.topk, "chunk": o.chunk, "quantizer": o.quantizer, "index_coding": o.index_coding}


def codec_for(algorithm: str, **params: Any) -> Codec:
    """The wire codec of an algorithm (unset parameters: a run's defaults); DDP: dense fp32 gradients."""
    if algorithm == "sparseloco":
        return make_codec("sparseloco", **{**sparseloco_defaults(), **params})
    if algorithm == "diloco":
        return make_codec("dense", dtype=params.get("dtype", "fp32"))
    if algorithm == "ddp":
        return make_codec("dense", dtype="fp32")
    raise EstimateError(f"unknown algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})")


# ----- seconds -------------------------------------------------------------------------------------
def allgather_s(frame: float, replicas: int, link: Link) -> float:
    """One relay all-gather among ``replicas`` equal frames: upload 1, download R − 1 (distrain.comm.network)."""
    return link.transfer_s(int(round(frame)), int(round((replicas - 1) * frame)))


def run_clock(algorithm: str, steps: int, inner_steps: int, step_time_s: float, sync_s: Sequence[float] | float,
              overlap: bool = False) -> tuple[float, float]:
    """(simulated wall-clock, compute seconds) of a whole run, as the simulator's clock runs it.

    ``sync_s``: seconds of each sync (one per round; DDP: one per step), or one value for all.
    Rounds compute first, then sync; with ``overlap`` a round's sync runs behind the next round's
    compute and the next sync waits for it: start_k = start_(k−1) + max(compute_k, sync_(k−1)).
    """
    if algorithm == "ddp":
        rounds = [1] * steps  # a gradient all-gather before every optimiser step
        overlap = False
    else:
        n = math.ceil(steps / inner_steps)
        rounds = [min(inner_steps, steps - k * inner_steps) for k in range(n)]
    syncs = list(sync_s) if isinstance(sync_s, Sequence) else [float(sync_s)] * len(rounds)
    if len(syncs) != len(rounds):
        raise EstimateError(f"{len(syncs)} sync times for {len(rounds)} syncs")
    compute = [h * step_time_s for h in rounds]
    if not overlap:
        return sum(compute) + sum(syncs), sum(compute)
    start = compute[0]
    for k in range(1, len(rounds)):
        start += max(compute[k], syncs[k - 1])
    return start, sum(compute)  # the last sync is still in flight when the run's clock stops


@dataclass(frozen=True)
class RoundEstimate:
    """Steady-state figures of one outer round (H inner steps) for one algorithm."""

    algorithm: str
    overlap: bool
    replicas: int
    compute_s: float
    comm_s: float
    round_s: float
    utilisation: float
    frame_bytes: float
    bytes_per_replica: float  # sent per replica per round (DDP: H frames)
    bytes_received_per_replica: float
    frame_method: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def round_estimate(algorithm: str, frame: FrameBytes, replicas: int, link: Link, inner_steps: int,
                   step_time_s: float, overlap: bool = False) -> RoundEstimate:
    """Per-round compute, communication, bytes and utilisation (steady state)."""
    if replicas < 2:
        raise EstimateError(f"an estimate needs at least 2 replicas, got {replicas}")
    if not step_time_s > 0 or inner_steps < 1:
        raise EstimateError(f"step time must be > 0 s and H >= 1, got {step_time_s} s and H = {inner_steps}")
    syncs = inner_steps if algorithm == "ddp" else 1
    overlap = overlap and algorithm != "ddp"  # DDP needs each step's gradients before that step
    compute = inner_steps * step_time_s
    comm = syncs * allgather_s(frame.total, replicas, link)
    round_s = max(compute, comm) if overlap else compute + comm
    return RoundEstimate(algorithm, overlap, replicas, compute, comm, round_s, compute / round_s, frame.total,
                         syncs * frame.total, syncs * (replicas - 1) * frame.total, frame.method)


def algorithm_frames(shapes: Mapping[str, tuple[int, ...]], algorithms: Sequence[str] = ALGORITHMS,
                     codec_params: Mapping[str, Any] | None = None, dense_dtype: str = "fp32") -> dict[str, FrameBytes]:
    """One frame estimate per algorithm (independent of R and of the link: compute it once)."""
    out = {}
    for alg in algorithms:
        params = dict(codec_params or {}) if alg == "sparseloco" else ({"dtype": dense_dtype} if alg == "diloco" else {})
        out[alg] = frame_bytes(codec_for(alg, **params), shapes)
    return out


def project(shapes: Mapping[str, tuple[int, ...]] | None, replicas: int, link: Link, inner_steps: int,
            step_time_s: float, algorithms: Sequence[str] = ALGORITHMS, codec_params: Mapping[str, Any] | None = None,
            dense_dtype: str = "fp32", frames: Mapping[str, FrameBytes] | None = None) -> list[RoundEstimate]:
    """Every algorithm with and without overlap (DDP: without) for one model, R and link."""
    if frames is None:
        if shapes is None:
            raise EstimateError("project needs the model's shapes or precomputed frames")
        frames = algorithm_frames(shapes, algorithms, codec_params, dense_dtype)
    out = []
    for alg in algorithms:
        for overlap in ((False,) if alg == "ddp" else (False, True)):
            out.append(round_estimate(alg, frames[alg], replicas, link, inner_steps, step_time_s, overlap))
    return out


# ----- from a run configuration (what the simulator runs) ------------------------------------------
EMBEDDING = "tok_embeddings.weight"


def idle_embedding_rows(cfg: Any) -> dict[str, np.ndarray]:
    """The input-embedding rows of the token ids the prepared training data never contains.

    A small corpus under a byte-level tokenizer leaves most of the 256 byte tokens unused; their
    rows get no gradient. Reads the cached token shard (tokenising first if it is not cached)."""
    from distrain.data import prepare, read_shard

    if cfg.model.tie_embeddings:
        return {}  # the tied output projection gives every row a gradient
    tokens = read_shard(prepare(cfg.data, cfg.run.seed).train_path)
    used = np.zeros(cfg.model.vocab_size, dtype=bool)
    used[np.unique(tokens)] = True
    return {EMBEDDING: np.flatnonzero(~used)}


def round_synthetics(cfg: Any, idle: Mapping[str, np.ndarray]) -> list[Synthetic]:
    """One ``Synthetic`` per sync of the run: DiLoCo/SparseLoCo pseudo-gradients shrink with the
    learning-rate schedule (std ≈ lr·√h: h AdamW steps of ~lr in weakly correlated directions,
    weight decay lr·wd·h); DDP's gradients do not depend on it (one value for every step)."""
    from distrain.optim import lr_multiplier

    t = cfg.train
    if cfg.outer.algorithm == "ddp":
        return [Synthetic(idle=idle)] * t.steps
    h = cfg.outer.inner_steps
    out = []
    for start in range(0, t.steps, h):
        steps = range(start, min(start + h, t.steps))
        lr = t.lr * float(np.mean([lr_multiplier(s, t) for s in steps]))
        out.append(Synthetic(delta_std=lr * math.sqrt(len(steps)), weight_std=cfg.model.init_std, idle=idle,
                             idle_decay=lr * t.weight_decay * len(steps)))
    return out


def estimate_config(cfg: Any, data_aware: bool = True) -> tuple[float, float, list[FrameBytes]]:
    """(predicted simulated wall-clock, utilisation, frame of each sync) of the run ``cfg`` describes.

    Uniform replicas of ``topology.replicas``, the ``[network]`` link and ``network.step_time_s``;
    ``model.vocab_size`` must be resolved (it is after ``run_simulation(cfg)``). ``data_aware``:
    model the embedding rows of tokens the training data never contains (``idle_embedding_rows``)."""
    from distrain.outer.build import codec_from_config

    alg = cfg.outer.algorithm
    if alg not in ALGORITHMS:
        raise EstimateError(f"outer.algorithm {alg!r} has no communication to estimate")
    if not cfg.network.step_time_s > 0:
        raise EstimateError("network.step_time_s must be > 0 for an estimate (0 means 'measured')")
    shapes = model_shapes(cfg.model)
    codec = codec_for("ddp") if alg == "ddp" else codec_from_config(cfg)
    synthetics = round_synthetics(cfg, idle_embedding_rows(cfg) if data_aware else {})
    cache: dict[tuple[float, float | None, float], FrameBytes] = {}
    frames = []
    for syn in synthetics:
        key = (syn.delta_std, syn.weight_std, syn.idle_decay)  # the idle rows are the same every round
        if key not in cache:
            cache[key] = frame_bytes(codec, shapes, cfg.run_id(), synthetic=syn)
        frames.append(cache[key])
    net = cfg.network
    link = Link(net.up_mbps, net.down_mbps, net.latency_ms)
    syncs = [allgather_s(f.total, cfg.topology.replicas, link) for f in frames]
    clock, compute = run_clock(alg, cfg.train.steps, cfg.outer.inner_steps, net.step_time_s, syncs,
                               overlap=cfg.outer.apply_delay == 1)
    return clock, compute / clock, frames


# ----- command line --------------------------------------------------------------------------------
def _table(rows: list[RoundEstimate]) -> str:
    from distrain.metrics import human_bytes

    head = ("algorithm", "overlap", "R", "compute/round", "comm/round", "round", "utilisation", "sent/replica",
            "received/replica")
    lines = [head]
    for r in rows:
        lines.append((r.algorithm, "yes" if r.overlap else "no", str(r.replicas), f"{r.compute_s:.1f} s",
                      f"{r.comm_s:.1f} s", f"{r.round_s:.1f} s", f"{r.utilisation:.1%}",
                      human_bytes(r.bytes_per_replica), human_bytes(r.bytes_received_per_replica)))
    widths = [max(len(x[c]) for x in lines) for c in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(x, widths)).rstrip() for x in lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_mutually_exclusive_group()
    m.add_argument("--preset", help=f"model preset ({', '.join(list(MODEL_PRESETS) + list(SCALE_PRESETS))})")
    m.add_argument("--params", type=float, help="parameter count (e.g. 7e9): a LLaMA-like shape is assumed")
    p.add_argument("--vocab-size", type=int, default=32000, help="vocabulary when the preset or count has none")
    p.add_argument("--replicas", type=int, default=8, help="R (default 8)")
    p.add_argument("--up-mbps", type=float, default=100.0)
    p.add_argument("--down-mbps", type=float, default=100.0)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--inner-steps", type=int, default=30, help="H (default 30)")
    p.add_argument("--step-time-s", type=float, required=True, help="compute seconds per inner step")
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--index-coding", default="gaps", help="SparseLoCo indices: gaps | packed")
    p.add_argument("--dense-dtype", default="fp32", help="DiLoCo wire dtype: fp32 | bf16")
    p.add_argument("--sweep", default="2,4,8,16,32,64", help="replica counts for the growth table ('' to skip)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run(args: argparse.Namespace) -> int:
    try:
        if args.preset is None and args.params is None:
            raise EstimateError("give --preset NAME or --params N")
        mcfg = model_config(args.preset, args.params, args.vocab_size)
        shapes = model_shapes(mcfg)
        link = Link(args.up_mbps, args.down_mbps, args.latency_ms)
        sl = {"topk": args.topk, "chunk": args.chunk, "index_coding": args.index_coding}
        frames = algorithm_frames(shapes, codec_params=sl, dense_dtype=args.dense_dtype)
        rows = project(None, args.replicas, link, args.inner_steps, args.step_time_s, frames=frames)
        sweep = [int(x) for x in args.sweep.split(",") if x.strip()]
        growth = {r: project(None, r, link, args.inner_steps, args.step_time_s, frames=frames) for r in sweep}
    except ValueError as e:  # EstimateError, bad codec parameters, bad link values
        print(f"distrain estimate: {e}", file=sys.stderr)
        return 2
    n = sum(math.prod(s) for s in shapes.values())
    if args.json:
        print(json.dumps({"params": n, "model": dataclasses.asdict(mcfg), "link": dataclasses.asdict(link),
                          "inner_steps": args.inner_steps, "step_time_s": args.step_time_s,
                          "rounds": [r.to_dict() for r in rows],
                          "growth": {str(k): [r.to_dict() for r in v] for k, v in growth.items()}}, indent=1))
        return 0
    print(f"model: {n / 1e9:.3f}B parameters ({len(shapes)} tensors), R = {args.replicas}, H = {args.inner_steps}, "
          f"{args.step_time_s:g} s/step, up {args.up_mbps:g} / down {args.down_mbps:g} Mbit/s, "
          f"{args.latency_ms:g} ms")
    print(_table(rows))
    for r in {r.algorithm: r for r in rows}.values():
        print(f"  {r.algorithm}: frame {r.frame_bytes / 1e6:.2f} MB ({r.frame_method})")
    if growth:
        print("\ngrowth with R (the all-gather downloads R − 1 frames):")
        print(_table([r for v in growth.values() for r in v]))
    return 0


COMMAND = ToolCommand("project per-round time, bytes and utilisation to many replicas (no training)",
                      add_arguments, run)
