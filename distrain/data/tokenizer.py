"""Tokenizer: a user's ``tokenizer.json`` or a byte-level BPE trained locally, both via HF ``tokenizers``.

Byte-level BPE covers every byte, so any text round-trips exactly through encode/decode; the one
special token ``<|endoftext|>`` separates documents in the token stream.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
# End-of-document tokens of common published tokenizers, tried in order for a user's tokenizer.
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
_MIN_VOCAB = 256 + 1  # every byte plus the end-of-text token


class TokenizerError(ValueError):
    """A tokenizer file is unusable or a training request is invalid."""


class Tokenizer:
    """Thin wrapper over ``tokenizers.Tokenizer`` exposing what the data pipeline needs."""

    def __init__(self, tok: HFTokenizer, eos_token: str | None = None):
        self._tok = tok
        vocab = tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise TokenizerError("tokenizer has an empty vocabulary")
        names = (eos_token,) if eos_token else EOS_CANDIDATES
        found = next((n for n in names if n in vocab), None)
        if found is None:
            raise TokenizerError(f"tokenizer has no end-of-text token (looked for {', '.join(names)})")
        self.eos_token = found
        self.eos_id = vocab[found]
        # Ids of a user's tokenizer need not be contiguous: size by the largest id, not the count.
        self.vocab_size = max(vocab.values()) + 1

    @classmethod
    def from_file(cls, path: str | Path, eos_token: str | None = None) -> Tokenizer:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {p}")
        try:
            tok = HFTokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise TokenizerError(f"{p}: not a valid tokenizer.json ({e})") from e
        try:
            return cls(tok, eos_token)
        except TokenizerError as e:
            raise TokenizerError(f"{p}: {e}") from None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train a byte-level BPE with ``<|endoftext|>`` as id 0 and at most ``vocab_size`` ids.

        A corpus too small to learn enough merges yields a smaller vocabulary; read ``vocab_size``.
        """
        if vocab_size < _MIN_VOCAB:
            raise TokenizerError(f"vocab_size must be >= {_MIN_VOCAB} (256 bytes + end-of-text), got {vocab_size}")
        if vocab_size > 2**32:
            raise TokenizerError(f"vocab_size must fit 32-bit token ids, got {vocab_size}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok, EOS_TOKEN)

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` atomically (temp file + rename) so readers never see half a file."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self._tok.to_str())
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode in parallel (Rust threads); no BOS/EOS is added — documents get EOS from the caller."""
        fast = getattr(self._tok, "encode_batch_fast", None)  # skips offsets; tokenizers >= 0.20
        encs = (fast or self._tok.encode_batch)(list(texts), add_special_tokens=False)
        return [e.ids for e in encs]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def to_str(self) -> str:
        """The tokenizer.json content (used to fingerprint it)."""
        return self._tok.to_str()
