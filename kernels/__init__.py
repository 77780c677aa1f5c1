"""Fused vision-mixing ops with PyTorch reference paths.

Public ops (each takes backend="auto" | "triton" | "reference"):
  attention(q, k, v)                          multi-head self-attention, (B, H, N, D)
  attention_packed(qkv, heads)                the same on a packed (B, N, 3 * H * D) projection
  token_mlp(x, ln_w, ln_b, w1, b1, w2, b2)    x + token-mixing MLP(LayerNorm(x)), (B, N, C)
  dwconv2d(x, weight, bias, activation)       depthwise "same" conv, (B, C, H, W)
  batch_norm(x, weight, bias, running_mean,   residual + BatchNorm(act(x)), training mode on
             running_var, ...)                the Triton path, (B, C, H, W)
  dwconv_batch_norm_residual(x, ...)          x + BatchNorm(GELU(dwconv2d(x))), training mode:
                                              ConvMixer's spatial mixing as one op

This package never imports `composer`; Triton is imported lazily so that a
machine without it still runs every op on the reference path.
"""
from kernels.attention.op import attention, attention_packed
from kernels.batch_norm.op import batch_norm
from kernels.dispatch import BACKENDS, BackendUnavailable
from kernels.dwconv.block import dwconv_batch_norm_residual
from kernels.dwconv.op import dwconv2d
from kernels.token_mlp.op import token_mlp

__all__ = ["attention", "attention_packed", "token_mlp", "dwconv2d", "batch_norm", "dwconv_batch_norm_residual",
           "backend_for", "BACKENDS", "BackendUnavailable"]


def backend_for(op: str, backend: str, device, dtype, **dims) -> tuple[str, list[str]]:
    """Which backend `op` would use for inputs described by `dims`, and why not Triton.

    Used by `composer summarize` to report the kernel path without running it.
    `dims` are the op's `triton_reasons` keywords (e.g. head_dim=64 for attention).
    """
    from kernels import dispatch
    from kernels.attention import op as attention_op
    from kernels.batch_norm import op as batch_norm_op
    from kernels.dwconv import op as dwconv_op
    from kernels.token_mlp import op as token_mlp_op

    ops = {"attention": attention_op, "token_mlp": token_mlp_op, "dwconv2d": dwconv_op, "batch_norm": batch_norm_op}
    reasons = ops[op].triton_reasons(dtype=dtype, **dims)
    return dispatch.explain(op, backend, device, reasons)
