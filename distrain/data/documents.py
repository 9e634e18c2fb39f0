"""Whole-document batches for adaptive sequence parallelism: deterministic, rank-disjoint, resumable.

Why: the window sampler cuts the token stream into equal windows, so every sequence has the same
length and an adaptive SP planner has nothing to adapt to. Here each sequence is one document
of the shard, with its real length, and a global batch is as many documents as fit a token budget.

Documents: ``prepare`` writes every document followed by the end-of-text token (one document per
stdlib or directory file, per JSONL record, per ``<|endoftext|>``-separated part or paragraph of a
text file), so documents are the spans between consecutive EOS tokens. A document's sample is
``[eos, d_0, ..., d_{n-1}]`` as inputs and ``[d_0, ..., d_{n-1}, eos]`` as targets: the EOS before a
document acts as its beginning-of-sequence token (the shard's first document gets one too), so
its first token is predicted and its end is learnt. A literal ``<|endoftext|>`` inside a
document's text is tokenised as that token, so it splits the document there. A document longer
than ``max_doc_len`` is cut into pieces of ``max_doc_len`` tokens (the last one shorter); each
piece is a sequence whose positions restart at 0. Empty documents (two EOS in a row) are skipped;
tokens after the shard's last EOS form a last document without a final target.

Order and ranks: epoch e orders the pieces by a permutation seeded with (seed, e); piece i of that
order belongs to rank i % world_size, each rank keeping n_pieces // world_size of them, so ranks
never share a piece within an epoch. A rank packs its pieces in order into batches: a batch takes
pieces while their tokens fit ``batch_tokens``; the last batch of an epoch may be smaller. The
state is two integers, (epoch, position = pieces of this epoch's order already served).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class DocumentBatch:
    inputs: torch.Tensor  # (T,) int64: the batch's sequences back to back
    targets: torch.Tensor  # (T,) int64: inputs shifted by one inside each sequence
    cu_seqlens: torch.Tensor  # (n + 1,) int64: sequence k is [cu[k], cu[k+1])

    @property
    def lengths(self) -> list[int]:
        return torch.diff(self.cu_seqlens).tolist()

    def __len__(self) -> int:
        return self.cu_seqlens.numel() - 1


def document_pieces(tokens: np.ndarray, eos_id: int, max_doc_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of every piece; inputs are tokens[start : start+length] with index -1 meaning EOS."""
    if max_doc_len < 1:
        raise ValueError(f"max_doc_len must be >= 1, got {max_doc_len}")
    eos = np.flatnonzero(np.asarray(tokens) == eos_id)
    n = int(np.asarray(tokens).size)
    starts = np.concatenate(([-1], eos))  # input span of a document: from the EOS before it ...
    ends = np.concatenate((eos, [n - 1]))  # ... up to (not including) its own EOS, the last target
    length = ends - starts
    keep = length > 1  # a lone EOS (empty document) teaches nothing; so does a tail without tokens
    keep[-1] = length[-1] >= 1 and n - 1 > starts[-1]
    starts, length = starts[keep], length[keep]
    n_pieces = -(-length // max_doc_len)
    piece_doc = np.repeat(np.arange(length.size), n_pieces)
    first = np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
    j = np.arange(piece_doc.size) - first  # index of the piece inside its document
    p_start = starts[piece_doc] + j * max_doc_len
    p_len = np.minimum(max_doc_len, length[piece_doc] - j * max_doc_len)
    return p_start.astype(np.int64), p_len.astype(np.int64)


class DocumentSampler:
    """A rank's stream of :class:`DocumentBatch` from a token shard (see the module docstring)."""

    def __init__(self, tokens: Any, eos_id: int, max_doc_len: int, batch_tokens: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        for name, v in (("max_doc_len", max_doc_len), ("batch_tokens", batch_tokens), ("world_size", world_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if batch_tokens < max_doc_len:
            raise ValueError(f"batch_tokens ({batch_tokens}) must be >= max_doc_len ({max_doc_len}): "
                             "a batch must hold the longest piece")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.tokens = np.asarray(tokens)
        if self.tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {self.tokens.shape}")
        self.eos_id, self.max_doc_len, self.batch_tokens = int(eos_id), max_doc_len, batch_tokens
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.starts, self.lengths = document_pieces(self.tokens, self.eos_id, max_doc_len)
        self.n_pieces = int(self.starts.size)
        self.per_rank = self.n_pieces // world_size
        if self.per_rank == 0:
            raise ValueError(f"token shard too small: {self.n_pieces} document pieces for {world_size} ranks "
                             "(each rank needs at least one document)")
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def _rank_pieces(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_pieces)
            self._order = perm[self.rank::self.world_size][: self.per_rank]
            self._order_epoch = epoch
        return self._order

    def _gather(self, pieces: np.ndarray) -> DocumentBatch:
        lens = self.lengths[pieces]
        cu = np.concatenate(([0], np.cumsum(lens)))
        idx = np.repeat(self.starts[pieces] - cu[:-1], lens) + np.arange(int(cu[-1]))  # shard index of each input
        inputs = np.where(idx < 0, self.eos_id, self.tokens[np.maximum(idx, 0)]).astype(np.int64)  # -1: the first EOS
        targets = self.tokens[idx + 1].astype(np.int64)
        return DocumentBatch(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(cu.astype(np.int64)))

    def _next_pieces(self) -> tuple[int, int, np.ndarray]:
        """(epoch, position, pieces) of the next batch, without moving."""
        epoch, position = self.epoch, self.position
        if position >= self.per_rank:
            epoch, position = epoch + 1, 0
        order = self._rank_pieces(epoch)
        lens = self.lengths[order[position:]]
        n = int(np.searchsorted(np.cumsum(lens), self.batch_tokens, side="right"))  # pieces that fit the budget
        n = max(n, 1)
        return epoch, position, order[position:position + n]

    def next_batch(self) -> DocumentBatch:
        self.epoch, self.position, pieces = self._next_pieces()
        self.position += pieces.size
        return self._gather(pieces)

    def peek_lengths(self) -> list[int]:
        """The sequence lengths of the next batch (a planner solves it ahead), without drawing it."""
        return self.lengths[self._next_pieces()[2]].tolist()

    def __iter__(self) -> DocumentSampler:
        return self

    def __next__(self) -> DocumentBatch:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume exactly where ``state`` was taken (same shard, lengths, rank, world_size, seed)."""
        try:
            epoch, position = state["epoch"], state["position"]
        except (KeyError, TypeError):
            raise ValueError(f"sampler state must have integer 'epoch' and 'position', got {state!r}") from None
        for name, v in (("epoch", epoch), ("position", position)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"sampler state {name!r} must be a non-negative integer, got {v!r}")
        if position > self.per_rank:
            raise ValueError(f"sampler state position {position} exceeds {self.per_rank} pieces per epoch "
                             "(was it saved for another shard, max_doc_len or world size?)")
        self.epoch, self.position = epoch, position


def document_lengths(data_cfg: Any, model_max_seq_len: int, batch_size: int) -> tuple[int, int]:
    """(max_doc_len, batch_tokens) of a config, its zeros resolved: model.max_seq_len, batch_size × that."""
    max_doc_len = data_cfg.max_doc_len or model_max_seq_len
    return max_doc_len, data_cfg.batch_tokens or batch_size * max_doc_len
