"""A full replica spread over several processes (devices) joined by a fast interconnect.

Inner steps are data-parallel inside the replica — torch DDP, or DeepSpeed ZeRO-1/2 when
``runtime.replica_parallel = "deepspeed"`` (optional dependency, imported only then) — while the
outer round is done once per replica: the leader (the replica's first rank) exchanges
pseudo-gradients with the other replicas' leaders, then ``after_outer`` broadcasts the new weights
from the leader over the replica's own process group, so every process of the replica continues
from the same global weights. Only torchrun builds these (one process per device).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from distrain.config import Config, ConfigError, TrainConfig
from distrain.layout import Layout
from distrain.model import cross_entropy
from distrain.optim import build_inner_optimizer
from distrain.outer import owned_parameters
from distrain.trainer import InnerTrainer, StepResult

Batch = tuple[torch.Tensor, torch.Tensor]


def replica_group_name(replica: int) -> str:
    return f"replica{replica}"


def solo_group_name(rank: int) -> str:
    return f"solo{rank}"


def replica_groups(cfg: Config, layout: Layout) -> dict[str, list[int]]:
    """Process groups a multi-process replica needs, to be created with the transport's groups.

    One group per replica of more than one process; for DeepSpeed also one single-rank group per
    process (its "model-parallel" group: this replica has no model parallelism).
    """
    groups = {replica_group_name(r): layout.ranks(r) for r in range(layout.replicas) if layout.devices[r] > 1}
    if groups and cfg.outer.algorithm not in ("diloco", "sparseloco"):
        raise ConfigError("runtime.replica_devices > 1 needs outer.algorithm = diloco or sparseloco "
                          "(the outer round is done by each replica's leader)")
    if groups and cfg.train.chunkwise.mode != "off":
        raise ConfigError("multi-process replicas do not combine with train.chunkwise yet")
    if groups and cfg.runtime.replica_parallel == "deepspeed":
        groups.update({solo_group_name(r): [r] for r in range(layout.world_size)})
    return groups


class ReplicaGroup:
    """This process's view of its replica: the process group, the leader, the inner parallelism."""

    def __init__(self, process_group: Any, ranks: list[int], rank: int, parallel: str = "ddp",
                 zero_stage: int = 2, solo_group: Any = None):
        if rank not in ranks:
            raise ValueError(f"rank {rank} is not in its replica's ranks {ranks}")
        self.pg, self.ranks, self.rank = process_group, list(ranks), rank
        self.leader = self.ranks[0]
        self.parallel, self.zero_stage, self.solo_group = parallel, zero_stage, solo_group

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader

    def make_trainer(self, model: nn.Module, cfg: TrainConfig, next_batch: Callable[[], Batch],
                     device: torch.device, seed: int) -> Any:
        if self.parallel == "deepspeed":
            return DeepSpeedTrainer(model, cfg, next_batch, device, self, seed)
        from torch.nn.parallel import DistributedDataParallel

        # No buffer sync in forward: rank 0 evaluates alone, and a collective there would hang.
        ddp = DistributedDataParallel(model, process_group=self.pg, forward_sync_buffers=False,
                                      device_ids=[device.index] if device.type == "cuda" else None)
        return InnerTrainer(ddp, cfg, next_batch, device, seed=seed)

    @torch.no_grad()
    def after_outer(self, model: nn.Module, trainer: Any) -> None:
        """The leader's weights to every process of the replica (one flat broadcast)."""
        params = list(owned_parameters(model).values())
        flat = torch.nn.utils.parameters_to_vector(params)
        dist.broadcast(flat, src=self.leader, group=self.pg)
        offset = 0
        for p in params:  # in place: DDP buckets and ZeRO's flat buffers keep pointing at these tensors
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        refresh = getattr(trainer, "refresh", None)
        if refresh is not None:
            refresh()


