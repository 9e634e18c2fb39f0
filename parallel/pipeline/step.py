"""One stage's part of a pipeline replica's training step (GPipe or 1F1B micro-batching).

Why plain functions over a duck-typed stage: the runtime owns processes, optimisers and rounds;
this module owns only what a step needs between neighbours — the op order
(`distrain.parallel.pipeline.schedule`), boundary frames (`distrain.comm.boundary`), loss and accumulation on the
last stage, and the replica-wide clip norm — so simulation, torchrun and Ray run the same code
over different transports.

Per step, every stage of a replica calls ``pipeline_step`` with the same micro-batches (the
deterministic data stream every stage reads; token ids are never sent) and the same ``step``:

    optimizer.zero_grad(set_to_none=True)
    res = pipeline_step(stage, micro_batches, transport, place, step=t, schedule="1f1b",
                        subspace=sub, grad_clip=1.0)
    optimizer.step(); scheduler.step()
    if sub is not None: sub.after_step()        # "project" method restores W ∈ span(U)

Gradients: the last stage seeds each micro-batch's summed token loss with 1/N, N the target
tokens of the whole step (targets of -100 are ignored), so ``.grad`` holds the gradient of the
step's mean token loss — equal to one unsplit backward over the concatenated micro-batches.
Clipping uses the whole replica's norm: each stage all-gathers its squared norm (and the last
stage its loss) over ``place.group``; every stage sums them in stage order and clips with the same
factor, as ``torch.nn.utils.clip_grad_norm_`` would on the unsplit model.

Transport (duck-typed, ``PointToPoint``): only ``send_bytes(dst, payload)`` (queued: it must
never wait for the receiver), ``recv_bytes(src)`` (blocks for the next message from src, with a
timeout) and ``all_gather_bytes(group, payload)``. A rejected frame or a timeout raises: the
step of this replica fails as a whole (the runtime drops the replica from the round).

Chunk-wise optimisation (SeCO/SpaCO) inside a stage: pass ``chunkwise`` (a
``distrain.parallel.chunkwise.ChunkwiseSpec`` with mode != "off"). The forward then runs without a graph
(only the stage's input is kept per micro-batch) and the backward calls ``chunkwise_backward``
with the received output gradient; SpaCO chunks are drawn per micro-batch, in micro-batch order,
from ``chunk_generator``, which every stage of the replica must seed identically.
"""

from __future__ import annotations

import contextlib
import math
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from distrain.comm import boundary as bd
from distrain.comm.errors import BoundaryRejectedError, CommError, FrameError
from distrain.parallel.chunkwise import IGNORE_INDEX, ChunkwiseSpec, chunkwise_backward, plan_chunks, select_chunks
from distrain.parallel.pipeline.schedule import bubble_fraction, stage_ops

# stage index, squared grad norm, loss sum (NaN except on the last stage), the stage's vote to stop
# after this step (a time window closing: every stage of the replica must stop at the same step)
_STAT = struct.Struct("<HddB")


class PointToPoint(Protocol):
    def send_bytes(self, dst: int, payload: bytes) -> None: ...
    def recv_bytes(self, src: int) -> bytes: ...
    def all_gather_bytes(self, group: str, payload: bytes) -> list[bytes | None]: ...


