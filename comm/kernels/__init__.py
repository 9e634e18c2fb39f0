"""Fast SparseLoCo encode and decode-aggregate: C++ (OpenMP) and CUDA kernels behind torch ops.

``encode`` and ``decode_aggregate`` have exactly the semantics (and outputs, bit for bit) of the
PyTorch reference in ``comm.codecs.sparseloco``; they run the fastest implementation available
for the tensors' device and fall back to the reference when no kernel library is loaded. Build
the libraries with ``python -m comm.kernels.build`` (or set ``DISTRAIN_KERNELS=build``); see
``comm/kernels/_lib.py`` for the environment switches. Importing this package never compiles,
loads or fails.
"""

from __future__ import annotations

import warnings

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from comm.kernels import _lib
from comm.kernels._lib import mode, set_mode

__all__ = ["backend", "decode_aggregate", "encode", "forced_mode", "mode", "set_mode", "status"]


def backend(device: torch.device | str = "cpu") -> str:
    """Implementation that runs for tensors on ``device``: ``cpp``, ``cuda`` or ``reference``."""
    kind = torch.device(device).type
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


def encode(ef: torch.Tensor, delta: torch.Tensor, *, beta: float, topk: int, chunk: int,
           quantizer: str, value_dtype: str = "fp16", index_coding: str = "packed"):
    """Drop-in for ``comm.codecs.sparseloco.sparseloco_encode_`` (same arguments and result)."""
    from comm.codecs.base import EncodedTensor, check_shape
    from comm.codecs.index_coding import INDEX_CODINGS
    from comm.codecs.quantizers import QUANTIZERS
    from comm.codecs.sparseloco import VALUE_DTYPES

    if ef.dtype != torch.float32 or not ef.is_contiguous():
        raise TypeError(f"error-feedback buffer must be contiguous float32, got {ef.dtype}")
    if ef.shape != delta.shape:
        raise ValueError(f"delta shape {tuple(delta.shape)} differs from buffer shape {tuple(ef.shape)}")
    if quantizer not in QUANTIZERS or value_dtype not in VALUE_DTYPES:
        raise ValueError(f"unknown quantizer {quantizer!r} or value dtype {value_dtype!r}")
    if index_coding not in INDEX_CODINGS:
        raise ValueError(f"unknown index coding {index_coding!r} ({', '.join(INDEX_CODINGS)})")
    if delta.device != ef.device:
        raise ValueError(f"delta is on {delta.device} but the error-feedback buffer on {ef.device}")
    layout = _ops.chunk_layout(check_shape(tuple(ef.shape)), int(chunk), int(topk))
    delta = delta.to(torch.float32).contiguous()
    idx, vals, cents = torch.ops.distrain.sparseloco_encode(ef, delta, float(beta), int(topk),
                                                            int(chunk), quantizer, value_dtype,
                                                            index_coding)
    buffers = {"indices": idx.numpy()}
    if quantizer == "none":
        buffers["values"] = vals.numpy().astype(VALUE_DTYPES[value_dtype][1], copy=False)
    else:
        buffers["codes"] = vals.numpy()
        buffers["centroids"] = cents.numpy().astype("<f4", copy=False)
    meta = {"chunk": layout.n_full, "k": layout.k_full, "nnz": layout.nnz}
    return EncodedTensor(shape=layout.shape, meta=meta, buffers=buffers)


def decode_aggregate(parts: list, shape: tuple[int, ...], *, topk: int, chunk: int,
                     quantizer: str, aggregation: str, value_dtype: str = "fp16",
                     index_coding: str = "packed", beta: float | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Same result as ``SparseLoCoCodec(...).decode_aggregate(parts, shape)``, on ``device``.

    Accepts the codec's ``params()`` as keywords (``beta`` is ignored). ``device=None`` returns a
    CPU tensor like the reference; a CUDA device uploads the payloads once and aggregates there.
    """
    from comm.codecs.base import check_layout, check_shape
    from comm.codecs.bitpack import padding_is_zero
    from comm.codecs.sparseloco import SparseLoCoCodec
    from comm.errors import SchemaError

    del beta  # part of the codec's params, irrelevant to decoding
    shape = check_shape(shape)
    if not parts:
        raise ValueError("decode_aggregate needs at least one contribution")
    codec = SparseLoCoCodec(topk=topk, chunk=chunk, quantizer=quantizer, aggregation=aggregation,
                            value_dtype=value_dtype, index_coding=index_coding)
    layout = codec.buffer_layout(shape)
    chunks = codec.layout(shape)
    for part in parts:  # the checks (and messages) of the reference's decode, in its order
        if part.shape != shape:
            raise ValueError(f"contribution of shape {part.shape} for a tensor of shape {shape}")
        try:
            check_layout(part, layout)
        except ValueError as exc:
            raise SchemaError(f"sparseloco tensor {part.shape}: {exc}") from None
        if index_coding == "packed" and not padding_is_zero(part.buffers["indices"], chunks.nnz,
                                                            chunks.index_bits):
            raise SchemaError("non-zero padding bits after the last index")
    vname = "values" if quantizer == "none" else "codes"
    arrays = [(p.buffers["indices"], p.buffers[vname]) for p in parts]
    cents = [p.buffers["centroids"] for p in parts] if quantizer != "none" else []
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cpu":
        # Received buffers are read-only views of the frame; the kernel only reads them.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            idx = [torch.from_numpy(np.ascontiguousarray(a)) for a, _ in arrays]
            val = [torch.from_numpy(np.ascontiguousarray(v)) for _, v in arrays]
            cen = [torch.from_numpy(np.ascontiguousarray(c)) for c in cents]
    else:
        idx, val, cen = _upload([a for a, _ in arrays], [v for _, v in arrays], cents, dev)
    return torch.ops.distrain.sparseloco_decode_aggregate(
        idx, val, cen, list(shape), int(topk), int(chunk), quantizer, aggregation, value_dtype,
        index_coding)


def _upload(indices: list[np.ndarray], values: list[np.ndarray], cents: list[np.ndarray],
            dev: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Copy every buffer to ``dev`` in one transfer; each view starts 16-byte aligned."""
    arrays = indices + values + cents
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


# Register the torch ops (cheap: no library is loaded until the first call).
from comm.kernels import ops as _ops  # noqa: E402,F401
