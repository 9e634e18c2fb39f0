"""The round loop's shared parts, and the in-process run: R workers as threads over the simulated transport.

``distrain train`` is the R = 1 case (no outer round); ``distrain simulate`` runs several
replicas through the very same ``Worker.run_round`` the multi-process launchers use, with a
network model that turns bytes into simulated seconds. The torchrun and Ray launchers reuse
``RoundLogger`` (metrics records, evaluation and checkpoint schedule, progress) and the per-rank
checkpoint helpers below, so every mode logs the same records and rounds the same way.
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
from distrain.checkpoint import LoadedCheckpoint, list_checkpoints, read_checkpoint, resolve_resume, save_checkpoint
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
    sim_time_s: float  # simulation: simulated wall-clock; real modes: the real round-loop wall-clock
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


def apply_torch_threads(cfg: Config) -> None:
    """``runtime.torch_threads`` > 0 pins torch's intra-op threads: results depend on it bit-wise."""
    if cfg.runtime.torch_threads > 0:
        torch.set_num_threads(cfg.runtime.torch_threads)


def n_rounds(cfg: Config, steps_per_round: int) -> int:
    """Rounds of a run whose first replica does ``steps_per_round`` inner steps per round."""
    return math.ceil(cfg.train.steps / steps_per_round)


def crossed(step: int, steps: int, every: int) -> bool:
    """Did the last ``steps`` inner steps, ending at ``step``, cross a multiple of ``every``?"""
    return bool(every) and step // every > (step - steps) // every


# ----- metrics: one schedule and one record format for every mode ---------------------------------
def round_record(round_idx: int, reports: list[RoundReport], total_tokens: int, bytes_sent: int,
                 clock_s: float, utilisation: float, wall_s: float | None = None) -> dict[str, Any]:
    """The ``kind = "train"`` record of one round, from the replicas' reports (leaders only).

    ``bytes_sent`` is the running total before this round; the record carries the new total.
    ``wall_s``: real seconds of the round; without it tokens/s is per (simulated) compute second.
    """
    r0 = reports[0]
    wall = wall_s if wall_s is not None else float(np.mean([r.compute_s for r in reports]))
    tokens_per_s = sum(r.tokens for r in reports) / max(1e-9, wall)
    rec: dict[str, Any] = {
        "kind": "train", "round": round_idx, "step": r0.step, "tokens": total_tokens,
        "loss": float(np.mean([r.train_loss for r in reports])), "lr": r0.lr,
        "tokens_per_s": tokens_per_s, "sim_time_s": clock_s, "utilisation": utilisation,
    }
    stats = [r.outer for r in reports if r.outer is not None]
    if stats:
        sent = float(np.mean([s.wire_bytes for s in stats]))
        dense = float(np.mean([s.dense_bytes for s in stats]))
        bytes_sent += int(sent)
        rec.update(wire_bytes=sent, dense_bytes=dense, compression=dense / max(1.0, sent),
                   rejected=sum(s.rejected for s in stats), contributors=min(s.contributors for s in stats))
    rec["bytes_sent"] = bytes_sent
    return rec


