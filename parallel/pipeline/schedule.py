"""Micro-batch orders of one pipeline stage: GPipe and 1F1B, and a check that a set of them
cannot deadlock.

Why a separate, torch-free module: the order is the whole deadlock argument, so it is a plain list
that tests can execute symbolically for every (stages, micro-batches) instead of hoping threads
happen to interleave badly.

Ops: ``("F", m)`` receives micro-batch m's activations from the previous stage (unless first),
runs the stage forward and sends the result to the next stage (unless last); ``("B", m)``
receives m's activation gradient from the next stage (unless last), back-propagates and sends the
input gradient to the previous stage (unless first). Messages on a link are FIFO.

* GPipe: all forwards, then all backwards (in micro-batch order, so every link carries its
  messages in the order they are read). Live activations per stage: M (every micro-batch).
* 1F1B (PipeDream-flush): stage s of S first runs ``w = min(S − s − 1, M)`` forwards, then
  alternates one forward and one backward, then drains the backwards. Live activations at stage s
  peak at ``min(S − s, M)`` ≤ S, independent of M: the bound ``live_bound`` states and the
  tests count.

Deadlock freedom (gloo): with sends that are queued (never wait for the receiver), a set of
stage orders deadlocks only if stages wait in a cycle, e.g. two neighbours each waiting to receive
from the other. ``check_deadlock_free`` executes the orders with FIFO links and raises if that
can happen (or if a stage would read a link out of order). Both schedules pass for all S, M; the
Transport's part is that ``send_bytes`` never blocks on the receiver (no batched isend/irecv,
pytorch#152938).
"""

from __future__ import annotations

from typing import NamedTuple

SCHEDULES = ("gpipe", "1f1b")


class Op(NamedTuple):
    kind: str  # "F" or "B"
    micro: int


def _check(schedule: str, n_stages: int, stage: int, n_micro: int) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if n_stages < 1 or not 0 <= stage < n_stages:
        raise ValueError(f"stage {stage} is not one of {n_stages} stages")
    if n_micro < 1:
        raise ValueError(f"a pipeline step needs at least one micro-batch, got {n_micro}")


def stage_ops(schedule: str, n_stages: int, stage: int, n_micro: int) -> list[Op]:
    """This stage's ops for one step, in execution order."""
    _check(schedule, n_stages, stage, n_micro)
    if schedule == "gpipe":
        return [Op("F", m) for m in range(n_micro)] + [Op("B", m) for m in range(n_micro)]
    warmup = min(n_stages - stage - 1, n_micro)
    ops = [Op("F", m) for m in range(warmup)]
    for m in range(n_micro - warmup):
        ops += [Op("F", m + warmup), Op("B", m)]
    ops += [Op("B", m) for m in range(n_micro - warmup, n_micro)]
    return ops


def live_bound(schedule: str, n_stages: int, stage: int, n_micro: int) -> int:
    """Most micro-batches whose activations this stage holds at once (forward done, backward not)."""
    _check(schedule, n_stages, stage, n_micro)
    return n_micro if schedule == "gpipe" else min(n_stages - stage, n_micro)


def peak_live(ops: list[Op]) -> int:
    live, peak = set(), 0
    for op in ops:
        if op.kind == "F":
            live.add(op.micro)
            peak = max(peak, len(live))
        else:
            live.discard(op.micro)
    return peak


def bubble_fraction(n_stages: int, n_micro: int) -> float:
    """Idle share of an ideal pipeline with equal stage times: (S − 1) / (M + S − 1), both schedules."""
    return (n_stages - 1) / (n_micro + n_stages - 1)


def check_deadlock_free(orders: list[list[Op]]) -> int:
    """Run every stage's order with queued sends and FIFO links; return the number of rounds.

    Raises ``RuntimeError`` naming the stuck stages if no stage can proceed before all are done,
    or if a stage would read a message other than the next one on its link.
    """
    n = len(orders)
    fwd = [[] for _ in range(n)]  # fwd[s]: micro-batches queued on link s-1 → s
    bwd = [[] for _ in range(n)]  # bwd[s]: micro-batches queued on link s+1 → s
    done_f = [set() for _ in range(n)]
    pos, rounds = [0] * n, 0
    while any(pos[s] < len(orders[s]) for s in range(n)):
        progressed = False
        for s in range(n):
            if pos[s] == len(orders[s]):
                continue
            kind, m = orders[s][pos[s]]
            queue = fwd[s] if kind == "F" else bwd[s]
            needs_msg = (kind == "F" and s > 0) or (kind == "B" and s < n - 1)
            if needs_msg and not queue:
                continue
            if needs_msg and queue[0] != m:
                raise RuntimeError(f"stage {s} reads micro-batch {queue[0]} where its {kind} op expects {m}")
            if kind == "B" and m not in done_f[s]:
                raise RuntimeError(f"stage {s} back-propagates micro-batch {m} before its forward")
            if needs_msg:
                queue.pop(0)
            if kind == "F":
                done_f[s].add(m)
                if s < n - 1:
                    fwd[s + 1].append(m)
            elif s > 0:
                bwd[s - 1].append(m)
            pos[s] += 1
            progressed = True
        rounds += 1
        if not progressed:
            stuck = [f"stage {s} waits at {orders[s][pos[s]]}" for s in range(n) if pos[s] < len(orders[s])]
            raise RuntimeError("pipeline orders deadlock: " + "; ".join(stuck))
    if any(fwd[s] or bwd[s] for s in range(n)):
        raise RuntimeError("pipeline orders leave unread messages on a link")
    return rounds
