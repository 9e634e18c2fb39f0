"""Robust aggregation: no single peer's (valid) frame can move the global weights far or abort a round.

A frame that passes ``distrain.comm.wire.decode_frame`` is well formed and finite, but finite is not
harmless: centroids of 3e38, or one flipped exponent bit in a dense payload, would move the
weights to ~1e38, and two of them overflow the fp32 sum. This module bounds every decoded
contribution by its norm relative to the round's contributions before ``codec.decode_aggregate``:

- ``contribution_norm``: the L2 norm of one contribution over all its tensors, in float64 (the
  square of the largest float32 is ~1.2e77, so float64 sums of squares cannot overflow for any
  tensor that fits in memory). For SparseLoCo with a 2-bit quantizer it is exact from the code
  counts: Σ_c count_c · centroid_c².
- ``reference_norm``: the *low* median of the positive norms. With two contributors it is the
  smaller one, so one hostile frame can never drag the reference up; with a majority of honest
  contributors it is an honest norm.
- ``decide``: per contribution, ``reject`` above ``max_norm`` (an absolute bound no honest
  pseudo-gradient comes near, which also keeps every later fp32 sum finite) or above
  ``reject_ratio`` × reference (an outlier), ``clip`` above ``clip_ratio`` × reference (scale it down
  to that norm, as Templar clips to the median norm), else ``keep``.
- ``scale_contribution``: new ``EncodedTensor`` objects with the value buffers scaled (the 4
  SparseLoCo ``centroids``, or its ``values`` for quantizer ``none``; the dense ``values``, bf16
  re-rounded from its u2 bit patterns). Received buffers are never written to.

Norms are compared per inner step when the contributions carry their step counts (replicas that
ran different step counts in a round): a replica that did more work is never clipped for it.
Decisions depend only on the received contributions, never on who computes them, so every replica
keeps and clips exactly the same set and the replicas stay in sync. ``robust_aggregate_inputs``
ties it together; ``check_sender`` verifies that a frame's header names the transport member it
came from (a member re-sending another member's frame must not count twice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch

from distrain.comm.codecs import Codec, DenseCodec, EncodedTensor, SparseLoCoCodec
from distrain.comm.codecs.quantizers import LEVELS
from distrain.comm.errors import SchemaError
from distrain.comm.wire import FrameMeta

Member = Hashable
Contribution = Mapping[str, EncodedTensor]

_BLOCK = 1 << 20  # elements per float64 block: bounded temporary memory for any tensor size
# Codes per level in one byte of 2-bit codes (4 codes per byte, first in the low bits).
_CODE_COUNTS = np.stack([((np.arange(256)[:, None] >> (2 * np.arange(4))) & 3) == c for c in range(LEVELS)],
                        axis=-1).sum(axis=1).astype(np.float64)  # [256, 4]
MAX_NORM_LIMIT = 1e30  # max_norm above this could let a sum of contributions overflow fp32


class SenderMismatchError(SchemaError):
    """A frame's header names a worker other than the transport member it arrived from."""


@dataclass(frozen=True)
class RobustPolicy:
    """How far a contribution may stray from the round's reference norm.

    ``clip_ratio``: contributions above ``clip_ratio`` × reference are scaled down to it.
    ``reject_ratio``: contributions above ``reject_ratio`` × reference are dropped as outliers.
    ``max_norm``: contributions above this absolute norm are dropped whatever the others say.
    """

    clip_ratio: float = 2.0
    reject_ratio: float = 10.0
    max_norm: float = 1e18

    def __post_init__(self) -> None:
        for name in ("clip_ratio", "reject_ratio", "max_norm"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"robust policy {name} must be a finite number, got {v!r}")
        if not 1.0 <= self.clip_ratio <= self.reject_ratio:
            raise ValueError(f"robust policy needs 1 <= clip_ratio <= reject_ratio, got {self.clip_ratio}, "
                             f"{self.reject_ratio}")
        if not 0.0 < self.max_norm <= MAX_NORM_LIMIT:
            raise ValueError(f"robust policy max_norm must be in (0, {MAX_NORM_LIMIT:g}], got {self.max_norm!r}")


