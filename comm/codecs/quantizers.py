"""Value quantizers for the selected SparseLoCo values (per-tensor statistics).

All statistics are accumulated in float64 and rounded once to float32; per-element arithmetic is
float32, one IEEE operation at a time (kernels: no FMA contraction, round-to-nearest-even), so a
kernel that follows these formulas reproduces the codes and centroids bit for bit.

``reference`` (the paper's code), over the selected values v (count m):
    shift = f32(Σ f64(v) / m)
    σ     = sqrt(Σ (f64(v) − f64(shift))² / (m − 1))          (σ = 0 when m < 2)
    scale = f32(1.5·σ)            (6σ spread over 4 levels); if scale == 0 or not finite: scale = 1
    t     = (v − shift) / scale + 2                          (three fp32 operations, in this order)
    code  = clamp(round_half_even(t), 0, 3)
    centroid[c] = f32(Σ_{code=c} f64(v) / count_c), or f32(f64(shift) + (c − 2)·f64(scale)) if empty.
  Its levels are centred on the mean, so near-zero values of both signs share level 2 and all
  values above shift + 0.75σ share level 3 — asymmetric for the bimodal top-k values.

``symmetric`` (our variant: sign + magnitude bin, decoded levels mirror around 0):
    τ     = f32(Σ |f64(v)| / m)                               (mean magnitude)
    big   = |v| > τ ;  neg = v < 0                           (−0.0 counts as non-negative)
    code  = 0 (neg, big) | 1 (neg, small) | 2 (pos, small) | 3 (pos, big)   (monotone in v)
    S = f32(mean |v| of small members)  (never empty for m ≥ 1; 0 when m = 0)
    L = f32(mean |v| of big members), or τ when there are none (then no code uses it)
    centroids = [−L, −S, S, L]
  Per magnitude bin it is unbiased for |v|; no level is wasted on values near zero (top-k values
  are large by construction).

Both return (codes uint8 [m], centroids float32 [4]); decoding is ``centroids[codes]``.
"""

from __future__ import annotations

import torch

LEVELS = 4
QUANTIZERS = ("reference", "symmetric", "none")


def _f32(x: float) -> float:
    """Round a Python float (float64) to the nearest float32 value."""
    return float(torch.tensor(x, dtype=torch.float64).to(torch.float32).item())


def _centroids(v64: torch.Tensor, codes: torch.Tensor, fallback: list[float]) -> torch.Tensor:
    """Mean of the values in each level (float64 sums, one rounding), ``fallback[c]`` if empty."""
    sums = torch.zeros(LEVELS, dtype=torch.float64, device=v64.device).index_add_(0, codes.long(), v64)
    counts = torch.bincount(codes.long(), minlength=LEVELS).to(torch.float64)
    means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.tensor(fallback, dtype=torch.float64, device=v64.device))
    return means.to(torch.float32)


def quantize_reference(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's 2-bit quantizer (see module docstring); returns (codes, centroids)."""
    v = v.to(torch.float32)
    m = v.numel()
    v64 = v.to(torch.float64)
    shift = _f32(v64.sum().item() / m) if m else 0.0
    sigma = ((v64 - shift).square().sum().item() / (m - 1)) ** 0.5 if m >= 2 else 0.0
    scale = _f32(1.5 * sigma)
    if not (scale > 0.0 and scale < float("inf")):
        scale = 1.0
    shift_t = torch.tensor(shift, dtype=torch.float32, device=v.device)
    scale_t = torch.tensor(scale, dtype=torch.float32, device=v.device)
    t = (v - shift_t) / scale_t + 2.0
    codes = torch.round(t).clamp_(0, LEVELS - 1).to(torch.uint8)
    fallback = [shift + (c - 2) * scale for c in range(LEVELS)]
    return codes, _centroids(v64, codes, fallback)


def quantize_symmetric(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign + magnitude-bin 2-bit quantizer (see module docstring); returns (codes, centroids)."""
    v = v.to(torch.float32)
    m = v.numel()
    a64 = v.to(torch.float64).abs()
    tau = _f32(a64.sum().item() / m) if m else 0.0
    big = v.abs() > tau
    neg = v < 0
    codes = torch.where(neg, torch.where(big, 0, 1), torch.where(big, 3, 2)).to(torch.uint8)
    mags = torch.zeros(2, dtype=torch.float64, device=v.device).index_add_(0, big.long(), a64)
    counts = torch.bincount(big.long(), minlength=2).to(torch.float64)
    small = float(mags[0] / counts[0]) if counts[0] > 0 else 0.0
    large = float(mags[1] / counts[1]) if counts[1] > 0 else tau
    cents = torch.tensor([-large, -small, small, large], dtype=torch.float64).to(torch.float32)
    return codes, cents.to(v.device)


def quantize(kind: str, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to a 2-bit quantizer by name."""
    if kind == "reference":
        return quantize_reference(v)
    if kind == "symmetric":
        return quantize_symmetric(v)
    raise ValueError(f"no 2-bit quantizer named {kind!r} (reference, symmetric)")
