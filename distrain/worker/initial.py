"""The weights a fresh run starts from, in one place for every launch mode and replica kind.

``model.init_from`` set: that directory's tensors (a Hugging Face LLaMA directory or a distrain run,
checked against the configured model when the config loaded) — continued pre-training. Otherwise
each parameter seeded by its name (``model.initial_tensor``). Every worker asks here for exactly the
parameters it holds, so a pipeline stage reads only its layers, and the simulation's threads,
torchrun's ranks and Ray's actors all start from the same global weights.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch
from torch import nn

from distrain.config import Config
from distrain.model import initial_tensor
from distrain.outer.base import Weights, owned_parameters

log = logging.getLogger(__name__)
_LOCK = threading.Lock()  # the simulation's worker threads build their stages concurrently


def initial_weights(cfg: Config, shapes: dict[str, tuple[int, ...]]) -> Weights:
    """The starting value (fp32, CPU) of every parameter named in ``shapes``."""
    if not cfg.model.init_from:
        return {n: initial_tensor(cfg.model, n, s, cfg.run.seed) for n, s in shapes.items()}
    from distrain.weights.source import check_fits, open_source
    from distrain.weights.source import initial_weights as source_weights

    with _LOCK:
        source = open_source(cfg.model.init_from)
        check_fits(source, cfg.model)  # again: the vocabulary is only known now
        got = source_weights(source, set(shapes))
    for n, s in shapes.items():
        if tuple(got[n].shape) != tuple(s):
            raise ValueError(f"model.init_from: tensor {n} has shape {list(got[n].shape)}, the model needs {list(s)}")
    return got


@torch.no_grad()
def start_from_init(cfg: Config, model: nn.Module) -> None:
    """Load ``model.init_from``'s values into the parameters ``model`` holds (no-op without it)."""
    if not cfg.model.init_from:
        return
    params = owned_parameters(model)
    values = initial_weights(cfg, {n: tuple(p.shape) for n, p in params.items()})
    for n, p in params.items():
        p.copy_(values[n].to(p.device, p.dtype))


def warn_on_another_tokenizer(cfg: Config, tokenizer_path: Path) -> None:
    """Token ids mean nothing across tokenizers: say so when ``model.init_from``'s tokenizer differs
    from the one this run reads its data with (the run goes on: an extended vocabulary may be meant)."""
    if not cfg.model.init_from:
        return
    from tokenizers import Tokenizer as HFTokenizer

    from distrain.weights.source import open_source

    theirs = open_source(cfg.model.init_from).tokenizer
    if theirs is None or Path(theirs).read_bytes() == Path(tokenizer_path).read_bytes():
        return
    vocab = [HFTokenizer.from_file(str(p)).get_vocab(with_added_tokens=True) for p in (theirs, tokenizer_path)]
    if vocab[0] != vocab[1]:
        log.warning("model.init_from %s was trained with another tokenizer (%s) than this run's data uses (%s); "
                    "set data.tokenizer=%s to keep its token ids", cfg.model.init_from, theirs, tokenizer_path, theirs)
