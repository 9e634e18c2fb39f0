"""Weights as wire frames (never pickled): the initial agreement, catch-up, the Coordinator's copy."""

from __future__ import annotations

import math

import torch

from distrain.comm.codecs import make_codec
from distrain.comm.wire import FrameLimits, FrameMeta, decode_frame, encode_frame

_DENSE = make_codec("dense", dtype="fp32")


def encode_params(params: dict[str, torch.Tensor], run: str, round_idx: int, sender: int) -> bytes:
    """Weights as one validated wire frame: dense fp32, uncompressed (weights barely compress)."""
    encoded = {n: _DENSE.encode(n, t.detach().float().cpu(), {}) for n, t in params.items()}
    return encode_frame(FrameMeta.for_codec(run, round_idx, sender, _DENSE), encoded, compress=False)


def decode_params(data: bytes, shapes: dict[str, tuple[int, ...]], run: str, round_idx: int) -> dict[str, torch.Tensor]:
    """Inverse of ``encode_params``, validated against the local shapes; bit-exact."""
    raw = sum(4 * math.prod(s) for s in shapes.values())
    limits = FrameLimits(max_payload_bytes=raw, max_raw_bytes=raw, max_tensors=max(1, len(shapes)))
    _, tensors = decode_frame(data, shapes, run, round_idx, limits, codec=_DENSE)
    return {n: _DENSE.decode_aggregate([et], shapes[n]) for n, et in tensors.items()}
