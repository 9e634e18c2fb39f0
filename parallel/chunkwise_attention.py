"""Fast attention of a chunk's queries over [earlier K/V; the chunk's own K/V].

Why: a chunk of T queries attends to S = P + T keys with a bottom-right aligned causal mask. Passed
as an explicit boolean mask (what `distrain.model.Attention` does when it gets a prefix), torch's
CPU flash kernel is slower than its unmasked/causal paths: 1.45× for the 16 chunks of a 16K-token
sequence, single-threaded (fwd+bwd, 4 heads of 64), and up to 4× with 2 threads on a busy machine.
At long lengths attention is most of a step, so that alone uses most of SeCO's time budget.
Split instead: the prefix block needs no mask, the own block is plain causal; both run the flash
kernel and are merged with their log-sum-exp. The backward runs the flash backward of each block against the merged output and
log-sum-exp, which gives each block's exact gradient (the same identity ring attention uses).

`distrain.model.Attention` calls `prefix_causal_attention` whenever it attends over a prefix.
Only CPU has the fast path here (it uses torch's private CPU flash ops, which return the log-sum-exp
that public SDPA hides; if a torch release drops them, the masked call is used again: slower, still
exact);
other devices keep the model's masked call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_aten = torch.ops.aten
_FWD = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_BWD = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def fast_path_available(q: Tensor) -> bool:
    return _FWD is not None and _BWD is not None and q.device.type == "cpu" and q.dtype in _DTYPES


class _PrefixCausal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
        P = k.shape[2] - q.shape[2]
        o1, l1 = _FWD(q, k[:, :, :P], v[:, :, :P], 0.0, False, scale=scale)
        o2, l2 = _FWD(q, k[:, :, P:], v[:, :, P:], 0.0, True, scale=scale)
        lse = torch.logaddexp(l1, l2)
        w1, w2 = torch.exp(l1 - lse).unsqueeze(-1), torch.exp(l2 - lse).unsqueeze(-1)
        out = (o1.to(w1.dtype) * w1 + o2.to(w2.dtype) * w2).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        P = k.shape[2] - q.shape[2]
        grad = grad.contiguous()
        dq1, dk1, dv1 = _BWD(grad, q, k[:, :, :P], v[:, :, :P], out, lse, 0.0, False, scale=ctx.scale)
        dq2, dk2, dv2 = _BWD(grad, q, k[:, :, P:], v[:, :, P:], out, lse, 0.0, True, scale=ctx.scale)
        return dq1 + dq2, torch.cat((dk1, dk2), dim=2), torch.cat((dv1, dv2), dim=2), None


def prefix_causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """softmax attention of q (B, H, T, D) over k, v (B, H, S, D), S >= T, where query i sees keys
    [0, S - T + i]: the last T of S positions, causally."""
    T, S = q.shape[2], k.shape[2]
    if S < T or v.shape[2] != S or k.shape[:2] != q.shape[:2]:
        raise ValueError(f"need q (B, H, T, D) and k, v (B, H, S>=T, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if S == T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if not fast_path_available(q):
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return _PrefixCausal.apply(q, k, v, scale)
