"""SparseLoCo reference codec (pure PyTorch, fp32): error feedback, per-chunk top-k, 2-bit values.

This module is the specification the C++/CUDA kernels must reproduce bit for bit.

Encode one tensor (``sparseloco_encode_``), given its fp32 error-feedback buffer ``ef``:
 1. ``ef = ef * f32(β)`` then ``ef = ef + Δ`` (two fp32 operations, no FMA).
 2. Cut ``ef`` into chunks (``chunking.ChunkLayout``: 64×64-style blocks for 2-D, 64-element
    runs otherwise, short last run allowed).
 3. Per chunk keep ``k`` elements by |value| with the tie rule **larger |v| first, then lower local
    index**: let ``t`` be the k-th largest |v| in the chunk; keep every element with ``|v| > t``
    and, among those with ``|v| == t``, the lowest local indices until ``k`` are kept. Selected
    elements are emitted in ascending local index, chunks in ascending chunk id.
 4. Quantize the selected values with per-tensor statistics (``quantizers``), or send them as
    fp16/fp32 with quantizer ``none`` (fp16 saturates at ±65504; EF keeps the remainder).
 5. ``ef[selected] = ef[selected] − dequant`` (fp32), so ``β·e_before + Δ == e_after + sent``.
 6. Buffers: ``indices`` = local indices packed ``index_bits`` wide (``bitpack`` layout),
    ``codes`` = 2-bit codes packed four per byte + ``centroids`` = 4 × fp32 (decode =
    ``centroids[code]``); or ``values`` (fp16/fp32) for quantizer ``none``.

Aggregation over replicas (``decode_aggregate``): each contribution is scattered in list order
(rank order) into an fp32 sum; ``mean_selected`` divides every coordinate by the number of
replicas that selected it (coordinates nobody selected stay 0), ``sum_over_r`` divides by R.

Kernels (``distrain.comm.kernels``): ``encode_`` and ``SparseLoCoCodec`` run the C++/CUDA kernel for the
tensors' device when one is loaded and this reference otherwise; this module registers the
reference as the kernels' fallback (the kernels never import the codec). ``validate`` keeps the
indices it decoded in ``EncodedTensor.cache``, so the reference ``decode_aggregate`` does not
decode a frame twice.
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
    require_int,
)
from distrain.comm import kernels
from distrain.comm.coords import CoordBound
from distrain.comm.codecs.bitpack import pack_bits, packed_nbytes, padding_is_zero, unpack_bits
from distrain.comm.codecs.index_coding import INDEX_CODINGS, decode_indices, encode_indices, index_nbytes
from distrain.comm.codecs.quantizers import LEVELS, QUANTIZERS, quantize
from distrain.comm.errors import IndexRangeError, NonFiniteError, SchemaError
from distrain.comm.kernels.geometry import ChunkLayout, chunk_layout

AGGREGATIONS = ("mean_selected", "sum_over_r")
VALUE_DTYPES = {"fp16": ("f2", np.dtype("<f2"), torch.float16), "fp32": ("f4", np.dtype("<f4"), torch.float32)}
MAX_CHUNK = 4096  # block side; keeps index fields ≤ 24 bits


def select_topk(chunks: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask with exactly ``k`` True per row: largest |v| first, ties to the lower index."""
    mag = chunks.abs()
    kth = torch.topk(mag, k, dim=1, largest=True, sorted=True).values[:, k - 1 : k]
    mask = mag >= kth
    surplus = (mask.sum(dim=1) > k).nonzero(as_tuple=True)[0]
    if surplus.numel():  # rows where ties at the k-th value exceed the room: lowest indices win
        sub = mag[surplus]
        above = sub > kth[surplus]
        ties = sub == kth[surplus]
        room = k - above.sum(dim=1, keepdim=True)
        mask[surplus] = above | (ties & (torch.cumsum(ties.to(torch.int64), dim=1) <= room))
    return mask


