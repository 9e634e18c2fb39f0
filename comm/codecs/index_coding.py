"""How a SparseLoCo tensor's selected local indices are laid out in its ``indices`` buffer.

- ``packed``: fixed-width fields (``index_bits`` = 12 for 4096-element chunks), the paper's format:
  exactly 12 bits per non-zero whatever the data.
- ``gaps``: within each chunk the ascending indices become gaps (first = the index itself, then
  differences ≥ 1), stored as little-endian uint16 split into two byte planes (all low bytes, then
  all high bytes). The buffer is 2 bytes per non-zero before compression, but the frame's zstd
  stage codes it at ~7.6 bits per index for top-64-of-4096 (gaps are roughly geometric with mean
  64 and the high-byte plane is nearly all zeros), instead of 12: lossless, and it is where
  distrain gets below the paper's 14 bits per non-zero.
"""

from __future__ import annotations

import numpy as np

from distrain.comm.codecs.bitpack import pack_bits, padding_is_zero, unpack_bits
from distrain.comm.errors import IndexRangeError, SchemaError
from distrain.comm.kernels.geometry import INDEX_CODINGS, index_nbytes

__all__ = ["INDEX_CODINGS", "decode_indices", "encode_indices", "index_nbytes"]


def _chunk_starts(ks: np.ndarray) -> np.ndarray:
    """Boolean mask over the nnz entries: True at the first selected entry of each chunk."""
    first = np.zeros(int(ks.sum()), dtype=bool)
    offsets = np.concatenate(([0], np.cumsum(ks)[:-1]))
    first[offsets[ks > 0]] = True
    return first


def encode_indices(coding: str, local: np.ndarray, ks: np.ndarray, index_bits: int) -> np.ndarray:
    """``local``: ascending local indices per chunk, chunks in order; ``ks``: entries per chunk."""
    local = np.ascontiguousarray(local, dtype=np.int64)
    if coding == "packed":
        return pack_bits(local, index_bits)
    gaps = np.empty_like(local)
    if local.size:
        gaps[0] = local[0]
        gaps[1:] = local[1:] - local[:-1]
        first = _chunk_starts(ks)
        gaps[first] = local[first]
    g16 = gaps.astype("<u2")
    return np.concatenate((g16 & 0xFF, g16 >> 8)).astype(np.uint8)


def decode_indices(coding: str, buf: np.ndarray, ks: np.ndarray, index_bits: int) -> np.ndarray:
    """Inverse of ``encode_indices``; structural problems raise ``SchemaError``/``IndexRangeError``."""
    nnz = int(ks.sum())
    if coding == "packed":
        if not padding_is_zero(buf, nnz, index_bits):
            raise SchemaError("non-zero padding bits after the last index")
        return unpack_bits(buf, nnz, index_bits)
    data = np.ascontiguousarray(buf, dtype=np.uint8)
    if data.size != 2 * nnz:
        raise SchemaError(f"gap-coded indices: {data.size} bytes for {nnz} entries")
    gaps = data[:nnz].astype(np.int64) | (data[nnz:].astype(np.int64) << 8)
    if nnz == 0:
        return gaps
    first = _chunk_starts(ks)
    if (gaps[~first] < 1).any():
        raise IndexRangeError("indices within a chunk are not strictly increasing (a gap is 0)")
    # cumulative sum restarted at every chunk start
    total = np.cumsum(gaps)
    base = np.where(first, total - gaps, 0)
    base = np.maximum.accumulate(base)
    return total - base
