"""torchrun entry point: one process per device; a replica is one process or a group of them.

    torchrun --standalone --nproc-per-node 3 -m launch.torchrun --config configs/torchrun_cpu.toml
    torchrun --nnodes 2 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        --nproc-per-node 4 --max-restarts 3 -m launch.torchrun --config my.toml

The world size must equal the layout's (``topology.replicas`` processes, or the sum of
``runtime.replica_devices``). Rank 0 prepares the data while the others wait, then everyone loads
the cache; rank 0 broadcasts its initial weights (a dense wire frame); every rank runs the same
``Worker.run_round`` as the simulation over a torch.distributed transport; rank 0 logs metrics and
evaluates; each rank checkpoints its own worker state under ``checkpoints/rank-K/step-N``.
A restarted job (``--checkpoint.resume=auto``, or any torchrun elastic restart) resumes every rank
from the newest step that all ranks have a good checkpoint for, agreed by an all-gather.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import torch

from comm.torch_transport import TorchTransport, init_process_group
from comm.transport import WORLD
from distrain.checkpoint import CheckpointError
from distrain.config import Config, ConfigError, load_config, save_config
from distrain.data import read_shard
from distrain.layout import REPLICAS, Layout
from distrain.replica import build_replica_group, replica_groups
from distrain.runner import (
    Fault,
    RoundLogger,
    RunSummary,
    apply_torch_threads,
    crossed,
    n_rounds,
    newest_common_step,
    prepare_data,
    rank_checkpoint_steps,
    read_rank_checkpoint,
    save_rank_checkpoint,
    validation_batches,
)
from distrain.worker import RoundReport, build_worker, decode_params, encode_params, run_id, steps_per_round

log = logging.getLogger("distrain.torchrun")


def restart_count() -> int:
    """How many times torchrun's elastic agent has restarted this job (0: first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


