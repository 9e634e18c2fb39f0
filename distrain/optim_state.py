"""The inner optimiser's per-parameter state as plain tensors (checkpoints), and its size in bytes.

torchao's quantised moments (``adamw8bit`` / ``adamw4bit``) are tensor subclasses —
``OptimState8bit`` / ``OptimState4bit``: uint8 codes (4-bit ones packed two to a byte), one fp32
scale per block and the map from code to value — which safetensors cannot store. A checkpoint
stores their parts as plain tensors under ``<state>.<format>.<part>`` (format ``int8 | uint8 |
int4 | uint4``: the code width, and whether the map is signed; part ``codes | scale | qmap``), and
a resume rebuilds exactly those tensors: no dequantise → requantise round trip, and the resumed run
ends on the uninterrupted run's weights. A replica whose optimiser changed across a resume (a table's
``optimizer`` may change) converts instead: quantised moments are dequantised for fp32 AdamW, and
fp32 moments are quantised by torchao for an 8-/4-bit one.
"""

from __future__ import annotations

from typing import Any

import torch

PARTS = ("codes", "scale", "qmap")
_BITS = {"OptimState8bit": 8, "OptimState4bit": 4}


def is_quantised(v: Any) -> bool:
    """Is ``v`` one of torchao's quantised optimiser states (known by name: torchao stays unimported)?"""
    return type(v).__name__ in _BITS


def _format(v: Any) -> str:
    return f"{'' if v.signed else 'u'}int{_BITS[type(v).__name__]}"


def flat_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One parameter's optimiser state as plain tensors: a quantised moment by its parts."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if is_quantised(v):
            out.update({f"{k}.{_format(v)}.{part}": getattr(v, part) for part in PARTS})
        elif isinstance(v, torch.Tensor):
            out[k] = v
    return out


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the optimiser's state occupies (quantised moments: codes, scales and maps; the step counts)."""
    return sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in flat_state(st).values())


def dequantised(fmt: str, parts: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor | None:
    """The fp32 values of a stored quantised moment (torchao's block-wise map lookup), or None when
    its parts do not make a tensor of ``shape``."""
    codes, scale, qmap = (parts.get(p) for p in PARTS)
    if codes is None or scale is None or qmap is None or not scale.numel():
        return None
    if fmt.endswith("int4"):
        codes = torch.stack([codes >> 4, codes & 0b1111], dim=-1)
    if codes.numel() != shape.numel() or codes.numel() % scale.numel():
        return None
    values = qmap.float()[codes.long()].view(scale.numel(), -1) * scale.float().view(-1, 1)
    return values.view(shape)


def _saved(got: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, dict]]]:
    """Saved tensors by state key: plain ones, and quantised ones as (format, parts)."""
    plain: dict[str, torch.Tensor] = {}
    quantised: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
    for key, v in got.items():
        k, _, rest = key.partition(".")
        if rest:
            fmt, _, part = rest.partition(".")
            quantised.setdefault(k, (fmt, {}))[1][part] = v
        else:
            plain[k] = v
    return plain, quantised


def restore_state(optimizer: torch.optim.Optimizer, p: torch.Tensor,
                  got: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """``p``'s state in ``optimizer``'s own form from its saved tensors (``flat_state``'s keys), or
    None when they do not fit ``p`` (saved for a tensor of another shape)."""
    plain, quantised = _saved(got)
    new_buffer = getattr(optimizer, "_new_buffer", None)  # torchao's: quantised, or fp32 for a small tensor
    state: dict[str, Any] = {}
    for k in sorted({*plain, *quantised}):
        if k == "step":
            state[k] = plain[k].to(torch.float32, copy=True)
            continue
        buf = new_buffer(p, k == "exp_avg") if new_buffer is not None else None
        if k in quantised and is_quantised(buf):
            fmt, parts = quantised[k]
            fresh = buf.__tensor_flatten__()
            if fmt == _format(buf) and all(p_ in parts and parts[p_].shape == getattr(buf, p_).shape
                                           and parts[p_].dtype == getattr(buf, p_).dtype for p_ in PARTS):
                state[k] = type(buf).__tensor_unflatten__(  # the saved codes themselves: bit-exact
                    {p_: parts[p_].to(p.device, copy=True) for p_ in fresh[0]}, fresh[1], None, None)
                continue
        value = dequantised(*quantised[k], p.shape) if k in quantised else plain[k]
        if value is None or tuple(value.shape) != tuple(p.shape):
            return None
        value = value.to(device=p.device, dtype=p.dtype)
        state[k] = value.clone() if buf is None else buf.copy_(value)  # torchao's buffer quantises what it takes
    return state
