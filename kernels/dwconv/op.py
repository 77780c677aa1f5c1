"""PLACEHOLDER (reference only) until the Triton kernel lands."""
import torch
import torch.nn.functional as F

from kernels import dispatch


def triton_reasons(*, dtype: torch.dtype, channels: int, kernel_size: int) -> list[str]:
    return ["the Triton depthwise-conv kernel is not implemented yet"]


def dwconv2d(x, weight, bias=None, *, activation=None, backend="auto"):
    dispatch.select("dwconv2d", backend, x.device,
                    triton_reasons(dtype=x.dtype, channels=x.shape[1], kernel_size=weight.shape[-1]))
    y = F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])
    return F.gelu(y) if activation == "gelu" else y
