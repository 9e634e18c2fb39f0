"""Which boundary format a pipeline's links can afford: the least lossy one whose transfer fits.

Why: compression pays only where boundary bytes dominate a step. On a fast link the d-dim bf16
activations cost nothing and any compression only loses. ``choose_format`` walks the formats that
leave the stage unconstrained from the least lossy — bf16 activations, then int8 and int4
activations quantised per token — and takes the first whose modelled transfer per step stays within
``budget`` of the stage's compute per step; when none fits, int4, the fewest bytes an unconstrained
stage can send. Subspace coordinates (``compress = {k = …}``) send fewer bytes still, but they
confine the stage's weights to span(U), and that cost more than any byte saving in every setting
measured (``bench/time_to_loss.py``: at 50 Mbit/s int4 reached two full replicas' loss in 0.86×
their time against 0.95× for k = d/32; at 20 Mbit/s and 50 ms the auto-chosen d/16 subspace was
the slowest of the formats tried; at 5 Mbit/s and 5 ms int4 reached it in 0.91×, the d/16 subspace in
0.98×, bf16 missed on one seed of three), so ``auto`` never picks one: it stays a choice a user makes. A
link's latency costs every format the same, so it does not enter the choice.
"""
from __future__ import annotations

from dataclasses import dataclass

from distrain.comm import boundary as bd

BUDGET = 0.10  # a step's boundary transfers may take this share of its compute


@dataclass(frozen=True)
class BoundaryFormat:
    name: str  # bf16 | int8 | int4 | subspace-k
    k: int  # subspace coordinates per token (0: the d-dim activations)
    wire_dtype: str  # bf16 | int8 | int4
    bytes_per_token: float  # payload per token and direction
    transfer_s: float  # modelled seconds of one step's boundary traffic (both directions, one boundary)
    share: float  # transfer_s over the stage's compute per step

    def describe(self, compute_s: float, budget: float, rejected: list["BoundaryFormat"]) -> str:
        why = (f"{self.bytes_per_token:.0f} B/token per direction, {self.transfer_s * 1e3:.0f} ms of boundary "
               f"transfers per step = {self.share:.0%} of its {compute_s:.3g} s compute (budget {budget:.0%})")
        if rejected:
            first = rejected[0]
            why += f"; {first.name} would take {first.share:.0%}"
        return f"boundary format {self.name}: {why}"


CANDIDATES = (("bf16", 0, "bf16"), ("int8", 0, "int8"), ("int4", 0, "int4"))  # (name, k, wire dtype), least lossy first


def choose_format(dim: int, tokens_per_step: int, microbatches: int, compute_s: float, mbps: float,
                  budget: float = BUDGET) -> tuple[BoundaryFormat, str]:
    """The least lossy unconstrained format whose boundary traffic per step fits in ``budget`` of
    ``compute_s`` over a link of ``mbps`` (the slowest between two stages), and a one-line reason.
    When none fits, int4 (the fewest bytes that leave the stage unconstrained)."""
    if compute_s <= 0 or mbps <= 0:
        raise ValueError(f"choosing a boundary format needs a positive compute time and link, got {compute_s}, {mbps}")
    tried: list[BoundaryFormat] = []
    for name, k, dtype in CANDIDATES:
        per_token = bd.bytes_per_token(k or dim, dtype)
        step_bytes = 2 * (tokens_per_step * per_token + microbatches * bd.FRAME_BYTES)  # forward and backward
        transfer = step_bytes * 8 / (mbps * 1e6)
        fmt = BoundaryFormat(name, k, dtype, per_token, transfer, transfer / compute_s)
        if fmt.share <= budget:
            return fmt, fmt.describe(compute_s, budget, tried)
        tried.append(fmt)
    last = tried[-1]
    return last, last.describe(compute_s, budget, tried[:1]) + (
        " (none fits: the fewest bytes of an unconstrained stage; a subspace, compress = {k = ...}, sends fewer "
        "but constrains the stage)")
