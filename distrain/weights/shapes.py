"""Parameter names and shapes a model's settings imply, without building the model.

The configuration checks ``model.init_from`` against these at load time, and the model sizes its
feed-forward layer with the same rule (``ffn_hidden_dim``), so the two can never disagree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# The ModelConfig fields that define a model's function (init_std and preset only shape training).
MODEL_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "multiple_of", "max_seq_len",
                "rope_theta", "norm_eps", "tie_embeddings")
EMBEDDING, OUTPUT = "tok_embeddings.weight", "output.weight"
LAYER_TENSORS = ("attention_norm.weight", "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                 "attention.wo.weight", "ffn_norm.weight", "feed_forward.w1.weight", "feed_forward.w3.weight",
                 "feed_forward.w2.weight")


def field(m: Any, name: str) -> Any:
    """A model setting of a ModelConfig or of a plain mapping of its fields."""
    return m[name] if isinstance(m, Mapping) else getattr(m, name)


def ffn_hidden_dim(m: Any) -> int:
    """The SwiGLU hidden size: ``ffn_dim``, or LLaMA's 8/3·dim rounded up to ``multiple_of``."""
    if field(m, "ffn_dim"):
        return int(field(m, "ffn_dim"))
    hidden = int(2 * 4 * field(m, "dim") / 3)
    return field(m, "multiple_of") * math.ceil(hidden / field(m, "multiple_of"))


def parameter_shapes(m: Any) -> dict[str, tuple[int, ...]]:
    """Every parameter of the whole model by our name (a tied head once, as the embedding);
    a vocabulary of 0 (not yet known) gives 0 in those shapes."""
    dim, heads, kv = field(m, "dim"), field(m, "n_heads"), field(m, "n_kv_heads")
    head_dim, hidden, vocab = dim // heads, ffn_hidden_dim(m), field(m, "vocab_size")
    per_layer = {"attention_norm.weight": (dim,), "attention.wq.weight": (heads * head_dim, dim),
                 "attention.wk.weight": (kv * head_dim, dim), "attention.wv.weight": (kv * head_dim, dim),
                 "attention.wo.weight": (dim, heads * head_dim), "ffn_norm.weight": (dim,),
                 "feed_forward.w1.weight": (hidden, dim), "feed_forward.w3.weight": (hidden, dim),
                 "feed_forward.w2.weight": (dim, hidden)}
    out: dict[str, tuple[int, ...]] = {EMBEDDING: (vocab, dim)}
    for i in range(field(m, "n_layers")):
        out.update({f"layers.{i}.{k}": s for k, s in per_layer.items()})
    out["norm.weight"] = (dim,)
    if not field(m, "tie_embeddings"):
        out[OUTPUT] = (vocab, dim)
    return out
