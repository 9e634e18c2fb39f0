"""The in-process run: R workers as threads over the simulated transport.

``distrain train`` is the R = 1 case (no outer round); ``distrain simulate`` runs several
replicas through the very same ``Worker.run_round`` the multi-process launchers use, with a
network model that turns bytes into simulated seconds.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from comm.network import NetworkModel, RankStats
from comm.simulated import SimulatedHub
from distrain.checkpoint import resolve_resume, save_checkpoint
from distrain.config import Config, save_config
from distrain.data import PreparedData, TokenSampler, prepare, read_shard
from distrain.metrics import MetricsLogger, Progress, human_bytes
from distrain.worker import RoundReport, Worker, build_worker

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    run_dir: Path
    rounds: int
    steps: int
    tokens: int
    first_val_loss: float
    final_val_loss: float
    wire_bytes_per_replica_per_round: float
    dense_fp32_bytes_per_replica_per_round: float
    sim_time_s: float
    utilisation: float
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["run_dir"] = str(self.run_dir)
        return d


def setup_run_dir(cfg: Config) -> Path:
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.toml")
    return run_dir


def prepare_data(cfg: Config, progress: bool = False) -> PreparedData:
    """Tokenise the configured source (cached) and fix the model's vocabulary size from it."""
    data = prepare(cfg.data, cfg.run.seed, progress=progress)
    if cfg.model.vocab_size and cfg.model.vocab_size < data.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {data.vocab_size}")
    if not cfg.model.vocab_size:
        cfg.model.vocab_size = data.vocab_size
    return data


def validation_batches(cfg: Config, data: PreparedData) -> list[tuple[torch.Tensor, torch.Tensor]]:
    val = TokenSampler(read_shard(data.val_path), cfg.data.seq_len, cfg.train.batch_size, 0, 1, cfg.run.seed)
    return val.val_batches(cfg.train.eval_batches)