def select_sparse(x: torch.Tensor, layout: ChunkLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of ``x`` per chunk: (chunk ids, local indices, values), ascending (chunk, index)."""
    full, last = layout.to_chunks(x)
    ids: list[torch.Tensor] = []
    local: list[torch.Tensor] = []
    vals: list[torch.Tensor] = []
    if full.shape[0]:
        c, i = select_topk(full, layout.k_full).nonzero(as_tuple=True)
        ids.append(c)
        local.append(i)
        vals.append(full[c, i])
    if last is not None:
        _, i = select_topk(last.reshape(1, -1), layout.k_last).nonzero(as_tuple=True)
        ids.append(torch.full_like(i, layout.n_chunks - 1))
        local.append(i)
        vals.append(last[i])
    return torch.cat(ids), torch.cat(local), torch.cat(vals)


def sparseloco_encode_(
    ef: torch.Tensor,
    delta: torch.Tensor,
    *,
    beta: float,
    topk: int,
    chunk: int,
    quantizer: str,
    value_dtype: str = "fp16",
    index_coding: str = "packed",
) -> EncodedTensor:
    """Fold ``delta`` into the error buffer ``ef`` (in place), select, quantize, and pack."""
    if ef.dtype != torch.float32 or not ef.is_contiguous():
        raise TypeError(f"error-feedback buffer must be contiguous float32, got {ef.dtype}")
    if ef.shape != delta.shape:
        raise ValueError(f"delta shape {tuple(delta.shape)} differs from buffer shape {tuple(ef.shape)}")
    if not torch.isfinite(delta).all():
        raise ValueError("pseudo-gradient contains NaN or Inf")
    if quantizer not in QUANTIZERS or value_dtype not in VALUE_DTYPES or index_coding not in INDEX_CODINGS:
        raise ValueError(f"unknown quantizer {quantizer!r}, value dtype {value_dtype!r} or index coding {index_coding!r}")
    layout = chunk_layout(check_shape(tuple(ef.shape)), chunk, topk)
    ef.mul_(beta).add_(delta.to(torch.float32))
    flat = ef.view(-1)
    ids, local, vals = select_sparse(ef, layout)
    buffers: dict[str, np.ndarray] = {
        "indices": encode_indices(index_coding, local.cpu().numpy(), layout.chunk_ks().numpy(), layout.index_bits)
    }
    if quantizer == "none":
        _, np_dtype, t_dtype = VALUE_DTYPES[value_dtype]
        # Saturate instead of overflowing to inf; error feedback keeps the clipped remainder.
        limit = torch.finfo(t_dtype).max
        sent_vals = vals.clamp(-limit, limit).to(t_dtype)
        dequant = sent_vals.to(torch.float32)
        buffers["values"] = sent_vals.cpu().numpy().astype(np_dtype, copy=False)
    else:
        codes, centroids = quantize(quantizer, vals)
        dequant = centroids[codes.long()]
        buffers["codes"] = pack_bits(codes.cpu().numpy(), 2)
        buffers["centroids"] = centroids.cpu().numpy().astype("<f4")
    gidx = layout.global_index(ids, local)
    flat[gidx] = flat[gidx] - dequant
    meta: dict[str, MetaValue] = {"chunk": layout.n_full, "k": layout.k_full, "nnz": layout.nnz}
    return EncodedTensor(shape=layout.shape, meta=meta, buffers=buffers)


def encode_(
    ef: torch.Tensor,
    delta: torch.Tensor,
    *,
    beta: float,
    topk: int,
    chunk: int,
    quantizer: str,
    value_dtype: str = "fp16",
    index_coding: str = "packed",
) -> EncodedTensor:
    """``sparseloco_encode_`` by the kernel for ``ef``'s device when one is loaded (same bits)."""
    kw = dict(beta=beta, topk=topk, chunk=chunk, quantizer=quantizer, value_dtype=value_dtype,
              index_coding=index_coding)
    if kernels.backend(ef.device) == "reference":
        return sparseloco_encode_(ef, delta, **kw)
    idx, vals, cents = kernels.encode(ef, delta, **kw)
    layout = chunk_layout(check_shape(tuple(ef.shape)), chunk, topk)
    buffers = {"indices": idx.numpy()}
    if quantizer == "none":
        buffers["values"] = vals.numpy().astype(VALUE_DTYPES[value_dtype][1], copy=False)
    else:
        buffers["codes"] = vals.numpy()
        buffers["centroids"] = cents.numpy().astype("<f4", copy=False)
    meta: dict[str, MetaValue] = {"chunk": layout.n_full, "k": layout.k_full, "nnz": layout.nnz}
    return EncodedTensor(shape=layout.shape, meta=meta, buffers=buffers)


def decode_local(layout: ChunkLayout, index_coding: str, buf: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunk id, local index) of every field of an ``indices`` buffer; structure errors raise."""
    ks = layout.chunk_ks()
    local = torch.from_numpy(decode_indices(index_coding, buf, ks.numpy(), layout.index_bits))
    return torch.repeat_interleave(torch.arange(layout.n_chunks), ks), local


def check_local(layout: ChunkLayout, ids: torch.Tensor, local: torch.Tensor) -> None:
    """Every local index inside its chunk and strictly increasing within it; else IndexRangeError."""
    limit = layout.chunk_sizes()[ids]
    bad = local >= limit
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise IndexRangeError(f"index {int(local[i])} out of range for chunk {int(ids[i])} of {int(limit[i])} elements")
    same_chunk = ids[1:] == ids[:-1]
    if (same_chunk & (local[1:] <= local[:-1])).any():
        raise IndexRangeError("indices within a chunk are not strictly increasing")


def values_of(quantizer: str, buffers: dict[str, np.ndarray], nnz: int) -> torch.Tensor:
    """The fp32 values a contribution sends (dequantized codes, or its fp16/fp32 values)."""
    if quantizer == "none":
        return torch.from_numpy(np.asarray(buffers["values"]).astype(np.float32))
    codes = torch.from_numpy(unpack_bits(buffers["codes"], nnz, 2))
    return torch.from_numpy(np.asarray(buffers["centroids"]).astype(np.float32))[codes]


def aggregate(contributions: list[tuple[torch.Tensor, torch.Tensor]], numel: int, aggregation: str,
              device: torch.device, merge: Merge | None = None) -> torch.Tensor:
    """Scatter (flat index, value) contributions in list order into an fp32 sum on ``device``.

    Within one contribution every index appears once, so ``index_add_`` has no colliding adds
    and the per-coordinate order is the list order on every device. Under a ``merge`` each
    contribution's values are scaled and weighted, and the divisor is the weights' sum (over the
    selectors, for ``mean_selected``) instead of the count.
    """
    weighted = merge is not None and not merge.plain
    total = torch.zeros(numel, dtype=torch.float32, device=device)
    count = torch.zeros(numel, dtype=torch.float32, device=device) if aggregation == "mean_selected" else None
    for i, (gidx, vals) in enumerate(contributions):
        gidx, vals = gidx.to(device), vals.to(device)
        weight = float(merge.weights[i]) if weighted else 1.0
        total.index_add_(0, gidx, vals * float(merge.scales[i] * weight) if weighted else vals)
        if count is not None:
            count.index_add_(0, gidx, torch.full_like(vals, weight))
    if count is not None:
        return total / (count.clamp(min=1.0) if not weighted else torch.where(count > 0, count, 1.0))
    return total / (float(sum(merge.weights)) if weighted else float(len(contributions)))


class SparseLoCoCodec(Codec):
    """SparseLoCo: error feedback + per-chunk top-k + 2-bit quantization + bit packing."""

    kind = "sparseloco"

    def __init__(
        self,
        topk: int = 64,
        chunk: int = 64,
        beta: float = 0.95,
        quantizer: str = "reference",
        aggregation: str = "mean_selected",
        value_dtype: str = "fp16",
        index_coding: str = "packed",
    ) -> None:
        self.topk = require_int("topk", topk, 1, 4096)
        self.chunk = require_int("chunk", chunk, 1, MAX_CHUNK)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
        self.beta = float(beta)
        self.quantizer = require_choice("quantizer", quantizer, QUANTIZERS)
        self.aggregation = require_choice("aggregation", aggregation, AGGREGATIONS)
        self.value_dtype = require_choice("value_dtype", value_dtype, tuple(VALUE_DTYPES))
        self.index_coding = require_choice("index_coding", index_coding, INDEX_CODINGS)
        if self.index_coding == "gaps" and self.chunk > 256:
            raise ValueError(f"index_coding 'gaps' stores uint16 gaps: chunk must be <= 256, got {self.chunk}")

    def params(self) -> dict[str, MetaValue]:
        return {
            "topk": self.topk,
            "chunk": self.chunk,
            "beta": self.beta,
            "quantizer": self.quantizer,
            "aggregation": self.aggregation,
            "value_dtype": self.value_dtype,
            "index_coding": self.index_coding,
        }

    def layout(self, shape: tuple[int, ...]) -> ChunkLayout:
        return chunk_layout(check_shape(shape), self.chunk, self.topk)

    def encode(self, name: str, delta: torch.Tensor, state: CodecState) -> EncodedTensor:
        ef = state.get(name)
        if ef is None:
            ef = state[name] = torch.zeros(delta.shape, dtype=torch.float32, device=delta.device)
        return encode_(ef, delta, beta=self.beta, topk=self.topk, chunk=self.chunk,
                       quantizer=self.quantizer, value_dtype=self.value_dtype,
                       index_coding=self.index_coding)

    def expected_meta(self, shape: tuple[int, ...]) -> dict[str, MetaValue]:
        lay = self.layout(shape)
        return {"chunk": lay.n_full, "k": lay.k_full, "nnz": lay.nnz}

    def buffer_layout(self, shape: tuple[int, ...]) -> dict[str, BufferSpec]:
        lay = self.layout(shape)
        specs = {"indices": BufferSpec("u1", index_nbytes(self.index_coding, lay.nnz, lay.index_bits))}
        if self.quantizer == "none":
            specs["values"] = BufferSpec(VALUE_DTYPES[self.value_dtype][0], lay.nnz)
        else:
            specs["codes"] = BufferSpec("u1", packed_nbytes(lay.nnz, 2))
            specs["centroids"] = BufferSpec("f4", LEVELS)
        return specs

    def _check_structure(self, et: EncodedTensor) -> ChunkLayout:
        """Buffers of exactly the expected names, dtypes and sizes; SchemaError otherwise."""
        try:
            check_layout(et, self.buffer_layout(et.shape))
        except ValueError as exc:
            raise SchemaError(f"sparseloco tensor {et.shape}: {exc}") from None
        return self.layout(et.shape)

    def _cache_key(self, et: EncodedTensor) -> tuple:
        """What a validation result depends on: geometry and coding, metadata, the very buffers."""
        return ((self.chunk, self.topk, self.index_coding, self.quantizer, self.value_dtype),
                et.shape, dict(et.meta), tuple(et.buffers.items()))

    def _validated(self, et: EncodedTensor) -> tuple[ChunkLayout, torch.Tensor, torch.Tensor] | None:
        """(layout, chunk ids, local indices) kept by ``validate`` for these buffers, else None."""
        hit = et.cache.get(self.kind)
        if hit is None:
            return None
        (params, shape, meta, items), decoded = hit
        now = self._cache_key(et)
        same_buffers = len(items) == len(now[3]) and all(
            a[0] == b[0] and a[1] is b[1] for a, b in zip(items, now[3]))
        return decoded if (params, shape, meta) == now[:3] and same_buffers else None

    def validate(self, et: EncodedTensor) -> None:
        """Structure, metadata, padding, index ranges and order, finiteness; FrameError subclasses.

        The decoded indices are kept in ``et.cache`` (keyed by this codec's geometry and the
        identity of the buffers, which are read-only views of a received frame), so
        ``decode_aggregate`` uses them instead of decoding again.
        """
        lay = self._check_structure(et)
        ids, local = decode_local(lay, self.index_coding, et.buffers["indices"])
        if et.meta != self.expected_meta(et.shape):
            raise SchemaError(f"metadata {et.meta} differs from expected {self.expected_meta(et.shape)}")
        if "codes" in et.buffers and not padding_is_zero(et.buffers["codes"], lay.nnz, 2):
            raise SchemaError("non-zero padding bits after the last code")
        check_local(lay, ids, local)
        for name in ("values", "centroids"):
            if name in et.buffers and not np.isfinite(et.buffers[name]).all():
                raise NonFiniteError(f"buffer {name!r} contains NaN or Inf")
        et.cache[self.kind] = (self._cache_key(et), (lay, ids, local))

    def decode(self, et: EncodedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One contribution as (row-major flat indices int64, fp32 values); validates it first
        unless ``validate`` already did (and then reuses its decoded indices)."""
        decoded = self._validated(et)
        if decoded is None:
            self.validate(et)
            decoded = self._validated(et)
            assert decoded is not None
        lay, ids, local = decoded
        return lay.global_index(ids, local), values_of(self.quantizer, et.buffers, lay.nnz)

    def chunk_layout(self, shape: tuple[int, ...], bound: CoordBound) -> ChunkLayout:
        return self.layout(shape)

    def decode_aggregate(self, parts: list[EncodedTensor], shape: tuple[int, ...],
                         device: torch.device | str | None = None, merge: Merge | None = None,
                         bound: CoordBound | None = None) -> torch.Tensor:
        """The kernels aggregate plain contributions; a weighted merge or an active per-coordinate
        bound takes the reference path."""
        shape = check_shape(shape)
        if not parts:
            raise ValueError("decode_aggregate needs at least one contribution")
        if merge is not None and len(merge.weights) != len(parts):
            raise ValueError(f"a merge of {len(merge.weights)} contributions for {len(parts)}")
        for part in parts:
            if part.shape != shape:
                raise ValueError(f"contribution of shape {part.shape} for a tensor of shape {shape}")
        dev = torch.device(device if device is not None else "cpu")
        if bound is not None and bound.active:
            return self.bounded_aggregate(parts, shape, dev, merge, bound, self.aggregation)
        if kernels.backend(dev) == "reference" or (merge is not None and not merge.plain):
            out = aggregate([self.decode(p) for p in parts], self.layout(shape).numel,
                            self.aggregation, dev, merge)
            return out.reshape(shape)
        lay = self.layout(shape)
        specs = self.buffer_layout(shape)
        for part in parts:  # the kernels check index ranges (and gap order) themselves
            try:
                check_layout(part, specs)
            except ValueError as exc:
                raise SchemaError(f"sparseloco tensor {part.shape}: {exc}") from None
            if self.index_coding == "packed" and not padding_is_zero(part.buffers["indices"], lay.nnz,
                                                                     lay.index_bits):
                raise SchemaError("non-zero padding bits after the last index")
        vname = "values" if self.quantizer == "none" else "codes"
        return kernels.decode_aggregate(
            [p.buffers["indices"] for p in parts], [p.buffers[vname] for p in parts],
            [p.buffers["centroids"] for p in parts] if self.quantizer != "none" else [],
            shape, topk=self.topk, chunk=self.chunk, quantizer=self.quantizer,
            aggregation=self.aggregation, value_dtype=self.value_dtype,
            index_coding=self.index_coding, device=dev)


# ---- the kernels' fallback: this reference, on raw tensors --------------------------------------
def _encode_reference_op(ef: torch.Tensor, delta: torch.Tensor, beta: float, topk: int, chunk: int,
                         quantizer: str, value_dtype: str,
                         index_coding: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    et = sparseloco_encode_(ef, delta, beta=beta, topk=topk, chunk=chunk, quantizer=quantizer,
                            value_dtype=value_dtype, index_coding=index_coding)
    idx = torch.from_numpy(np.ascontiguousarray(et.buffers["indices"]))
    if quantizer == "none":
        return idx, torch.from_numpy(np.ascontiguousarray(et.buffers["values"])), torch.empty(0)
    return (idx, torch.from_numpy(np.ascontiguousarray(et.buffers["codes"])),
            torch.from_numpy(np.ascontiguousarray(et.buffers["centroids"])))


def _decode_reference_op(indices: list[torch.Tensor], values: list[torch.Tensor],
                         centroids: list[torch.Tensor], shape: list[int], topk: int, chunk: int,
                         quantizer: str, aggregation: str, value_dtype: str,
                         index_coding: str) -> torch.Tensor:
    """The op's contract: raw buffers in, the aggregate on the buffers' device out, the same
    errors as the kernels (structure, index range, gap order)."""
    layout = chunk_layout(check_shape(tuple(shape)), chunk, topk)
    contributions = []
    for r in range(len(indices)):
        bufs = {"values" if quantizer == "none" else "codes": values[r].cpu().numpy()}
        if quantizer != "none":
            bufs["centroids"] = centroids[r].cpu().numpy()
        ids, local = decode_local(layout, index_coding, indices[r].cpu().numpy())
        check_local(layout, ids, local)
        contributions.append((layout.global_index(ids, local), values_of(quantizer, bufs, layout.nnz)))
    device = indices[0].device if indices else torch.device("cpu")
    return aggregate(contributions, layout.numel, aggregation, device).reshape(layout.shape)


kernels.register_reference("sparseloco_encode", _encode_reference_op)
kernels.register_reference("sparseloco_decode_aggregate", _decode_reference_op)
