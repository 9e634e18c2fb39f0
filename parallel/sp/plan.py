"""An adaptive-SP plan, and getting the same one to every device of a replica in time.

Why apart from the planner: the runtime needs the plan type, the plan-ahead thread and the
broadcast, not how plans are found.

``PlanAhead`` solves the next step's plan in a background thread while this step trains;
``broadcast_plan`` sends the leader's plan to every device of the replica (JSON bytes, never
pickle), so all ranks run the same plan even though a time-limited solve is not deterministic.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from distrain.parallel.sp.cost import check_plan

STATUSES = ("optimal", "time_limit", "greedy")


class PlanError(ValueError):
    """A batch cannot be planned on these devices (bad input, or it does not fit)."""


class SequenceTooLongError(PlanError):
    """A sequence is longer than the largest group of the replica can hold."""


@dataclass
class SPPlan:
    groups: list[list[int]]  # device ids (0..n-1 inside the replica) of each group
    assignment: list[int]  # group index of each sequence of the batch
    predicted_step_s: float
    status: str = "greedy"
    solve_s: float = 0.0

    def sequences_of(self, group: int) -> list[int]:
        return [k for k, g in enumerate(self.assignment) if g == group]

    def group_of(self, device: int) -> int | None:
        """Index of the group holding ``device``; None when the plan leaves it idle."""
        return next((j for j, g in enumerate(self.groups) if device in g), None)

    def to_dict(self) -> dict[str, Any]:
        return {"groups": self.groups, "assignment": self.assignment, "predicted_step_s": self.predicted_step_s,
                "status": self.status, "solve_s": self.solve_s}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SPPlan:
        try:
            groups = [[int(i) for i in g] for g in d["groups"]]
            plan = cls(groups, [int(a) for a in d["assignment"]], float(d["predicted_step_s"]),
                       str(d.get("status", "greedy")), float(d.get("solve_s", 0.0)))
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"not a plan: {e!r}") from None
        if plan.status not in STATUSES:
            raise PlanError(f"plan status {plan.status!r} is not one of {STATUSES}")
        return plan


def validate_plan(plan: SPPlan, lengths: Sequence[int], n_devices: int,
                  capacity: float | Sequence[float] | None = None, degrees: Sequence[int] | None = None) -> None:
    try:
        check_plan(plan.groups, plan.assignment, lengths, n_devices, capacity, degrees)
    except ValueError as e:
        raise PlanError(f"invalid plan: {e}") from None


# ---- one step ahead, and the same plan on every rank ------------------------------------------


class PlanAhead:
    """Plans step k+1 in a background thread while step k trains (one solve in flight at a time)."""

    def __init__(self, planner: Callable[[Sequence[int]], SPPlan]):
        self._planner = planner
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sp-planner")
        self._pending: dict[int, Future] = {}

    def submit(self, step: int, lengths: Sequence[int]) -> None:
        if step in self._pending:
            raise PlanError(f"a plan for step {step} was already submitted")
        self._pending[step] = self._pool.submit(self._planner, list(lengths))

    def result(self, step: int, timeout: float | None = None) -> SPPlan:
        """The plan of ``step`` (waits for it); a planner error is raised here."""
        if step not in self._pending:
            raise PlanError(f"no plan was submitted for step {step}")
        return self._pending.pop(step).result(timeout)

    def close(self) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> PlanAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def broadcast_json(obj: Any, src: int, group: Any = None, device: Any = None) -> Any:
    """Every rank of ``group`` returns the JSON-able object of the rank at position ``src`` in the
    group (length, then UTF-8 bytes; never pickle). Positions, not job ranks, so the same call runs
    over torchrun's world, a Ray replica's own world and the simulation's thread groups.
    ``device``: where the bytes travel (the group's: a CUDA device for NCCL; default CPU)."""
    import torch
    import torch.distributed as dist

    device = torch.device("cpu") if device is None else torch.device(device)
    data = json.dumps(obj).encode() if obj is not None else b""
    n = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(n, group=group, group_src=src)
    size = int(n)  # the one host read: the buffer's size
    if data and len(data) == size:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    else:
        buf = torch.empty(size, dtype=torch.uint8, device=device)
    dist.broadcast(buf, group=group, group_src=src)
    return json.loads(buf.cpu().numpy().tobytes().decode())


def broadcast_plan(plan: SPPlan | None, src: int, group: Any = None, device: Any = None) -> SPPlan:
    """Every rank of ``group`` returns the plan of the rank at position ``src`` (JSON bytes, never pickle)."""
    return SPPlan.from_dict(broadcast_json(plan.to_dict() if plan is not None else None, src, group, device))
