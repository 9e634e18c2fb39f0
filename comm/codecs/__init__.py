"""Codecs for pseudo-gradients: SparseLoCo (sparse, 2-bit) and dense (fp32/bf16), one interface."""

from __future__ import annotations

from typing import Any

from distrain.comm.codecs.base import BufferSpec, Codec, CodecState, EncodedTensor, Merge
from distrain.comm.codecs.dense import DenseCodec
from distrain.comm.codecs.sparseloco import SparseLoCoCodec, sparseloco_encode_

CODECS: dict[str, type[Codec]] = {SparseLoCoCodec.kind: SparseLoCoCodec, DenseCodec.kind: DenseCodec}


def make_codec(kind: str, **params: Any) -> Codec:
    """Build a codec by kind ("sparseloco" | "dense"); unknown kinds or parameters are errors."""
    cls = CODECS.get(kind)
    if cls is None:
        raise ValueError(f"unknown codec kind {kind!r} (known: {', '.join(sorted(CODECS))})")
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"codec {kind!r}: {exc}") from None


__all__ = [
    "BufferSpec",
    "Codec",
    "CodecState",
    "DenseCodec",
    "EncodedTensor",
    "Merge",
    "SparseLoCoCodec",
    "make_codec",
    "sparseloco_encode_",
]
