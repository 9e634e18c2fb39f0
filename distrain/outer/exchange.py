"""One segment's frame exchange: encode, all-gather, validate, bound, merge.

Why apart from the optimisers: DiLoCo, SparseLoCo and the DDP baseline differ in what they do
with an aggregate, not in how contributions travel and are judged.

Every frame states the work behind it (its replica's inner steps and tokens in the round). The
robust bound compares norms per step, so a replica that did more work is never clipped for it,
and ``merge_of`` turns the stated work into the merge ``outer.merge`` asks for:

- ``mean``: every contribution as sent (the codec's aggregation);
- ``steps``: FedNova — each pseudo-gradient divided by its step count, the merge rescaled by the
  mean count, so replicas that took fewer steps pull with the direction they found, not with less
  of it, and the update keeps the size of an average replica's;
- ``tokens``: weighted by the tokens each trained on (what a larger batch would have done).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from distrain.comm.codecs import Codec, EncodedTensor, Merge
from distrain.comm.coords import CoordBound, clip_parts
from distrain.comm.direction import DirectionPolicy, Verdict, direction_check, gram
from distrain.comm.errors import FrameError, RoundLateError
from distrain.comm.robust import RobustPolicy, robust_aggregate_inputs
from distrain.comm.transport import Transport
from distrain.comm.wire import FrameMeta, decode_frame, encode_frame
from distrain.outer.base import Contribution, Contributions, Weights

log = logging.getLogger(__name__)

MERGES = ("mean", "steps", "tokens")

# (tensor name, [(member, its encoded contribution)], shape, device, merge) -> the aggregate
# (a combine applies the run's per-coordinate bound itself: it was built with it)
Combine = Callable[[str, list[tuple[int, EncodedTensor]], tuple[int, ...], torch.device, Merge | None], torch.Tensor]


def merge_of(kind: str, kept: Sequence[Contribution]) -> Merge | None:
    """The merge of ``kept`` under ``outer.merge = kind``; None (as sent) when the contributions did
    equal work or did not state it, so equal rounds aggregate exactly as without a merge."""
    if kind not in MERGES:
        raise ValueError(f"unknown merge {kind!r} (known: {', '.join(MERGES)})")
    steps = [c.steps for c in kept]
    tokens = [c.tokens for c in kept]
    if kind == "mean" or not kept:
        return None
    if kind == "steps":
        if min(steps) <= 0 or len(set(steps)) == 1:
            return None
        mean = sum(steps) / len(steps)
        return Merge(tuple(mean / s for s in steps), (1.0,) * len(steps))
    if min(tokens) <= 0 or len(set(tokens)) == 1:
        return None
    mean = sum(tokens) / len(tokens)
    return Merge((1.0,) * len(tokens), tuple(t / mean for t in tokens))


@dataclass
class Exchanged:
    """What one exchange gave: the aggregate (None: nothing usable arrived), this worker's frame
    size, the contributions kept, why the others were not, how many were clipped, and each
    judged member's direction (cosine to the others' consensus; weight 0: set aside)."""

    aggregate: Weights | None
    wire_bytes: int
    kept: Contributions = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    clipped: int = 0
    directions: list[Verdict] = field(default_factory=list)


class FrameExchange:
    """Encode named tensors into a frame, all-gather frames, decode the valid ones, bound each
    contribution's norm per step (``distrain.comm.robust``), set aside one that pulls against the
    others (``distrain.comm.direction``) and merge on the weights' device under the per-coordinate
    bound (``distrain.comm.coords``).

    A frame is checked against the member it came from (a member re-sending another's frame does
    not count twice), then judged by its norm against the round's others: clipped, or rejected as
    an outlier. Nothing a peer sends can abort the round: with no usable contribution the
    aggregate is ``None`` and the step is skipped. ``settle`` is everything after the transport,
    so a benchmark or a test can aggregate recorded contributions exactly as a round does.
    """

    def __init__(self, codec: Codec, shapes: dict[str, tuple[int, ...]], transport: Transport | None, group: str,
                 run_id: str, rank: int, device: torch.device, policy: RobustPolicy | None = None,
                 combine: Combine | None = None, merge: str = "mean", bound: CoordBound | None = None,
                 direction: DirectionPolicy | None = None):
        if merge not in MERGES:
            raise ValueError(f"unknown merge {merge!r} (known: {', '.join(MERGES)})")
        self.device = device
        self.policy = policy
        self.bound = bound
        self.direction = direction
        self.combine = combine  # how a tensor's kept contributions become its aggregate (default: the codec's)
        self.merge = merge
        self.codec = codec
        self.encoder: Codec = codec  # what encodes this worker's own frame (fault injection wraps it)
        self.shapes = shapes
        self.transport = transport
        self.group = group
        self.run_id = run_id
        self.rank = rank

    def use(self, codec: Codec) -> None:
        """Encode and decode with ``codec`` from now on (a per-round schedule); an encoder wrapped by
        fault injection stays wrapped."""
        if self.encoder is self.codec:
            self.encoder = codec
        self.codec = codec

    def wrap_encoder(self, wrap: Callable[[Codec], Codec]) -> None:
        self.encoder = wrap(self.codec)

    def exchange(self, round_idx: int, tensors: Weights, state: Weights, steps: int = 0,
                 tokens: int = 0) -> Exchanged:
        encoded = {n: self.encoder.encode(n, t, state) for n, t in tensors.items()}
        meta = FrameMeta.for_codec(self.run_id, round_idx, self.rank, self.codec, steps, tokens)
        frame = encode_frame(meta, encoded)
        try:
            frames = self.transport.all_gather_bytes(self.group, frame)
        except RoundLateError:
            self._unsend(encoded, state)
            raise
        decoded: Contributions = []
        reasons: list[str] = []
        for member, data in zip(self.transport.members(self.group), frames):
            if data is None:
                continue
            try:
                got, parts = decode_frame(data, self.shapes, self.run_id, round_idx, codec=self.codec, worker=member)
                decoded.append(Contribution(member, parts, got.steps, got.tokens))
            except FrameError as e:
                reasons.append(f"{type(e).__name__} from member {member}: {e}")
                log.warning("round %d: rejected frame from member %d of %s: %s", round_idx, member, self.group, e)
        got = self.settle(round_idx, decoded, reasons)
        got.wire_bytes = len(frame)
        return got

    def settle(self, round_idx: int, decoded: Contributions, reasons: list[str] | None = None) -> Exchanged:
        """The round's aggregate from its decoded contributions: norm bound, direction check, merge
        under the per-coordinate bound (``wire_bytes`` left 0)."""
        reasons = [] if reasons is None else reasons
        kept, clipped = self._judge(round_idx, decoded, reasons)
        verdicts = self._directions(round_idx, kept)
        kept = [c for c, v in zip(kept, verdicts) if v.weight > 0] if verdicts else kept
        if not kept:
            log.warning("round %d: no usable contribution in group %s (%s): the outer step is skipped",
                        round_idx, self.group, "; ".join(reasons) or "none arrived")
            return Exchanged(None, 0, [], reasons, clipped, verdicts)
        merge = merge_of(self.merge, kept)
        if self.combine is not None:
            aggregate = {n: self.combine(n, [(c.member, c.tensors[n]) for c in kept], self.shapes[n], self.device, merge)
                         for n in self.shapes}
        else:
            aggregate = {n: self.codec.decode_aggregate([c.tensors[n] for c in kept], self.shapes[n],
                                                        device=self.device, merge=merge, bound=self.bound)
                         for n in self.shapes}
        return Exchanged(aggregate, 0, kept, reasons, clipped, verdicts)

    def _directions(self, round_idx: int, kept: Contributions) -> list[Verdict]:
        """Each kept member's cosine to the others' consensus (coordinate-bounded values, as the
        aggregate will see them) and whether it is set aside; [] when the check is off."""
        if self.direction is None or not kept:
            return []
        tensors = []
        for n, shape in self.shapes.items():
            parts = [self.codec.decode(c.tensors[n]) for c in kept]
            if self.bound is not None and self.bound.clip > 0:
                parts, _ = clip_parts(parts, self.codec.chunk_layout(shape, self.bound), self.bound.clip)
            tensors.append(parts)
        numels = [math.prod(s) for s in self.shapes.values()]
        verdicts = direction_check([c.member for c in kept], gram(tensors, numels), self.direction)
        for v in verdicts:
            if v.weight == 0:
                log.warning("round %d, %s: %s", round_idx, self.group, v.reason)
        return verdicts

    @torch.no_grad()
    def _unsend(self, encoded: dict[str, EncodedTensor], state: Weights) -> None:
        """The frame never reached the round (late): what encoding took out of the error buffers goes
        back in, so the work it carried is sent in a later round instead of lost."""
        for n, et in encoded.items():
            if n in state:
                state[n] += self.codec.decode_aggregate([et], self.shapes[n], device=state[n].device).to(state[n])

    def _judge(self, round_idx: int, decoded: Contributions, reasons: list[str]) -> tuple[Contributions, int]:
        """The robust bound (per step): the kept contributions, clipped ones scaled down."""
        if self.policy is None:
            return decoded, 0
        work = {c.member: c for c in decoded}
        steps = {c.member: c.steps for c in decoded} if all(c.steps > 0 for c in decoded) else None
        judged = robust_aggregate_inputs(self.codec, [(c.member, c.tensors) for c in decoded], self.policy, steps)
        for why in judged.rejected + judged.clipped:
            log.warning("round %d, %s: %s", round_idx, self.group, why)
        reasons += judged.rejected
        kept = [Contribution(m, t, work[m].steps, work[m].tokens) for m, t in judged.kept]
        return kept, len(judged.clipped)
