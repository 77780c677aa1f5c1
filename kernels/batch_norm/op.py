"""Public batch-norm op: validation, backend choice, autograd and torch.library registration.

Same structure as the other ops: two `torch.library.triton_op`s (forward, backward) tied
together with `register_autograd` for torch.compile, and `_EagerBatchNorm` running the same
launchers under a plain autograd.Function for eager calls. The running statistics are
updated outside the ops, with two in-place PyTorch ops, so that the ops mutate nothing.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kernels import dispatch
from kernels.batch_norm.reference import batch_norm_reference

OP = "batch_norm"
ACTIVATIONS = (None, "gelu")


def triton_reasons(*, dtype: torch.dtype, training: bool = True, layout_ok: bool = True) -> list[str]:
    """Why the Triton kernels cannot take this input."""
    reasons = dispatch.dtype_reasons(dtype)
    if not training:
        reasons.append("eval mode: the kernels compute batch statistics (PyTorch's batch_norm applies the "
                       "running ones in one pass)")
    if not layout_ok:
        reasons.append("x (and residual) must be contiguous NCHW: the kernels read each (image, channel) "
                       "plane as one row (channels_last goes to PyTorch)")
    return reasons


# ----------------------------------------------------------------------------- Triton path

def _launch_forward(x, weight, bias, residual, eps, gelu):
    from kernels.batch_norm import triton as kt

    return kt.forward(x, weight, bias, residual, eps, gelu)


def _launch_backward(dy, x, weight, mean, rstd, gelu, dx_sum=None):
    from kernels.batch_norm import triton as kt

    return kt.backward(dy, x, weight, mean, rstd, gelu, dx_sum=dx_sum)


@torch.library.triton_op("kernels::batch_norm_fwd", mutates_args=())
def _batch_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                    eps: float, gelu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, biased variance, rstd)."""
    return _launch_forward(x, weight, bias, residual, eps, gelu)


@torch.library.triton_op("kernels::batch_norm_bwd", mutates_args=())
def _batch_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                    gelu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias), the last two fp32."""
    return _launch_backward(dy, x, weight, mean, rstd, gelu)


def _save(ctx, x, weight, bias, residual, mean, rstd, gelu):
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.gelu = gelu
    ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
    ctx.has_residual = residual is not None


def _backward_with(ctx, dy, launch_backward):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = launch_backward(dy, x, weight, mean, rstd, ctx.gelu)
    w_dtype, b_dtype = ctx.dtypes
    return (dx, None if w_dtype is None else dw.to(w_dtype), None if b_dtype is None else db.to(b_dtype),
            dy if ctx.has_residual else None, None, None)


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, _eps, gelu = inputs
    _y, mean, _var, rstd = output
    _save(ctx, x, weight, bias, residual, mean, rstd, gelu)
    ctx.mark_non_differentiable(mean, _var, rstd)


def _backward(ctx, dy, _dmean, _dvar, _drstd):
    return _backward_with(ctx, dy, _batch_norm_bwd)


_batch_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerBatchNorm(torch.autograd.Function):
    """The Triton path for plain tensors in eager mode: same launchers, same saved tensors."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, gelu):
        with dispatch.direct_launch():
            y, mean, var, rstd = _launch_forward(x, weight, bias, residual, eps, gelu)
        _save(ctx, x, weight, bias, residual, mean, rstd, gelu)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        with dispatch.direct_launch():
            return _backward_with(ctx, dy, _launch_backward)


# ----------------------------------------------------------------------------- public op

def _check(x, weight, bias, running_mean, running_var, training, momentum, activation, residual) -> None:
    if x.dim() != 4:
        raise ValueError(f"batch_norm: x must be (B, C, H, W); got shape {tuple(x.shape)}")
    C = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None and tuple(t.shape) != (C,):
            raise ValueError(f"batch_norm: {name} must be ({C},); got {tuple(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("batch_norm: give both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError("batch_norm: eval mode (training=False) needs running_mean and running_var")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"batch_norm: residual must have x's shape {tuple(x.shape)}; got {tuple(residual.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"batch_norm: activation must be None or 'gelu'; got {activation!r}")
    if not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"batch_norm: momentum must be a number in [0, 1]; got {momentum!r}")
    if training and x.numel() // max(C, 1) < 2:
        raise ValueError(f"batch_norm: training needs more than one value per channel; got x {tuple(x.shape)}")


def batch_norm(x, weight=None, bias=None, running_mean=None, running_var=None, *, training=True, momentum=0.1,
               eps=1e-5, activation=None, residual=None, backend="auto"):
    """residual + BatchNorm(act(x)) over (B, H, W) per channel, as F.batch_norm computes it.

    Args:
        x: (B, C, H, W); the Triton path takes contiguous NCHW in training mode.
        weight, bias: (C,) affine parameters, or None.
        running_mean, running_var: (C,) buffers updated in place when training (unbiased
            variance, `momentum` as in nn.BatchNorm2d), or None; needed in eval mode.
        training: batch statistics (True) or the running ones.
        activation: None or "gelu" (exact), applied to x before the normalization.
        residual: a tensor like x added to the result, or None.
        backend: "auto" | "triton" | "reference" (see kernels.dispatch).
    Returns:
        A tensor like x. Differentiable in x, weight, bias and residual.
    """
    _check(x, weight, bias, running_mean, running_var, training, momentum, activation, residual)
    layout_ok = x.is_contiguous() and (residual is None or (residual.is_contiguous()
                                                             and residual.dtype == x.dtype))
    reasons = triton_reasons(dtype=x.dtype, training=training, layout_ok=layout_ok)
    params = [t for t in (weight, bias, residual) if t is not None]
    if any(t.device != x.device for t in params):
        reasons.append("x, weight, bias and residual are on different devices")
    if dispatch.select(OP, backend, x.device, reasons) == "reference":
        return batch_norm_reference(x, weight, bias, running_mean, running_var, training, momentum, eps,
                                    activation, residual)
    gelu = activation == "gelu"
    if dispatch.plain_eager(x, weight, bias, residual):
        y, mean, var = _EagerBatchNorm.apply(x, weight, bias, residual, float(eps), gelu)
    else:
        y, mean, var, _ = _batch_norm_fwd(x, weight, bias, residual, float(eps), gelu)
    update_running_stats(running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum)
    return y


def update_running_stats(running_mean, running_var, mean: Tensor, var: Tensor, n: int, momentum: float) -> None:
    """As nn.BatchNorm2d does in training: lerp toward the batch mean and the unbiased batch
    variance (var is the biased one, over n values a channel); nothing when the buffers are None."""
    if running_mean is None:
        return
    with torch.no_grad():
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_((var * (n / (n - 1))).to(running_var.dtype), momentum)
