"""The Codec interface shared by the SparseLoCo and dense codecs.

A codec turns one replica's pseudo-gradient for one named tensor into an ``EncodedTensor``
(named little-endian numpy buffers plus small metadata, ready for a wire frame), and turns the
encoded contributions of all replicas back into one aggregated fp32 tensor. Codec state (the
error-feedback buffers) lives in a caller-owned dict keyed by tensor name, so checkpointing it
is the caller's choice and the codec object itself stays immutable.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from distrain.comm.coords import CoordBound, bounded_mean, clip_parts
from distrain.comm.kernels.geometry import ChunkLayout, chunk_layout

MetaValue = int | float | str
CodecState = dict[str, torch.Tensor]

# numpy dtypes allowed on the wire, by their short name in frame headers.
WIRE_DTYPES: dict[str, np.dtype] = {
    "u1": np.dtype("<u1"),
    "u2": np.dtype("<u2"),
    "f2": np.dtype("<f2"),
    "f4": np.dtype("<f4"),
}


def wire_dtype_name(dtype: np.dtype) -> str:
    """Short wire name of a numpy dtype; ValueError if it is not allowed on the wire."""
    for name, dt in WIRE_DTYPES.items():
        if np.dtype(dtype) == dt:
            return name
    raise ValueError(f"dtype {dtype} is not a wire dtype ({', '.join(WIRE_DTYPES)})")


@dataclass(frozen=True)
class EncodedTensor:
    """One tensor's encoded contribution: 1-D little-endian buffers and scalar metadata."""

    shape: tuple[int, ...]
    meta: dict[str, MetaValue] = field(default_factory=dict)
    buffers: dict[str, np.ndarray] = field(default_factory=dict)
    # What a codec's ``validate`` decoded, so that decoding does not repeat it (see
    # ``SparseLoCoCodec.validate``). Not part of the value: never compared, copied or sent.
    cache: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def nbytes(self) -> int:
        """Payload bytes of all buffers (what the wire carries before zstd)."""
        return int(sum(b.nbytes for b in self.buffers.values()))


@dataclass(frozen=True)
class BufferSpec:
    """Expected dtype and element count of one buffer (used to validate frames before decoding)."""

    dtype: str
    count: int

    @property
    def nbytes(self) -> int:
        return self.count * WIRE_DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Merge:
    """How unequal contributions combine: contribution i's values are multiplied by ``scales[i]`` and
    weigh ``weights[i]`` in the mean — Σ wᵢ·sᵢ·vᵢ / Σ wᵢ over the contributions that count for a
    coordinate (all of them, or those that selected it, as the codec's aggregation says)."""

    scales: tuple[float, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.scales) != len(self.weights):
            raise ValueError(f"{len(self.scales)} scales for {len(self.weights)} weights")
        if not all(math.isfinite(x) and x > 0 for x in (*self.scales, *self.weights)):
            raise ValueError("merge scales and weights must be finite and positive")

    @property
    def plain(self) -> bool:
        """Every contribution as sent, with weight 1 (the codecs' own aggregation)."""
        return all(x == 1.0 for x in (*self.scales, *self.weights))


