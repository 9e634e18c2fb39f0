"""Deterministic, rank-disjoint batches of (x, y) from a token shard, resumable from two integers.

The shard is cut into non-overlapping windows of ``seq_len + 1`` tokens. Epoch ``e`` orders the
windows by a permutation seeded with ``(seed, e)``; window ``i`` of that order belongs to rank
``i % world_size``, and every rank keeps the same number of them (``n_windows // world_size``), so
ranks never see the same window within an epoch and the state of a rank is just
``(epoch, position)``: which permutation, and how many batches of it were served.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class TokenSampler:
    """A rank's stream of ``(x, y)`` LongTensor batches of shape ``(batch_size, seq_len)``, y = x shifted."""

    def __init__(self, tokens: Any, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        for name, v in (("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.tokens = np.asarray(tokens)
        if self.tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {self.tokens.shape}")
        self.seq_len, self.batch_size, self.rank, self.world_size, self.seed = seq_len, batch_size, rank, world_size, seed
        self.window = seq_len + 1
        self.n_windows = self.tokens.size // self.window
        self.per_rank = self.n_windows // world_size
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            need = batch_size * world_size * self.window
            raise ValueError(
                f"token shard too small: {self.tokens.size} tokens make {self.n_windows} windows of "
                f"seq_len+1 = {self.window}; one batch of {batch_size} for each of {world_size} ranks "
                f"needs {need} tokens"
            )
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def _rank_windows(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._order = perm[self.rank :: self.world_size][: self.per_rank]
            self._order_epoch = epoch
        return self._order

    def _gather(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = windows[:, None] * self.window + np.arange(self.window)
        rows = torch.from_numpy(self.tokens[idx].astype(np.int64))
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        start = self.position * self.batch_size
        windows = self._rank_windows(self.epoch)[start : start + self.batch_size]
        self.position += 1
        return self._gather(windows)

    def __iter__(self) -> TokenSampler:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume exactly where ``state`` was taken (same shard, seq_len, batch_size, rank, world_size, seed)."""
        try:
            epoch, position = state["epoch"], state["position"]
        except (KeyError, TypeError):
            raise ValueError(f"sampler state must have integer 'epoch' and 'position', got {state!r}") from None
        for name, v in (("epoch", epoch), ("position", position)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"sampler state {name!r} must be a non-negative integer, got {v!r}")
        if position > self.batches_per_epoch:
            raise ValueError(
                f"sampler state position {position} exceeds {self.batches_per_epoch} batches per epoch "
                "(was it saved for another shard, batch size or world size?)"
            )
        self.epoch, self.position = epoch, position

    def val_batches(self, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed evaluation batches, the same for every call and rank (see :func:`fixed_batches`)."""
        return fixed_batches(self.tokens, self.seq_len, self.batch_size, n_batches)


def fixed_batches(tokens: Any, seq_len: int, batch_size: int, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_batches`` batches of windows spread evenly over the whole shard (independent of seeds and ranks).

    A shard with fewer than ``n_batches * batch_size`` windows gives as many full batches as it
    holds; one without a single full batch is an error.
    """
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    s = TokenSampler(tokens, seq_len, batch_size)  # validates sizes, raises if no full batch fits
    n = min(n_batches, s.batches_per_epoch)
    windows = np.linspace(0, s.n_windows - 1, n * batch_size).round().astype(np.int64)
    return [s._gather(windows[i * batch_size : (i + 1) * batch_size]) for i in range(n)]
