"""Inside a Ray actor: one ``Worker``, built exactly as the simulation and torchrun build it.

The actor runs several threads (``max_concurrency``) so that peers can ``deliver`` point-to-point
messages while its round runs. A multi-device full replica's actors join a ``torch.distributed``
world of their own (gloo over TCP on the leader's node, the address handed out by the driver), as
Ray Train does; its device groups map job ranks to positions in that world. Model weights and
pseudo-gradients leave the actor only as ``bytes`` wire frames, validated on receipt.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from distrain.comm.device_groups import ProcessDeviceGroups
from distrain.comm.errors import CommError
from distrain.comm.ray_transport import RayTransport
from distrain.comm.torch_transport import resolve_backend
from distrain.checkpoint import CheckpointError
from distrain.config import Config, load_config
from distrain.layout import Layout
from distrain.runtime.common import apply_torch_threads, prepare_data, validation_batches
from distrain.comm.transport import Transport
from distrain.runtime.faults import BoundaryFault, Fault, FaultyTransport
from distrain.runtime.resume import ResumeSource, checkpoint_dir, write_worker
from distrain.worker.build import build_worker
from distrain.worker.frames import decode_params, encode_params
from distrain.worker.plan import ReplicaRound
from distrain.worker.stage import EMBEDDING, segment_shapes
from distrain.worker.worker import Worker

log = logging.getLogger(__name__)


def config_from_toml(text: str) -> Config:
    """A resolved config sent as TOML text (strictly re-checked by ``load_config``)."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
        path = f.name
    try:
        return load_config(path)
    finally:
        os.unlink(path)


class NeedsCatchUpError(CommError):
    """A worker was asked to run a round it is not at (it restarted, or missed a round)."""


