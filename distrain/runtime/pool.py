"""The seam between the RoundLoop and a launch mode: the loop's state, and how it reaches the workers.

``LoopState`` is the one owner of the round number (and the run's other counters); the loop hands
it to whoever needs it — pools, workers, transports take the round as an argument.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from distrain.layout import Layout
from distrain.runtime.steps import RoundPlan
from distrain.worker.worker import RoundReport


@dataclass
class LoopState:
    """What a resumed run continues from (saved in the checkpoint's manifest)."""

    round: int = 0
    step: int = 0  # global progress: inner steps of a replica at full speed
    tokens: int = 0
    bytes_sent: int = 0
    busy_s: float = 0.0  # real seconds of inner steps (mean over replicas)
    elapsed_s: float = 0.0  # real seconds of the round loop, earlier attempts included
    first_val: float = float("nan")
    step_s: list[float] = field(default_factory=list)  # per replica: its step time, averaged over recent rounds
    replica_steps: list[int] = field(default_factory=list)  # per replica: inner steps it has run
    clipped: int = 0  # contributions the robust bound scaled down, over the run

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Resumed:
    """What a pool resumed: the loop state (fitted to this topology) and the topology's changes."""

    loop: dict[str, Any]
    changes: list[str] = field(default_factory=list)


class WorkerPool(ABC):
    """How the RoundLoop reaches its workers in one launch mode."""

    layout: Layout
    mode: str  # simulation | torchrun | ray
    clock_name = "wall"  # what the records' sim_time_s is: "sim" (virtual clock) or "wall"

    @property
    def is_coordinator(self) -> bool:
        """This process logs the run (the driver, or rank 0 under torchrun)."""
        return True

    @property
    def restarted(self) -> bool:
        """The job was restarted under it (torchrun's elastic agent): resume whatever the config says."""
        return False

    @abstractmethod
    def checkpoint_steps(self) -> list[list[int]]:
        """Checkpoint steps each process sees, newest first (not yet verified)."""

    @abstractmethod
    def load(self, step: int) -> Resumed | None:
        """Every worker takes its state from the checkpoint of ``step`` (into this topology); None if
        any process cannot."""

    @abstractmethod
    def initial_sync(self) -> None:
        """A fresh run: every segment's owners agree on the initial weights."""

    @abstractmethod
    def run_round(self, round_idx: int, plan: RoundPlan) -> list[RoundReport]:
        """Run ``round_idx`` on the live workers, each replica its part of ``plan``; the reports of
        those that completed it."""

    @abstractmethod
    def finish(self, round_idx: int) -> None:
        """Apply updates still in flight (``round_idx`` is the last round)."""

    @abstractmethod
    def evaluate(self, round_idx: int) -> float:
        """Validation loss of the global weights at the start of ``round_idx`` (on the evaluation replica)."""

    @abstractmethod
    def save(self, step: int, loop: dict[str, Any]) -> None:
        """Checkpoint ``step``: each worker's own state, each segment's global state once, the loop
        state in the manifest — committed atomically once every part is written."""

    def catch_up(self, round_idx: int, replica_steps: list[int]) -> list[dict[str, Any]]:
        """Workers that fell behind rejoin at ``round_idx``, their replicas having run
        ``replica_steps`` inner steps so far (events to log)."""
        return []

    def publish_global(self, round_idx: int) -> None:
        """The global weights at the start of ``round_idx`` go where a restarted worker finds them."""

    def events(self, round_idx: int) -> list[dict[str, Any]]:
        """Membership events of round ``round_idx``, which is over (dropped, rejoined, rejected frames)."""
        return []

    def clock(self, state: LoopState) -> tuple[float, float]:
        """(clock seconds, compute utilisation) for the records: the loop's wall-clock by default."""
        return state.elapsed_s, min(1.0, state.busy_s / max(1e-9, state.elapsed_s))

    def summary_extra(self) -> dict[str, Any]:
        return {}

    def record_extra(self) -> dict[str, Any]:
        """Mode-specific figures for the round's record (simulation: the pipelines' waits)."""
        return {}
