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
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from distrain.comm.codecs import Codec, EncodedTensor, Merge
from distrain.comm.errors import FrameError, RoundLateError
from distrain.comm.robust import RobustPolicy, robust_aggregate_inputs
from distrain.comm.transport import Transport
from distrain.comm.wire import FrameMeta, decode_frame, encode_frame
from distrain.outer.base import Contribution, Contributions, Weights

log = logging.getLogger(__name__)

MERGES = ("mean", "steps", "tokens")

# (tensor name, [(member, its encoded contribution)], shape, device, merge) -> the aggregate
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
    size, the contributions kept, why the others were not, how many were clipped."""

    aggregate: Weights | None
    wire_bytes: int
    kept: Contributions = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    clipped: int = 0


class FrameExchange:
    """Encode named tensors into a frame, all-gather frames, decode the valid ones, bound each
    contribution's norm per step (``distrain.comm.robust``) and merge on the weights' device.

    A frame is checked against the member it came from (a member re-sending another's frame does
    not count twice), then judged by its norm against the round's others: clipped, or rejected as
    an outlier. Nothing a peer sends can abort the round: with no usable contribution the
    aggregate is ``None`` and the step is skipped.
    """

    def __init__(self, codec: Codec, shapes: dict[str, tuple[int, ...]], transport: Transport, group: str,
                 run_id: str, rank: int, device: torch.device, policy: RobustPolicy | None = None,
                 combine: Combine | None = None, merge: str = "mean"):
        if merge not in MERGES:
            raise ValueError(f"unknown merge {merge!r} (known: {', '.join(MERGES)})")
        self.device = device
        self.policy = policy
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
        kept, clipped = self._judge(round_idx, decoded, reasons)
        if not kept:
            log.warning("round %d: no usable contribution in group %s (%s): the outer step is skipped",
                        round_idx, self.group, "; ".join(reasons) or "none arrived")
            return Exchanged(None, len(frame), [], reasons, clipped)
        merge = merge_of(self.merge, kept)
        if self.combine is not None:
            aggregate = {n: self.combine(n, [(c.member, c.tensors[n]) for c in kept], self.shapes[n], self.device, merge)
                         for n in tensors}
        else:
            aggregate = {n: self.codec.decode_aggregate([c.tensors[n] for c in kept], self.shapes[n],
                                                        device=self.device, merge=merge) for n in tensors}
        return Exchanged(aggregate, len(frame), kept, reasons, clipped)

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
