"""torchrun: one process per worker; the RoundLoop runs on every rank, rank 0 logs.

Every rank builds the layout from the same config, the byte groups (``TorchTransport``) and the
device groups (``ProcessDeviceGroups``) in the same order, and its own worker. The pool's calls
are collectives over the world, so every rank takes the same decisions: round reports and small
control values are all-gathered as msgpack (never pickled), the evaluation replica's leader
computes the validation loss and broadcasts it, the initial weights go from each segment's first
owner to the others as validated dense frames. A checkpoint (``checkpoints/step-N``) is written
by every rank into one temp directory — its worker's own part, and the global part of each segment
it is the lowest owner of — and committed by rank 0 after all have written; a restarted job, or a
job of another topology, resumes every rank from it. torch collectives cannot drop a member: a dead rank means an elastic
restart (``--max-restarts``), not a smaller round.
"""

from __future__ import annotations

import logging
import os
import struct
import sys
from pathlib import Path
from typing import Any

import msgpack
import torch

from distrain.comm.device_groups import ProcessDeviceGroups
from distrain.comm.torch_transport import TorchTransport, resolve_backend
from distrain.comm.transport import WORLD, Transport
from distrain.checkpoint import CheckpointError, abort_step, begin_step, commit_step
from distrain.config import Config, save_config
from distrain.layout import Layout
from distrain.runtime.common import keep_tokenizer, prepare_data, run_dir_of, validation_batches
from distrain.runtime.faults import BoundaryFault, Fault
from distrain.runtime.loop import RoundLoop
from distrain.runtime.pool import Resumed, WorkerPool
from distrain.runtime.records import RunSummary
from distrain.runtime.resume import (
    ResumeSource,
    checkpoint_dir,
    manifest_for,
    saved_steps,
    segment_writers,
    write_worker,
)
from distrain.runtime.steps import RoundPlan
from distrain.worker.build import build_worker
from distrain.worker.frames import decode_params, encode_params
from distrain.worker.stage import EMBEDDING
from distrain.worker.worker import RoundReport

log = logging.getLogger("distrain.torchrun")