class _ReplicaMPU:
    """The "model-parallel unit" DeepSpeed asks for its groups: data-parallel = this replica,
    model-parallel = this process alone, so ZeRO shards optimiser state inside the replica only."""

    def __init__(self, group: ReplicaGroup):
        self.g = group

    def get_data_parallel_group(self):
        return self.g.pg

    def get_data_parallel_rank(self) -> int:
        return self.g.ranks.index(self.g.rank)

    def get_data_parallel_world_size(self) -> int:
        return len(self.g.ranks)

    def get_model_parallel_group(self):
        return self.g.solo_group

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


class DeepSpeedTrainer:
    """Inner steps under a DeepSpeed ZeRO-1/2 engine, with ``InnerTrainer``'s interface.

    Same AdamW groups and schedule as ``InnerTrainer`` (passed to DeepSpeed as client optimiser
    and scheduler); clipping and accumulation are DeepSpeed's. Its checkpoint state holds the
    model, schedule and step; the ZeRO-partitioned AdamW moments are not in it (a resumed
    DeepSpeed replica restarts them at zero).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, next_batch: Callable[[], Batch], device: torch.device,
                 group: ReplicaGroup, seed: int = 0):
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed
        except ImportError as e:
            raise ImportError("runtime.replica_parallel = 'deepspeed' needs DeepSpeed: pip install 'distrain[deepspeed]'") from e
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        self.model, self.cfg, self.next_batch, self.device = model, cfg, next_batch, device
        self.base_optimizer, self.scheduler = build_inner_optimizer(model, cfg)
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.batch_size,
            "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": group.zero_stage},
            "steps_per_print": 1 << 30,
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=self.base_optimizer, lr_scheduler=self.scheduler, config=ds_config,
            mpu=_ReplicaMPU(group), dist_init_required=False)
        self.group = group
        self.step = 0
        self.generator = torch.Generator().manual_seed(seed)

    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        self.engine.train()
        total, tokens = 0.0, 0
        lr = self.base_optimizer.param_groups[0]["lr"]
        for _ in range(self.cfg.grad_accum):
            x, y = self.next_batch()
            x, y = x.to(self.device), y.to(self.device)
            loss = cross_entropy(self.engine(x), y)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.item()
            tokens += y.numel()
        loss_avg = total / self.cfg.grad_accum
        if not torch.isfinite(torch.tensor(loss_avg)):
            raise FloatingPointError(f"non-finite training loss {loss_avg} at step {self.step}")
        norm = self.engine.get_global_grad_norm()
        self.step += 1
        return StepResult(loss_avg, tokens, float(norm) if norm is not None else 0.0, lr, time.perf_counter() - t0)

    def refresh(self) -> None:
        """The module's weights were overwritten (outer step): copy them into ZeRO's fp32 partitions."""
        self.optimizer.refresh_fp32_params()

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> float:
        self.model.eval()
        losses = [cross_entropy(self.model(x.to(self.device)), y.to(self.device)).item() for x, y in batches]
        return sum(losses) / max(1, len(losses))

    def zero_partition_numel(self) -> int:
        """fp32 master weights this process holds: about 1/N of the model under ZeRO over N processes."""
        return int(sum(t.numel() for t in self.optimizer.single_partition_of_fp32_groups))

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "scheduler": self.scheduler.state_dict(), "step": self.step,
                "generator": self.generator.get_state(),
                "zero": {"stage": self.group.zero_stage, "partition_numel": self.zero_partition_numel()}}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(self.base_optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
        self.refresh()


def build_replica_group(cfg: Config, layout: Layout, transport: Any) -> ReplicaGroup | None:
    """This process's ``ReplicaGroup`` (None for a single-process replica)."""
    rank = transport.rank
    replica = layout.replica_of(rank)
    if layout.devices[replica] == 1:
        return None
    solo = transport.process_group(solo_group_name(rank)) if cfg.runtime.replica_parallel == "deepspeed" else None
    return ReplicaGroup(transport.process_group(replica_group_name(replica)), layout.ranks(replica), rank,
                        cfg.runtime.replica_parallel, cfg.runtime.zero_stage, solo)
