"""One segment's frame exchange: encode, all-gather, validate, bound, aggregate.

Why apart from the optimisers: DiLoCo, SparseLoCo and the DDP baseline differ in what they do
with an aggregate, not in how contributions travel and are judged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from distrain.comm.codecs import Codec, EncodedTensor
from distrain.comm.errors import FrameError
from distrain.comm.robust import RobustPolicy, robust_aggregate_inputs
from distrain.comm.transport import Transport
from distrain.comm.wire import FrameMeta, decode_frame, encode_frame
from distrain.outer.base import Contributions, Weights

log = logging.getLogger(__name__)

# (tensor name, [(member, its encoded contribution)], shape, device) -> the aggregate
Combine = Callable[[str, list[tuple[int, EncodedTensor]], tuple[int, ...], torch.device], torch.Tensor]


@dataclass
class Exchanged:
    """What one exchange gave: the aggregate (None: nothing usable arrived), this worker's frame
    size, the contributions kept, and why the others were not."""

    aggregate: Weights | None
    wire_bytes: int
    kept: Contributions = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


class FrameExchange:
    """Encode named tensors into a frame, all-gather frames, decode the valid ones, bound each
    contribution's norm (``distrain.comm.robust``) and aggregate on the weights' device.

    A frame is checked against the member it came from (a member re-sending another's frame does
    not count twice), then judged by its norm against the round's others: clipped, or rejected as
    an outlier. Nothing a peer sends can abort the round: with no usable contribution the
    aggregate is ``None`` and the step is skipped.
    """

    def __init__(self, codec: Codec, shapes: dict[str, tuple[int, ...]], transport: Transport, group: str,
                 run_id: str, rank: int, device: torch.device, policy: RobustPolicy | None = None,
                 combine: Combine | None = None):
        self.device = device
        self.policy = policy
        self.combine = combine  # how a tensor's kept contributions become its aggregate (default: the codec's)
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

    def exchange(self, round_idx: int, tensors: Weights, state: Weights) -> Exchanged:
        encoded = {n: self.encoder.encode(n, t, state) for n, t in tensors.items()}
        frame = encode_frame(FrameMeta.for_codec(self.run_id, round_idx, self.rank, self.codec), encoded)
        frames = self.transport.all_gather_bytes(self.group, frame)
        decoded: Contributions = []
        reasons: list[str] = []
        for member, data in zip(self.transport.members(self.group), frames):
            if data is None:
                continue
            try:
                _, parts = decode_frame(data, self.shapes, self.run_id, round_idx, codec=self.codec, worker=member)
                decoded.append((member, parts))
            except FrameError as e:
                reasons.append(f"{type(e).__name__} from member {member}: {e}")
                log.warning("round %d: rejected frame from member %d of %s: %s", round_idx, member, self.group, e)
        kept = decoded
        if self.policy is not None:
            judged = robust_aggregate_inputs(self.codec, decoded, self.policy)
            kept = judged.kept
            for why in judged.rejected + judged.clipped:
                log.warning("round %d, %s: %s", round_idx, self.group, why)
            reasons += judged.rejected
        if not kept:
            log.warning("round %d: no usable contribution in group %s (%s): the outer step is skipped",
                        round_idx, self.group, "; ".join(reasons) or "none arrived")
            return Exchanged(None, len(frame), [], reasons)
        if self.combine is not None:
            aggregate = {n: self.combine(n, [(m, t[n]) for m, t in kept], self.shapes[n], self.device) for n in tensors}
        else:
            aggregate = {n: self.codec.decode_aggregate([t[n] for _, t in kept], self.shapes[n], device=self.device)
                         for n in tensors}
        return Exchanged(aggregate, len(frame), list(kept), reasons)
