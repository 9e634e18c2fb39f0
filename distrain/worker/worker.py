"""One worker: the owner of a parameter set, an injected inner schedule, and its segments' outer rounds.

A worker holds a whole model (a full replica's device) or one stage's layers (a pipeline stage),
runs its inner steps with the schedule its replica asks for (``distrain.inner``), and takes part in
the outer round of each segment it owns (``distrain.layout``), in that segment's group. The same
``Worker.run_round`` runs in simulation (threads over an in-process transport), under torchrun (one
process per worker) and under Ray (one actor per worker); ``distrain.worker.build.build_worker`` is
the one way every mode builds one, which is what makes the modes produce bit-identical weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from distrain.comm.codecs import Codec
from distrain.comm.errors import RoundLateError
from distrain.config import Config
from distrain.data import DocumentSampler, TokenSampler
from distrain.inner.schedule import Batch, InnerSchedule
from distrain.layout import Layout, segment_of
from distrain.model import build_model
from distrain.outer.base import OuterOptimizer, RoundStats, Weights
from distrain.inner.schedule import Window
from distrain.worker.compressed import EmbeddingRelay, EmbeddingShadow
from distrain.worker.plan import ReplicaRound
from distrain.worker.stage import BuiltStage


@dataclass
class RoundReport:
    rank: int
    replica: int
    round: int
    steps: int
    step: int  # inner steps done by this worker so far
    tokens: int  # tokens of its data stream trained this round (0 for a stage that reads no new data)
    train_loss: float  # nan for a worker that computes no loss (a pipeline stage before the last)
    lr: float
    compute_s: float  # compute charged for its steps (a slowed worker's extra time included)
    outer: list[RoundStats] = field(default_factory=list)  # one per segment it synced
    extra: dict[str, Any] = field(default_factory=dict)
    steps_s: float = 0.0  # on its clock, its steps (compute plus a pipeline's bubble and boundary waits)
    sync_s: float = 0.0  # on its clock, its outer rounds (exchange, and waiting for the other replicas)
    work_tokens: int = 0  # tokens its replica trained on this round (what a token-weighted merge weighs)

    @property
    def step_s(self) -> float:
        """Its mean step time this round, on its clock (what the next round's window is cut from)."""
        return self.steps_s / self.steps if self.steps else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RoundReport":
        """Rebuild a report sent between processes as a plain (msgpack) map."""
        d = dict(d)
        outer = [RoundStats(**o) for o in d.pop("outer", [])]
        return cls(**d, outer=outer)


class Worker:
    """A parameter set (whole model or stage), its inner schedule, data stream and segment syncs."""

    def __init__(self, cfg: Config, layout: Layout, rank: int, stage: BuiltStage, schedule: InnerSchedule,
                 syncs: dict[int, OuterOptimizer], sampler: TokenSampler | DocumentSampler,
                 shadow: EmbeddingShadow | None = None, relay: EmbeddingRelay | None = None):
        """``relay``/``shadow``: a compressed pipeline in a round-based run — its first stage relays
        the embedding's aggregate, its later stages follow the global embedding in ``shadow``."""
        self.cfg, self.layout, self.rank = cfg, layout, rank
        self.slot = layout.slot(rank)
        self.replica = self.slot.replica
        self.rep = layout.replicas[self.replica]
        self.model, self.view, self.sub = stage.model, stage.view, stage.sub
        self.schedule, self.syncs, self.sampler = schedule, syncs, sampler
        self.shadow, self.relay = shadow, relay
        self.tokens = 0
        # a pipeline's later stages and an SP replica's other devices read the same batches
        self.reads_data = self.slot.stage == 0 and (self.rep.parallel != "sp" or self.slot.device == 0)
        self.has_loss = rank == layout.reporter(self.replica) or self.rep.kind == "full"
        self.rounds = [g for g, s in syncs.items() if s.moves_in_rounds]
        # the tokens a step trains on stand for the whole replica (its devices read their own shards)
        self.token_factor = self.rep.devices if self.rep.parallel in ("ddp", "deepspeed") else 1
        self.late = False  # it missed an exchange's grace; it takes part again once it has the global weights

    def run_round(self, round_idx: int, todo: ReplicaRound) -> RoundReport:
        """Run this replica's inner steps of ``round_idx`` (stopping early, at a step boundary that
        the whole replica agrees on, when its window closes), then the outer round of every owned
        segment, stating the work done."""
        clock = self.schedule.clock
        start = clock.now()
        window = Window(start, todo.window_s, todo.step_s) if todo.window_s > 0 else None
        losses, compute_s, lr, tokens, train_s, done = [], 0.0, 0.0, 0, 0.0, 0
        extra: dict[str, float] = {}
        for i in range(todo.runs):
            res = self.schedule.train_step(todo.progress_at(i), window)
            done += 1
            train_s += res.seconds
            compute_s += res.compute_s
            losses.append(res.loss)
            tokens += res.tokens
            lr = res.lr
            for k, v in res.extra.items():
                extra[k] = extra.get(k, 0.0) + v
            if res.stop:
                break
        steps_s = clock.now() - start
        loss = self._round_loss(losses, round_idx) if losses and self.has_loss else float("nan")
        work_tokens = tokens * self.token_factor
        tokens = tokens if self.reads_data else 0
        self.tokens += tokens
        stats = self._sync(round_idx, extra, done, work_tokens)
        return RoundReport(self.rank, self.replica, round_idx, done, self.schedule.step, tokens, loss, lr,
                           compute_s, stats, extra={"train_s": train_s, **extra}, steps_s=steps_s,
                           sync_s=clock.now() - start - steps_s, work_tokens=work_tokens)

    @staticmethod
    def _round_loss(losses: list[float | torch.Tensor], round_idx: int) -> float:
        """The round's mean training loss, read from the device once (the steps never wait for the
        host); a non-finite one stops the round before anything is exchanged."""
        values = [x.float() if isinstance(x, torch.Tensor) else torch.tensor(float(x)) for x in losses]
        loss = float(torch.stack(values).mean())
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss} in round {round_idx}")
        return loss

    def _sync(self, round_idx: int, extra: dict[str, float], steps: int = 0, tokens: int = 0) -> list[RoundStats]:
        """Every owned segment's outer round; then the replica starts from what came back.

        A worker that reached an exchange after its grace (``RoundLateError``) sits the round out:
        its error buffers keep what it would have sent, its AdamW moments and data position stay,
        and the driver brings it back with the global weights (``rejoin``)."""
        local = self.view.read() if self.rounds else {}
        stats, targets = [], {}
        for sync in self.syncs.values():
            try:
                st, target = sync.sync_round(round_idx, {n: local[n] for n in sync.names} if local else {}, steps,
                                             tokens)
            except RoundLateError:
                self.late = True
                continue
            if st is not None:
                stats.append(st)
            targets.update(target or {})
        if self.late:
            extra["late"] = 1.0
        if self.relay is not None and self.slot.stage == 0 and self.rep.stages > 1:
            extra["relay_bytes"] = float(self.relay.send(self.later_stages(), self.syncs[0].contributions(), round_idx))
        if self.shadow is not None and self.relay is not None:
            first = self.layout.stage_ranks(self.replica, 0)[0]
            self.shadow.receive(self.relay.receive(first, round_idx), round_idx)
        if targets and not self.late:
            self._start_from(targets)
        self.schedule.refresh()  # a multi-device replica's devices take the leader's new weights
        return stats

    def later_stages(self) -> list[int]:
        return [self.layout.stage_ranks(self.replica, s)[0] for s in range(1, self.rep.stages)]

    def _start_from(self, targets: Weights) -> None:
        """Load the segments' targets (through the constraint) and tell each what the replica got."""
        self.view.write(targets, embedding=self.shadow.embedding if self.shadow is not None else None)
        actual = None if self.view.exact else self.view.read()
        for g in self.rounds:
            self.syncs[g].started({n: actual[n] for n in self.syncs[g].names} if actual is not None else None)

    def finish(self) -> None:
        """End of run: apply what is still in flight (``outer.apply_delay``), so every replica
        ends on the global weights."""
        targets = {}
        for sync in self.syncs.values():
            targets.update(sync.flush() or {})
        if self.shadow is not None:
            self.shadow.flush()
        if targets:
            self._start_from(targets)
        self.schedule.refresh()

    def inject(self, wrap: Callable[[Codec], Codec]) -> None:
        """Fault injection: this worker's own frames are encoded by ``wrap(codec)`` from now on."""
        for sync in self.syncs.values():
            sync.wrap_encoder(wrap)

    def slow_down(self, factor: float) -> None:
        """Fault injection: every inner step takes ``factor`` times longer from now on (real time
        under torchrun and Ray, simulated time in the simulation)."""
        self.schedule.slowdown = float(factor)

    # ----- global weights: the unit of catch-up and of the initial broadcast -------------------
    def global_state(self) -> Weights:
        """The replica-independent weights of the parameters this worker holds (fp32, CPU)."""
        if not self.rounds:
            return {n: t.detach().cpu().clone() for n, t in self.view.read().items()}
        return {n: t for g in self.rounds for n, t in self.syncs[g].global_state().items()}

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(t.shape) for n, t in self.view.read().items()}

    def segment_shapes(self, g: int) -> dict[str, tuple[int, ...]]:
        """Shapes of this worker's parameters in segment ``g`` (a catch-up frame's schema)."""
        lay = self.layout
        return {n: s for n, s in self.param_shapes().items() if segment_of(n, lay.n_layers, lay.segments) == g}

    @torch.no_grad()
    def load_global(self, params: Weights, embedding: torch.Tensor | None = None) -> None:
        """Start from ``params`` (every parameter this worker holds) as the global weights;
        ``embedding``: the global embedding, for a later stage of a compressed pipeline."""
        own = self.param_shapes()
        if set(params) != set(own):
            raise ValueError(f"global weights name {sorted(set(params) ^ set(own))} differently from the model")
        if self.shadow is not None and embedding is not None:
            self.shadow.reset_to(embedding)
        targets = {}
        for g in self.rounds:
            targets.update(self.syncs[g].reset_to({n: params[n] for n in self.syncs[g].names}))
        self._start_from(targets or params)
        self.schedule.refresh()

    def rejoin(self, params: Weights, embedding: torch.Tensor | None = None) -> None:
        """Back from a round it was late for: the global weights, nothing else (its error buffers,
        AdamW moments, step count and data position are its own and stay)."""
        self.load_global(params, embedding)
        self.late = False

    def catch_up(self, params: Weights, steps_done: int, embedding: torch.Tensor | None = None) -> None:
        """Join from the current global weights, as a worker of a replica that has run ``steps_done``
        inner steps so far.

        A restarted worker has lost its error-feedback buffer and AdamW moments (they restart at
        zero); its step count and data position are moved to where a worker that never failed
        would be (the learning rate follows the run's progress anyway), so it trains on fresh data.
        """
        self.load_global(params, embedding)
        self.schedule.seek(steps_done)
        self.seek_data(steps_done)

    def seek_data(self, steps: int) -> None:
        """Put the data stream where a worker that never failed is after ``steps`` inner steps."""
        batches = steps * self.cfg.train.grad_accum if isinstance(self.sampler, TokenSampler) else steps
        if isinstance(self.sampler, TokenSampler):
            bpe = self.sampler.batches_per_epoch
            self.sampler.load_state_dict({"epoch": batches // bpe, "position": batches % bpe})
            return
        self.sampler.load_state_dict({"epoch": 0, "position": 0})  # document batches vary in size: replay
        for _ in range(batches):
            self.sampler.next_batch()

    # ----- state --------------------------------------------------------------------------------
    def evaluate(self, batches: list[Batch]) -> float:
        """Validation loss of the global weights: a full replica's model (which holds them at a
        round's end), or an unconstrained copy of each stage passed through the pipeline."""
        if self.rep.kind == "full":
            return self.schedule.evaluate(batches)
        copy = build_model(self.cfg.model, *self.slot.layers).to(next(self.model.parameters()).device)
        copy.load_state_dict({**copy.state_dict(), **self.global_state()})
        return self.schedule.evaluate(batches, copy)
