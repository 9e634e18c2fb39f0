"""torch.distributed transport: byte collectives over gloo (CPU) or NCCL (GPU) process groups.

Frames have different sizes on every rank (top-k payloads compress differently), while
``dist.all_gather`` needs equal shapes: each collective first all-gathers the sizes, pads every
payload to the largest, all-gathers ``uint8`` tensors and trims. Bytes only — nothing is pickled.

Named groups (e.g. ``"replicas"``, ``"stage0"``) become ``dist.new_group`` process groups. Creating
one is a collective over the whole world, so every rank must construct the transport with the same
group spec; the constructor checks that by all-gathering a hash of it. A dead or late member
cannot be dropped from a torch collective: after ``timeout_s`` the collective raises
``CollectiveTimeoutError`` and the launcher's elastic restart (torchrun ``--max-restarts``)
resumes the job from its last checkpoint.

Point-to-point messages go over the default group as two ``isend``s (an int64 size, then the
uint8 payload) matched by two blocking ``recv``s on the other side. Sends are never waited for
at the call, so two neighbours that both send before they receive cannot deadlock (the gloo
pitfall of batched isend/irecv, pytorch#152938, is avoided by never batching); finished sends
are reaped on later calls and ``flush`` waits for the rest. Device groups for tensors (DDP, ZeRO,
Ulysses) are not the transport's: see ``distrain.comm.device_groups``.
"""

from __future__ import annotations

import hashlib
import os
import json
from collections.abc import Mapping, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from distrain.comm.errors import CollectiveTimeoutError, CommError, NotAMemberError, UnknownGroupError
from distrain.comm.transport import WORLD, Transport

MAX_PAYLOAD_BYTES = 1 << 31  # one frame; a larger announced size is refused before allocating


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def resolve_backend(backend: str) -> str:
    """``auto`` → NCCL with CUDA, else gloo; NCCL without CUDA is an error naming the fix."""
    backend = default_backend() if backend == "auto" else backend
    if backend == "nccl" and not torch.cuda.is_available():
        raise CommError("backend 'nccl' needs CUDA; use 'gloo' on CPU")
    return backend


def world_backend(byte_backend: str, device_backend: str) -> str:
    """The default group's backend when the frames and the replicas' tensors use different ones: CPU
    tensors (frames) over the first, CUDA tensors over the second (e.g. ``cpu:gloo,cuda:nccl``)."""
    if byte_backend == device_backend:
        return byte_backend
    if (byte_backend, device_backend) == ("gloo", "nccl"):
        return "cpu:gloo,cuda:nccl"
    raise CommError(f"frames over {byte_backend} beside replicas over {device_backend}: give frames gloo "
                    "(CPU bytes) and replicas nccl, or one backend for both")


def init_process_group(byte_backend: str = "gloo", device_backend: str = "auto", timeout_s: float = 600.0) -> None:
    """Initialise the default group from the torchrun environment (``env://``), once, for both kinds
    of group (``world_backend``)."""
    if dist.is_initialized():
        return
    backend = world_backend(resolve_backend(byte_backend), resolve_backend(device_backend))
    timeout = timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent keeps one store across elastic restarts, and the default env:// setup
        # does not separate attempts: a restarted gloo group then reads the dead attempt's peer
        # addresses ("connection refused"). Keys under a per-attempt prefix avoid that.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=dist.PrefixStore(f"distrain/attempt_{attempt}", store),
                                rank=rank, world_size=world, timeout=timeout)
        return
    dist.init_process_group(backend, timeout=timeout)


def _timeout_error(exc: RuntimeError, group: str, op: str) -> Exception:
    text = str(exc).lower()
    if "timed out" in text or "timeout" in text:
        return CollectiveTimeoutError(f"group {group!r} {op}: {exc}")
    return CommError(f"group {group!r} {op} failed: {exc}")