class Simulation:
    """Drives rounds over R in-process workers; rank 0's view is what gets logged."""

    def __init__(self, cfg: Config):
        if cfg.outer.algorithm == "none" and cfg.topology.replicas != 1:
            raise ValueError("outer.algorithm = 'none' trains one replica; set topology.replicas = 1 "
                             "or pick ddp, diloco or sparseloco")
        self.cfg = cfg
        self.run_dir = setup_run_dir(cfg)
        self.data = prepare_data(cfg, progress=cfg.logging.progress)
        save_config(cfg, self.run_dir / "config.toml")  # now with the resolved vocabulary size
        self.val_batches = validation_batches(cfg, self.data)
        R = cfg.topology.replicas
        net = cfg.network
        self.hub = SimulatedHub(R, {"replicas": list(range(R))},
                                NetworkModel.uniform(R, net.up_mbps, net.down_mbps, net.latency_ms),
                                timeout_s=cfg.topology.round_timeout_s)
        train_tokens = read_shard(self.data.train_path)
        self.workers: list[Worker] = [build_worker(cfg, r, r, train_tokens, self.hub.transport(r)) for r in range(R)]
        self.metrics = MetricsLogger(self.run_dir, cfg.logging.tensorboard)
        self.round = 0
        self.bytes_sent = 0
        self.ckpt_dir = self.run_dir / "checkpoints"
        resumed = resolve_resume(cfg.checkpoint.resume, self.ckpt_dir)
        if resumed is not None:
            self.load_state_dict(resumed.state)
            log.info("resumed from %s (round %d)", resumed.path, self.round)

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "bytes_sent": self.bytes_sent, "workers": [w.state_dict() for w in self.workers],
                "network": [dataclasses.asdict(self.hub.stats(r)) for r in range(len(self.workers))], "rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["workers"]) != len(self.workers):
            raise ValueError(f"checkpoint has {len(state['workers'])} workers, config has {len(self.workers)}")
        self.round = int(state["round"])
        self.bytes_sent = int(state["bytes_sent"])
        for w, s in zip(self.workers, state["workers"]):
            w.load_state_dict(s)
        self.hub.network.load_stats([RankStats(**d) for d in state["network"]])
        torch.set_rng_state(state["rng"])

    def save(self) -> Path:
        meta = {"round": self.round, "step": self.workers[0].trainer.step, "tokens": self.total_tokens,
                "config_hash": self.cfg.hash()}
        return save_checkpoint(self.ckpt_dir, self.workers[0].trainer.step, self.state_dict(), meta,
                               keep=self.cfg.checkpoint.keep)

    def clock_s(self) -> float:
        """Simulated wall-clock: the latest worker clock."""
        return max(self.hub.stats(r).clock_s for r in range(len(self.workers)))

    def utilisation(self) -> float:
        """Fraction of worker-seconds spent computing (the rest is communication and waiting)."""
        clock = self.clock_s()
        busy = sum(self.hub.stats(r).compute_time_s for r in range(len(self.workers)))
        return busy / (clock * len(self.workers)) if clock > 0 else 1.0

    @property
    def total_tokens(self) -> int:
        return sum(w.tokens for w in self.workers)

    # -- running -------------------------------------------------------------------------------
    def n_rounds(self) -> int:
        return math.ceil(self.cfg.train.steps / self.workers[0].steps_per_round)

    def evaluate(self) -> float:
        return self.workers[0].trainer.evaluate(self.val_batches)

    def run(self) -> RunSummary:
        cfg = self.cfg
        t0 = time.perf_counter()
        n_rounds = self.n_rounds()
        progress = Progress(n_rounds, cfg.logging.progress, desc=cfg.outer.algorithm, initial=self.round)
        first_val = self.evaluate() if self.round == 0 else float("nan")
        if self.round == 0:
            self.metrics.log({"kind": "val", "step": 0, "round": 0, "tokens": 0, "bytes_sent": 0,
                              "sim_time_s": 0.0, "val_loss": first_val}, step=0)
        wire, dense, val_loss = [], [], first_val
        every = cfg.checkpoint.every
        pool = ThreadPoolExecutor(max_workers=len(self.workers), thread_name_prefix="worker")
        try:
            while self.round < n_rounds:
                remaining = cfg.train.steps - self.workers[0].trainer.step
                reports = self._run_round(pool, remaining)
                self.round += 1
                rec = self._round_record(reports)
                wire.append(rec.get("wire_bytes", 0.0))
                dense.append(rec.get("dense_bytes", 0.0))
                step = rec["step"]
                self.metrics.log(rec, step=step)
                last = self.round == n_rounds
                if last or step // cfg.train.eval_every > (step - reports[0].steps) // cfg.train.eval_every:
                    val_loss = self.evaluate()
                    self.metrics.log({"kind": "val", "step": step, "round": self.round, "tokens": rec["tokens"],
                                      "bytes_sent": rec["bytes_sent"], "sim_time_s": rec["sim_time_s"],
                                      "val_loss": val_loss}, step=step)
                    rec["val_loss"] = val_loss
                progress.update(1, loss=rec["loss"], val=val_loss, tok_s=rec["tokens_per_s"],
                                sent=human_bytes(rec["bytes_sent"]), ratio=rec.get("compression", 1.0))
                if cfg.outer.algorithm in ("diloco", "sparseloco"):
                    progress.write(self._round_line(rec))
                if last or (every and step // every > (step - reports[0].steps) // every):
                    self.save()
        finally:
            pool.shutdown(wait=True)
            progress.close()
            self.metrics.close()
        if cfg.logging.plots:
            from distrain.plots import plot_run

            plot_run(self.run_dir)
        clock = self.clock_s()
        return RunSummary(self.run_dir, self.round, self.workers[0].trainer.step, self.total_tokens, first_val,
                          val_loss, float(np.mean(wire)) if wire else 0.0, float(np.mean(dense)) if dense else 0.0,
                          clock, self.utilisation(), time.perf_counter() - t0)

    def _run_round(self, pool: ThreadPoolExecutor, remaining: int) -> list[RoundReport]:
        futures = [pool.submit(w.run_round, self.round, remaining) for w in self.workers]
        errors, reports = [], []
        for f in futures:
            try:
                reports.append(f.result())
            except Exception as e:  # noqa: BLE001 - re-raised below with every worker's failure
                errors.append(e)
        if errors:
            raise errors[0]
        return reports

    def _round_record(self, reports: list[RoundReport]) -> dict[str, Any]:
        r0 = reports[0]
        wall = sum(r.compute_s for r in reports) / len(reports)
        rec: dict[str, Any] = {
            "kind": "train", "round": self.round, "step": r0.step, "tokens": self.total_tokens,
            "loss": float(np.mean([r.train_loss for r in reports])), "lr": r0.lr,
            "tokens_per_s": sum(r.tokens for r in reports) / max(1e-9, wall * len(reports)) * len(reports),
            "sim_time_s": self.clock_s(), "utilisation": self.utilisation(),
        }
        stats = [r.outer for r in reports if r.outer is not None]
        if stats:
            sent = float(np.mean([s.wire_bytes for s in stats]))
            dense = float(np.mean([s.dense_bytes for s in stats]))
            self.bytes_sent += int(sent)
            rec.update(wire_bytes=sent, dense_bytes=dense, compression=dense / max(1.0, sent),
                       rejected=sum(s.rejected for s in stats), contributors=min(s.contributors for s in stats))
        rec["bytes_sent"] = self.bytes_sent
        return rec

    def _round_line(self, rec: dict[str, Any]) -> str:
        return (f"round {rec['round']:4d} step {rec['step']:5d} loss {rec['loss']:.4f} "
                f"sent {human_bytes(rec.get('wire_bytes', 0))}/replica ({rec.get('compression', 1):.0f}x < fp32) "
                f"sim {rec['sim_time_s']:.1f}s util {rec['utilisation']:.2f}")


def run_simulation(cfg: Config) -> RunSummary:
    return Simulation(cfg).run()