class WorkerHost:
    """One worker in a Ray actor; the driver (``distrain.runtime.ray.pool``) calls its methods."""

    def __init__(self, cfg_toml: str, rank: int, coordinator: Any, faults: tuple[str, ...] = ()):
        self.cfg = cfg = config_from_toml(cfg_toml)
        apply_torch_threads(cfg)
        self.rank = rank
        self.layout = Layout.from_config(cfg)
        self.data = prepare_data(cfg)  # cached by the driver (or prepared here, on another node)
        kwargs: dict[str, Any] = dict(groups=self.layout.byte_groups(), timeout_s=cfg.topology.round_timeout_s)
        parsed = [Fault.parse(f) for f in faults if f]
        self.slow = next((f for f in parsed if f.kind == "slow"), None)
        wire_faults = [f for f in parsed if f.kind in ("stale", "kill", "late")]
        for f in wire_faults:
            kwargs["stale_round" if f.kind == "stale" else "hold_round"] = f.round
            if f.kind == "late":
                kwargs["hold_s"] = f.delay
        cls = FaultyTransport if wire_faults else RayTransport
        self.transport: RayTransport = cls(coordinator, rank, self.layout.world_size, **kwargs)
        bad = next((f for f in parsed if f.kind == "boundary"), None)
        self.link: Transport = BoundaryFault(self.transport, bad.round, bad.delay) if bad else self.transport
        self.worker: Worker | None = None
        self.val_batches = validation_batches(cfg, self.data)
        self.run = cfg.run_id()
        self.in_sync = False  # the worker's state is the end of the round the driver ran last

    # ----- start-up ------------------------------------------------------------------------------
    def rendezvous(self) -> str:
        """``host:port`` on this actor's node for its replica's torch.distributed world."""
        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return f"{host}:{s.getsockname()[1]}"

    def setup(self, peers: dict[int, Any], address: str | None) -> int:
        """Join the replica's device world (when it has several devices) and build the worker."""
        self.transport.set_peers(peers)
        slot = self.layout.slot(self.rank)
        rep = self.layout.replicas[slot.replica]
        groups = None
        if rep.kind == "full" and rep.devices > 1:
            import torch.distributed as dist

            if address is None:
                raise ValueError(f"worker {self.rank}: a replica of {rep.devices} devices needs a rendezvous address")
            if dist.is_initialized():
                dist.destroy_process_group()
            ranks = self.layout.ranks(rep.index)
            # the replica's own world carries tensors only (frames go through the Coordinator): its
            # backend is runtime.device_backend, NCCL on GPU actors (Ulysses needs CUDA all_to_all)
            backend = resolve_backend(self.cfg.runtime.device_backend)
            if backend == "nccl":
                torch.cuda.set_device(0)  # Ray hands each GPU actor its own device as cuda:0
            dist.init_process_group(backend, init_method=f"tcp://{address}", rank=ranks.index(self.rank),
                                    world_size=len(ranks), timeout=timedelta(seconds=self.cfg.topology.round_timeout_s))
            specs = [s for s in self.layout.device_group_specs() if set(s) <= set(ranks)]
            groups = ProcessDeviceGroups(specs, self.rank, to_local={r: i for i, r in enumerate(ranks)},
                                         timeout_s=self.cfg.topology.round_timeout_s, backend=backend)
        self.worker = build_worker(self.cfg, self.layout, self.rank, self.data, self.link, groups)
        self.in_sync = True
        return os.getpid()

    def info(self) -> dict[str, Any]:
        return {"rank": self.rank, "pid": os.getpid(), "in_sync": self.in_sync,
                "threads": torch.get_num_threads(), "ready": self.worker is not None}

    def deliver(self, src: int, round_idx: int, seq: int, payload: bytes) -> None:
        """A peer's point-to-point message (called by the peer's transport, not awaited)."""
        self.transport.mailbox.put(src, round_idx, seq, payload)

    # ----- rounds --------------------------------------------------------------------------------
    def _worker(self) -> Worker:
        if self.worker is None:
            raise NeedsCatchUpError(f"worker {self.rank} is not set up (it restarted)")
        return self.worker

    def run_round(self, round_idx: int, todo: dict[str, Any]) -> dict[str, Any]:
        """This worker's part of ``round_idx`` (``todo``: its replica's ``ReplicaRound``)."""
        worker = self._worker()
        if not self.in_sync:
            raise NeedsCatchUpError(f"worker {self.rank} failed in an earlier round, asked for round {round_idx}")
        self.in_sync = False  # a round that fails half-way leaves the worker needing a catch-up
        self.link.begin_round(round_idx)
        if self.slow is not None and self.slow.round == round_idx:
            worker.slow_down(self.slow.factor)
        report = worker.run_round(round_idx, ReplicaRound.from_dict(todo))
        self.in_sync = True
        return report.to_dict()

    def finish(self) -> None:
        self._worker().finish()

    def export_global(self, round_idx: int, segment: int) -> tuple[bytes, int]:
        """One segment's global weights at the start of ``round_idx`` as a dense wire frame, and
        its size (a second, tiny return value the driver can check without fetching the frame)."""
        frame = encode_params(self._worker().syncs[segment].global_state(), self.run, round_idx, self.rank)
        return frame, len(frame)

    def _global_weights(self, round_idx: int, items: dict[str, list[Any]]) -> tuple[dict[str, torch.Tensor],
                                                                                   torch.Tensor | None]:
        """The global weights of the segments this worker holds (start of ``round_idx``), and the
        global embedding for a later stage of a compressed pipeline, from the Coordinator's frames."""
        import ray

        worker = self._worker()

        def frame(g: int) -> bytes:
            data = ray.get(items[str(g)][0])
            if not isinstance(data, bytes):
                raise TypeError(f"global weights object of segment {g} is {type(data).__name__}, not bytes")
            return data

        params: dict[str, torch.Tensor] = {}
        for g in self.layout.segments_in(self.layout.slot(self.rank).layers):
            params.update(decode_params(frame(g), worker.segment_shapes(g), self.run, round_idx))
        embedding = None
        if worker.shadow is not None:  # a later compressed stage also follows the global embedding
            embedding = decode_params(frame(0), segment_shapes(self.cfg, self.layout, 0), self.run, round_idx)[EMBEDDING]
        return params, embedding

    def catch_up(self, round_idx: int, items: dict[str, list[Any]], steps_done: int) -> int:
        """A rebuilt worker joins at ``round_idx`` from the global weights, where its replica would be
        after ``steps_done`` inner steps."""
        params, embedding = self._global_weights(round_idx, items)
        self._worker().catch_up(params, steps_done, embedding)
        self.in_sync = True
        return os.getpid()

    def rejoin(self, round_idx: int, items: dict[str, list[Any]]) -> None:
        """Back from a round it was late for: the global weights of ``round_idx``; its state stays."""
        params, embedding = self._global_weights(round_idx, items)
        self._worker().rejoin(params, embedding)

    def evaluate(self) -> float:
        return self._worker().evaluate(self.val_batches)

    def save(self, tmp: str, own: bool, segments: list[int]) -> dict[str, Any]:
        """Write this worker's own part (``own``) and the global part of ``segments`` into the step's
        temp directory; the manifest entries, for the driver's commit."""
        return write_worker(Path(tmp), self._worker(), {int(g): self.rank for g in segments}, own)

    def load(self, run_dir: str, step: int) -> bool:
        """Resume this worker from the checkpoint of ``step`` (into this job's topology); False when it
        cannot (it then catches up from the global weights)."""
        try:
            src = ResumeSource(self.cfg, self.layout, checkpoint_dir(Path(run_dir)) / f"step-{step}")
            src.restore(self._worker())
            rng = src.rng(self.rank)
        except CheckpointError as e:
            log.warning("worker %d: %s", self.rank, e)
            return False
        self.in_sync = True
        if rng is not None:
            torch.set_rng_state(rng)
        return True
