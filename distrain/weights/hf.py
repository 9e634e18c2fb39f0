"""The Hugging Face LLaMA format: tensor names, ``config.json`` and safetensors files, both ways.

Our decoder is HF's ``LlamaForCausalLM`` under other names: RMSNorm, SwiGLU (w1 gate, w3 up, w2
down), grouped-query attention without biases, and RoPE in the same half-split ("rotate_half")
layout (``distrain.model.rope_tables``), so q/k rows need no permutation — unlike Meta's original
interleaved-pair checkpoints, which HF's conversion script permutes. Only names change.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from distrain.weights.shapes import EMBEDDING, OUTPUT, ffn_hidden_dim, field

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_TOP = {EMBEDDING: "model.embed_tokens.weight", "norm.weight": "model.norm.weight", OUTPUT: "lm_head.weight"}
_LAYER = {"attention_norm.weight": "input_layernorm.weight", "attention.wq.weight": "self_attn.q_proj.weight",
          "attention.wk.weight": "self_attn.k_proj.weight", "attention.wv.weight": "self_attn.v_proj.weight",
          "attention.wo.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
          "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
          "feed_forward.w2.weight": "mlp.down_proj.weight"}
_HF_TOP = {v: k for k, v in _TOP.items()}
_HF_LAYER = {v: k for k, v in _LAYER.items()}
_OURS_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
IGNORED_HF = re.compile(r"rotary_emb\.inv_freq$")  # a buffer older HF checkpoints saved; recomputed anyway


class HFFormatError(ValueError):
    """A directory is not a LLaMA model in the Hugging Face format we read."""


def hf_name(name: str) -> str:
    """Our parameter name → HF LLaMA's."""
    if name in _TOP:
        return _TOP[name]
    m = _OURS_RE.match(name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    raise ValueError(f"{name} is not a parameter of the LLaMA decoder")


def our_name(name: str) -> str | None:
    """HF LLaMA's tensor name → ours (None for a tensor we do not read)."""
    if name in _HF_TOP:
        return _HF_TOP[name]
    m = _HF_RE.match(name)
    if m and m.group(2) in _HF_LAYER:
        return f"layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}"
    return None


def hf_config(m: Any, eos_id: int | None = None) -> dict[str, Any]:
    """``config.json`` of a ``LlamaForCausalLM`` with our model's settings (``m``: ModelConfig or its fields).
    The rotary base is written both ways (``rope_parameters`` for transformers 5, ``rope_theta`` before)."""
    dim, heads = field(m, "dim"), field(m, "n_heads")
    out = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": field(m, "vocab_size"), "hidden_size": dim, "intermediate_size": ffn_hidden_dim(m),
        "num_hidden_layers": field(m, "n_layers"), "num_attention_heads": heads,
        "num_key_value_heads": field(m, "n_kv_heads"), "head_dim": dim // heads, "hidden_act": "silu",
        "max_position_embeddings": field(m, "max_seq_len"), "rms_norm_eps": field(m, "norm_eps"),
        "rope_theta": field(m, "rope_theta"),
        "rope_parameters": {"rope_type": "default", "rope_theta": field(m, "rope_theta")},
        "tie_word_embeddings": bool(field(m, "tie_embeddings")), "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32",
    }
    if eos_id is not None:  # documents end with end-of-text, which also opens one (no separate BOS)
        out.update(bos_token_id=eos_id, eos_token_id=eos_id)
    return out


