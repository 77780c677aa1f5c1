"""Attention in plain PyTorch: the ground truth, the CPU path and the visualizer's source.

Math runs in fp32 (fp64 stays fp64); the result is cast back to the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over the last two dims of (B, H, N, D); differentiable.

    Uses SDPA on upcast inputs: on CPU it is a fused fp32 kernel with its own
    backward, much faster than materialising the (B, H, N, N) scores.
    """
    ct = _compute_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = F.scaled_dot_product_attention(q.to(ct), k.to(ct), v.to(ct), scale=scale)
    return out.to(q.dtype)


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The (B, H, N, N) float32 softmax probabilities (rows sum to 1), for inspection."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return torch.softmax(scores, dim=-1)
