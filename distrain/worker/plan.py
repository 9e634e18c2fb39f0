"""What one replica does in one round, as the RoundLoop decided it (``distrain.runtime.steps``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ReplicaRound:
    """A replica's part of a round: how many inner steps, where they sit in the run's schedule, and
    the compute window they must fit in.

    ``progress`` and ``span`` are in inner steps of a full-speed replica (the unit of ``train.steps``
    and of the learning-rate schedule): the round starts at ``progress`` and stands for ``span`` of
    them, whatever number of steps this replica takes, so every replica is at the same point of
    warm-up and decay at every moment of the round.
    """

    steps: int  # inner steps planned (a window may stop it earlier); its steps are spread over the span
    progress: float  # global progress at the round's start
    span: float  # global progress the round stands for
    window_s: float = 0.0  # stop after a step when the next would overrun this window (0: run all steps)
    step_s: float = 0.0  # the replica's expected step time (what the window check assumes)
    limit: int = -1  # stop after this many steps (a replayed round that a window stopped early; -1: none)

    def __post_init__(self) -> None:
        if self.steps < 0 or self.span < 0 or self.window_s < 0 or self.limit > self.steps:
            raise ValueError(f"a replica's round needs non-negative steps, span and window, a limit of at most "
                             f"its steps, got {self}")

    @property
    def runs(self) -> int:
        """Steps to run unless a window stops it earlier."""
        return self.steps if self.limit < 0 else self.limit

    def progress_at(self, i: int) -> float:
        """Global progress at this replica's ``i``-th step of the round."""
        return self.progress + i * self.span / self.steps if self.steps else self.progress

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReplicaRound":
        return cls(int(d["steps"]), float(d["progress"]), float(d["span"]), float(d.get("window_s", 0.0)),
                   float(d.get("step_s", 0.0)), int(d.get("limit", -1)))