class RoundLogger:
    """Rank 0's account of a run: metrics.jsonl records, the progress bar, the summary's averages."""

    def __init__(self, cfg: Config, run_dir: Path, total_rounds: int, start_round: int = 0, bytes_sent: int = 0):
        self.cfg = cfg
        self.metrics = MetricsLogger(run_dir, cfg.logging.tensorboard, append=start_round > 0)
        self.progress = Progress(total_rounds, cfg.logging.progress, desc=cfg.outer.algorithm, initial=start_round)
        self.total_rounds = total_rounds
        self.bytes_sent = bytes_sent
        self.wire: list[float] = []
        self.dense: list[float] = []
        self.first_val = float("nan")
        self.val_loss = float("nan")

    def initial_val(self, val_loss: float) -> None:
        self.first_val = self.val_loss = val_loss
        self.metrics.log({"kind": "val", "step": 0, "round": 0, "tokens": 0, "bytes_sent": 0,
                          "sim_time_s": 0.0, "val_loss": val_loss}, step=0)

    def train(self, round_idx: int, reports: list[RoundReport], total_tokens: int, clock_s: float,
              utilisation: float, wall_s: float | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        rec = round_record(round_idx, reports, total_tokens, self.bytes_sent, clock_s, utilisation, wall_s)
        rec.update(extra or {})
        self.bytes_sent = rec["bytes_sent"]
        self.wire.append(rec.get("wire_bytes", 0.0))
        self.dense.append(rec.get("dense_bytes", 0.0))
        self.metrics.log(rec, step=rec["step"])
        return rec

    def eval_due(self, rec: dict[str, Any], steps: int) -> bool:
        return rec["round"] == self.total_rounds or crossed(rec["step"], steps, self.cfg.train.eval_every)

    def checkpoint_due(self, rec: dict[str, Any], steps: int) -> bool:
        return rec["round"] == self.total_rounds or crossed(rec["step"], steps, self.cfg.checkpoint.every)

    def val(self, rec: dict[str, Any], val_loss: float) -> None:
        self.val_loss = val_loss
        self.metrics.log({"kind": "val", "step": rec["step"], "round": rec["round"], "tokens": rec["tokens"],
                          "bytes_sent": rec["bytes_sent"], "sim_time_s": rec["sim_time_s"], "val_loss": val_loss},
                         step=rec["step"])
        rec["val_loss"] = val_loss

    def log(self, record: dict[str, Any]) -> None:
        """Any other record (e.g. ``kind = "event"``: a worker dropped, a resume)."""
        self.metrics.log(record, step=record.get("step"))

    def show(self, rec: dict[str, Any], clock: str = "sim") -> None:
        self.progress.update(1, loss=rec["loss"], val=self.val_loss, tok_s=rec["tokens_per_s"],
                             sent=human_bytes(rec["bytes_sent"]), ratio=rec.get("compression", 1.0))
        if self.cfg.outer.algorithm in ("diloco", "sparseloco"):
            self.progress.write(round_line(rec, clock))

    def summary(self, run_dir: Path, rounds: int, steps: int, tokens: int, clock_s: float, utilisation: float,
                wall_s: float) -> RunSummary:
        return RunSummary(run_dir, rounds, steps, tokens, self.first_val, self.val_loss,
                          float(np.mean(self.wire)) if self.wire else 0.0,
                          float(np.mean(self.dense)) if self.dense else 0.0, clock_s, utilisation, wall_s)

    def close(self) -> None:
        self.progress.close()
        self.metrics.close()


def round_line(rec: dict[str, Any], clock: str = "sim") -> str:
    return (f"round {rec['round']:4d} step {rec['step']:5d} loss {rec['loss']:.4f} "
            f"sent {human_bytes(rec.get('wire_bytes', 0))}/replica ({rec.get('compression', 1):.0f}x < fp32) "
            f"{clock} {rec['sim_time_s']:.1f}s util {rec['utilisation']:.2f}")


# ----- per-rank checkpoints (torchrun, Ray): checkpoints/rank-K/step-N -----------------------------
def rank_checkpoint_dir(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"rank-{rank}"


def save_rank_checkpoint(run_dir: Path, rank: int, step: int, state: dict[str, Any], meta: dict[str, Any],
                         keep: int) -> Path:
    return save_checkpoint(rank_checkpoint_dir(run_dir, rank), step, state, {**meta, "rank": rank}, keep=keep)


def rank_checkpoint_steps(run_dir: Path, rank: int) -> list[int]:
    """Steps this rank has a checkpoint directory for, newest first (not yet verified)."""
    return [int(p.name.split("-", 1)[1]) for p in list_checkpoints(rank_checkpoint_dir(run_dir, rank))]


def read_rank_checkpoint(run_dir: Path, rank: int, step: int) -> LoadedCheckpoint:
    """One rank's checkpoint at ``step``, verified (size, checksum, format) before loading."""
    return read_checkpoint(rank_checkpoint_dir(run_dir, rank) / f"step-{step}")


def newest_common_step(steps_per_rank: list[list[int]], exclude: set[int] = frozenset()) -> int | None:
    """The newest step every rank has a checkpoint for (the agreed resume point), or None."""
    if not steps_per_rank:
        return None
    common = set(steps_per_rank[0]).intersection(*map(set, steps_per_rank[1:])) - set(exclude)
    return max(common) if common else None


# ----- the simulation ------------------------------------------------------------------------------
class Simulation:
    """Drives rounds over R in-process workers; rank 0's view is what gets logged."""

    def __init__(self, cfg: Config):
        if cfg.outer.algorithm == "none" and cfg.topology.replicas != 1:
            raise ValueError("outer.algorithm = 'none' trains one replica; set topology.replicas = 1 "
                             "or pick ddp, diloco or sparseloco")
        self.cfg = cfg
        apply_torch_threads(cfg)
        self.run_dir = setup_run_dir(cfg)
        self.data = prepare_data(cfg, progress=cfg.logging.progress)
        save_config(cfg, self.run_dir / "config.toml")  # now with the resolved vocabulary size
        self.val_batches = validation_batches(cfg, self.data)
        R = cfg.topology.replicas
        net = cfg.network
        self.hub = SimulatedHub(R, {"replicas": list(range(R))},
                                NetworkModel.uniform(R, net.up_mbps, net.down_mbps, net.latency_ms),
                                timeout_s=cfg.topology.round_timeout_s,
                                overlap=cfg.outer.apply_delay == 1)  # delayed apply: all-gathers in the background
        train_tokens = read_shard(self.data.train_path)
        self.workers: list[Worker] = [build_worker(cfg, r, r, train_tokens, self.hub.transport(r)) for r in range(R)]
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
        return n_rounds(self.cfg, self.workers[0].steps_per_round)

    def evaluate(self) -> float:
        return self.workers[0].trainer.evaluate(self.val_batches)

    def run(self) -> RunSummary:
        cfg = self.cfg
        t0 = time.perf_counter()
        total = self.n_rounds()
        logger = RoundLogger(cfg, self.run_dir, total, self.round, self.bytes_sent)
        if self.round == 0:
            logger.initial_val(self.evaluate())
        pool = ThreadPoolExecutor(max_workers=len(self.workers), thread_name_prefix="worker")
        try:
            while self.round < total:
                remaining = cfg.train.steps - self.workers[0].trainer.step
                t_round = time.perf_counter()
                reports = self._run_round(pool, remaining)
                t_round = time.perf_counter() - t_round
                self.round += 1
                if self.round == total:
                    for w in self.workers:
                        w.finish()
                rec = logger.train(self.round, reports, self.total_tokens, self.clock_s(), self.utilisation(),
                                   wall_s=t_round)
                self.bytes_sent = logger.bytes_sent
                if logger.eval_due(rec, reports[0].steps):
                    logger.val(rec, self.evaluate())
                logger.show(rec)
                if logger.checkpoint_due(rec, reports[0].steps):
                    self.save()
        finally:
            pool.shutdown(wait=True)
            logger.close()
        if cfg.logging.plots:
            from distrain.plots import plot_run

            plot_run(self.run_dir)
        return logger.summary(self.run_dir, self.round, self.workers[0].trainer.step, self.total_tokens,
                              self.clock_s(), self.utilisation(), time.perf_counter() - t0)

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


def run_simulation(cfg: Config) -> RunSummary:
    return Simulation(cfg).run()


# ----- fault injection for the launchers' tests and demos ----------------------------------------
@dataclass(frozen=True)
class Fault:
    """``KIND:rank=R,round=N[,delay=S]`` — what to break, where, and when.

    - ``exit`` (torchrun): rank R exits at the start of round N, on the first attempt only, so
      torchrun's elastic restart has something to resume;
    - ``kill`` (Ray): worker R stops after its inner steps of round N, before sending its frame,
      and the driver kills its actor S seconds into the round (Ray restarts it);
    - ``stale`` (Ray): worker R re-sends its previous round's frame in round N.
    """

    kind: str
    rank: int
    round: int
    delay: float = 0.0

    KINDS = ("exit", "kill", "stale")

    @classmethod
    def parse(cls, spec: str) -> "Fault":
        kind, _, rest = spec.partition(":")
        if kind not in cls.KINDS:
            raise ValueError(f"fault {spec!r}: kind must be one of {', '.join(cls.KINDS)}")
        fields: dict[str, str] = {}
        for part in filter(None, rest.split(",")):
            k, eq, v = part.partition("=")
            if not eq or k not in ("rank", "round", "delay"):
                raise ValueError(f"fault {spec!r}: expected rank=R,round=N[,delay=S], got {part!r}")
            fields[k] = v
        if "rank" not in fields or "round" not in fields:
            raise ValueError(f"fault {spec!r}: rank and round are required")
        try:
            return cls(kind, int(fields["rank"]), int(fields["round"]), float(fields.get("delay", 0.0)))
        except ValueError:
            raise ValueError(f"fault {spec!r}: rank and round must be integers, delay a number") from None
