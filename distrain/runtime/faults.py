"""Fault injection for the launchers' tests and demos: what to break, where, and when.

Faults are parsed from ``--fault=KIND:rank=R,round=N[,delay=S][,factor=F]`` and carried out by the
mode that supports them: a rank that exits (torchrun's elastic restart), an actor killed mid-round
or a stale frame (Ray), a hostile worker whose frames are valid but huge (simulation), a slow
worker (every mode).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

import torch

from distrain.comm import boundary as bd
from distrain.comm.codecs import EncodedTensor
from distrain.comm.ray_transport import RayTransport
from distrain.comm.transport import Transport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fault:
    """``KIND:rank=R,round=N[,delay=S][,factor=F]`` — what to break, where, and when.

    - ``exit`` (torchrun): rank R exits at the start of round N, on the first attempt only, so
      torchrun's elastic restart has something to resume;
    - ``kill`` (Ray): worker R stops after its inner steps of round N, before sending its frame,
      and the driver kills its actor S seconds into the round (Ray restarts it);
    - ``stale`` (Ray): worker R re-sends its previous round's frame in round N;
    - ``hostile`` (simulation): from round N on, worker R's pseudo-gradient frames are valid and
      finite but ``delay`` (default 1e30) times too large — what robust aggregation must survive;
    - ``flip`` (simulation): from round N on, worker R sends its own pseudo-gradient negated and
      ``factor`` (default 1.9) times its size: under the norm clip, so only the direction check
      and the per-coordinate bound stand in its way;
    - ``slow`` (every mode): from round N on (default 0), every inner step of worker R takes
      ``factor`` times longer — real time under torchrun and Ray, simulated time in simulation;
    - ``late`` (Ray): in round N worker R waits ``delay`` seconds before its exchange — alive, but
      past the grace, so it must sit the round out and rejoin with its state;
    - ``boundary`` (every mode): from round N on, every pipeline boundary frame worker R sends holds
      ``delay`` in every value (0: NaN) — valid frames a receiving stage must reject, at once.
    """

    kind: str
    rank: int
    round: int
    delay: float = 0.0
    factor: float = 1.0

    KINDS = ("exit", "kill", "stale", "hostile", "flip", "slow", "late", "boundary")

    @property
    def flip_factor(self) -> float:
        """A ``flip`` fault's size relative to the honest pseudo-gradient (default 1.9)."""
        return self.factor if self.factor != 1.0 else 1.9

    @classmethod
    def parse(cls, spec: str) -> "Fault":
        kind, _, rest = spec.partition(":")
        if kind not in cls.KINDS:
            raise ValueError(f"fault {spec!r}: kind must be one of {', '.join(cls.KINDS)}")
        fields: dict[str, str] = {}
        for part in filter(None, rest.split(",")):
            k, eq, v = part.partition("=")
            if not eq or k not in ("rank", "round", "delay", "factor"):
                raise ValueError(f"fault {spec!r}: expected rank=R,round=N[,delay=S][,factor=F], got {part!r}")
            fields[k] = v
        if kind == "slow":
            fields.setdefault("round", "0")
            if "factor" not in fields:
                raise ValueError(f"fault {spec!r}: a slow worker needs factor=F (its steps take F times longer)")
        if kind == "late" and float(fields.get("delay", "0") or 0) <= 0:
            raise ValueError(f"fault {spec!r}: a late worker needs delay=S (seconds it waits before its exchange)")
        if "rank" not in fields or "round" not in fields:
            raise ValueError(f"fault {spec!r}: rank and round are required")
        try:
            fault = cls(kind, int(fields["rank"]), int(fields["round"]), float(fields.get("delay", 0.0)),
                        float(fields.get("factor", 1.0)))
        except ValueError:
            raise ValueError(f"fault {spec!r}: rank and round must be integers, delay and factor numbers") from None
        if not (fault.factor >= 1.0 and fault.factor < 1e6):
            raise ValueError(f"fault {spec!r}: factor must be in [1, 1e6), got {fault.factor}")
        return fault

    def spec(self) -> str:
        """The ``--fault`` text that parses back to this fault."""
        out = f"{self.kind}:rank={self.rank},round={self.round}"
        out += f",delay={self.delay!r}" if self.delay else ""
        return out + (f",factor={self.factor!r}" if self.factor != 1.0 else "")