class StageCoords(Protocol):
    """What a compressed stage offers its boundaries (``distrain.parallel.subspace.Subspace``)."""

    u: Tensor  # (d, k), orthonormal columns

    @property
    def k(self) -> int: ...
    @property
    def fingerprint(self) -> int: ...
    def to_coords(self, x: Tensor, ids: Tensor) -> Tensor: ...
    def from_coords(self, c: Tensor, ids: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class StagePlace:
    """Where this worker sits in its pipeline replica."""

    ranks: tuple[int, ...]  # transport ranks of the replica's stages, in stage order
    stage: int  # this worker's index into ranks
    group: str | None = None  # transport group of exactly these ranks (clip norm, loss); needed if > 1 stage

    @property
    def n_stages(self) -> int:
        return len(self.ranks)


@dataclass
class PipelineStepResult:
    loss: float  # mean token loss of the step (on every stage, via the norm all-gather)
    tokens: int  # target tokens of the step (not ignored)
    grad_norm: float  # whole replica, before clipping
    clip_coef: float  # factor applied to every stage's gradients (1.0 when not clipped)
    n_micro: int
    peak_live: int  # most micro-batches whose activations (or, chunk-wise, inputs) this stage held at once
    compute_s: float = 0.0  # forward/backward math
    codec_s: float = 0.0  # encoding and validating boundary frames
    send_s: float = 0.0  # inside send_bytes (queueing)
    wait_s: float = 0.0  # blocked in recv_bytes: pipeline bubble + transfer time, not separable here
    sync_s: float = 0.0  # norm/loss all-gather (incl. waiting for the slowest stage) and clipping
    total_s: float = 0.0
    bubble_fraction: float = 0.0  # ideal idle share (S − 1)/(M + S − 1) for equal stage times
    bytes_sent: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})
    bytes_recv: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})
    positions: int = 0  # input positions of the step (batch·seq summed over micro-batches)
    stop: bool = False  # some stage voted to stop after this step (the replica stops together)

    def boundary_bytes_per_token(self, direction: str = "forward") -> float:
        """Bytes this stage sent per position of the step in one direction, framing included."""
        return self.bytes_sent[direction] / self.positions if self.positions else 0.0


def _loss_sum(logits: Tensor, targets: Tensor) -> Tensor:
    if logits.dtype != torch.float64:  # low precision upcast, as distrain.model.cross_entropy; fp64 stays
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _check_inputs(stage: Any, place: StagePlace, micro_batches: Sequence[tuple[Tensor, Tensor]]) -> None:
    s, n = place.stage, place.n_stages
    if not 0 <= s < n:
        raise ValueError(f"stage index {s} is not one of {n} stages")
    if stage.is_first != (s == 0) or stage.is_last != (s == n - 1):
        raise ValueError(f"stage {s} of {n} holds layers [{stage.start}, {stage.end}): first/last do not match")
    if n > 1 and place.group is None:
        raise ValueError("a pipeline of several stages needs place.group (its stages) for the clip norm and loss")
    if not micro_batches:
        raise ValueError("a pipeline step needs at least one micro-batch")
    for m, (ids, tgt) in enumerate(micro_batches):
        if ids.dim() != 2 or ids.is_floating_point() or tuple(tgt.shape) != tuple(ids.shape):
            raise ValueError(f"micro-batch {m}: ids and targets must be integer (batch, seq) tensors of one shape, "
                             f"got {tuple(ids.shape)} and {tuple(tgt.shape)}")


