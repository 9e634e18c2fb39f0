"""Dense codecs for DiLoCo: the whole pseudo-gradient as fp32 or bf16, averaged over replicas.

bf16 travels as its raw 16-bit patterns (``u2``; numpy has no bfloat16): the fp32 value rounded to
nearest-even bf16 by torch. Aggregation sums the replicas' fp32 values in list (rank) order and
divides by the number of contributions.
"""

from __future__ import annotations

import numpy as np
import torch

from distrain.comm.codecs.base import (
    BufferSpec,
    Codec,
    CodecState,
    EncodedTensor,
    Merge,
    MetaValue,
    check_layout,
    check_shape,
    require_choice,
)
from distrain.comm.coords import CoordBound
from distrain.comm.errors import NonFiniteError, SchemaError

DENSE_DTYPES = {"fp32": "f4", "bf16": "u2"}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class DenseCodec(Codec):
    """Send every element: fp32 (exact) or bf16 (half the bytes)."""

    kind = "dense"

    def __init__(self, dtype: str = "fp32") -> None:
        self.dtype = require_choice("dtype", dtype, tuple(DENSE_DTYPES))

    def params(self) -> dict[str, MetaValue]:
        return {"dtype": self.dtype}

    def encode(self, name: str, delta: torch.Tensor, state: CodecState) -> EncodedTensor:
        """Encode ``delta``; dense codecs keep no state (``state`` is left untouched)."""
        shape = check_shape(tuple(delta.shape))
        if not torch.isfinite(delta).all():
            raise ValueError(f"pseudo-gradient {name!r} contains NaN or Inf")
        flat = delta.detach().reshape(-1).to(torch.float32)
        if self.dtype == "fp32":
            buf = flat.cpu().numpy().astype("<f4")
        else:
            bf = flat.to(torch.bfloat16)
            if not torch.isfinite(bf).all():
                raise ValueError(f"pseudo-gradient {name!r} overflows bf16")
            buf = bf.view(torch.int16).cpu().numpy().view(np.uint16).astype("<u2")
        return EncodedTensor(shape=shape, meta={}, buffers={"values": buf})

    def expected_meta(self, shape: tuple[int, ...]) -> dict[str, MetaValue]:
        return {}

    def buffer_layout(self, shape: tuple[int, ...]) -> dict[str, BufferSpec]:
        return {"values": BufferSpec(DENSE_DTYPES[self.dtype], _numel(check_shape(shape)))}

    def _values(self, et: EncodedTensor) -> torch.Tensor:
        try:
            check_layout(et, self.buffer_layout(et.shape))
        except ValueError as exc:
            raise SchemaError(f"dense tensor {et.shape}: {exc}") from None
        buf = et.buffers["values"]
        if self.dtype == "fp32":
            return torch.from_numpy(buf.astype(np.float32))
        return torch.from_numpy(buf.astype(np.uint16).view(np.int16)).view(torch.bfloat16).to(torch.float32)

    def validate(self, et: EncodedTensor) -> None:
        if et.meta:
            raise SchemaError(f"dense tensors carry no metadata, got {et.meta}")
        if not torch.isfinite(self._values(et)).all():
            raise NonFiniteError("dense values contain NaN or Inf")

    def decode(self, et: EncodedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every element, as (flat indices, fp32 values); finite values checked."""
        values = self._values(et)
        if not torch.isfinite(values).all():
            raise NonFiniteError("dense values contain NaN or Inf")
        return torch.arange(values.numel(), dtype=torch.int64), values

    def decode_aggregate(self, parts: list[EncodedTensor], shape: tuple[int, ...],
                         device: torch.device | str | None = None, merge: Merge | None = None,
                         bound: CoordBound | None = None) -> torch.Tensor:
        """Sum in list order and divide by R (by Σ weights under a merge), on ``device``: fp32 adds
        are exact IEEE operations everywhere, so the bits do not depend on the device. With a
        ``bound`` that clips, values are first cut per coordinate (every contribution selects
        every coordinate, so ``min_selectors`` changes nothing here)."""
        shape = check_shape(shape)
        if not parts:
            raise ValueError("decode_aggregate needs at least one contribution")
        if merge is not None and len(merge.weights) != len(parts):
            raise ValueError(f"a merge of {len(merge.weights)} contributions for {len(parts)}")
        dev = torch.device(device if device is not None else "cpu")
        if bound is not None and bound.clip > 0:
            for part in parts:
                if part.shape != shape:
                    raise ValueError(f"contribution of shape {part.shape} for a tensor of shape {shape}")
            return self.bounded_aggregate(parts, shape, dev, merge, bound, "sum_over_r")
        total = torch.zeros(_numel(shape), dtype=torch.float32, device=dev)
        for i, part in enumerate(parts):
            if part.shape != shape:
                raise ValueError(f"contribution of shape {part.shape} for a tensor of shape {shape}")
            values = self._values(part).to(dev)
            if merge is not None and not merge.plain:
                values = values * float(merge.scales[i] * merge.weights[i])
            total += values
        if merge is not None and not merge.plain:
            return (total / float(sum(merge.weights))).reshape(shape)
        return (total / float(len(parts))).reshape(shape)