@dataclass(frozen=True)
class Decision:
    """What happens to one contribution: ``keep``, ``clip`` (values × ``scale``) or ``reject``."""

    member: Member
    norm: float
    action: str
    scale: float
    reason: str = ""


@dataclass
class RobustOutcome:
    """``kept``: (member, tensors) to aggregate, clipped ones already scaled; reasons per action."""

    kept: list[tuple[Member, dict[str, EncodedTensor]]]
    rejected: list[str] = field(default_factory=list)
    clipped: list[str] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    reference: float = 0.0


# ----- norms ---------------------------------------------------------------------------------------
def _sumsq(values: np.ndarray) -> float:
    """Σ v² in float64, in bounded blocks (a 2-G-element tensor never gets a float64 copy)."""
    flat = values.reshape(-1)
    total = 0.0
    for start in range(0, flat.size, _BLOCK):
        block = flat[start : start + _BLOCK].astype(np.float64)
        total += float(np.dot(block, block))
    return total


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even bf16 bit patterns (torch's rounding, as the dense codec's encoder)."""
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16).astype("<u2")


def _code_counts(codes: np.ndarray, nnz: int) -> np.ndarray:
    """How many of the first ``nnz`` 2-bit codes use each level (padding codes are zero bits)."""
    counts = np.bincount(codes.reshape(-1), minlength=256).astype(np.float64) @ _CODE_COUNTS
    counts[0] -= 4 * codes.size - nnz
    return counts


def tensor_sumsq(codec: Codec, et: EncodedTensor) -> float:
    """Σ of the squared decoded values of one encoded tensor, in float64."""
    if isinstance(codec, SparseLoCoCodec):
        if "values" in et.buffers:
            return _sumsq(et.buffers["values"])
        counts = _code_counts(et.buffers["codes"], codec.layout(et.shape).nnz)
        cents = et.buffers["centroids"].astype(np.float64)
        return float(np.dot(counts, cents * cents))
    if isinstance(codec, DenseCodec):
        vals = et.buffers["values"]
        if codec.dtype == "bf16":
            return sum(_sumsq(_bf16_to_f32(vals[s : s + _BLOCK])) for s in range(0, vals.size, _BLOCK))
        return _sumsq(vals)
    raise TypeError(f"robust aggregation does not know codec {codec.kind!r}")


def contribution_norm(codec: Codec, tensors: Contribution) -> float:
    """L2 norm of one contribution over all its tensors (float64; finite for any finite input)."""
    return math.sqrt(sum(tensor_sumsq(codec, et) for et in tensors.values()))


def reference_norm(norms: Sequence[float], max_norm: float = MAX_NORM_LIMIT) -> float:
    """Low median of the positive, finite norms not above ``max_norm``; 0.0 when there are none."""
    usable = sorted(n for n in norms if math.isfinite(n) and 0.0 < n <= max_norm)
    return usable[(len(usable) - 1) // 2] if usable else 0.0


# ----- decisions -----------------------------------------------------------------------------------
def decide(norms: Sequence[tuple[Member, float]], policy: RobustPolicy | None = None) -> tuple[list[Decision], float]:
    """One decision per (member, norm), and the reference norm they were judged against."""
    policy = policy or RobustPolicy()
    ref = reference_norm([n for _, n in norms], policy.max_norm)
    out: list[Decision] = []
    for member, norm in norms:
        if not math.isfinite(norm):
            out.append(Decision(member, norm, "reject", 0.0, f"member {member}: non-finite norm"))
        elif norm > policy.max_norm:
            out.append(Decision(member, norm, "reject", 0.0,
                                f"member {member}: norm {norm:.3g} exceeds the absolute bound {policy.max_norm:.3g}"))
        elif ref > 0.0 and norm > policy.reject_ratio * ref:
            out.append(Decision(member, norm, "reject", 0.0,
                                f"member {member}: outlier, norm {norm:.3g} is {norm / ref:.3g}x the round's "
                                f"reference {ref:.3g} (limit {policy.reject_ratio:g}x)"))
        elif ref > 0.0 and norm > policy.clip_ratio * ref:
            target = policy.clip_ratio * ref
            out.append(Decision(member, norm, "clip", target / norm,
                                f"member {member}: norm {norm:.3g} is {norm / ref:.3g}x the round's reference "
                                f"{ref:.3g}, clipped to {policy.clip_ratio:g}x"))
        else:
            out.append(Decision(member, norm, "keep", 1.0))
    return out, ref


def scale_contribution(codec: Codec, tensors: Contribution, factor: float) -> dict[str, EncodedTensor]:
    """New encodings whose decoded values are ``factor`` × the originals (0 ≤ factor ≤ 1).

    SparseLoCo centroids no code uses are set to 0: they are never decoded, and zeroing them means
    no later arithmetic (a kernel, a future aggregation rule) can meet a hostile 3e38 there.
    """
    if not 0.0 <= factor <= 1.0:
        raise ValueError(f"scale factor must be in [0, 1], got {factor}")
    out: dict[str, EncodedTensor] = {}
    for name, et in tensors.items():
        bufs = dict(et.buffers)
        if isinstance(codec, SparseLoCoCodec):
            if "values" in bufs:
                v = bufs["values"]
                bufs["values"] = (v.astype(np.float64) * factor).astype(v.dtype)
            else:
                used = _code_counts(bufs["codes"], codec.layout(et.shape).nnz) > 0
                cents = np.where(used, bufs["centroids"].astype(np.float64) * factor, 0.0)
                bufs["centroids"] = cents.astype("<f4")
        elif isinstance(codec, DenseCodec):
            v = bufs["values"]
            if factor != 1.0:
                if codec.dtype == "bf16":
                    bufs["values"] = np.concatenate(
                        [_f32_to_bf16(_bf16_to_f32(v[s : s + _BLOCK]) * np.float32(factor))
                         for s in range(0, v.size, _BLOCK)] or [v[:0].copy()])
                else:
                    bufs["values"] = (v * np.float32(factor)).astype("<f4")
        else:
            raise TypeError(f"robust aggregation does not know codec {codec.kind!r}")
        out[name] = EncodedTensor(shape=et.shape, meta=dict(et.meta), buffers=bufs)
    return out


def check_sender(meta: FrameMeta, member: int) -> None:
    """Raise ``SenderMismatchError`` unless the frame's header names the member it came from."""
    if meta.worker != member:
        raise SenderMismatchError(f"frame names worker {meta.worker} but arrived from member {member} "
                                  f"(a re-sent frame is not counted twice)")


