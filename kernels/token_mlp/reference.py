"""Token-mixing MLP in plain PyTorch: the ground truth and the CPU training path.

Per image, with X of shape (N, C):

    Z = LayerNorm_C(X)                       (N, C)
    H = GELU(W1 @ Z + b1[:, None])           (Hd, C)
    Y = X + W2 @ H + b2[:, None]             (N, C)

Mixing tokens is a left multiplication, so no transpose is ever materialized:
`w1 @ z` broadcasts the (Hd, N) weight over the batch of (N, C) slabs.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def token_mlp_reference(x, ln_weight, ln_bias, w1, b1, w2, b2, eps: float = 1e-5):
    """x + W2 @ GELU(W1 @ LayerNorm(x) + b1) + b2, computed in fp32 (or x's precision if higher).

    Args:
        x: (B, N, C) tokens.
        ln_weight, ln_bias: (C,) LayerNorm affine parameters.
        w1: (Hd, N), b1: (Hd,) token-mixing expansion.
        w2: (N, Hd), b2: (N,) token-mixing projection back to N tokens.
    Returns:
        (B, N, C) in x's dtype.
    """
    ct = torch.promote_types(x.dtype, torch.float32)
    # Autocast would silently run the matmuls in bf16/fp16; the reference is
    # the ground truth, so it always computes in `ct`.
    no_autocast = (torch.autocast(device_type=x.device.type, enabled=False)
                   if x.device.type in ("cpu", "cuda") else contextlib.nullcontext())  # e.g. meta tensors
    with no_autocast:
        xf = x.to(ct)
        z = F.layer_norm(xf, (x.shape[-1],), ln_weight.to(ct), ln_bias.to(ct), eps)  # (B, N, C)
        h = F.gelu(torch.matmul(w1.to(ct), z) + b1.to(ct)[:, None])                 # (B, Hd, C)
        y = xf + torch.matmul(w2.to(ct), h) + b2.to(ct)[:, None]                     # (B, N, C)
    return y.to(x.dtype)