class _StageRun:
    """The state of one stage during one step: stashed micro-batches, timers, byte counters."""

    def __init__(self, stage: Any, micro_batches: Sequence[tuple[Tensor, Tensor]], transport: PointToPoint,
                 place: StagePlace, step: int, subspace: StageCoords | None, wire_dtype: str,
                 chunkwise: ChunkwiseSpec | None, chunk_generator: torch.Generator | None,
                 autocast_dtype: torch.dtype | None, on_compute: Callable[[str, int, float], None] | None,
                 bounds: bd.BoundaryBounds | None = None) -> None:
        p = next(stage.parameters())
        self.bounds = bounds
        self.stage, self.t, self.place, self.step = stage, transport, place, step
        self.device, self.dtype = p.device, p.dtype
        self.mbs = [(ids.to(self.device), tgt.to(self.device)) for ids, tgt in micro_batches]
        self.sub, self.wire = subspace, wire_dtype
        self.basis = subspace.fingerprint if subspace is not None else 0
        self.width = subspace.k if subspace is not None else stage.cfg.dim
        self.cw = chunkwise if chunkwise is not None and chunkwise.mode != "off" else None
        self.on_compute = on_compute
        self.amp = ((lambda: torch.autocast(self.device.type, dtype=autocast_dtype)) if autocast_dtype is not None
                    else contextlib.nullcontext)
        self.amp_dtype = autocast_dtype
        self.n_tokens = sum(int((tgt != IGNORE_INDEX).sum()) for _, tgt in self.mbs)
        if self.n_tokens == 0:
            raise ValueError("every target of the step is the ignore index (-100): there is no loss")
        self.chunks = self._draw_chunks(chunk_generator)
        self.stash: dict[int, tuple[Tensor | None, Tensor]] = {}
        self.peak = 0
        self.loss_sum = 0.0
        self.timers = dict(compute_s=0.0, codec_s=0.0, send_s=0.0, wait_s=0.0)
        self.sent = {"forward": 0, "backward": 0}
        self.recv = {"forward": 0, "backward": 0}

    def _draw_chunks(self, gen: torch.Generator | None) -> list[tuple[int, ...] | None]:
        if self.cw is None or self.cw.mode != "spaco":
            return [None] * len(self.mbs)
        return [select_chunks(plan_chunks(ids.shape[1], self.cw).n_chunks, self.cw, gen) for ids, _ in self.mbs]

    # -- boundary I/O ---------------------------------------------------------------------
    def _send(self, direction: int, dst_stage: int, m: int, tensor: Tensor) -> None:
        t0 = time.perf_counter()
        data = bd.encode_boundary(tensor, direction=direction, step=self.step, micro=m, dtype=self.wire,
                                  basis=self.basis)
        t1 = time.perf_counter()
        self.t.send_bytes(self.place.ranks[dst_stage], data)
        self.timers["codec_s"] += t1 - t0
        self.timers["send_s"] += time.perf_counter() - t1
        self.sent[bd.DIRECTIONS[direction]] += len(data)

    def _recv(self, direction: int, src_stage: int, m: int) -> Tensor:
        ids = self.mbs[m][0]
        t0 = time.perf_counter()
        data = self.t.recv_bytes(self.place.ranks[src_stage])
        t1 = time.perf_counter()
        expect = bd.BoundaryExpect(direction, self.step, m, (*ids.shape, self.width), self.wire, self.basis)
        src = self.place.ranks[src_stage]
        try:
            got = bd.decode_boundary(data, expect)
            if self.bounds is not None:
                self.bounds.check(got, src, direction, self.step, m)
        except FrameError as e:  # the replica's step cannot go on: say where, when and why, at once
            raise BoundaryRejectedError(f"stage {self.place.stage} rejected the {bd.DIRECTIONS[direction]} boundary "
                                        f"frame of step {self.step}, micro-batch {m} from stage {src_stage}: "
                                        f"{type(e).__name__}: {e}") from e
        out = got.to(device=self.device, dtype=self.dtype)
        self.timers["wait_s"] += t1 - t0
        self.timers["codec_s"] += time.perf_counter() - t1
        self.recv[bd.DIRECTIONS[direction]] += len(data)
        return out

    def _charge(self, kind: str, m: int, t0: float) -> None:
        dt = time.perf_counter() - t0
        self.timers["compute_s"] += dt
        if self.on_compute is not None:
            self.on_compute(kind, m, dt)

    # -- ops ------------------------------------------------------------------------------
    def forward(self, m: int) -> None:
        ids, tgt = self.mbs[m]
        s, last = self.place.stage, self.stage.is_last
        leaf = None
        if self.stage.is_first:
            inp = ids
        else:
            leaf = self._recv(bd.FORWARD, s - 1, m)
            if self.cw is None:
                leaf.requires_grad_(True)
        t0 = time.perf_counter()
        out = None
        if leaf is not None:
            with torch.set_grad_enabled(self.cw is None):
                inp = self.sub.from_coords(leaf, ids) if self.sub is not None else leaf
        if self.cw is not None:  # chunk-wise: keep only the input; the backward recomputes
            if not last:
                with torch.no_grad(), self.amp():
                    out = self._boundary_out(self.stage(inp), ids)
            self.stash[m] = (None, inp)
        else:
            with torch.enable_grad(), self.amp():
                h = self.stage(inp)
                out = _loss_sum(h, tgt) if last else self._boundary_out(h, ids)
            if last:
                self.loss_sum += float(out.detach())
            self.stash[m] = (leaf, out)
        self.peak = max(self.peak, len(self.stash))
        self._charge("F", m, t0)
        if not last:
            self._send(bd.FORWARD, s + 1, m, out)

    def _boundary_out(self, h: Tensor, ids: Tensor) -> Tensor:
        return self.sub.to_coords(h, ids) if self.sub is not None else h

    def backward(self, m: int) -> None:
        s, first, last = self.place.stage, self.stage.is_first, self.stage.is_last
        leaf, out = self.stash.pop(m)
        g = None if last else self._recv(bd.BACKWARD, s + 1, m)
        t0 = time.perf_counter()
        if self.cw is not None:
            in_grad = self._chunkwise_backward(m, out, g)
        else:
            with torch.enable_grad():
                seed = torch.tensor(1.0 / self.n_tokens, dtype=out.dtype, device=out.device) if last else g.to(out.dtype)
                torch.autograd.backward(out, seed)
            in_grad = leaf.grad if leaf is not None else None
        del leaf, out
        self._charge("B", m, t0)
        if not first:
            if in_grad is None:  # the stage's output did not depend on its input (cannot happen in a Transformer)
                raise RuntimeError(f"stage {s} got no input gradient for micro-batch {m}")
            self._send(bd.BACKWARD, s - 1, m, in_grad)

    def _chunkwise_backward(self, m: int, inp: Tensor, g: Tensor | None) -> Tensor | None:
        tgt = self.mbs[m][1]
        kw: dict[str, Any] = dict(chunks=self.chunks[m]) if self.chunks[m] is not None else {}
        if self.stage.is_last:
            count = int((tgt != IGNORE_INDEX).sum())
            if count == 0:
                return torch.zeros_like(inp) if not self.stage.is_first else None
            res = chunkwise_backward(self.stage, inp, tgt, self.cw, loss_scale=count / self.n_tokens,
                                     autocast_dtype=self.amp_dtype, **kw)
            self.loss_sum += res.loss * count
        else:
            gh = g @ self.sub.u.T.to(g.dtype) if self.sub is not None else g  # ∂L/∂h = U·∂L/∂c per token
            res = chunkwise_backward(self.stage, inp, None, self.cw, grad_output=gh,
                                     autocast_dtype=self.amp_dtype, **kw)
        if res.input_grad is None:
            return None
        return res.input_grad @ self.sub.u.to(res.input_grad.dtype) if self.sub is not None else res.input_grad

    # -- replica-wide norm, loss and clipping ---------------------------------------------
    def finish(self, grad_clip: float, stop_vote: bool = False) -> tuple[float, float, float, bool]:
        """(loss, grad norm, clip coefficient, stop), identical on every stage of the replica."""
        params = [p for p in {id(p): p for p in self.stage.parameters()}.values() if p.requires_grad]
        grads = [p.grad for p in params if p.grad is not None]
        sq = float(sum(g.detach().double().pow(2).sum() for g in grads)) if grads else 0.0
        mine = _STAT.pack(self.place.stage, sq, self.loss_sum if self.stage.is_last else math.nan, int(stop_vote))
        n = self.place.n_stages
        got = [mine] if n == 1 else self.t.all_gather_bytes(self.place.group, mine)
        stats = _parse_stats(got, n)
        total_sq = sum(stats[i][0] for i in range(n))
        loss = stats[n - 1][1] / self.n_tokens
        norm = math.sqrt(total_sq)
        coef = 1.0
        if grad_clip > 0:
            coef = min(1.0, grad_clip / (norm + 1e-6))
            if coef < 1.0 and grads:
                torch._foreach_mul_(grads, coef)
        return loss, norm, coef, any(stats[i][2] for i in range(n))


