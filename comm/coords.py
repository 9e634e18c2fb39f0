"""Per-coordinate bounds on an aggregate: what one contribution may do to one weight.

The norm bound (``distrain.comm.robust``) limits the size of a whole contribution, but inside that
budget a valid frame can put everything on one coordinate: SparseLoCo centroids
[0, 0, 0, −1.9·median] with one non-zero code moved one weight 31–37× further than any honest
update, and ``mean_selected`` gives a coordinate that only one replica selected that replica's full
value. ``CoordBound`` closes this per coordinate, from the round's contributions alone (every
replica computes the same bound, so every replica aggregates the same bits):

- ``clip``: in every chunk (the codec's chunk geometry; ``chunk`` × ``chunk`` blocks for a dense
  codec) the round's scale is the low median, over the contributions with a non-zero value there,
  of each one's largest |value| in the chunk; values beyond ``clip`` × that scale are cut to it, sign
  kept. Honest 2-bit contributions decode to a few centroids whose sizes agree across replicas, so
  they are (nearly) never cut; one that stands alone is cut to what the others do there.
- ``min_selectors``: a coordinate selected by fewer contributions than this is divided by the
  contributions' total weight (R: ``sum/R``) instead of by its selectors' (``mean_selected``), so a
  coordinate only one replica selected is not a full vote. 1 keeps ``mean_selected`` as it is.

The functions take decoded contributions — (flat indices int64, fp32 values) per contribution — so
every codec and the direction check (``distrain.comm.direction``) share them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from distrain.comm.kernels.geometry import ChunkLayout

Decoded = tuple[torch.Tensor, torch.Tensor]  # (flat indices int64, fp32 values) of one contribution


@dataclass(frozen=True)
class CoordBound:
    """``clip``: cut values beyond this multiple of the chunk's robust scale (0: off; else ≥ 1).
    ``min_selectors``: coordinates fewer contributions selected are divided by R (1: off).
    ``chunk``: block side of the scale's chunks for a codec without its own geometry (dense)."""

    clip: float = 1.5
    min_selectors: int = 1
    chunk: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)) or not math.isfinite(self.clip) \
                or not (self.clip == 0 or self.clip >= 1):
            raise ValueError(f"coordinate clip must be 0 (off) or a finite number >= 1, got {self.clip!r}")
        if isinstance(self.min_selectors, bool) or not isinstance(self.min_selectors, int) or self.min_selectors < 1:
            raise ValueError(f"min_selectors must be an integer >= 1, got {self.min_selectors!r}")
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or not 1 <= self.chunk <= 4096:
            raise ValueError(f"chunk must be an integer in [1, 4096], got {self.chunk!r}")

    @property
    def active(self) -> bool:
        """Does this bound change anything (else the codec's own aggregation runs)?"""
        return self.clip > 0 or self.min_selectors > 1


def chunk_of(layout: ChunkLayout, gidx: torch.Tensor) -> torch.Tensor:
    """The chunk id of every row-major flat index (the inverse of ``ChunkLayout.global_index``)."""
    if layout.is_2d:
        _, cols = layout.shape
        cr, cc = layout.block
        return (gidx // cols // cr) * (cols // cc) + (gidx % cols) // cc
    return gidx // layout.n_full


def chunk_scales(parts: Sequence[Decoded], layout: ChunkLayout) -> torch.Tensor:
    """Per chunk, the low median over contributions of each one's largest |value| there, counting
    only contributions with a non-zero value in the chunk (0 where none has). fp32, on the CPU."""
    maxes = torch.zeros(len(parts), layout.n_chunks, dtype=torch.float32)
    for row, (gidx, vals) in zip(maxes, parts):
        row.scatter_reduce_(0, chunk_of(layout, gidx.cpu()), vals.cpu().abs(), reduce="amax")
    ordered, _ = torch.sort(maxes, dim=0)  # zeros first
    present = (maxes > 0).sum(dim=0)  # contributions with a non-zero value in each chunk
    zeros = len(parts) - present
    pick = (zeros + (present - 1).clamp(min=0) // 2).clamp(max=len(parts) - 1)
    out = ordered.gather(0, pick.unsqueeze(0)).squeeze(0)
    return torch.where(present > 0, out, torch.zeros_like(out))


def clip_parts(parts: Sequence[Decoded], layout: ChunkLayout, clip: float) -> tuple[list[Decoded], int]:
    """Values cut to ``clip`` × their chunk's scale (sign kept), and how many values were cut."""
    limit = chunk_scales(parts, layout) * torch.tensor(clip, dtype=torch.float32)
    out: list[Decoded] = []
    cut = 0
    for gidx, vals in parts:
        lim = limit.to(vals.device)[chunk_of(layout, gidx).to(vals.device)]
        bounded = torch.maximum(torch.minimum(vals, lim), -lim)
        cut += int((bounded != vals).sum())
        out.append((gidx, bounded))
    return out, cut


def bounded_mean(parts: Sequence[Decoded], numel: int, weights: Sequence[float], aggregation: str,
                 min_selectors: int, device: torch.device) -> torch.Tensor:
    """Σ wᵢ·vᵢ scattered in list order (fp32), divided per coordinate by the selectors' weight where
    at least ``min_selectors`` contributions selected it (``mean_selected``), else by Σ wᵢ."""
    total = torch.zeros(numel, dtype=torch.float32, device=device)
    count = torch.zeros(numel, dtype=torch.float32, device=device)
    selectors = torch.zeros(numel, dtype=torch.int32, device=device)
    for (gidx, vals), w in zip(parts, weights):
        gidx, vals = gidx.to(device), vals.to(device)
        total.index_add_(0, gidx, vals * float(w) if w != 1.0 else vals)
        count.index_add_(0, gidx, torch.full_like(vals, float(w)))
        selectors.index_add_(0, gidx, torch.ones_like(gidx, dtype=torch.int32))
    everyone = torch.tensor(float(sum(weights)), dtype=torch.float32, device=device)
    if aggregation != "mean_selected":
        return total / everyone
    divisor = torch.where(selectors >= min_selectors, count, everyone)
    return total / torch.where(divisor > 0, divisor, torch.ones_like(divisor))
