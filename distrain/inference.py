"""A trained model outside the run: loaded from a run's global weights or an exported Hugging Face
directory, scored on text (``distrain eval``) and sampled from (``distrain generate``).

Text is tokenised with the run's tokenizer and preceded by end-of-text, which is what precedes
every document in the training stream.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from distrain.config import ModelConfig
from distrain.data.tokenizer import Tokenizer, TokenizerError
from distrain.model import Transformer
from distrain.weights.source import Source, WeightsError, open_source


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    source: Source


@dataclass
class TextScore:
    loss: float  # mean cross-entropy per predicted token (nats)
    perplexity: float
    tokens: int  # predicted tokens


def model_config(fields: dict[str, object]) -> ModelConfig:
    """A ModelConfig with a source's model settings (the training-only ones at their defaults)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in fields.items() if k in known})


@torch.no_grad()
def load_model(path: str | Path, step: int | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """The whole model with ``path``'s weights (a run's global weights, or an HF directory's) and its tokenizer."""
    source = open_source(path, step)
    if source.tokenizer is None:
        raise WeightsError(f"{source.describe()} has no tokenizer.json to read text with")
    try:
        tokenizer = Tokenizer.from_file(source.tokenizer)
    except (TokenizerError, FileNotFoundError) as e:
        raise WeightsError(str(e)) from None
    model = Transformer(model_config(source.fields), seed=0)  # seeded by name: the global generator is left alone
    weights = source.load()
    for name, p in model.named_parameters():  # a tied head is the embedding, named once
        p.copy_(weights[name])
    return LoadedModel(model.to(device).eval(), tokenizer, source)


def text_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """``text`` as one document: end-of-text, then its tokens."""
    return [tokenizer.eos_id] + tokenizer.encode(text)


@torch.no_grad()
def score(model: Transformer, ids: list[int], seq_len: int, batch_size: int = 8) -> TextScore:
    """Mean loss and perplexity of predicting ``ids[1:]``, in consecutive windows of ``seq_len`` positions
    (each window predicts the token after each of its positions; windows do not overlap)."""
    if len(ids) < 2:
        raise ValueError("the text has no token to predict")
    seq_len = min(seq_len, model.cfg.max_seq_len)
    device = next(model.parameters()).device
    starts = list(range(0, len(ids) - 1, seq_len))
    total, count = 0.0, 0
    full = [s for s in starts if s + seq_len + 1 <= len(ids)]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + \
        [[s] for s in starts if s + seq_len + 1 > len(ids)]
    for group in groups:
        rows = [ids[s:s + seq_len + 1] for s in group]
        batch = torch.tensor(rows, dtype=torch.long, device=device)
        logits = model(batch[:, :-1])
        total += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                       reduction="sum"))
        count += batch[:, 1:].numel()
    loss = total / count
    return TextScore(loss, math.exp(loss), count)


@torch.no_grad()
def sample(model: Transformer, ids: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
           seed: int = 0) -> list[int]:
    """``max_new_tokens`` tokens after ``ids``, sampled with a generator seeded by ``seed`` (temperature 0:
    greedy; ``top_k`` > 0: from the k likeliest). The context is the last ``max_seq_len`` tokens."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    out = list(ids)
    for _ in range(max_new_tokens):
        context = torch.tensor([out[-model.cfg.max_seq_len:]], dtype=torch.long, device=device)
        logits = model(context)[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if 0 < top_k < logits.numel():
                logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen))
        out.append(nxt)
    return out[len(ids):]