def _parse_stats(payloads: list[bytes | None], n_stages: int) -> dict[int, tuple[float, float, bool]]:
    """Validate the gathered (stage, squared norm, loss sum, stop vote) records: exactly one per stage."""
    if len(payloads) != n_stages:
        raise CommError(f"clip-norm group has {len(payloads)} members, the pipeline {n_stages} stages")
    stats: dict[int, tuple[float, float, bool]] = {}
    for p in payloads:
        if p is None:
            raise CommError("a stage of this pipeline replica is missing from the clip-norm all-gather")
        if len(p) != _STAT.size:
            raise CommError(f"clip-norm record of {len(p)} bytes, expected {_STAT.size}")
        i, sq, loss, vote = _STAT.unpack(p)
        if i >= n_stages or i in stats or not (math.isfinite(sq) and sq >= 0) or vote > 1:
            raise CommError(f"bad clip-norm record: stage {i}, squared norm {sq}, stop vote {vote}")
        stats[i] = (sq, loss, bool(vote))
    return stats


def pipeline_step(
    stage: Any,
    micro_batches: Sequence[tuple[Tensor, Tensor]],
    transport: PointToPoint,
    place: StagePlace,
    *,
    step: int,
    schedule: str = "1f1b",
    subspace: StageCoords | None = None,
    wire_dtype: str = "bf16",
    grad_clip: float = 0.0,
    chunkwise: ChunkwiseSpec | None = None,
    chunk_generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    on_compute: Callable[[str, int, float], None] | None = None,
    stop_vote: Callable[[], bool] | None = None,
    bounds: bd.BoundaryBounds | None = None,
) -> PipelineStepResult:
    """Run this stage's part of one step; accumulates (and clips) gradients into ``.grad``.

    ``micro_batches``: the step's (ids, targets) pairs, identical on every stage of the replica.
    ``subspace``: this stage's ``Subspace`` (all stages compressed, or none). ``on_compute(kind,
    micro, seconds)`` is called after each forward ("F") / backward ("B") computation, before its
    send: a simulated clock charges compute there. ``stop_vote()``, asked once the stage's part of
    the step is done, is this stage's vote to stop after it; ``result.stop`` is every stage's OR (it
    travels with the clip norm, so it costs no extra message). ``bounds``: magnitude bounds on the
    received frames (kept across steps by the caller). A frame that fails validation or its bounds
    raises ``BoundaryRejectedError`` naming this stage, the step and the reason. Raises
    ``FloatingPointError`` on every stage if the loss is not finite (before anyone steps).
    """
    t_start = time.perf_counter()
    _check_inputs(stage, place, micro_batches)
    run = _StageRun(stage, micro_batches, transport, place, step, subspace, wire_dtype, chunkwise,
                    chunk_generator, autocast_dtype, on_compute, bounds)
    n_micro = len(run.mbs)
    stage.train()
    for op in stage_ops(schedule, place.n_stages, place.stage, n_micro):
        (run.forward if op.kind == "F" else run.backward)(op.micro)
    t_sync = time.perf_counter()
    loss, norm, coef, stop = run.finish(grad_clip, stop_vote() if stop_vote is not None else False)
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite training loss {loss} at step {step}")
    end = time.perf_counter()
    return PipelineStepResult(
        loss=loss, tokens=run.n_tokens, grad_norm=norm, clip_coef=coef, n_micro=n_micro, peak_live=run.peak,
        sync_s=end - t_sync, total_s=end - t_start, bubble_fraction=bubble_fraction(place.n_stages, n_micro),
        bytes_sent=run.sent, bytes_recv=run.recv, positions=sum(ids.numel() for ids, _ in run.mbs), stop=stop,
        **run.timers,
    )