class TorchTransport(Transport):
    """One process's endpoint; the default process group must already be initialised."""

    def __init__(self, groups: Mapping[str, Sequence[int]] | None = None, device: torch.device | str | None = None,
                 timeout_s: float | None = None, max_payload_bytes: int = MAX_PAYLOAD_BYTES,
                 backend: str | None = None) -> None:
        """``backend``: of the named groups (the frames'); default: the world's."""
        if not (dist.is_available() and dist.is_initialized()):
            raise CommError("torch.distributed is not initialised (call distrain.comm.torch_transport.init_process_group)")
        self._rank, self._world = dist.get_rank(), dist.get_world_size()
        self._backend = backend or dist.get_backend()
        if device is not None:
            self._device = torch.device(device)
        elif self._backend == "nccl":
            self._device = torch.device("cuda", torch.cuda.current_device())
        else:
            self._device = torch.device("cpu")
        self._max = int(max_payload_bytes)
        spec = {WORLD: list(range(self._world)), **{k: sorted(v) for k, v in (groups or {}).items()}}
        for name, ranks in spec.items():
            if not ranks or len(set(ranks)) != len(ranks) or not all(0 <= r < self._world for r in ranks):
                raise ValueError(f"group {name!r}: ranks {ranks} must be distinct, non-empty, in 0..{self._world - 1}")
        self._check_same_spec(spec)
        self._sends: list[tuple[list[dist.Work], tuple[torch.Tensor, ...]]] = []
        kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
        self._groups: dict[str, tuple[list[int], dist.ProcessGroup | None]] = {}
        for name in sorted(spec):  # the same order on every rank: new_group is a world collective
            ranks = spec[name]
            pg = None if name == WORLD else dist.new_group(ranks, backend=backend, **kwargs)
            self._groups[name] = (ranks, pg)

    @property
    def backend(self) -> str:
        """The backend of the frames' groups."""
        return self._backend

    def _check_same_spec(self, spec: dict[str, list[int]]) -> None:
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).digest()
        mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8).to(self._device)
        every = [torch.empty_like(mine) for _ in range(self._world)]
        dist.all_gather(every, mine)
        bad = [r for r, d in enumerate(every) if not torch.equal(d, mine)]
        if bad:
            raise CommError(f"rank {self._rank}: group spec differs from ranks {bad}; every rank must pass the same groups")

    # ----- Transport ---------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def device(self) -> torch.device:
        return self._device

    def members(self, group: str) -> list[int]:
        return list(self._lookup(group)[0])

    def all_gather_bytes(self, group: str, payload: bytes) -> list[bytes | None]:
        ranks, pg = self._member(group)
        data = _as_bytes(payload)
        try:
            size = torch.tensor([len(data)], dtype=torch.int64, device=self._device)
            sizes_t = [torch.empty_like(size) for _ in ranks]
            dist.all_gather(sizes_t, size, group=pg)
            sizes = [int(s.item()) for s in sizes_t]
            too_big = [(r, s) for r, s in zip(ranks, sizes) if s > self._max]
            if too_big:  # every member sees the same sizes, so every member refuses together
                raise CommError(f"group {group!r}: payload sizes {too_big} exceed {self._max} bytes")
            longest = max(sizes)
            buf = torch.zeros(longest, dtype=torch.uint8, device=self._device)
            if data:
                buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self._device)
            outs = [torch.empty(longest, dtype=torch.uint8, device=self._device) for _ in ranks]
            dist.all_gather(outs, buf, group=pg)
        except RuntimeError as exc:
            raise _timeout_error(exc, group, "all_gather") from exc
        return [o[:n].cpu().numpy().tobytes() for o, n in zip(outs, sizes)]

    def broadcast_bytes(self, group: str, payload: bytes | None, src: int) -> bytes:
        ranks, pg = self._member(group)
        if src not in ranks:
            raise NotAMemberError(f"broadcast source {src} is not a member of group {group!r}")
        if self._rank == src and payload is None:
            raise ValueError("the broadcast source must pass a payload")
        data = _as_bytes(payload) if self._rank == src else b""
        try:
            size = torch.tensor([len(data)], dtype=torch.int64, device=self._device)
            dist.broadcast(size, src=src, group=pg)
            n = int(size.item())
            if n > self._max:
                raise CommError(f"group {group!r}: broadcast of {n} bytes exceeds {self._max}")
            buf = torch.empty(n, dtype=torch.uint8, device=self._device)
            if self._rank == src and n:
                buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            if n:
                dist.broadcast(buf, src=src, group=pg)
        except RuntimeError as exc:
            raise _timeout_error(exc, group, "broadcast") from exc
        return buf.cpu().numpy().tobytes()

    def barrier(self, group: str) -> None:
        _, pg = self._member(group)
        try:
            if self._backend == "nccl":  # NCCL barriers need a device; a one-element all-reduce is one
                dist.all_reduce(torch.zeros(1, device=self._device), group=pg)
            else:
                dist.barrier(group=pg)
        except RuntimeError as exc:
            raise _timeout_error(exc, group, "barrier") from exc

    def send_bytes(self, dst: int, payload: bytes) -> None:
        self._peer(dst)
        data = _as_bytes(payload)
        if len(data) > self._max:
            raise CommError(f"message of {len(data)} bytes to rank {dst} exceeds {self._max}")
        size = torch.tensor([len(data)], dtype=torch.int64, device=self._device)
        tensors: tuple[torch.Tensor, ...] = (size,)
        try:
            works = [dist.isend(size, dst)]
            if data:
                buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self._device)
                tensors = (size, buf)
                works.append(dist.isend(buf, dst))
        except RuntimeError as exc:
            raise _timeout_error(exc, f"p2p {self._rank}->{dst}", "send") from exc
        self._sends.append((works, tensors))  # the tensors must live until the sends complete
        self._sends = [(w, t) for w, t in self._sends if not all(x.is_completed() for x in w)]

    def recv_bytes(self, src: int) -> bytes:
        self._peer(src)
        try:
            size = torch.empty(1, dtype=torch.int64, device=self._device)
            dist.recv(size, src)
            n = int(size.item())
            if not 0 <= n <= self._max:
                raise CommError(f"rank {src} announced a message of {n} bytes (limit {self._max})")
            buf = torch.empty(n, dtype=torch.uint8, device=self._device)
            if n:
                dist.recv(buf, src)
        except RuntimeError as exc:
            raise _timeout_error(exc, f"p2p {src}->{self._rank}", "recv") from exc
        return buf.cpu().numpy().tobytes()

    def flush(self) -> None:
        """Wait until every message this rank sent has left (end of a round, before shutdown)."""
        for works, _ in self._sends:
            for w in works:
                w.wait()
        self._sends.clear()

    # ----- helpers -----------------------------------------------------------------------------
    def _peer(self, rank: int) -> None:
        if not 0 <= rank < self._world or rank == self._rank:
            raise ValueError(f"rank {self._rank}: no peer rank {rank} (world of {self._world})")

    def _lookup(self, group: str) -> tuple[list[int], dist.ProcessGroup | None]:
        g = self._groups.get(group)
        if g is None:
            raise UnknownGroupError(f"unknown group {group!r} (known: {', '.join(sorted(self._groups))})")
        return g

    def _member(self, group: str) -> tuple[list[int], dist.ProcessGroup | None]:
        ranks, pg = self._lookup(group)
        if self._rank not in ranks:
            raise NotAMemberError(f"rank {self._rank} is not a member of group {group!r} ({ranks})")
        return ranks, pg


def _as_bytes(payload: object) -> bytes:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    return bytes(payload)
