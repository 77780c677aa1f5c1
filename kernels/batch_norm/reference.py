"""PyTorch path of `kernels.batch_norm`: what the Triton kernels are tested against."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def batch_norm_reference(x: torch.Tensor, weight, bias, running_mean, running_var, training: bool,
                         momentum: float, eps: float, activation: str | None, residual) -> torch.Tensor:
    """residual + batch_norm(act(x)), as F.batch_norm computes it (running statistics updated
    in place when training)."""
    a = F.gelu(x) if activation == "gelu" else x
    y = F.batch_norm(a, running_mean, running_var, weight, bias, training, momentum, eps)
    return y if residual is None else residual + y