class TorchrunJob:
    """One rank's part of a torchrun job."""

    def __init__(self, cfg: Config, layout: Layout, transport: TorchTransport, fault: Fault | None = None):
        self.cfg, self.layout, self.transport, self.fault = cfg, layout, transport, fault
        self.rank = transport.rank
        self.replica = layout.replica_of(self.rank)
        self.run_dir = Path(cfg.run.out_dir) / cfg.run.name
        if self.rank == 0:  # rank 0 prepares (tokenises) while the others wait, then they hit the cache
            data = prepare_data(cfg, progress=cfg.logging.progress)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.toml")
        transport.barrier(WORLD)
        if self.rank != 0:
            data = prepare_data(cfg)
        self.worker = build_worker(cfg, self.rank, self.replica, read_shard(data.train_path), transport,
                                   group=REPLICAS, data_shard=layout.data_rank(self.rank),
                                   replica_group=build_replica_group(cfg, layout, transport))
        self.val_batches = validation_batches(cfg, data) if self.rank == 0 else []
        self.round, self.bytes_sent, self.tokens = 0, 0, 0
        self.busy_s, self.elapsed_s = 0.0, 0.0  # inner-step seconds (mean over replicas) and loop wall-clock
        self.first_val = float("nan")
        self.resumed_from: int | None = None
        if cfg.checkpoint.resume not in ("none", "auto"):
            raise ConfigError("under torchrun checkpoint.resume must be 'none' or 'auto' (each rank resumes its own "
                              "checkpoints/rank-K at the newest step every rank has)")
        if cfg.checkpoint.resume == "auto" or restart_count() > 0:
            self.resumed_from = self._resume()
        if self.resumed_from is None:
            self._broadcast_initial_weights()

    # ----- start ---------------------------------------------------------------------------------
    def _gather(self, obj: Any) -> list[Any]:
        """All ranks' small control values (msgpack, never pickle)."""
        got = self.transport.all_gather_bytes(WORLD, msgpack.packb(obj, use_bin_type=True))
        return [msgpack.unpackb(b, raw=False, strict_map_key=False) for b in got]  # type: ignore[arg-type]

    def _broadcast_initial_weights(self) -> None:
        """Rank 0's weights to every rank as a validated dense frame (identical seeds make this a
        no-op on one machine; across machines it rules out any difference in initialisation)."""
        rid = run_id(self.cfg)
        frame = encode_params(self.worker.global_params(), rid, 0, 0) if self.rank == 0 else None
        data = self.transport.broadcast_bytes(WORLD, frame, src=0)
        self.worker.load_global(decode_params(data, self.worker.param_shapes(), rid, 0))

    def _resume(self) -> int | None:
        """Load the newest checkpoint step every rank has and can read; None: start fresh."""
        mine = rank_checkpoint_steps(self.run_dir, self.rank)
        bad: set[int] = set()
        for _ in range(len(mine) + 1):
            step = newest_common_step(self._gather(mine), bad)
            if step is None:
                return None
            try:
                ckpt = read_rank_checkpoint(self.run_dir, self.rank, step)
                ok = True
            except CheckpointError as e:
                log.warning("rank %d: checkpoint step %d unusable: %s", self.rank, step, e)
                ok = False
            if all(self._gather(ok)):
                st = ckpt.state
                self.worker.load_state_dict(st["worker"])
                self.round, self.bytes_sent, self.tokens = int(st["round"]), int(st["bytes_sent"]), int(st["tokens"])
                self.busy_s, self.elapsed_s = float(st["busy_s"]), float(st["elapsed_s"])
                self.first_val = float(st["first_val"])
                torch.set_rng_state(st["rng"])
                log.info("rank %d resumed from step %d (round %d)", self.rank, step, self.round)
                return step
            bad.add(step)
        return None

    # ----- rounds --------------------------------------------------------------------------------
    def save(self, step: int) -> None:
        state = {"round": self.round, "bytes_sent": self.bytes_sent, "tokens": self.tokens, "busy_s": self.busy_s,
                 "elapsed_s": self.elapsed_s, "first_val": self.first_val, "worker": self.worker.state_dict(), "rng": torch.get_rng_state()}
        meta = {"round": self.round, "step": step, "tokens": self.tokens, "config_hash": self.cfg.hash(),
                "world_size": self.layout.world_size}
        save_rank_checkpoint(self.run_dir, self.rank, step, state, meta, self.cfg.checkpoint.keep)

    def utilisation(self) -> float:
        """Fraction of the loop's wall-clock spent in inner steps (mean over replicas)."""
        return min(1.0, self.busy_s / max(1e-9, self.elapsed_s))

    def _maybe_fail(self) -> None:
        f = self.fault
        if f and f.kind == "exit" and f.rank == self.rank and f.round == self.round and restart_count() == 0:
            log.warning("fault injection: rank %d exits at the start of round %d", self.rank, self.round)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(17)

    def run(self) -> RunSummary | None:
        cfg = self.cfg
        spr0 = steps_per_round(cfg, 0)
        total = n_rounds(cfg, spr0)
        logger = RoundLogger(cfg, self.run_dir, total, self.round, self.bytes_sent) if self.rank == 0 else None
        t_start = time.perf_counter()
        try:
            if logger is not None:
                if self.resumed_from is not None:
                    logger.first_val = self.first_val
                    logger.log({"kind": "event", "event": "resumed", "step": self.resumed_from, "round": self.round,
                                "attempt": restart_count()})
                elif self.round == 0:
                    logger.initial_val(self.worker.evaluate(self.val_batches))
                    self.first_val = logger.first_val
            loop_start, elapsed0 = time.perf_counter(), self.elapsed_s  # earlier attempts' loop time counts
            while self.round < total:
                self._maybe_fail()
                remaining = cfg.train.steps - self.round * spr0
                t0 = time.perf_counter()
                report = self.worker.run_round(self.round, remaining)
                self.round += 1
                if self.round == total:
                    self.worker.finish()
                reports = [RoundReport.from_dict(d) for d in self._gather(report.to_dict())]
                wall = time.perf_counter() - t0
                leaders = [reports[r] for r in self.layout.leaders()]
                self.tokens += sum(r.tokens for r in reports)
                self.busy_s += float(sum(r.extra.get("train_s", 0.0) for r in leaders) / len(leaders))
                step = leaders[0].step
                self.elapsed_s = elapsed0 + time.perf_counter() - loop_start
                if logger is not None:
                    rec = logger.train(self.round, leaders, self.tokens, self.elapsed_s, self.utilisation(), wall_s=wall)
                    self.bytes_sent = logger.bytes_sent
                    if logger.eval_due(rec, leaders[0].steps):
                        logger.val(rec, self.worker.evaluate(self.val_batches))
                    logger.show(rec, clock="wall")
                if self.round == total or crossed(step, leaders[0].steps, cfg.checkpoint.every):
                    self.save(step)
            self.transport.barrier(WORLD)
        finally:
            if logger is not None:
                logger.close()
        if logger is None:
            return None
        if cfg.logging.plots:
            from distrain.plots import plot_run

            plot_run(self.run_dir)
        summary = logger.summary(self.run_dir, self.round, self.worker.trainer.step, self.tokens, self.elapsed_s,
                                 self.utilisation(), time.perf_counter() - t_start)
        (self.run_dir / "summary.json").write_text(json.dumps({**summary.to_dict(), "mode": "torchrun",
                                                               "world_size": self.layout.world_size}, indent=1))
        return summary


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m launch.torchrun", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="torchrun_cpu", help="TOML file or preset name in configs/")
    p.add_argument("--fault", default="", help="fault injection, e.g. exit:rank=1,round=2 (tests and demos)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"%(asctime)s rank{os.environ.get('RANK', '?')} %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, overrides)
        layout = Layout.from_config(cfg)
        fault = Fault.parse(args.fault) if args.fault else None
    except (ConfigError, ValueError) as e:
        print(f"launch.torchrun: config error: {e}", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "0"))
    if world != layout.world_size:
        print(f"launch.torchrun: WORLD_SIZE={world or 'unset'} but the config needs {layout.world_size} processes "
              f"({layout.replicas} replicas, devices {list(layout.devices)}); run under torchrun with "
              f"--nproc-per-node {layout.world_size}", file=sys.stderr)
        return 2
    apply_torch_threads(cfg)
    if torch.cuda.is_available() and cfg.runtime.backend != "gloo":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    init_process_group(cfg.runtime.backend, cfg.topology.round_timeout_s)
    import torch.distributed as dist

    try:
        transport = TorchTransport({**layout.groups(), **replica_groups(cfg, layout)},
                                   timeout_s=cfg.topology.round_timeout_s)
        summary = TorchrunJob(cfg, layout, transport, fault).run()
        if summary is not None:
            print(json.dumps(summary.to_dict()), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