def fields_from_hf(cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Our model fields from a LLaMA ``config.json``; anything we cannot represent is an HFFormatError."""
    def need(ok: bool, why: str) -> None:
        if not ok:
            raise HFFormatError(f"{where}: {why}")

    need(cfg.get("model_type") == "llama", f"model_type {cfg.get('model_type')!r}, only 'llama' is supported")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        need(isinstance(cfg.get(key), int) and not isinstance(cfg.get(key), bool) and cfg[key] > 0,
             f"'{key}' must be a positive integer, got {cfg.get(key)!r}")
    need(not cfg.get("attention_bias") and not cfg.get("mlp_bias"), "biases in attention or MLP are not supported")
    need(cfg.get("hidden_act", "silu") == "silu", f"hidden_act {cfg.get('hidden_act')!r}, only 'silu' is supported")
    dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    need(cfg.get("head_dim") in (None, dim // heads) and dim % heads == 0,
         f"head_dim {cfg.get('head_dim')!r} must be hidden_size / num_attention_heads = {dim / heads:g}")
    rope = cfg.get("rope_parameters") or {}
    need(isinstance(rope, dict) and rope.get("rope_type", "default") == "default" and not cfg.get("rope_scaling"),
         "rope scaling is not supported (only the default rotary embedding)")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return {"vocab_size": cfg["vocab_size"], "dim": dim, "n_layers": cfg["num_hidden_layers"], "n_heads": heads,
            "n_kv_heads": int(cfg.get("num_key_value_heads") or heads), "ffn_dim": cfg["intermediate_size"],
            "multiple_of": 1, "max_seq_len": int(cfg.get("max_position_embeddings", 2048)),
            "rope_theta": float(theta), "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
            "tie_embeddings": bool(cfg.get("tie_word_embeddings", False))}


def read_config(root: Path) -> dict[str, Any]:
    path = root / CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFFormatError(f"{path}: unreadable ({e})") from None
    if not isinstance(cfg, dict):
        raise HFFormatError(f"{path}: must hold a JSON object")
    return cfg


def weight_files(root: Path) -> list[Path]:
    """The safetensors files of an HF directory: one, or the shards its index names."""
    if (root / WEIGHTS).is_file():
        return [root / WEIGHTS]
    index = root / INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise HFFormatError(f"{index}: unreadable ({e})") from None
        files = [root / s for s in shards]
        missing = [f.name for f in files if not f.is_file() or f.parent != root]
        if missing:
            raise HFFormatError(f"{index} names shards that are not in {root}: {', '.join(missing[:3])}")
        return files
    raise HFFormatError(f"{root}: no {WEIGHTS} (or {INDEX})")


def _tensors(root: Path) -> dict[str, tuple[Path, str]]:
    """Our name → (file, HF name) for every tensor we read; an unknown tensor is an HFFormatError."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, tuple[Path, str]] = {}
    for path in weight_files(root):
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except (SafetensorError, OSError) as e:
            raise HFFormatError(f"{path}: not a safetensors file ({e})") from None
        for key in keys:
            ours = our_name(key)
            if ours is None:
                if IGNORED_HF.search(key):
                    continue
                raise HFFormatError(f"{path}: tensor {key} is not part of a LLaMA decoder")
            out[ours] = (path, key)
    return out


def hf_shapes(root: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of an HF directory's tensors by our names, read from the file headers only."""
    from safetensors import safe_open

    out = {}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for ours, (path, key) in _tensors(root).items():
        by_file.setdefault(path, []).append((ours, key))
    for path, items in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for ours, key in items:
                out[ours] = tuple(f.get_slice(key).get_shape())
    return out


def read_hf_weights(root: Path, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of an HF directory by our names, as fp32 (only ``names``, when given)."""
    from safetensors import safe_open

    out = {}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for ours, (path, key) in _tensors(root).items():
        if names is None or ours in names:
            by_file.setdefault(path, []).append((ours, key))
    for path, items in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for ours, key in items:
                out[ours] = f.get_tensor(key).float()
    return out


def write_hf_weights(path: Path, weights: Mapping[str, torch.Tensor]) -> None:
    """``model.safetensors`` with HF's names (fp32, contiguous, no shared storage), written atomically."""
    from safetensors.torch import save_file

    tensors = {hf_name(n): t.detach().to("cpu", torch.float32).contiguous().clone() for n, t in weights.items()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def write_atomic(path: Path, write: Callable[[str], object]) -> None:
    """Write through a temp file beside ``path`` and rename, so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide an export from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_hf_dir(root: Path) -> bool:
    return (root / CONFIG).is_file() and ((root / WEIGHTS).is_file() or (root / INDEX).is_file())

