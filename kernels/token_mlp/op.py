"""PLACEHOLDER (reference only) until the Triton kernel lands."""
import torch
import torch.nn.functional as F

from kernels import dispatch


def triton_reasons(*, dtype: torch.dtype, tokens: int, channels: int, hidden: int) -> list[str]:
    return ["the Triton token-MLP kernel is not implemented yet"]


def token_mlp(x, ln_weight, ln_bias, w1, b1, w2, b2, *, eps=1e-5, backend="auto"):
    dispatch.select("token_mlp", backend, x.device,
                    triton_reasons(dtype=x.dtype, tokens=x.shape[1], channels=x.shape[2], hidden=w1.shape[0]))
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)        # (B, N, C)
    h = F.gelu(torch.einsum("hn,bnc->bhc", w1, h) + b1[:, None])         # (B, Hd, C)
    return x + torch.einsum("nh,bhc->bnc", w2, h) + b2[:, None]
