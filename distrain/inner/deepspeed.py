"""DeepSpeed ZeRO-1/2 as the inner schedule of a multi-device full replica (optional dependency).

DeepSpeed is imported only when a replica asks for it (``parallel = "deepspeed"``); it needs one
process per device with ``torch.distributed`` initialised, so it runs under torchrun and Ray, not
in the in-process simulation.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from distrain.config import TrainConfig
from distrain.inner.devices import ReplicaDevices
from distrain.inner.schedule import Batch, InnerSchedule, StepOutcome
from distrain.model import cross_entropy


class _ReplicaMPU:
    """The "model-parallel unit" DeepSpeed asks for its groups: data-parallel = this replica,
    model-parallel = this process alone, so ZeRO shards optimiser state inside the replica only."""

    def __init__(self, devices: ReplicaDevices):
        self.d = devices

    def get_data_parallel_group(self):
        return self.d.group

    def get_data_parallel_rank(self) -> int:
        return self.d.position

    def get_data_parallel_world_size(self) -> int:
        return len(self.d.ranks)

    def get_model_parallel_group(self):
        return self.d.solo

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


class DeepSpeedSchedule(InnerSchedule):
    """Inner steps under a DeepSpeed ZeRO-1/2 engine.

    The same AdamW groups as every schedule (passed to DeepSpeed as its client optimiser:
    ``self.optimizer`` stays the torch AdamW, whose learning rate the base sets before each step;
    the engine's wrapper is ``self.zero``); clipping and accumulation are DeepSpeed's. Its checkpoint
    state holds each process's ZeRO partition of the AdamW moments (resumable into the same
    partitioning) and the step; the weights are the run's global ones.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, next_batch: Callable[[], Batch], device: torch.device,
                 devices: ReplicaDevices, zero_stage: int, seed: int = 0, **clocked: Any):
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed
        except ImportError as e:
            raise ImportError("parallel = 'deepspeed' needs DeepSpeed: pip install 'distrain[deepspeed]'") from e
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        super().__init__(model, cfg, device, seed=seed, **clocked)
        self.next_batch = next_batch
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.batch_size,
            "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": zero_stage},
            "steps_per_print": 1 << 30,
        }
        self.engine, self.zero, _, _ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, config=ds_config,
            mpu=_ReplicaMPU(devices), dist_init_required=False)
        self.devices, self.zero_stage = devices, zero_stage

    def _step(self) -> StepOutcome:
        self.engine.train()
        losses, tokens = [], 0
        for _ in range(self.cfg.grad_accum):
            x, y = self.next_batch()
            loss = cross_entropy(self.engine(self.to_device(x)), self.to_device(y))
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
            tokens += y.numel()
        loss_avg = torch.stack(losses).float().mean()
        self._check_finite(loss_avg)
        norm = self.engine.get_global_grad_norm()
        return StepOutcome(loss_avg, tokens, norm if norm is not None else 0.0)

    def _agree(self, vote: bool) -> bool:
        return self.devices.any(vote)

    def refresh(self) -> None:
        """The outer step changed the weights on the leader: every device takes them, then ZeRO's
        fp32 partitions are rebuilt from the module."""
        self.devices.broadcast_from_leader(self.model)
        self.zero.refresh_fp32_params()

    def zero_partition_numel(self) -> int:
        """fp32 master weights this process holds: about 1/N of the model under ZeRO over N processes."""
        return int(sum(t.numel() for t in self.zero.single_partition_of_fp32_groups))

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This process's ZeRO partition of the AdamW moments (``zero/<group>/<key>``, flat, as
        DeepSpeed keeps them), the generator, and the partition sizes they fit."""
        out = {"rng/generator": self.generator.get_state()}
        base = self.zero.optimizer
        for i, part in enumerate(self.zero.single_partition_of_fp32_groups):
            for k, v in base.state.get(part, {}).items():
                if isinstance(v, torch.Tensor):
                    out[f"zero/{i}/{k}"] = v
        return out, {"step": self.step, "zero": self._zero_shape()}

    def _zero_shape(self) -> dict[str, Any]:
        return {"stage": self.zero_stage, "devices": len(self.devices.ranks), "position": self.devices.position,
                "partitions": [int(t.numel()) for t in self.zero.single_partition_of_fp32_groups]}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> tuple[int, int]:
        """The moments of this process's partition, when they were saved for the same partitioning
        (same stage, devices and position); otherwise they start at zero. The fp32 master weights
        are rebuilt from the module (the global weights, loaded before)."""
        self.step = int(meta["step"])
        if "rng/generator" in tensors:
            self.generator.set_state(tensors["rng/generator"])
        self.zero.refresh_fp32_params()
        parts = self.zero.single_partition_of_fp32_groups
        base = self.zero.optimizer
        for part in parts:
            base.state.pop(part, None)
        if meta.get("zero") != self._zero_shape():
            return 0, len(parts)
        for i, part in enumerate(parts):
            got = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"zero/{i}/")}
            if got:
                base.state[part] = {k: v.to(torch.float32, copy=True) if k == "step" else
                                    v.to(device=part.device, dtype=part.dtype, copy=True) for k, v in got.items()}
        return len(parts), len(parts)
