"""Token shards: a 64-byte versioned header followed by little-endian token ids, read by memmap.

Header (little-endian): magic ``b"DTRNTOK\\0"`` (8 bytes), version (uint32), dtype code (uint32:
1 = uint16, 2 = uint32), token count (uint64), vocab size (uint32), zero padding to 64 bytes.
Tokens are uint16 when the vocabulary fits (half the disk and page cache), else uint32.
Readers check magic, version, dtype and that the file size is exactly header + count·itemsize, so
a truncated or foreign file is reported instead of being trained on.
"""

from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

MAGIC = b"DTRNTOK\0"
VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIQI")  # magic, version, dtype code, count, vocab size
DTYPES: dict[int, np.dtype] = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
_WRITE_CHUNK = 1 << 22  # tokens converted per write, bounding the extra memory of a dtype change


class ShardFormatError(ValueError):
    """A file is not a valid token shard; the message names the file and the problem."""


@dataclass(frozen=True)
class ShardHeader:
    version: int
    dtype: np.dtype
    count: int
    vocab_size: int


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Smallest supported token dtype able to hold ids ``0 .. vocab_size-1``."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if vocab_size <= 2**16:
        return DTYPES[1]
    if vocab_size <= 2**32:
        return DTYPES[2]
    raise ValueError(f"vocab_size {vocab_size} does not fit 32-bit token ids")


def _code_of(dtype: np.dtype) -> int:
    return next(c for c, d in DTYPES.items() if d == dtype)


class ShardWriter:
    """Streams tokens into a shard; the file appears at ``path`` only when ``close()`` succeeds.

    Writing goes to a temporary file in the same folder, the header's count is filled in at the
    end, and an ``os.replace`` publishes it, so a crash never leaves a half-written shard behind.
    """

    def __init__(self, path: str | Path, vocab_size: int):
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.dtype = dtype_for_vocab(vocab_size)
        self.count = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._f = os.fdopen(fd, "wb")
        self._f.write(bytes(HEADER_SIZE))

    def write(self, tokens: np.ndarray | list[int]) -> None:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {arr.shape}")
        if arr.size == 0:
            return
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got range [{lo}, {hi}]")
        for start in range(0, arr.size, _WRITE_CHUNK):
            self._f.write(arr[start : start + _WRITE_CHUNK].astype(self.dtype, copy=False).tobytes())
        self.count += arr.size

    def close(self) -> None:
        """Fill in the header, flush to disk and publish the file."""
        if self._f.closed:
            return
        try:
            self._f.seek(0)
            header = _HEADER.pack(MAGIC, VERSION, _code_of(self.dtype), self.count, self.vocab_size)
            self._f.write(header.ljust(HEADER_SIZE, b"\0"))
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the temporary file; nothing is published."""
        if not self._f.closed:
            self._f.close()
        Path(self._tmp).unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int) -> Path:
    """Write ``tokens`` as a shard atomically (temp file + rename); dtype chosen from ``vocab_size``."""
    with ShardWriter(path, vocab_size) as w:
        w.write(tokens)
    return Path(path)


def read_header(path: str | Path) -> ShardHeader:
    """Parse and validate a shard's header and its size; raises ShardFormatError naming the problem."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"token shard not found: {p}")
    size = p.stat().st_size
    with open(p, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise ShardFormatError(f"{p}: truncated header ({len(raw)} of {HEADER_SIZE} bytes)")
    magic, version, code, count, vocab_size = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise ShardFormatError(f"{p}: bad magic {magic!r} (expected {MAGIC!r}); not a distrain token shard")
    if version != VERSION:
        raise ShardFormatError(f"{p}: unsupported version {version} (this reader handles version {VERSION})")
    if code not in DTYPES:
        raise ShardFormatError(f"{p}: unknown dtype code {code} (known: 1 = uint16, 2 = uint32)")
    dtype = DTYPES[code]
    expected = HEADER_SIZE + count * dtype.itemsize
    if size != expected:
        problem = "truncated" if size < expected else "trailing bytes"
        raise ShardFormatError(
            f"{p}: {problem}: file size {size} bytes, header says {count} {dtype.name} tokens = {expected} bytes"
        )
    if vocab_size < 1 or dtype_for_vocab(vocab_size) != dtype:
        raise ShardFormatError(f"{p}: vocab size {vocab_size} does not match dtype {dtype.name}")
    return ShardHeader(version=version, dtype=dtype, count=count, vocab_size=vocab_size)


def read_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard's tokens read-only (an empty array when it holds none)."""
    h = read_header(path)
    if h.count == 0:
        return np.zeros(0, dtype=h.dtype)  # mmap cannot map zero bytes
    return np.memmap(path, dtype=h.dtype, mode="r", offset=HEADER_SIZE, shape=(h.count,))
