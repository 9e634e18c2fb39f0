"""Chunk geometry of SparseLoCo: how a tensor is cut into chunks, and the sizes of packed fields.

It sits below both the codecs (the specification) and the kernel bindings, and imports neither, so
the kernels take "tensors and geometry" without knowing any codec.

* 2-D tensors (rows × cols): blocks of ``cr × cc`` where ``cr`` is the largest divisor of ``rows``
  that is ≤ ``chunk`` and ``cc`` likewise for ``cols``; every chunk has ``n = cr·cc`` elements.
  Chunks are numbered row-major over the block grid (``c = bi·(cols/cc) + bj``) and an element's
  local index inside its chunk is row-major inside the block (``l = r·cc + col``).
* Every other tensor (1-D, 0-D, ≥3-D) is flattened (row-major) and cut into consecutive chunks of
  ``chunk`` elements; the last chunk is shorter when ``numel`` is not a multiple (no padding). The
  local index is the offset inside the chunk.

k per chunk: ``k(n) = min(n, max(1, round_half_up(topk·n / 4096)))`` computed in integers as
``(2·topk·n + 4096) // 8192``, so a 4096-element chunk keeps exactly ``topk``. A short last 1-D
chunk gets its own ``k(n_last)``. Index fields are ``bits = ceil(log2(n_full))`` wide (12 for
4096; 0 when ``n_full = 1``) where ``n_full`` is the size of the first (full) chunk.
"""


from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import cached_property

import torch

REFERENCE_CHUNK_NUMEL = 4096


def largest_divisor_at_most(n: int, limit: int) -> int:
    """Largest divisor of ``n`` that is ≤ ``limit`` (≥ 1)."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


def k_for(n: int, topk: int) -> int:
    """Elements kept in a chunk of ``n`` elements when ``topk`` are kept per 4096."""
    return min(n, max(1, (2 * topk * n + REFERENCE_CHUNK_NUMEL) // (2 * REFERENCE_CHUNK_NUMEL)))


@dataclass(frozen=True)
class ChunkLayout:
    """Chunk geometry of one tensor shape for given ``chunk`` and ``topk`` parameters."""

    shape: tuple[int, ...]
    chunk: int
    topk: int

    @cached_property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_2d(self) -> bool:
        return len(self.shape) == 2

    @cached_property
    def block(self) -> tuple[int, int]:
        """(cr, cc) for 2-D tensors; (1, chunk length) for flattened tensors."""
        if self.is_2d:
            rows, cols = self.shape
            return largest_divisor_at_most(rows, self.chunk), largest_divisor_at_most(cols, self.chunk)
        return 1, min(self.chunk, self.numel)

    @cached_property
    def n_full(self) -> int:
        """Elements in a full chunk (every chunk for 2-D; all but possibly the last for 1-D)."""
        cr, cc = self.block
        return cr * cc

    @cached_property
    def n_chunks(self) -> int:
        return -(-self.numel // self.n_full)

    @cached_property
    def n_last(self) -> int:
        """Elements in the last chunk (== n_full unless a flattened tensor has a remainder)."""
        return self.numel - (self.n_chunks - 1) * self.n_full

    @cached_property
    def k_full(self) -> int:
        return k_for(self.n_full, self.topk)

    @cached_property
    def k_last(self) -> int:
        return k_for(self.n_last, self.topk)

    @cached_property
    def nnz(self) -> int:
        """Total selected elements of the tensor."""
        return (self.n_chunks - 1) * self.k_full + self.k_last

    @cached_property
    def index_bits(self) -> int:
        return (self.n_full - 1).bit_length()

    def chunk_sizes(self) -> torch.Tensor:
        """Element count of every chunk (int64)."""
        sizes = torch.full((self.n_chunks,), self.n_full, dtype=torch.int64)
        sizes[-1] = self.n_last
        return sizes

    def chunk_ks(self) -> torch.Tensor:
        """Selected count of every chunk (int64)."""
        ks = torch.full((self.n_chunks,), self.k_full, dtype=torch.int64)
        ks[-1] = self.k_last
        return ks

    def to_chunks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split ``x`` into (full chunks [m, n_full], short last chunk [n_last] or None)."""
        if self.is_2d:
            rows, cols = self.shape
            cr, cc = self.block
            blocks = x.reshape(rows // cr, cr, cols // cc, cc).permute(0, 2, 1, 3)
            return blocks.reshape(self.n_chunks, self.n_full), None
        flat = x.reshape(-1)
        if self.n_last == self.n_full:
            return flat.reshape(self.n_chunks, self.n_full), None
        split = (self.n_chunks - 1) * self.n_full
        return flat[:split].reshape(self.n_chunks - 1, self.n_full), flat[split:]

    def global_index(self, chunk_ids: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """Row-major flat index into the tensor of (chunk id, local index) pairs."""
        if self.is_2d:
            _, cols = self.shape
            cr, cc = self.block
            nbj = cols // cc
            row = (chunk_ids // nbj) * cr + local // cc
            col = (chunk_ids % nbj) * cc + local % cc
            return row * cols + col
        return chunk_ids * self.n_full + local


INDEX_CODINGS = ("packed", "gaps")


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes needed for ``count`` fixed-width fields of ``bits`` bits (``bitpack`` layout)."""
    return (count * bits + 7) // 8


def index_nbytes(coding: str, nnz: int, index_bits: int) -> int:
    """Bytes of an ``indices`` buffer: packed fields, or two uint16 byte planes for ``gaps``."""
    if coding not in INDEX_CODINGS:
        raise ValueError(f"unknown index coding {coding!r} ({', '.join(INDEX_CODINGS)})")
    return packed_nbytes(nnz, index_bits) if coding == "packed" else 2 * nnz


@functools.lru_cache(maxsize=4096)
def chunk_layout(shape: tuple[int, ...], chunk: int, topk: int) -> ChunkLayout:
    """Cached layout: a model has few distinct shapes, and every round asks for the same ones."""
    lay = ChunkLayout(tuple(int(s) for s in shape), int(chunk), int(topk))
    lay.numel, lay.block  # noqa: B018 - fill the cached properties
    return lay