class FaultyTransport(RayTransport):
    """Fault injection on the worker side of a Ray job.

    ``stale_round``: in that round this worker re-sends its previous round's frame.
    ``hold_round``: in that round this worker stops after its inner steps, before sending its
    frame, for ``hold_s`` (once) — the window in which the driver kills its actor (``kill``: the kill
    lands mid-round every time, not before the round started nor after it finished), or the delay
    that makes it late (``late``).
    """

    def __init__(self, *args: Any, stale_round: int = -1, hold_round: int = -1, hold_s: float = 60.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._stale_round, self._hold_round, self._hold_s = stale_round, hold_round, hold_s
        self._last: bytes | None = None

    def all_gather_bytes(self, group: str, payload: bytes) -> list[bytes | None]:
        current = self.mailbox.round
        if current == self._hold_round:
            self._hold_round = -1
            log.warning("fault injection: worker %d holds %g s before its exchange in round %d", self.rank,
                        self._hold_s, current)
            time.sleep(self._hold_s)
        send = self._last if current == self._stale_round and self._last is not None else payload
        self._last = payload
        return super().all_gather_bytes(group, send)



class HostileCodec:
    """A worker's codec gone hostile: frames stay valid and finite, their values ``factor`` times
    too large (SparseLoCo centroids, dense fp32 values; a negative factor flips their sign).
    Everything else is the real codec's, so its own error feedback stays honest and it decodes the
    others' frames as before."""

    def __init__(self, inner: Any, factor: float = 1e30):
        self.inner, self.factor = inner, float(factor)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode(self, name: str, delta: Any, state: Any) -> EncodedTensor:
        et = self.inner.encode(name, delta, state)
        bufs = {k: (np.clip(v.astype(np.float64) * self.factor, -3e38, 3e38).astype(v.dtype)
                    if v.dtype.kind == "f" else v) for k, v in et.buffers.items()}
        return EncodedTensor(shape=et.shape, meta=et.meta, buffers=bufs)


class BoundaryFault(Transport):
    """A worker's transport whose outgoing pipeline boundary frames, from round ``start`` on, hold
    ``value`` in every value (NaN for 0): well-formed frames that the receiving stage must reject.
    Everything else passes through unchanged."""

    def __init__(self, inner: Transport, start: int, value: float = 0.0):
        self.inner, self.start, self.value = inner, start, value if value else float("nan")
        self.current = -1

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def world_size(self) -> int:
        return self.inner.world_size

    def begin_round(self, round_idx: int) -> None:
        self.current = round_idx
        self.inner.begin_round(round_idx)

    def members(self, group: str) -> list[int]:
        return self.inner.members(group)

    def all_gather_bytes(self, group: str, payload: bytes) -> list[bytes | None]:
        return self.inner.all_gather_bytes(group, payload)

    def broadcast_bytes(self, group: str, payload: bytes | None, src: int) -> bytes:
        return self.inner.broadcast_bytes(group, payload, src)

    def barrier(self, group: str) -> None:
        self.inner.barrier(group)

    def recv_bytes(self, src: int) -> bytes:
        return self.inner.recv_bytes(src)

    def send_bytes(self, dst: int, payload: bytes) -> None:
        head = bd.frame_header(payload) if self.current >= self.start else None
        if head is not None:
            direction, dtype, step, micro, shape, basis = head
            log.warning("fault injection: worker %d sends a boundary frame of %g (step %d)", self.rank, self.value, step)
            payload = bd.encode_boundary(torch.full(shape, self.value), direction=direction, step=step, micro=micro,
                                         dtype=dtype, basis=basis)
        self.inner.send_bytes(dst, payload)

    def __getattr__(self, name: str) -> Any:  # transport-specific extras (flush, mailbox, set_peers)
        return getattr(self.inner, name)
