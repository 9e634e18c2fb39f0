"""SparseLoCo encode / decode-aggregate as torch ops: C++ and CUDA kernels, the codec's reference as fallback.

``torch.ops.distrain.sparseloco_encode`` and ``torch.ops.distrain.sparseloco_decode_aggregate``
dispatch on the device of their tensor arguments. The ``CPU`` and ``CUDA`` implementations call
the ctypes libraries; when those are unavailable (not built, stale, ``DISTRAIN_KERNELS=reference``)
and for every other device (CompositeExplicitAutograd) they run the *reference* that the codec
registered with ``register_reference``: this module takes tensors and geometry and never imports
a codec, so the specification stays in ``distrain.comm.codecs`` and is handed down, not reached up for.
Registered with the low-level ``torch.library.Library`` API rather than ``custom_op``: the
latter's Python wrapper layers cost ~0.3 ms per call, more than the whole kernel on a small
tensor. Fake (meta) implementations let the ops appear in traced graphs.

Encode outputs are CPU tensors: the payload goes to the wire anyway, and reading the result back
is where the CUDA kernels' data errors are checked. The kernels check buffer sizes, dtypes and
devices themselves, so calling the ops directly (without ``distrain.comm.kernels``) cannot make the
libraries read or write out of bounds.

Outputs of encode: ``indices`` (uint8, packed), ``values`` (uint8 packed 2-bit codes, or fp16/fp32
values for quantizer ``none``) and ``centroids`` (4 × fp32, empty for ``none``).
"""

from __future__ import annotations

import ctypes
from typing import Callable

import numpy as np
import torch

from distrain.comm.errors import IndexRangeError
from distrain.comm.kernels import _lib
from distrain.comm.kernels.geometry import ChunkLayout, chunk_layout, index_nbytes, packed_nbytes


class KernelError(RuntimeError):
    """A kernel library rejected its arguments or a CUDA call failed (a bug, not bad data)."""


OPS = ("sparseloco_encode", "sparseloco_decode_aggregate")
_REFERENCES: dict[str, Callable[..., object]] = {}


def register_reference(op: str, fn: Callable[..., object]) -> None:
    """Install the torch reference of ``op`` (same arguments and results): the kernels' fallback."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r} (known: {', '.join(OPS)})")
    _REFERENCES[op] = fn


def _reference(op: str) -> Callable[..., object]:
    fn = _REFERENCES.get(op)
    if fn is None:
        raise KernelError(f"distrain::{op}: no kernel library loaded and no reference registered "
                          "(importing distrain.comm.codecs registers it)")
    return fn


_VALUE_TORCH = {"fp16": torch.float16, "fp32": torch.float32}


def geometry(layout: ChunkLayout) -> _lib.Geometry:
    """The ``dl_geometry`` of a chunk layout: 2-D tensors as they are, others flattened."""
    if layout.is_2d:
        rows, cols = layout.shape
        cr, cc = layout.block
    else:
        rows, cols, cr, cc = 1, layout.numel, 1, layout.n_full
    return _lib.Geometry(rows, cols, cr, cc, layout.k_full, layout.k_last, layout.index_bits, 0)


def _raise_for(status: int, lib: ctypes.CDLL) -> None:
    """Map a kernel status to the exception the reference raises for the same input."""
    if status == _lib.OK:
        return
    msg = _lib.status_message(lib, status)
    if status in (_lib.ERR_NONFINITE_DELTA, _lib.ERR_NONFINITE_EF):
        raise ValueError(msg)
    if status in (_lib.ERR_INDEX, _lib.ERR_INDEX_ORDER):
        raise IndexRangeError(msg)
    if status == _lib.ERR_NO_MEMORY:
        raise MemoryError(msg)
    raise KernelError(f"kernel failed: {msg} (status {status})")


def _encode_outputs(layout: ChunkLayout, quantizer: str, value_dtype: str, index_coding: str,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty output tensors of an encoding of ``layout``."""
    nnz = layout.nnz
    idx = torch.empty(index_nbytes(index_coding, nnz, layout.index_bits), dtype=torch.uint8,
                      device=device)
    if quantizer == "none":
        vals = torch.empty(nnz, dtype=_VALUE_TORCH[value_dtype], device=device)
        cents = torch.empty(0, dtype=torch.float32, device=device)
    else:
        vals = torch.empty(packed_nbytes(nnz, 2), dtype=torch.uint8, device=device)
        cents = torch.empty(4, dtype=torch.float32, device=device)
    return idx, vals, cents


