"""LLaMA-style decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention) that can be built whole
or as a pipeline stage holding a contiguous range of layers.

Layers keep their global index as their name (``layers.7``) so a stage's ``state_dict`` keys are
exactly the whole model's keys for the parameters it owns: the outer round of a stage can then
exchange pseudo-gradients with whoever owns the same names in other replicas.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distrain.config import MODEL_PRESETS, ModelConfig  # noqa: F401 - MODEL_PRESETS re-exported
from distrain.parallel.chunkwise_attention import prefix_causal_attention
from distrain.weights.shapes import ffn_hidden_dim  # one rule for the model and the init_from check


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))  # fp32 statistics, fp64 stays fp64
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(head_dim: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables in the half-split ("rotate_half") convention used by HF LLaMA."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    t = torch.arange(max_len, dtype=torch.float64, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (T, D) for the positions of x."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


@dataclass
class KVPrefix:
    """Keys/values (after RoPE, before GQA expansion) of earlier positions for one layer."""

    k: torch.Tensor  # (B, n_kv_heads, T_prev, head_dim)
    v: torch.Tensor


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        prefix: KVPrefix | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Causal attention of x over [prefix; x]. ``kv`` may pass this chunk's own K/V in."""
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
        k, v = kv if kv is not None else self.project_kv(x, cos, sin)
        if prefix is not None and prefix.k.shape[2] > 0:
            k = torch.cat((prefix.k.to(k.dtype), k), dim=2)
            v = torch.cat((prefix.v.to(v.dtype), v), dim=2)
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        S = k.shape[2]
        if S == T:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # queries are the last T of S positions (a chunk after cached K/V): bottom-right causal
            out = prefix_causal_attention(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden_dim(cfg)
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, prefix: KVPrefix | None = None, kv=None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, prefix, kv)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The whole model, or the stage holding layers [start, end).

    The first stage (start == 0) owns the token embedding and takes token ids; the last stage
    (end == n_layers) owns the final norm and output head and returns logits. Other stages map
    hidden states to hidden states.
    """

    def __init__(self, cfg: ModelConfig, start: int = 0, end: int | None = None, seed: int | None = None):
        super().__init__()
        end = cfg.n_layers if end is None else end
        if not 0 <= start < end <= cfg.n_layers:
            raise ValueError(f"stage [{start}, {end}) is not a non-empty range of {cfg.n_layers} layers")
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (it comes from the tokenizer)")
        self.cfg = cfg
        self.start, self.end = start, end
        self.is_first, self.is_last = start == 0, end == cfg.n_layers
        if cfg.tie_embeddings and not (self.is_first and self.is_last):
            raise ValueError("tie_embeddings needs the embedding and the head on the same stage")
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim) if self.is_first else None
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(start, end)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps) if self.is_last else None
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False) if self.is_last else None
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Initialise every parameter; with ``seed``, each from its own generator seeded by
        (seed, name) (``initial_tensor``), so a stage holding layers [a, b) starts exactly as those
        layers of the whole model do (pipeline workers never build the whole model). Without a
        seed: torch's global generator."""
        for name, p in self.named_parameters():
            p.copy_(initial_tensor(self.cfg, name, tuple(p.shape), seed))

    def rope(self, start_pos: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start_pos + length > self.rope_cos.shape[0]:
            raise ValueError(f"positions up to {start_pos + length} exceed model.max_seq_len={self.rope_cos.shape[0]}")
        return self.rope_cos[start_pos : start_pos + length], self.rope_sin[start_pos : start_pos + length]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(tokens)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h))

    def forward(
        self,
        x: torch.Tensor,
        start_pos: int = 0,
        prefixes: list[KVPrefix | None] | None = None,
    ) -> torch.Tensor:
        """x: token ids (B, T) on the first stage, hidden states (B, T, dim) otherwise."""
        h = self.embed(x) if self.is_first else x
        cos, sin = self.rope(start_pos, h.shape[1])
        for j, layer in enumerate(self.layers.values()):
            h = layer(h, cos, sin, prefixes[j] if prefixes is not None else None)
        return self.head(h) if self.is_last else h


def initial_tensor(cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int | None) -> torch.Tensor:
    """The initial value of parameter ``name``: norms at 1, residual-writing projections scaled
    down with depth (GPT-2 / LLaMA practice), everything else N(0, init_std²)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + zlib.crc32(name.encode()))
    std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else cfg.init_std
    return torch.randn(shape, generator=gen) * std


def build_model(cfg: ModelConfig, start: int = 0, end: int | None = None, seed: int | None = None) -> Transformer:
    return Transformer(cfg, start, end, seed)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
