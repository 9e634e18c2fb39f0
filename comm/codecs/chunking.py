"""How a tensor is cut into SparseLoCo chunks: defined in ``distrain.comm.kernels.geometry``.

The geometry lives there, below both the codecs and the kernel bindings (which must not import
codecs); this module keeps the codec-side name.
"""

from distrain.comm.kernels.geometry import (
    REFERENCE_CHUNK_NUMEL,
    ChunkLayout,
    chunk_layout,
    k_for,
    largest_divisor_at_most,
)

__all__ = ["REFERENCE_CHUNK_NUMEL", "ChunkLayout", "chunk_layout", "k_for", "largest_divisor_at_most"]