_LIB = torch.library.Library("distrain", "DEF")
_LIB.define("sparseloco_encode(Tensor(a!) ef, Tensor delta, float beta, int topk, int chunk, "
            "str quantizer, str value_dtype, str index_coding) -> (Tensor, Tensor, Tensor)")
_LIB.define("sparseloco_decode_aggregate(Tensor[] indices, Tensor[] values, Tensor[] centroids, "
            "int[] shape, int topk, int chunk, str quantizer, str aggregation, str value_dtype, "
            "str index_coding) -> Tensor")


# ---- encode -------------------------------------------------------------------------------------
def _encode_reference(ef: torch.Tensor, delta: torch.Tensor, beta: float, topk: int, chunk: int,
                      quantizer: str, value_dtype: str,
                      index_coding: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _reference("sparseloco_encode")(ef, delta, beta, topk, chunk, quantizer, value_dtype,
                                           index_coding)


@torch.library.register_fake("distrain::sparseloco_encode")
def _encode_fake(ef, delta, beta, topk, chunk, quantizer, value_dtype, index_coding):
    return _encode_outputs(chunk_layout(tuple(ef.shape), chunk, topk), quantizer, value_dtype,
                           index_coding)


def _kernel_ready(ef: torch.Tensor, delta: torch.Tensor) -> bool:
    """Inputs the kernels take as they are; anything else goes to the reference (and its errors)."""
    return (ef.dtype == torch.float32 and delta.dtype == torch.float32 and ef.is_contiguous()
            and delta.is_contiguous() and ef.shape == delta.shape and ef.numel() > 0
            and ef.device == delta.device)


def _encode_cpu(ef, delta, beta, topk, chunk, quantizer, value_dtype, index_coding):
    lib = _lib.library("cpu")
    if lib is None or not _kernel_ready(ef, delta):
        return _encode_reference(ef, delta, beta, topk, chunk, quantizer, value_dtype, index_coding)
    layout = chunk_layout(tuple(ef.shape), chunk, topk)
    idx, vals, cents = _encode_outputs(layout, quantizer, value_dtype, index_coding)
    geo = geometry(layout)
    status = lib.dl_cpu_sparseloco_encode(
        ef.data_ptr(), delta.data_ptr(), ctypes.c_float(beta), ctypes.byref(geo),
        _lib.QUANTIZER_CODES[quantizer], _lib.VALUE_DTYPE_CODES[value_dtype],
        _lib.INDEX_CODING_CODES[index_coding], idx.data_ptr() if idx.numel() else None,
        vals.data_ptr() if vals.numel() else None, cents.data_ptr() if cents.numel() else None,
        torch.get_num_threads())
    _raise_for(status, lib)
    return idx, vals, cents


def _encode_cuda(ef, delta, beta, topk, chunk, quantizer, value_dtype, index_coding):
    lib = _lib.library("cuda")
    if lib is None or not _kernel_ready(ef, delta):
        return _encode_reference(ef, delta, beta, topk, chunk, quantizer, value_dtype, index_coding)
    layout = chunk_layout(tuple(ef.shape), chunk, topk)
    dev = ef.device
    idx, vals, cents = _encode_outputs(layout, quantizer, value_dtype, index_coding, dev)
    geo = geometry(layout)
    ws = torch.empty(int(lib.dl_cuda_encode_workspace_bytes(ctypes.byref(geo))), dtype=torch.uint8,
                     device=dev)
    status = torch.zeros(1, dtype=torch.int32, device=dev)
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        rc = lib.dl_cuda_sparseloco_encode(
            ef.data_ptr(), delta.data_ptr(), ctypes.c_float(beta), ctypes.byref(geo),
            _lib.QUANTIZER_CODES[quantizer], _lib.VALUE_DTYPE_CODES[value_dtype],
            _lib.INDEX_CODING_CODES[index_coding], idx.data_ptr() if idx.numel() else None,
            vals.data_ptr(), cents.data_ptr() if cents.numel() else None, ws.data_ptr(),
            ws.numel(), status.data_ptr(), stream)
    _raise_for(rc, lib)
    _raise_for(int(status.item()), lib)  # synchronises with the stream
    return idx.cpu(), vals.cpu(), cents.cpu()


# ---- decode-aggregate -----------------------------------------------------------------------------
def _decode_reference(indices, values, centroids, shape, topk, chunk, quantizer, aggregation,
                      value_dtype, index_coding) -> torch.Tensor:
    return _reference("sparseloco_decode_aggregate")(indices, values, centroids, shape, topk,
                                                     chunk, quantizer, aggregation, value_dtype,
                                                     index_coding)


@torch.library.register_fake("distrain::sparseloco_decode_aggregate")
def _decode_fake(indices, values, centroids, shape, topk, chunk, quantizer, aggregation,
                 value_dtype, index_coding):
    return torch.empty(list(shape), dtype=torch.float32, device=indices[0].device)


def _check_parts(layout: ChunkLayout, indices: list[torch.Tensor], values: list[torch.Tensor],
                 centroids: list[torch.Tensor], quantizer: str, value_dtype: str,
                 index_coding: str, device: torch.device) -> None:
    """Every buffer has exactly the size, dtype and device the kernels will access."""
    n = len(indices)
    if n == 0 or len(values) != n or (quantizer != "none" and len(centroids) != n):
        raise ValueError(f"decode_aggregate needs one indices/values(/centroids) tensor per part, "
                         f"got {len(indices)}/{len(values)}/{len(centroids)}")
    nnz = layout.nnz
    want_idx = index_nbytes(index_coding, nnz, layout.index_bits)
    want_val = ((nnz, _VALUE_TORCH[value_dtype]) if quantizer == "none"
                else (packed_nbytes(nnz, 2), torch.uint8))
    for r in range(n):
        checks = [(indices[r], want_idx, torch.uint8, "indices"), (values[r], *want_val, "values")]
        if quantizer != "none":
            checks.append((centroids[r], 4, torch.float32, "centroids"))
        for t, numel, dtype, name in checks:
            if t.numel() != numel or t.dtype != dtype or t.device != device:
                raise ValueError(f"part {r}: {name} is {t.dtype}[{t.numel()}] on {t.device}, "
                                 f"expected {dtype}[{numel}] on {device}")


def _ptr_array(tensors: list[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() if t.numel() else None for t in tensors])


def _decode_cpu(indices, values, centroids, shape, topk, chunk, quantizer, aggregation,
                value_dtype, index_coding):
    lib = _lib.library("cpu")
    if lib is None:
        return _decode_reference(indices, values, centroids, shape, topk, chunk, quantizer,
                                 aggregation, value_dtype, index_coding)
    layout = chunk_layout(tuple(int(s) for s in shape), chunk, topk)
    _check_parts(layout, indices, values, centroids, quantizer, value_dtype, index_coding,
                 torch.device("cpu"))
    geo = geometry(layout)
    indices = [t.contiguous() for t in indices]
    values = [t.contiguous() for t in values]
    cents = (torch.cat([c.reshape(-1) for c in centroids]).contiguous() if quantizer != "none"
             else None)
    out = torch.empty(layout.shape, dtype=torch.float32)
    status = lib.dl_cpu_sparseloco_decode_aggregate(
        ctypes.byref(geo), len(indices), _ptr_array(indices), _ptr_array(values),
        cents.data_ptr() if cents is not None else None, _lib.QUANTIZER_CODES[quantizer],
        _lib.VALUE_DTYPE_CODES[value_dtype], _lib.INDEX_CODING_CODES[index_coding],
        _lib.AGGREGATION_CODES[aggregation], out.data_ptr(), torch.get_num_threads())
    _raise_for(status, lib)
    return out


_VALUE_NUMPY = {"fp16": np.dtype("<f2"), "fp32": np.dtype("<f4")}


def decode_cpu_arrays(layout: ChunkLayout, indices: list[np.ndarray], values: list[np.ndarray],
                      centroids: list[np.ndarray], quantizer: str, aggregation: str,
                      value_dtype: str, index_coding: str) -> torch.Tensor | None:
    """The CPU kernel straight on received numpy buffers: no tensor wrapping and no dispatch,
    which cost more than the kernel on small tensors. None when the library is not loaded."""
    lib = _lib.library("cpu")
    if lib is None:
        return None
    n = len(indices)
    if n == 0 or len(values) != n or (quantizer != "none" and len(centroids) != n):
        raise ValueError(f"decode_aggregate needs one indices/values(/centroids) buffer per part, "
                         f"got {len(indices)}/{len(values)}/{len(centroids)}")
    want_idx = index_nbytes(index_coding, layout.nnz, layout.index_bits)
    want_val = ((layout.nnz, _VALUE_NUMPY[value_dtype]) if quantizer == "none"
                else (packed_nbytes(layout.nnz, 2), np.dtype(np.uint8)))
    idx = [np.ascontiguousarray(a) for a in indices]
    val = [np.ascontiguousarray(a) for a in values]
    for r in range(n):
        for a, size, dtype, name in ((idx[r], want_idx, np.dtype(np.uint8), "indices"),
                                     (val[r], *want_val, "values")):
            if a.size != size or a.dtype != dtype:
                raise ValueError(f"part {r}: {name} is {a.dtype}[{a.size}], expected {dtype}[{size}]")
    cents = None
    if quantizer != "none":
        cents = np.ascontiguousarray(np.concatenate([np.asarray(c).reshape(-1) for c in centroids]),
                                     dtype=np.float32)
        if cents.size != 4 * n:
            raise ValueError(f"centroids: {cents.size} floats for {n} parts, expected {4 * n}")
    out = torch.empty(layout.shape, dtype=torch.float32)
    status = lib.dl_cpu_sparseloco_decode_aggregate(
        ctypes.byref(geometry(layout)), n,
        (ctypes.c_void_p * n)(*[a.ctypes.data if a.size else None for a in idx]),
        (ctypes.c_void_p * n)(*[a.ctypes.data if a.size else None for a in val]),
        cents.ctypes.data if cents is not None else None, _lib.QUANTIZER_CODES[quantizer],
        _lib.VALUE_DTYPE_CODES[value_dtype], _lib.INDEX_CODING_CODES[index_coding],
        _lib.AGGREGATION_CODES[aggregation], out.data_ptr(), torch.get_num_threads())
    _raise_for(status, lib)
    return out


def _decode_cuda(indices, values, centroids, shape, topk, chunk, quantizer, aggregation,
                 value_dtype, index_coding):
    lib = _lib.library("cuda")
    if lib is None:
        return _decode_reference(indices, values, centroids, shape, topk, chunk, quantizer,
                                 aggregation, value_dtype, index_coding)
    layout = chunk_layout(tuple(int(s) for s in shape), chunk, topk)
    dev = indices[0].device
    _check_parts(layout, indices, values, centroids, quantizer, value_dtype, index_coding, dev)
    geo = geometry(layout)
    indices = [t.contiguous() for t in indices]
    values = [t.contiguous() for t in values]
    ptrs = torch.tensor([[t.data_ptr() for t in indices], [t.data_ptr() for t in values]],
                        dtype=torch.int64).to(dev)
    cents = (torch.cat([c.reshape(-1) for c in centroids]).to(dev) if quantizer != "none"
             else None)
    out = torch.zeros(layout.shape, dtype=torch.float32, device=dev)
    counts = (torch.zeros(layout.numel, dtype=torch.int32, device=dev)
              if aggregation == "mean_selected" else None)
    status = torch.zeros(1, dtype=torch.int32, device=dev)
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        rc = lib.dl_cuda_sparseloco_decode_aggregate(
            ctypes.byref(geo), len(indices), ptrs[0].data_ptr(), ptrs[1].data_ptr(),
            cents.data_ptr() if cents is not None else None, _lib.QUANTIZER_CODES[quantizer],
            _lib.VALUE_DTYPE_CODES[value_dtype], _lib.INDEX_CODING_CODES[index_coding],
            _lib.AGGREGATION_CODES[aggregation], out.data_ptr(),
            counts.data_ptr() if counts is not None else None, status.data_ptr(), stream)
    _raise_for(rc, lib)
    _raise_for(int(status.item()), lib)
    return out


_LIB.impl("sparseloco_encode", _encode_reference, "CompositeExplicitAutograd")
_LIB.impl("sparseloco_encode", _encode_cpu, "CPU")
_LIB.impl("sparseloco_encode", _encode_cuda, "CUDA")
_LIB.impl("sparseloco_decode_aggregate", _decode_reference, "CompositeExplicitAutograd")
_LIB.impl("sparseloco_decode_aggregate", _decode_cpu, "CPU")
_LIB.impl("sparseloco_decode_aggregate", _decode_cuda, "CUDA")