def robust_aggregate_inputs(codec: Codec, contributions: Sequence[tuple[Member, Contribution]],
                            policy: RobustPolicy | None = None,
                            steps: Mapping[Member, int] | None = None) -> RobustOutcome:
    """Judge the round's decoded contributions; the kept ones (clipped where needed) go to
    ``codec.decode_aggregate``. ``steps``: each member's inner steps in the round — norms are then
    compared per step (the absolute bound still applies to the whole norm). Never raises for finite
    input; a member listed twice keeps only its first contribution. An empty ``kept`` means "no
    usable contribution": skip the step."""
    seen: set[Member] = set()
    unique: list[tuple[Member, Contribution]] = []
    duplicates: list[str] = []
    for member, tensors in contributions:
        if member in seen:
            duplicates.append(f"member {member}: second contribution in one round, ignored")
            continue
        seen.add(member)
        unique.append((member, tensors))
    policy = policy or RobustPolicy()
    norms = [(m, contribution_norm(codec, t)) for m, t in unique]
    per_step = [(m, n / max(1, steps.get(m, 1)) if steps and math.isfinite(n) else n) for m, n in norms]
    decisions, ref = decide(per_step, policy)
    for i, ((member, norm), d) in enumerate(zip(norms, decisions)):
        if d.action != "reject" and norm > policy.max_norm:
            decisions[i] = Decision(member, norm, "reject", 0.0, f"member {member}: norm {norm:.3g} exceeds the "
                                                                 f"absolute bound {policy.max_norm:.3g}")
    outcome = RobustOutcome(kept=[], rejected=duplicates, decisions=decisions, reference=ref)
    for (member, tensors), d in zip(unique, decisions):
        if d.action == "reject":
            outcome.rejected.append(d.reason)
            continue
        if d.action == "clip":
            outcome.clipped.append(d.reason)
        outcome.kept.append((member, scale_contribution(codec, tensors, d.scale)))
    return outcome
