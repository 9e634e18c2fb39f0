"""The inner schedule of an adaptive sequence-parallel replica: one planned step at a time.

Every device of the replica reads the same document batch (the replica's data stream). The
leader plans the *next* batch in a background thread while the current one trains
(``distrain.parallel.sp.plan.PlanAhead``): SP groups of mixed sizes and which documents each runs,
under each device's memory and speed (``distrain.parallel.sp.planner.plan_step``); the plan
travels to the other devices over the replica's process group as JSON bytes (never pickled), so
every device runs the same plan. The step itself (``distrain.parallel.sp.step.sp_train_step``)
runs Ulysses attention inside each group and sums token-weighted gradients over the replica, so a
step under any plan equals the same batch on one device. A replica of one device is the plan
"one group of one".
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distrain.comm.device_groups import DeviceGroups
from distrain.config import TrainConfig
from distrain.data import DocumentSampler
from distrain.inner.devices import ReplicaDevices
from distrain.inner.schedule import InnerSchedule, StepOutcome
from distrain.parallel.sp.cost import REFERENCE_7B, SPCosts
from distrain.parallel.sp.plan import PlanAhead, SPPlan, broadcast_plan
from distrain.parallel.sp.planner import allowed_degrees, plan_step
from distrain.parallel.sp.step import sp_train_step


class SPSchedule(InnerSchedule):
    def __init__(self, model: nn.Module, cfg: TrainConfig, sampler: DocumentSampler, device: torch.device,
                 devices: ReplicaDevices | None, groups: DeviceGroups | None, n_heads: int,
                 speeds: list[float], capacity: int = 0, costs_file: str = "", time_limit_s: float = 1.0,
                 seed: int = 0, **clocked: Any):
        super().__init__(model, cfg, device, seed=seed, **clocked)
        self.sampler, self.devices, self.groups = sampler, devices, groups
        self.ranks = devices.ranks if devices is not None else [0]
        self.costs = SPCosts.load(costs_file) if costs_file else REFERENCE_7B
        n = len(self.ranks)
        degrees = allowed_degrees(n_heads, n)
        capacity_or_none = capacity or None

        def planner(lengths: list[int]) -> SPPlan:
            return plan_step(lengths, n, self.costs, degrees=degrees, speeds=speeds, capacity=capacity_or_none,
                             time_limit_s=time_limit_s)

        self.planner = planner
        self.ahead = PlanAhead(planner) if self.is_leader and n > 1 else None
        self._ahead_step: int | None = None  # the step whose plan is being solved in the background

    @property
    def is_leader(self) -> bool:
        return self.devices is None or self.devices.is_leader

    def _plan(self) -> SPPlan:
        """This step's plan (solved during the previous step), the next step's submitted."""
        if self.devices is None:
            return self.planner(self.sampler.peek_lengths())
        plan = None
        if self.ahead is not None:
            if self._ahead_step != self.step:  # first step, or after a catch-up: solve it now
                self._ahead_step = self.step
                self.ahead.submit(self._ahead_step, self.sampler.peek_lengths())
            plan = self.ahead.result(self.step)
        return broadcast_plan(plan, 0, self.devices.group, self.devices.device)

    def _plan_next(self) -> None:
        if self.ahead is not None:
            self._ahead_step = self.step + 1
            self.ahead.submit(self._ahead_step, self.sampler.peek_lengths())

    def _group_for(self, ranks: tuple[int, ...]) -> Any:
        me = self.ranks[self.devices.position] if self.devices is not None else 0
        return self.groups.group(ranks) if self.groups is not None and me in ranks else None

    def _step(self) -> StepOutcome:
        self.model.train()
        plan = self._plan()
        batch = self.sampler.next_batch()
        self._plan_next()  # solved while this step trains
        res = sp_train_step(self.model, self.optimizer, batch.inputs, batch.targets, batch.cu_seqlens, plan,
                            self.devices.position if self.devices is not None else 0, self._group_for,
                            ranks=self.ranks if self.devices is not None else None, grad_clip=self.cfg.grad_clip,
                            autocast_dtype=self.amp_dtype)
        return StepOutcome(res.loss, res.tokens, res.grad_norm,
                           {"sp_groups": float(len(plan.groups)), "sp_local_tokens": float(res.local_tokens)})

    def _drop_ahead(self) -> None:
        if self.ahead is not None and self._ahead_step is not None:
            self.ahead.result(self._ahead_step)  # let the solve finish; its batch is not the next one now
        self._ahead_step = None

    def seek(self, step: int) -> None:
        self._drop_ahead()
        super().seek(step)

    def _agree(self, vote: bool) -> bool:
        return self.devices.any(vote) if self.devices is not None else vote

    def refresh(self) -> None:
        if self.devices is not None:
            self.devices.broadcast_from_leader(self.model)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> tuple[int, int]:
        self._drop_ahead()
        return super().load_state_tensors(tensors, meta)
