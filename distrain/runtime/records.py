"""The coordinator's account of a run: one record format for every mode, the progress, the summary."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distrain.config import Config
from distrain.layout import Layout
from distrain.metrics import MetricsLogger, Progress, human_bytes
from distrain.outer.base import RoundStats
from distrain.runtime.steps import RoundPlan
from distrain.worker.worker import RoundReport


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
    segment_bytes: list[float] = field(default_factory=list)  # pseudo-gradient bytes per segment per round
    boundary_bytes_per_token: float = 0.0  # pipeline boundaries, per token and direction (0: no pipeline)
    pipeline_wait_share: float = 0.0  # of the pipeline workers' simulated time: bubble + boundary transfers
    step_share: float = 1.0  # of the workers' round time, the share inside inner steps (compute, pipeline waits)
    replica_step_share: list[float] = field(default_factory=list)  # the same, per replica
    replica_steps: list[int] = field(default_factory=list)  # inner steps each replica ran
    clipped: int = 0  # contributions the robust bound scaled down
    set_aside: int = 0  # contributions the direction check set aside (each counted once per round)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["run_dir"] = str(self.run_dir)
        return d


def crossed(step: int, steps: int, every: int) -> bool:
    """Did the last ``steps`` inner steps, ending at ``step``, cross a multiple of ``every``?"""
    return bool(every) and step // every > (step - steps) // every


def time_split(reports: list[RoundReport], n_replicas: int) -> dict[str, list[float]]:
    """Where each replica's round went, in seconds on its workers' clocks (mean over its workers):
    ``compute``; ``pipeline`` (inside its steps but not computing: a pipeline's bubble, boundary
    transfers and clip-norm exchange); ``exchange`` (the outer round's transfers: what the replica
    that reached it last spent there); ``idle`` (waiting at the exchange for the others)."""
    sums = {k: [0.0] * n_replicas for k in ("compute", "steps", "sync", "n")}
    for r in reports:
        sums["compute"][r.replica] += r.compute_s
        sums["steps"][r.replica] += r.steps_s
        sums["sync"][r.replica] += r.sync_s
        sums["n"][r.replica] += 1
    present = [i for i in range(n_replicas) if sums["n"][i]]
    mean = {k: [sums[k][i] / sums["n"][i] if sums["n"][i] else 0.0 for i in range(n_replicas)]
            for k in ("compute", "steps", "sync")}
    exchange = min((mean["sync"][i] for i in present), default=0.0)
    return {
        "compute": mean["compute"],
        "pipeline": [max(0.0, st - c) for st, c in zip(mean["steps"], mean["compute"])],
        "exchange": [exchange if i in present else 0.0 for i in range(n_replicas)],
        "idle": [max(0.0, mean["sync"][i] - exchange) if i in present else 0.0 for i in range(n_replicas)],
    }


def step_share(split: dict[str, list[float]]) -> float:
    """Share of the workers' round time spent inside inner steps (compute and a pipeline's own waits)."""
    busy = sum(split["compute"]) + sum(split["pipeline"])
    total = busy + sum(split["exchange"]) + sum(split["idle"])
    return busy / total if total > 0 else 1.0


def round_record(round_idx: int, step: int, reports: list[RoundReport], layout: Layout, total_tokens: int,
                 bytes_sent: int, clock_s: float, utilisation: float, wall_s: float,
                 plan: RoundPlan | None = None) -> dict[str, Any]:
    """The ``kind = "train"`` record of one round, from the reports of the workers that finished it.

    Loss: mean over replicas of the loss of the worker that stands for each (``layout.reporter``).
    Bytes: per replica, the sum of its workers' frames over every segment; the record carries the
    mean over replicas (``wire_bytes``) and per segment (``segment_bytes``). ``bytes_sent`` is the
    running total before this round; the record carries the new total. Per replica: the steps it
    ran (``replica_steps``, what ``topology.step_plan`` replays), the tokens behind its
    contribution, its mean step time and where its time went (``time``); ``plan`` is the round's
    decision and ``clipped`` the contributions the robust bound scaled down.
    """
    reporters = {layout.reporter(r.replica): r for r in reports if r.rank == layout.reporter(r.replica)}
    losses = [r.train_loss for r in reporters.values() if math.isfinite(r.train_loss)]
    first = reporters[min(reporters)] if reporters else reports[0]
    round_tokens = sum(r.tokens for r in reports)
    rec: dict[str, Any] = {
        "kind": "train", "round": round_idx, "step": step, "tokens": total_tokens,
        "loss": float(np.mean(losses)) if losses else float("nan"), "lr": first.lr,
        "tokens_per_s": round_tokens / max(1e-9, wall_s), "sim_time_s": clock_s, "utilisation": utilisation,
        "workers": len(reports), "replicas": len({r.replica for r in reports}),
    }
    n = layout.n_replicas
    reporters_of = {r.replica: r for r in reports if r.rank == layout.reporter(r.replica)}
    rec["replica_steps"] = [reporters_of[i].steps if i in reporters_of else 0 for i in range(n)]
    rec["replica_tokens"] = [reporters_of[i].work_tokens if i in reporters_of else 0 for i in range(n)]
    rec["replica_step_s"] = [max((r.step_s for r in reports if r.replica == i), default=0.0) for i in range(n)]
    split = time_split(reports, n)
    rec["time"] = split
    rec["step_share"] = step_share(split)
    if plan is not None:
        rec["plan"] = plan.to_dict()
    stats = [(r.replica, s) for r in reports for s in r.outer]
    if stats:
        per_replica: dict[int, list[float]] = {}
        per_segment: dict[int, list[float]] = {}
        for replica, s in stats:
            per_replica.setdefault(replica, [0.0, 0.0])
            per_replica[replica][0] += s.wire_bytes
            per_replica[replica][1] += s.dense_bytes
            per_segment.setdefault(s.segment, []).append(s.wire_bytes)
        sent = float(np.mean([v[0] for v in per_replica.values()]))
        dense = float(np.mean([v[1] for v in per_replica.values()]))
        bytes_sent += int(sent)
        rec.update(wire_bytes=sent, dense_bytes=dense, compression=dense / max(1.0, sent),
                   rejected=sum(s.rejected for _, s in stats), clipped=sum(s.clipped for _, s in stats),
                   contributors=min(s.contributors for _, s in stats),
                   segment_bytes=[float(np.mean(per_segment[g])) for g in sorted(per_segment)])
        rec.update(direction_record([s for _, s in stats]))
    per_token = []
    for replica in sorted({r.replica for r in reports}):
        spec = layout.replicas[replica]
        mine = [r for r in reports if r.replica == replica]
        if spec.kind == "pipeline" and spec.stages > 1 and all("boundary_bytes" in r.extra for r in mine):
            positions = mine[0].extra["positions"]
            sent = sum(r.extra["boundary_bytes"] for r in mine)
            per_token.append(sent / max(1.0, positions * 2 * (spec.stages - 1)))
    if per_token:
        rec["boundary_bytes_per_token"] = float(np.mean(per_token))
    rec["bytes_sent"] = bytes_sent
    return rec


def direction_record(stats: list[RoundStats]) -> dict[str, Any]:
    """The direction check's account of a round, per sender: ``sender_cosine`` (segment → sender →
    cosine to the others' consensus, None: not judged) and ``down_weighted`` (the senders set
    aside, as "segment:rank"). Every worker of a segment judged the same frames, so the first
    report of each segment stands for all; {} when the check is off."""
    cos: dict[str, dict[str, float | None]] = {}
    aside: list[str] = []
    for s in stats:
        key = str(s.segment)
        if not s.senders or key in cos:
            continue
        cos[key] = {str(m): c for m, c in zip(s.senders, s.cosines)}
        aside += [f"{s.segment}:{m}" for m in s.set_aside]
    return {"sender_cosine": cos, "down_weighted": sorted(aside)} if cos else {}


def round_line(rec: dict[str, Any], clock: str = "sim") -> str:
    seg = rec.get("segment_bytes") or []
    per_seg = f" [segments {' '.join(human_bytes(b) for b in seg)}]" if len(seg) > 1 else ""
    boundary = ""
    if "boundary_bytes_per_token" in rec:
        boundary = f" boundary {rec['boundary_bytes_per_token']:.1f}B/token"
        if "pipeline_wait_share" in rec:
            boundary += f" (pipeline waits {rec['pipeline_wait_share']:.0%})"
    counts = rec.get("replica_steps") or []
    steps = f" steps {'/'.join(map(str, counts))}" if len(set(counts)) > 1 else ""
    return (f"round {rec['round']:4d} step {rec['step']:5d} loss {rec['loss']:.4f}{steps} "
            f"sent {human_bytes(rec.get('wire_bytes', 0))}/replica{per_seg} ({rec.get('compression', 1):.0f}x < fp32)"
            f"{boundary} {clock} {rec['sim_time_s']:.1f}s in steps {rec.get('step_share', 1.0):.0%} "
            f"compute {rec['utilisation']:.0%}")


class RoundLogger:
    """The coordinator's metrics.jsonl records, progress bar and the summary's averages."""

    def __init__(self, cfg: Config, run_dir: Path, total_rounds: int, start_round: int = 0, bytes_sent: int = 0,
                 clock: str = "sim"):
        self.cfg = cfg
        self.metrics = MetricsLogger(run_dir, cfg.logging.tensorboard, append=start_round > 0)
        self.progress = Progress(total_rounds, cfg.logging.progress, desc=cfg.outer.algorithm, initial=start_round)
        self.total_rounds = total_rounds
        self.bytes_sent = bytes_sent
        self.clock = clock
        self.wire: list[float] = []
        self.dense: list[float] = []
        self.records: list[dict[str, Any]] = []
        self.first_val = float("nan")
        self.val_loss = float("nan")

    def initial_val(self, val_loss: float) -> None:
        self.first_val = self.val_loss = val_loss
        self.metrics.log({"kind": "val", "step": 0, "round": 0, "tokens": 0, "bytes_sent": 0,
                          "sim_time_s": 0.0, "val_loss": val_loss}, step=0)

    def train(self, rec: dict[str, Any]) -> None:
        self.bytes_sent = rec["bytes_sent"]
        self.wire.append(rec.get("wire_bytes", 0.0))
        self.dense.append(rec.get("dense_bytes", 0.0))
        self.records.append(rec)
        self.metrics.log(rec, step=rec["step"])

    def val(self, rec: dict[str, Any], val_loss: float) -> None:
        self.val_loss = val_loss
        self.metrics.log({"kind": "val", "step": rec["step"], "round": rec["round"], "tokens": rec["tokens"],
                          "bytes_sent": rec["bytes_sent"], "sim_time_s": rec["sim_time_s"], "val_loss": val_loss},
                         step=rec["step"])
        rec["val_loss"] = val_loss

    def log(self, record: dict[str, Any]) -> None:
        """Any other record (e.g. ``kind = "event"``: a worker dropped, a resume)."""
        self.metrics.log(record, step=record.get("step"))

    def show(self, rec: dict[str, Any]) -> None:
        self.progress.update(1, loss=rec["loss"], val=self.val_loss, tok_s=rec["tokens_per_s"],
                             sent=human_bytes(rec["bytes_sent"]), ratio=rec.get("compression", 1.0))
        if self.cfg.algorithm.rounds:
            self.progress.write(round_line(rec, self.clock))

    def say(self, line: str) -> None:
        """A line the user should see whatever the verbosity (e.g. where a run resumed)."""
        self.progress.write(line)

    def summary(self, run_dir: Path, rounds: int, steps: int, tokens: int, clock_s: float, utilisation: float,
                wall_s: float) -> RunSummary:
        segs = [r["segment_bytes"] for r in self.records if "segment_bytes" in r]
        per_token = [r["boundary_bytes_per_token"] for r in self.records if "boundary_bytes_per_token" in r]
        last = self.records[-1] if self.records else {}
        splits = [r["time"] for r in self.records if "time" in r]
        total = {k: np.sum([sp[k] for sp in splits], axis=0) for k in ("compute", "pipeline", "exchange", "idle")} \
            if splits else None
        per_replica = []
        if total is not None:
            busy = total["compute"] + total["pipeline"]
            per_replica = [float(b / t) if t > 0 else 1.0
                           for b, t in zip(busy, busy + total["exchange"] + total["idle"])]
        counts = [r["replica_steps"] for r in self.records if "replica_steps" in r]
        return RunSummary(run_dir, rounds, steps, tokens, self.first_val, self.val_loss,
                          float(np.mean(self.wire)) if self.wire else 0.0,
                          float(np.mean(self.dense)) if self.dense else 0.0, clock_s, utilisation, wall_s,
                          [float(x) for x in np.mean(segs, axis=0)] if segs else [],
                          float(np.mean(per_token)) if per_token else 0.0, float(last.get("pipeline_wait_share", 0.0)),
                          step_share({k: list(v) for k, v in total.items()}) if total is not None else 1.0,
                          per_replica, [int(x) for x in np.sum(counts, axis=0)] if counts else [],
                          int(sum(r.get("clipped", 0) for r in self.records)),
                          int(sum(len(r.get("down_weighted", ())) for r in self.records)))

    def close(self) -> None:
        self.progress.close()
        self.metrics.close()