class Codec(ABC):
    """Encode per-tensor pseudo-gradients; decode and aggregate all replicas' contributions."""

    kind: ClassVar[str]

    @abstractmethod
    def params(self) -> dict[str, MetaValue]:
        """Wire-serialisable parameters; ``make_codec(self.kind, **self.params())`` rebuilds it."""

    @abstractmethod
    def encode(self, name: str, delta: torch.Tensor, state: CodecState) -> EncodedTensor:
        """Encode ``delta`` (the pseudo-gradient of tensor ``name``), updating ``state`` in place."""

    @abstractmethod
    def decode_aggregate(self, parts: list[EncodedTensor], shape: tuple[int, ...],
                         device: torch.device | str | None = None,
                         merge: Merge | None = None, bound: CoordBound | None = None) -> torch.Tensor:
        """Aggregate the replicas' contributions (missing replicas already removed) to fp32.

        The result lies on ``device`` (None: CPU), the device of the weights it will update, and
        is bit-identical whatever the device. ``merge``: per-contribution scales and weights for
        contributions of unequal work (None: every contribution as sent, weight 1). ``bound``:
        per-coordinate bounds (``distrain.comm.coords``), applied after the merge's scales.
        """

    @abstractmethod
    def decode(self, et: EncodedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One contribution as (row-major flat indices int64, fp32 values), on the CPU; validates it."""

    def chunk_layout(self, shape: tuple[int, ...], bound: CoordBound) -> ChunkLayout:
        """The chunks a per-coordinate bound estimates its scales over (the codec's own geometry,
        else ``bound.chunk`` blocks)."""
        return chunk_layout(tuple(shape), bound.chunk, 64)

    def bounded_aggregate(self, parts: list[EncodedTensor], shape: tuple[int, ...], device: torch.device,
                          merge: Merge | None, bound: CoordBound, aggregation: str) -> torch.Tensor:
        """Decode, scale by the merge, cut per coordinate, and combine (``coords.bounded_mean``)."""
        decoded = [self.decode(p) for p in parts]
        weights: tuple[float, ...] = (1.0,) * len(parts)
        if merge is not None and not merge.plain:
            decoded = [(g, v * float(s)) if s != 1.0 else (g, v) for (g, v), s in zip(decoded, merge.scales)]
            weights = merge.weights
        layout = self.chunk_layout(shape, bound)
        if bound.clip > 0:
            decoded, _ = clip_parts(decoded, layout, bound.clip)
        return bounded_mean(decoded, layout.numel, weights, aggregation, bound.min_selectors, device).reshape(shape)

    @abstractmethod
    def expected_meta(self, shape: tuple[int, ...]) -> dict[str, MetaValue]:
        """Metadata an encoding of a tensor of ``shape`` must carry (validated on receipt)."""

    @abstractmethod
    def buffer_layout(self, shape: tuple[int, ...]) -> dict[str, BufferSpec]:
        """Exact buffers (name → dtype, element count) an encoding of ``shape`` must carry."""

    @abstractmethod
    def validate(self, et: EncodedTensor) -> None:
        """Check buffer contents (index ranges, finiteness); raise a ``FrameError`` subclass.

        A codec may keep what it decoded for the checks in ``et.cache`` for ``decode_aggregate``.
        """

    def payload_nbytes(self, shape: tuple[int, ...]) -> int:
        """Exact bytes of the raw buffers for a tensor of ``shape`` (before zstd, no header)."""
        return sum(spec.nbytes for spec in self.buffer_layout(shape).values())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and (self.kind, self.params()) == (other.kind, other.params())

    def __hash__(self) -> int:
        return hash((self.kind, tuple(sorted(self.params().items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def check_layout(et: EncodedTensor, layout: dict[str, BufferSpec]) -> None:
    """Raise ValueError unless ``et`` carries exactly the buffers of ``layout``."""
    if set(et.buffers) != set(layout):
        raise ValueError(f"buffers {sorted(et.buffers)} differ from expected {sorted(layout)}")
    for name, spec in layout.items():
        buf = et.buffers[name]
        if buf.ndim != 1 or buf.dtype != WIRE_DTYPES[spec.dtype] or buf.size != spec.count:
            raise ValueError(
                f"buffer {name!r}: got {buf.dtype}[{buf.size}] (ndim {buf.ndim}), "
                f"expected {WIRE_DTYPES[spec.dtype]}[{spec.count}]"
            )


def check_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Normalise a shape to a tuple of positive ints; ValueError otherwise."""
    out = tuple(int(s) for s in shape)
    if any(s <= 0 for s in out):
        raise ValueError(f"shape {shape} has an empty dimension")
    return out


def require_int(name: str, value: Any, lo: int, hi: int) -> int:
    """Typed parameter check used by codec constructors (params may come from a wire header)."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")
    return value


def require_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Typed parameter check: ``value`` must be one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value
