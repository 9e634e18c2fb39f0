"""Fast SparseLoCo encode and decode-aggregate: C++ (OpenMP) and CUDA kernels behind torch ops.

The kernels take tensors and geometry (``distrain.comm.kernels.geometry``) and never import a codec: the
SparseLoCo codec (``distrain.comm.codecs.sparseloco``) is the specification, registers its PyTorch
reference as the ops' fallback (``register_reference``) and wraps the raw outputs into its own
``EncodedTensor``. ``encode`` and ``decode_aggregate`` produce, bit for bit, what that reference
produces; they run the fastest implementation available for the tensors' device. Build the
libraries with ``python -m distrain.comm.kernels.build`` (or set ``DISTRAIN_KERNELS=build``); see
``comm/kernels/_lib.py`` for the environment switches. Importing this package never compiles,
loads or fails.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch

from distrain.comm.kernels import _lib
from distrain.comm.kernels import ops as _ops
from distrain.comm.kernels._lib import mode, set_mode
from distrain.comm.kernels.geometry import chunk_layout
from distrain.comm.kernels.ops import KernelError, register_reference

__all__ = ["KernelError", "backend", "decode_aggregate", "encode", "forced_mode", "mode",
           "register_reference", "set_mode", "status"]

Buffer = np.ndarray | torch.Tensor


def backend(device: torch.device | str | None = "cpu") -> str:
    """Implementation that runs for tensors on ``device``: ``cpp``, ``cuda`` or ``reference``."""
    kind = torch.device(device if device is not None else "cpu").type
    if kind == "cpu":
        return "cpp" if _lib.library("cpu") is not None else "reference"
    if kind == "cuda":
        return "cuda" if _lib.library("cuda") is not None else "reference"
    return "reference"


def status() -> dict[str, str]:
    """Per library: ``loaded`` or the reason it is not (for logs and ``--version``-style output)."""
    return {kind: (_lib.unavailable_reason(kind) or "loaded") for kind in ("cpu", "cuda")}


@contextmanager
def forced_mode(m: str) -> Iterator[None]:
    """Temporarily set the loading mode (tests: ``forced_mode("reference")`` runs the reference)."""
    previous = _lib._forced_mode
    set_mode(m)
    try:
        yield
    finally:
        set_mode(previous)


def _check_names(quantizer: str, value_dtype: str, index_coding: str,
                 aggregation: str | None = None) -> None:
    for what, value, known in (("quantizer", quantizer, _lib.QUANTIZER_CODES),
                               ("value dtype", value_dtype, _lib.VALUE_DTYPE_CODES),
                               ("index coding", index_coding, _lib.INDEX_CODING_CODES),
                               ("aggregation", aggregation, _lib.AGGREGATION_CODES)):
        if value is not None and value not in known:
            raise ValueError(f"unknown {what} {value!r} ({', '.join(known)})")


def encode(ef: torch.Tensor, delta: torch.Tensor, *, beta: float, topk: int, chunk: int,
           quantizer: str, value_dtype: str = "fp16",
           index_coding: str = "packed") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold ``delta`` into the error buffer ``ef`` (in place) and return its CPU payload tensors.

    Returns ``(indices, values, centroids)``: packed indices (uint8), packed 2-bit codes (uint8)
    or fp16/fp32 values for quantizer ``none``, and 4 fp32 centroids (empty for ``none``).
    """
    if ef.dtype != torch.float32 or not ef.is_contiguous():
        raise TypeError(f"error-feedback buffer must be contiguous float32, got {ef.dtype}")
    if ef.shape != delta.shape:
        raise ValueError(f"delta shape {tuple(delta.shape)} differs from buffer shape {tuple(ef.shape)}")
    if delta.device != ef.device:
        raise ValueError(f"delta is on {delta.device} but the error-feedback buffer on {ef.device}")
    _check_names(quantizer, value_dtype, index_coding)
    delta = delta.to(torch.float32).contiguous()
    return torch.ops.distrain.sparseloco_encode(ef, delta, float(beta), int(topk), int(chunk),
                                                quantizer, value_dtype, index_coding)


def decode_aggregate(indices: Sequence[Buffer], values: Sequence[Buffer],
                     centroids: Sequence[Buffer], shape: tuple[int, ...], *, topk: int,
                     chunk: int, quantizer: str, aggregation: str, value_dtype: str = "fp16",
                     index_coding: str = "packed",
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Aggregate R contributions, given as their raw buffers, to an fp32 tensor on ``device``.

    ``indices[r]``, ``values[r]`` (codes or fp16/fp32 values) and ``centroids[r]`` (4 fp32, none
    for quantizer ``none``) are part r's buffers as ``encode`` wrote them; list order is the
    summation order. ``device=None`` means CPU. For a CUDA device the buffers are uploaded in one
    transfer and aggregated there (by the CUDA kernel, or the reference on that device).
    """
    _check_names(quantizer, value_dtype, index_coding, aggregation)
    if not indices:
        raise ValueError("decode_aggregate needs at least one contribution")
    layout = chunk_layout(tuple(int(s) for s in shape), int(chunk), int(topk))
    dev = torch.device(device if device is not None else "cpu")
    cents = list(centroids) if quantizer != "none" else []
    if dev.type == "cpu" and all(isinstance(b, np.ndarray) for b in [*indices, *values, *cents]):
        out = _ops.decode_cpu_arrays(layout, list(indices), list(values), cents, quantizer,
                                     aggregation, value_dtype, index_coding)
        if out is not None:
            return out
    if dev.type == "cpu":
        idx, val, cen = (_as_cpu(list(indices)), _as_cpu(list(values)), _as_cpu(cents))
    else:
        idx, val, cen = _upload(list(indices), list(values), cents, dev)
    return torch.ops.distrain.sparseloco_decode_aggregate(
        idx, val, cen, list(layout.shape), int(topk), int(chunk), quantizer, aggregation,
        value_dtype, index_coding)


def _as_cpu(buffers: list[Buffer]) -> list[torch.Tensor]:
    """CPU tensors viewing the buffers (received buffers are read-only; the kernels only read)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return [torch.from_numpy(np.ascontiguousarray(b)) if isinstance(b, np.ndarray)
                else b.cpu().contiguous() for b in buffers]


def _upload(indices: list[Buffer], values: list[Buffer], cents: list[Buffer],
            dev: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Copy every buffer to ``dev`` in one transfer; each view starts 16-byte aligned."""
    arrays = [b.cpu().numpy() if isinstance(b, torch.Tensor) else np.ascontiguousarray(b)
              for b in indices + values + cents]
    offsets, total = [], 0
    for a in arrays:
        offsets.append(total)
        total += -(-a.nbytes // 16) * 16
    blob = np.zeros(max(total, 16), dtype=np.uint8)
    for a, off in zip(arrays, offsets):
        blob[off:off + a.nbytes] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
    host = torch.from_numpy(blob)
    if dev.type == "cuda":
        host = host.pin_memory()
    device_blob = host.to(dev, non_blocking=True)
    views = []
    for a, off in zip(arrays, offsets):
        dtype = torch.from_numpy(a[:0]).dtype
        views.append(device_blob[off:off + a.nbytes].view(dtype))
    n = len(indices)
    return views[:n], views[n:2 * n], views[2 * n:]
