"""Depthwise "same" convolution in pure PyTorch: the ground truth and the CPU path.

Math runs in fp32 (or the input's precision when it is higher, e.g. fp64 for
test references); the result comes back in the input's dtype and memory format.
Autograd through the casts gives the training path its gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32, or the input's dtype when it carries more precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dwconv2d_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                       activation: str | None = None) -> Tensor:
    """y = act(conv2d(x, weight, bias, padding="same", groups=C)).

    x: (B, C, H, W), weight: (C, 1, kh, kw), bias: (C,) or None.
    """
    ct = compute_dtype(x.dtype)
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous()
    y = F.conv2d(x.to(ct), weight.to(ct), None if bias is None else bias.to(ct),
                 padding="same", groups=x.shape[1])
    if activation == "gelu":
        y = F.gelu(y)  # exact (erf) GELU
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return y.to(dtype=x.dtype, memory_format=fmt)
