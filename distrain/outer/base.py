"""The outer optimiser's seam: one segment's parameters meeting the same parameters in other replicas.

An outer optimiser never touches the model. Each round the worker hands it the replica's local
weights in the ordinary parameterisation (``sync_round``) and loads what comes back; it reports
what it actually loaded (``started``, through a compressed stage's constraint), from which the next
pseudo-gradient is measured. Other modules see the global weights only through ``global_state``
and move them only through ``reset_to``; what the last round kept (``contributions``) and fault
injection (``wrap_encoder``) are declared hooks, not fields to reach into.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from distrain.comm.codecs import Codec, EncodedTensor

Weights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Contribution:
    """One member's usable contribution to a round: its encoded tensors and the work behind them."""

    member: int
    tensors: dict[str, EncodedTensor]
    steps: int = 0  # inner steps of its replica in the round (0: not stated)
    tokens: int = 0  # tokens its replica trained on in the round


Contributions = list[Contribution]


@dataclass
class RoundStats:
    round: int
    wire_bytes: int  # bytes this worker put on the wire this round (frames, headers included)
    dense_bytes: int  # what the same tensors would take as dense fp32
    contributors: int  # frames that entered the aggregate
    rejected: int
    reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0  # real time spent in encode + exchange + decode + step
    segment: int = 0
    clipped: int = 0  # contributions scaled down by the robust bound
    # The direction check, per judged sender (member ranks, in order): its cosine to the others'
    # consensus (None: not judged) and its weight (0: set aside for the round).
    senders: list[int] = field(default_factory=list)
    cosines: list[float | None] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    @property
    def set_aside(self) -> list[int]:
        """The senders the direction check set aside this round."""
        return [m for m, w in zip(self.senders, self.weights) if w == 0]


def owned_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by name, tied ones once (the outer round's unit of ownership)."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out


def check_names(params: Weights, own: list[str]) -> None:
    if set(params) != set(own):
        raise ValueError(f"global weights name {sorted(set(params) ^ set(own))} differently from the model")


class OuterOptimizer:
    """An outer optimiser over one segment's parameters (by name); this base synchronises nothing
    (``outer.algorithm = "none"``: one replica)."""

    grad_sync: Callable[[list[torch.Tensor]], None] | None = None  # per-step gradient hook (a method of DDPOuter)
    moves_in_rounds = False  # exchanges pseudo-gradients and keeps global weights (DiLoCo, SparseLoCo)

    def __init__(self, initial: Weights):
        self.names = list(initial)
        self.shapes = {n: tuple(t.shape) for n, t in initial.items()}

    def sync_round(self, round_idx: int, local: Weights, steps: int = 0,
                   tokens: int = 0) -> tuple[RoundStats | None, Weights | None]:
        """The outer round of ``round_idx``, after ``steps`` inner steps on ``tokens`` tokens (what a
        merge of unequal contributions weighs): statistics, and the weights to start the next round
        from (None: keep training on)."""
        return None, None

    def started(self, actual: Weights | None) -> None:
        """The replica starts the next round from ``actual`` (None: exactly the returned target)."""

    def global_state(self) -> Weights:
        raise NotImplementedError(f"{type(self).__name__} keeps no global weights")

    def reset_to(self, params: Weights) -> Weights:
        """New global weights (initial agreement, catch-up); returns what to load."""
        check_names(params, self.names)
        return params

    def flush(self) -> Weights | None:
        """Apply anything still in flight (delayed mode); returns what to load, if anything."""
        return None

    def contributions(self) -> Contributions:
        """The contributions the last round aggregated (a compressed pipeline relays the embedding's)."""
        return []

    def wrap_encoder(self, wrap: Callable[[Codec], Codec]) -> bool:
        """Fault injection: encode this worker's own frames with ``wrap(codec)``; False if it sends none."""
        return False

    # ----- checkpoint state, by content --------------------------------------------------------
    def shared_tables(self) -> dict[str, Weights]:
        """Outer state besides the weights that every owner of the segment holds identically (the
        outer step's momentum and pending aggregate, by parameter name): a checkpoint stores it once."""
        return {}

    def load_shared(self, tables: dict[str, Weights]) -> None:
        """Take ``shared_tables`` (of any segmentation: only this optimiser's names are used)."""

    def own_tables(self) -> dict[str, Weights]:
        """This replica's own outer state by parameter name (error feedback, round anchors)."""
        return {}

    def own_meta(self) -> dict[str, Any]:
        """This replica's own small outer state (JSON)."""
        return {}

    def load_own(self, tables: dict[str, Weights], meta: dict[str, Any]) -> None:
        """Take ``own_tables``/``own_meta`` (regrouped by name: a table may hold other names too)."""
