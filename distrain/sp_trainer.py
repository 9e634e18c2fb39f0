"""The inner schedule of an adaptive sequence-parallel replica: one planned step at a time.

Every device of the replica reads the same document batch (the replica's data stream). The
leader plans the *next* batch in a background thread while the current one trains
(``parallel.sp_plan.PlanAhead``): SP groups of mixed sizes and which documents each runs, under
each device's memory and speed (``parallel.sp_planner.plan_step``); the plan travels to the other
devices over the replica's process group as JSON bytes (never pickled), so every device runs the
same plan. The step itself (``parallel.sp_step.sp_train_step``) runs Ulysses attention inside each
group and sums token-weighted gradients over the replica, so a step under any plan equals the
same batch on one device. A replica of one device is the plan "one group of one".
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from comm.device_groups import DeviceGroups
from distrain.config import TrainConfig
from distrain.data import DocumentSampler
from distrain.optim import build_inner_optimizer, schedule_at
from distrain.replica_devices import ReplicaDevices
from distrain.trainer import InnerTrainer, StepResult, autocast_dtype
from parallel.sp_cost import REFERENCE_7B, SPCosts
from parallel.sp_plan import PlanAhead, SPPlan
from parallel.sp_planner import allowed_degrees, plan_step
from parallel.sp_step import sp_train_step

Batch = tuple[torch.Tensor, torch.Tensor]


def _broadcast_plan(plan: SPPlan | None, devices: ReplicaDevices) -> SPPlan:
    """The leader's plan to every device of the replica (length, then UTF-8 JSON)."""
    data = json.dumps(plan.to_dict()).encode() if plan is not None else b""
    n = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(n, group_src=0, group=devices.group)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if devices.is_leader else torch.empty(int(n),
                                                                                                     dtype=torch.uint8)
    dist.broadcast(buf, group_src=0, group=devices.group)
    return SPPlan.from_dict(json.loads(buf.numpy().tobytes().decode()))


class SPTrainer:
    charges_clock = False

    def __init__(self, model: nn.Module, cfg: TrainConfig, sampler: DocumentSampler, device: torch.device,
                 devices: ReplicaDevices | None, groups: DeviceGroups | None, n_heads: int,
                 speeds: list[float], capacity: int = 0, costs_file: str = "", time_limit_s: float = 1.0):
        self.model, self.cfg, self.sampler, self.device = model, cfg, sampler, device
        self.devices, self.groups = devices, groups
        self.ranks = devices.ranks if devices is not None else [0]
        self.optimizer, self.scheduler = build_inner_optimizer(model, cfg)
        self.amp_dtype = autocast_dtype(cfg.precision, device)
        self.step = 0
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
        self.last: dict[str, float] = {}
        self._eval = InnerTrainer(model, cfg, lambda: (_ for _ in ()).throw(RuntimeError("evaluation only")),
                                  device)  # evaluation on window batches, the model's ordinary forward

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
        return _broadcast_plan(plan, self.devices)

    def _plan_next(self) -> None:
        if self.ahead is not None:
            self._ahead_step = self.step + 1
            self.ahead.submit(self._ahead_step, self.sampler.peek_lengths())

    def _group_for(self, ranks: tuple[int, ...]) -> Any:
        me = self.ranks[self.devices.position] if self.devices is not None else 0
        return self.groups.group(ranks) if self.groups is not None and me in ranks else None

    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        self.model.train()
        plan = self._plan()
        batch = self.sampler.next_batch()
        self._plan_next()  # solved while this step trains
        lr = self.optimizer.param_groups[0]["lr"]
        res = sp_train_step(self.model, self.optimizer, batch.inputs, batch.targets, batch.cu_seqlens, plan,
                            self.devices.position if self.devices is not None else 0, self._group_for,
                            ranks=self.ranks if self.devices is not None else None, grad_clip=self.cfg.grad_clip,
                            autocast_dtype=self.amp_dtype)
        self.scheduler.step()
        self.step += 1
        self.last = {"sp_groups": float(len(plan.groups)), "sp_local_tokens": float(res.local_tokens)}
        return StepResult(res.loss, res.tokens, res.grad_norm, lr, time.perf_counter() - t0)

    def evaluate(self, batches: list[Batch]) -> float:
        return self._eval.evaluate(batches)

    def _drop_ahead(self) -> None:
        if self.ahead is not None and self._ahead_step is not None:
            self.ahead.result(self._ahead_step)  # let the solve finish; its batch is not the next one now
        self._ahead_step = None

    def seek(self, step: int) -> None:
        self._drop_ahead()
        self.step = int(step)
        self.scheduler = schedule_at(self.optimizer, self.cfg, self.step)

    def refresh(self) -> None:
        if self.devices is not None:
            self.devices.broadcast_from_leader(self.model)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._drop_ahead()
        self.step = int(state["step"])