def pipeline_eval_loss(stage: Any, batches: Sequence[tuple[Tensor, Tensor]], transport: PointToPoint,
                       place: StagePlace, *, step: int, wire_dtype: str = "fp32") -> float:
    """Mean token loss of ``batches`` through the replica's (uncompressed) stages, forward only.

    Every stage calls it with the same batches; activations cross the boundaries at full width
    (evaluation is rare, and it runs on the unconstrained global weights). Every stage returns the
    same value (the last stage's loss, gathered with the replica's clip-norm record).
    """
    n = place.n_stages
    s = place.stage
    device = next(stage.parameters()).device
    dtype = next(stage.parameters()).dtype
    loss_sum, tokens = 0.0, 0
    stage.eval()
    with torch.no_grad():
        for m, (ids, tgt) in enumerate(batches):
            ids, tgt = ids.to(device), tgt.to(device)
            if stage.is_first:
                h = stage(ids)
            else:
                data = transport.recv_bytes(place.ranks[s - 1])
                expect = bd.BoundaryExpect(bd.FORWARD, step, m, (*ids.shape, stage.cfg.dim), wire_dtype)
                h = stage(bd.decode_boundary(data, expect).to(device=device, dtype=dtype))
            if stage.is_last:
                loss_sum += float(_loss_sum(h, tgt))
                tokens += int((tgt != IGNORE_INDEX).sum())
            else:
                transport.send_bytes(place.ranks[s + 1], bd.encode_boundary(h, direction=bd.FORWARD, step=step,
                                                                             micro=m, dtype=wire_dtype))
    mine = _STAT.pack(s, float(tokens), loss_sum if stage.is_last else math.nan, 0)
    got = [mine] if n == 1 else transport.all_gather_bytes(place.group, mine)
    stats = _parse_stats(got, n)
    count, total, _ = stats[n - 1]
    return total / max(1.0, count)
