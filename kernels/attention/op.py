"""PLACEHOLDER (reference only) until the Triton kernel lands."""
import torch

from kernels import dispatch


def triton_reasons(*, dtype: torch.dtype, head_dim: int) -> list[str]:
    return ["the Triton attention kernel is not implemented yet"]


def attention(q, k, v, *, scale=None, backend="auto"):
    dispatch.select("attention", backend, q.device, triton_reasons(dtype=q.dtype, head_dim=q.shape[-1]))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)
    return (p @ v.float()).to(q.dtype)