def restart_count() -> int:
    """How many times torchrun's elastic agent has restarted this job (0: first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


class TorchrunPool(WorkerPool):
    """This rank's worker among the others; every method is a collective over the world."""

    mode = "torchrun"

    def __init__(self, cfg: Config, layout: Layout, transport: TorchTransport, fault: Fault | None = None):
        self.cfg, self.layout, self.transport, self.fault = cfg, layout, transport, fault
        self.rank = transport.rank
        self.run_dir = run_dir_of(cfg)
        if self.rank == 0:  # rank 0 prepares (tokenises) while the others wait, then they hit the cache
            data = prepare_data(cfg, progress=cfg.logging.progress)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.toml")
            keep_tokenizer(self.run_dir, data)
        transport.barrier(WORLD)
        if self.rank != 0:
            data = prepare_data(cfg)
        groups = ProcessDeviceGroups(layout.device_group_specs(), self.rank, timeout_s=cfg.topology.round_timeout_s,
                                     backend=resolve_backend(cfg.runtime.device_backend))
        self.backends = {"byte_backend": transport.backend, "device_backend": groups.backend}
        self.link: Transport = transport
        if fault is not None and fault.kind == "boundary" and fault.rank == self.rank:
            self.link = BoundaryFault(transport, fault.round, fault.delay)
        self.worker = build_worker(cfg, layout, self.rank, data, self.link, groups)
        self.eval_ranks = layout.eval_ranks()
        self.val_batches = validation_batches(cfg, data) if self.rank in self.eval_ranks else []

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    @property
    def restarted(self) -> bool:
        return restart_count() > 0

    def _gather(self, obj: Any) -> list[Any]:
        """All ranks' small control values (msgpack, never pickle)."""
        got = self.transport.all_gather_bytes(WORLD, msgpack.packb(obj, use_bin_type=True))
        return [msgpack.unpackb(b, raw=False, strict_map_key=False) for b in got]  # type: ignore[arg-type]

    # ----- WorkerPool --------------------------------------------------------------------------
    def checkpoint_steps(self) -> list[list[int]]:
        return self._gather(saved_steps(self.run_dir))

    def load(self, step: int) -> Resumed | None:
        """This rank's worker from the checkpoint of ``step`` (every rank derives the same plan);
        None on every rank when any rank cannot."""
        try:
            src: ResumeSource | None = ResumeSource(self.cfg, self.layout, checkpoint_dir(self.run_dir) / f"step-{step}")
        except CheckpointError as e:
            log.warning("rank %d: checkpoint step %d unusable: %s", self.rank, step, e)
            src = None
        if not all(self._gather(src is not None)):
            return None
        ok = True
        try:
            src.restore(self.worker)  # collective inside a multi-device replica: its devices all get here
        except CheckpointError as e:
            log.warning("rank %d: checkpoint step %d unusable: %s", self.rank, step, e)
            ok = False
        if not all(self._gather(ok)):
            return None
        rng = src.rng(self.rank)
        if rng is not None:
            torch.set_rng_state(rng)
        return Resumed(src.loop, src.plan.changes)

    def initial_sync(self) -> None:
        """Each segment's weights from its first owner to the other owners (validated dense frames,
        never pickled): identical seeds make this a no-op on one machine; across machines it rules
        out any difference in initialisation. Devices of a replica then take their leader's."""
        rid = self.cfg.run_id()
        shapes = self.worker.param_shapes()
        received: dict[str, torch.Tensor] = {}
        for g in self.layout.owned_segments(self.rank):
            group = self.layout.segment_group(g)
            src = self.layout.segment_members(g)[0]
            mine = self.worker.syncs[g].global_state()
            frame = encode_params(mine, rid, 0, self.rank) if self.rank == src else None
            data = self.transport.broadcast_bytes(group, frame, src=src)
            received.update(decode_params(data, {n: shapes[n] for n in mine}, rid, 0))
        embedding = self._relay_initial_embedding(received, rid)
        self.worker.load_global(received if received else self.worker.global_state(), embedding)

    def _relay_initial_embedding(self, received: dict[str, torch.Tensor], rid: str) -> torch.Tensor | None:
        """A compressed pipeline's later stages rebuild boundaries from the global embedding they do
        not hold: its first stage hands them the agreed one (a validated dense frame)."""
        w = self.worker
        if w.relay is None:
            return None
        first = self.layout.stage_ranks(w.replica, 0)[0]
        if self.rank == first:
            frame = encode_params({EMBEDDING: received[EMBEDDING]}, rid, 0, self.rank)
            for dst in w.later_stages():
                self.transport.send_bytes(dst, frame)
            return None
        shape = (self.cfg.model.vocab_size, self.cfg.model.dim)
        return decode_params(self.transport.recv_bytes(first), {EMBEDDING: shape}, rid, 0)[EMBEDDING]

    def _maybe_fail(self, round_idx: int) -> None:
        f = self.fault
        if f and f.kind == "exit" and f.rank == self.rank and f.round == round_idx and restart_count() == 0:
            log.warning("fault injection: rank %d exits at the start of round %d", self.rank, round_idx)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(17)

    def run_round(self, round_idx: int, plan: RoundPlan) -> list[RoundReport]:
        self._maybe_fail(round_idx)
        f = self.fault
        if f and f.kind == "slow" and f.rank == self.rank and f.round == round_idx:
            self.worker.slow_down(f.factor)
        self.link.begin_round(round_idx)
        report = self.worker.run_round(round_idx, plan.for_replica(self.worker.replica))
        self.transport.flush()
        return [RoundReport.from_dict(d) for d in self._gather(report.to_dict())]

    def finish(self, round_idx: int) -> None:
        self.worker.finish()

    def evaluate(self, round_idx: int) -> float:
        loss = self.worker.evaluate(self.val_batches) if self.rank in self.eval_ranks else None
        src = self.eval_ranks[-1]  # the full replica's leader, or the pipeline's last stage
        got = self.transport.broadcast_bytes(WORLD, struct.pack("<d", loss) if self.rank == src else None, src=src)
        return struct.unpack("<d", got)[0]

    def save(self, step: int, loop: dict[str, Any]) -> None:
        """Rank 0 opens the step's temp directory; every rank writes its worker's part (and the
        global part of the segments it is the lowest owner of); rank 0 commits once all succeeded."""
        ckpt = checkpoint_dir(self.run_dir)
        tmp = str(begin_step(ckpt, step)) if self.rank == 0 else None
        tmp = self._gather(tmp)[0]
        try:
            files, error = write_worker(Path(tmp), self.worker, segment_writers(self.layout, range(self.layout.world_size))), ""
        except Exception as e:  # noqa: BLE001 - every rank must hear of it before anyone goes on
            files, error = {}, f"rank {self.rank}: {type(e).__name__}: {e}"
        got = self._gather({"files": files, "error": error})
        errors = [g["error"] for g in got if g["error"]]
        if self.rank == 0:
            if errors:
                abort_step(Path(tmp))
            else:
                try:
                    merged = {k: v for g in got for k, v in g["files"].items()}
                    commit_step(ckpt, Path(tmp), step, manifest_for(self.cfg, self.layout, loop), merged,
                                keep=self.cfg.checkpoint.keep)
                except Exception as e:  # noqa: BLE001 - as above
                    errors.append(f"rank 0: commit failed: {type(e).__name__}: {e}")
        errors = self._gather(errors)[0]  # the commit is done (or not) before any rank goes on
        if errors:
            raise RuntimeError(f"checkpoint of step {step} failed: {'; '.join(errors)}")

    def summary_extra(self) -> dict[str, Any]:
        return {"attempt": restart_count(), **self.backends}


def run_torchrun(cfg: Config, fault: Fault | None = None) -> RunSummary | None:
    """This rank's part of a torchrun job (the process group is initialised); rank 0's summary."""
    layout = Layout.from_config(cfg)
    transport = TorchTransport(layout.byte_groups(), timeout_s=cfg.topology.round_timeout_s,
                               backend=resolve_backend(cfg.runtime.byte_backend))
    pool = TorchrunPool(cfg, layout, transport, fault)
    summary = RoundLoop(cfg, pool, pool.run_dir).run()
    transport.barrier(WORLD)
    return summary
