"""Fixed-width bit fields packed into a little-endian bit stream.

Layout (the kernels follow it): field ``i`` of width ``b`` occupies stream bits
``[i*b, (i+1)*b)``; stream bit ``j`` is bit ``j % 8`` (LSB = 0) of byte ``j // 8``; within a field
the least significant bit comes first. Unused bits of the last byte are zero. For ``b = 2`` this
is "four codes per byte, first code in the two low bits". Fields are at most 25 bits wide so that
every field lies inside one 32-bit little-endian word starting at its first byte.
"""

from __future__ import annotations

import numpy as np

from distrain.comm.kernels.geometry import packed_nbytes

MAX_FIELD_BITS = 25

__all__ = ["MAX_FIELD_BITS", "pack_bits", "packed_nbytes", "padding_is_zero", "unpack_bits"]


def _check_bits(bits: int) -> None:
    if not 0 <= bits <= MAX_FIELD_BITS:
        raise ValueError(f"field width {bits} outside 0..{MAX_FIELD_BITS}")


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integers (each < 2**bits) into a uint8 array."""
    _check_bits(bits)
    vals = np.ascontiguousarray(values, dtype=np.int64).reshape(-1)
    nbytes = packed_nbytes(vals.size, bits)
    if vals.size and (vals.min() < 0 or vals.max() >= (1 << bits)):
        raise ValueError(f"values outside 0..{(1 << bits) - 1} cannot be packed in {bits} bits")
    if nbytes == 0:
        return np.zeros(0, dtype=np.uint8)
    start = np.arange(vals.size, dtype=np.int64) * bits
    first = start >> 3
    word = vals << (start & 7)  # < 2**32: the field inside a 4-byte window
    out = np.zeros(nbytes + 4, dtype=np.float64)
    for t in range(4):
        # Fields never share bits, so summing their byte contributions equals OR-ing them.
        out += np.bincount(first + t, weights=((word >> (8 * t)) & 0xFF), minlength=nbytes + 4)
    return out[:nbytes].astype(np.uint8)


def unpack_bits(buf: np.ndarray, count: int, bits: int) -> np.ndarray:
    """Inverse of ``pack_bits``: ``count`` fields as int64. ``buf`` must hold exactly enough bytes."""
    _check_bits(bits)
    data = np.ascontiguousarray(buf, dtype=np.uint8).reshape(-1)
    if data.size != packed_nbytes(count, bits):
        raise ValueError(f"{data.size} bytes cannot hold exactly {count} fields of {bits} bits")
    if bits == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    padded = np.concatenate([data, np.zeros(4, dtype=np.uint8)]).astype(np.int64)
    start = np.arange(count, dtype=np.int64) * bits
    first = start >> 3
    word = padded[first] | (padded[first + 1] << 8) | (padded[first + 2] << 16) | (padded[first + 3] << 24)
    return (word >> (start & 7)) & ((1 << bits) - 1)


def padding_is_zero(buf: np.ndarray, count: int, bits: int) -> bool:
    """True when the unused high bits of the last byte are zero (canonical encoding)."""
    used = count * bits
    if used % 8 == 0 or buf.size == 0:
        return True
    return int(buf[-1]) >> (used % 8) == 0
