"""Find, check and load the kernel shared libraries with ctypes (never at import time).

``DISTRAIN_KERNELS`` selects what happens on first use:

* ``auto`` (default): load a library from ``DISTRAIN_KERNELS_DIR`` (default ``build/kernels``)
  if one was built from the current ``csrc/`` sources; otherwise use the PyTorch reference.
* ``build``: like ``auto``, but first compile a missing or stale library (needs g++, and nvcc
  for the CUDA one when torch has CUDA).
* ``reference`` (or ``off``): never load a library.

Whatever goes wrong (no library, a stale one, a missing compiler, a wrong ABI) is logged once and
the reference is used instead: importing or calling ``distrain.comm.kernels`` never fails because of it.
A library is loaded once per process: a rebuilt one is picked up by new processes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass


log = logging.getLogger("distrain.comm.kernels")

ABI_VERSION = 1  # must equal DL_ABI_VERSION in csrc/distrain_kernels.h
MODES = ("auto", "build", "reference", "off")

# Status codes (enum dl_status).
OK, ERR_INVALID, ERR_NONFINITE_DELTA, ERR_NONFINITE_EF, ERR_INDEX_ORDER, ERR_INDEX, \
    ERR_NO_MEMORY, ERR_CUDA = range(8)
QUANTIZER_CODES = {"reference": 0, "symmetric": 1, "none": 2}
VALUE_DTYPE_CODES = {"fp16": 0, "fp32": 1}
AGGREGATION_CODES = {"mean_selected": 0, "sum_over_r": 1}
INDEX_CODING_CODES = {"packed": 0, "gaps": 1}


class Geometry(ctypes.Structure):
    """Mirror of ``dl_geometry``."""

    _fields_ = [
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("cr", ctypes.c_int64),
        ("cc", ctypes.c_int64),
        ("k_full", ctypes.c_int64),
        ("k_last", ctypes.c_int64),
        ("index_bits", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
    ]


_P = ctypes.c_void_p
_I32, _I64, _F32 = ctypes.c_int32, ctypes.c_int64, ctypes.c_float
_GEO = ctypes.POINTER(Geometry)
_SIGNATURES: dict[str, dict[str, tuple]] = {
    "cpu": {
        "dl_abi_version": (_I32, ()),
        "dl_status_string": (ctypes.c_char_p, (_I32,)),
        "dl_nnz": (_I64, (_GEO,)),
        "dl_cpu_sparseloco_encode": (_I32, (_P, _P, _F32, _GEO, _I32, _I32, _I32, _P, _P, _P,
                                            _I32)),
        "dl_cpu_sparseloco_decode_aggregate": (_I32, (_GEO, _I64, _P, _P, _P, _I32, _I32, _I32,
                                                      _I32, _P, _I32)),
    },
    "cuda": {
        "dl_abi_version": (_I32, ()),
        "dl_status_string": (ctypes.c_char_p, (_I32,)),
        "dl_cuda_encode_workspace_bytes": (_I64, (_GEO,)),
        "dl_cuda_sparseloco_encode": (_I32, (_P, _P, _F32, _GEO, _I32, _I32, _I32, _P, _P, _P, _P,
                                             _I64, _P, _P)),
        "dl_cuda_sparseloco_decode_aggregate": (_I32, (_GEO, _I64, _P, _P, _P, _I32, _I32, _I32,
                                                       _I32, _P, _P, _P, _P)),
    },
}


@dataclass
class _Slot:
    lib: ctypes.CDLL | None = None
    tried: bool = False
    reason: str = ""


_lock = threading.Lock()
_slots: dict[str, _Slot] = {"cpu": _Slot(), "cuda": _Slot()}
_forced_mode: str | None = None


def mode() -> str:
    """Current loading mode (``set_mode`` overrides the ``DISTRAIN_KERNELS`` variable)."""
    m = _forced_mode or os.environ.get("DISTRAIN_KERNELS", "auto").strip().lower() or "auto"
    if m not in MODES:
        _warn_once("mode", f"DISTRAIN_KERNELS={m!r} is not one of {', '.join(MODES)}; using the "
                   "reference implementation")
        return "reference"
    return m


def set_mode(m: str | None) -> None:
    """Override the mode for this process (None: back to the environment); forgets loaded libs."""
    global _forced_mode
    if m is not None and m not in MODES:
        raise ValueError(f"kernel mode must be one of {', '.join(MODES)}, got {m!r}")
    with _lock:
        _forced_mode = m
        for kind in _slots:
            _slots[kind] = _Slot()


_warned: set[str] = set()


def _warn_once(key: str, msg: str, level: int = logging.WARNING) -> None:
    if key not in _warned:
        _warned.add(key)
        log.log(level, msg)


def _target(kind: str):
    from distrain.comm.kernels import build as _build

    return _build.cpu_target() if kind == "cpu" else _build.cuda_target()


def _load(kind: str) -> tuple[ctypes.CDLL | None, str]:
    """Load one library or explain why not (the explanation is logged once by the caller)."""
    from distrain.comm.kernels import build as _build

    m = mode()
    if m in ("reference", "off"):
        return None, f"DISTRAIN_KERNELS={m}"
    path = _build.lib_dir() / (_build.CPU_LIB if kind == "cpu" else _build.CUDA_LIB)
    have_sources = _build.SRC_DIR.is_dir()
    if m == "build" and have_sources:
        try:
            target = _target(kind)
            if not _build.is_current(target):
                log.info("building %s", target.name)
                _build.build(target)
        except _build.BuildError as exc:  # e.g. no compiler: a current prebuilt library still works
            _warn_once(f"build-{kind}", f"cannot build the {kind} kernels: {exc}")
    try:
        if not path.exists():
            hint = "python -m distrain.comm.kernels.build" + (" --cuda=yes" if kind == "cuda" else "")
            return None, f"{path} not found (build it with `{hint}` or set DISTRAIN_KERNELS=build)"
        if have_sources and _build.kind_sources(kind):
            if not _build.built_from_current_sources(kind):
                return None, (f"{path} is stale (csrc/ changed since it was built); rebuild with "
                              "`python -m distrain.comm.kernels.build` or set DISTRAIN_KERNELS=build")
        lib = ctypes.CDLL(str(path))
        for name, (restype, argtypes) in _SIGNATURES[kind].items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, list(argtypes)
        if lib.dl_abi_version() != ABI_VERSION:
            return None, f"{path} has ABI {lib.dl_abi_version()}, expected {ABI_VERSION}"
        return lib, ""
    except (OSError, AttributeError, _build.BuildError) as exc:
        return None, f"cannot load {path}: {exc}"


def library(kind: str) -> ctypes.CDLL | None:
    """The loaded ``cpu`` or ``cuda`` library, or None (reason logged once)."""
    slot = _slots[kind]
    if slot.tried:
        return slot.lib
    with _lock:
        slot = _slots[kind]
        if not slot.tried:
            if kind == "cuda" and not _torch_has_cuda():
                slot.lib, slot.reason = None, "torch has no usable CUDA device"
            else:
                slot.lib, slot.reason = _load(kind)
                if slot.lib is None:
                    quiet = mode() in ("reference", "off") or "not found" in slot.reason
                    _warn_once(f"load-{kind}", f"{kind} kernels unavailable, using the PyTorch "
                               f"reference: {slot.reason}", logging.INFO if quiet else logging.WARNING)
            slot.tried = True
    return slot.lib


def unavailable_reason(kind: str) -> str:
    """Why ``library(kind)`` is None ('' when it is loaded)."""
    library(kind)
    return _slots[kind].reason


def _torch_has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken CUDA setup means: no CUDA kernels
        return False


def status_message(lib: ctypes.CDLL, status: int) -> str:
    return lib.dl_status_string(int(status)).decode()
