"""Fast attention of a chunk's queries over [earlier K/V; the chunk's own K/V].

Why: a chunk of T queries attends to S = P + T keys with a bottom-right aligned causal mask. Passed
as an explicit boolean mask (what `distrain.model.Attention` does when it gets a prefix), torch's
CPU flash kernel cannot skip work and runs ~4-5× slower per step than the `is_causal=True` kernel
used for whole sequences, which alone breaks SeCO's 4/3 compute budget. Split instead: the prefix
block needs no mask, the own block is plain causal; both run the flash kernel and are merged with
their log-sum-exp. The backward runs the flash backward of each block against the merged output and
log-sum-exp, which gives each block's exact gradient (the same identity ring attention uses).

`prefix_causal_attention` is the function; `RouteChunkAttention` is a torch function mode that
sends the model's masked SDPA call to it while chunkwise passes run, after checking the mask really
is the bottom-right causal one. The mode is a stop-gap: once the model's masked branch calls
`prefix_causal_attention` itself, the mode sees no masked call and does nothing.
Only CPU has the fast path here (it uses torch's CPU flash ops, which return the log-sum-exp);
other devices keep the model's masked call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

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


class RouteChunkAttention(TorchFunctionMode):
    """Within this mode, SDPA calls with a bottom-right causal boolean mask use the split kernel."""

    def __init__(self) -> None:
        super().__init__()
        self._tril: dict[tuple[int, torch.device], Tensor] = {}

    def _is_bottom_right_causal(self, mask: Tensor, T: int, S: int) -> bool:
        if mask.dtype != torch.bool or tuple(mask.shape) != (T, S) or S <= T:
            return False
        key = (T, mask.device)
        if key not in self._tril:
            self._tril[key] = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
        return bool(mask[:, : S - T].all()) and torch.equal(mask[:, S - T:], self._tril[key])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and len(args) == 3:
            q, k, v = args
            mask = kwargs.get("attn_mask")
            extra = set(kwargs) - {"attn_mask", "scale", "dropout_p", "is_causal", "enable_gqa"}
            if (mask is not None and not extra and not kwargs.get("is_causal", False)
                    and kwargs.get("dropout_p", 0.0) == 0.0 and not kwargs.get("enable_gqa", False)
                    and q.dim() == 4 and k.shape == v.shape and k.shape[:2] == q.shape[:2]
                    and fast_path_available(q) and k.dtype == q.dtype == v.dtype
                    and self._is_bottom_right_causal(mask, q.shape[2], k.shape[2])):
                return _PrefixCausal.apply(q, k, v, kwargs.get("scale"))
        return func(*args, **kwargs)
