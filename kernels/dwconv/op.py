"""Public depthwise-conv op: validation, backend choice, autograd and torch.library registration.

The Triton path is two `torch.library.triton_op`s (forward, backward) tied
together with `register_autograd`, so torch.compile(fullgraph=True) sees them
as graph nodes and inductor can still see the kernels inside. Plain eager calls
skip that layer: `_EagerDwConv` runs the same launchers under a plain
autograd.Function (see `dispatch.plain_eager`). Triton itself is imported only
inside the op bodies.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kernels import dispatch
from kernels.dwconv import reference

OP = "dwconv2d"
MAX_KERNEL = 15
ACTIVATIONS = (None, "gelu")


def triton_reasons(*, dtype: torch.dtype, channels: int, kernel_size: int) -> list[str]:
    """Why the Triton kernel cannot take inputs of this dtype, channel count and kernel size."""
    reasons = dispatch.dtype_reasons(dtype)
    if channels < 1:
        reasons.append(f"channels must be at least 1 (got {channels})")
    if kernel_size % 2 == 0:
        reasons.append(f"kernel size {kernel_size} is even; the kernel takes odd sizes (symmetric 'same' padding)")
    if not 1 <= kernel_size <= MAX_KERNEL:
        reasons.append(f"kernel size {kernel_size} is outside 1..{MAX_KERNEL}")
    return reasons


# ----------------------------------------------------------------------------- Triton path

def _launch_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: bool,
                    save_preact: bool) -> tuple[Tensor, Tensor]:
    from kernels.dwconv import triton as kt

    y = torch.empty_like(x)
    z = torch.empty_like(x) if save_preact else x.new_empty((0,))
    kt.conv_forward(x, weight.contiguous(), None if bias is None else bias.contiguous(),
                    y, z if save_preact else None, gelu=gelu)
    return y, z


def _launch_backward(dy: Tensor, x: Tensor, weight: Tensor, z: Tensor, gelu: bool, has_bias: bool,
                     need_dx: bool, need_dw: bool) -> tuple[Tensor, Tensor, Tensor]:
    from kernels.dwconv import triton as kt

    dx, dw, db = kt.conv_backward(dy, x, weight.contiguous(), z if gelu else None, gelu=gelu,
                                  has_bias=has_bias, need_dx=need_dx, need_dw=need_dw)
    # a fresh empty tensor for each missing gradient: outputs of a library op must not alias
    return (x.new_empty((0,)) if dx is None else dx,
            x.new_empty((0,)) if dw is None else dw.to(weight.dtype),
            x.new_empty((0,)) if db is None else db)


@torch.library.triton_op("kernels::dwconv2d_fwd", mutates_args=())
def _dwconv2d_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: bool,
                  save_preact: bool) -> tuple[Tensor, Tensor]:
    """(y, z): z is the pre-activation when GELU is fused and backward will need it, else empty."""
    return _launch_forward(x, weight, bias, gelu, save_preact)


@torch.library.triton_op("kernels::dwconv2d_bwd", mutates_args=())
def _dwconv2d_bwd(dy: Tensor, x: Tensor, weight: Tensor, z: Tensor, gelu: bool, has_bias: bool,
                  need_dx: bool, need_dw: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw, db); a gradient that is not needed comes back empty."""
    return _launch_backward(dy, x, weight, z, gelu, has_bias, need_dx, need_dw)


def _save(ctx, x, weight, bias, z, gelu):
    ctx.save_for_backward(x, weight, z)
    ctx.gelu = gelu
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_with(ctx, dy, launch_backward):
    x, weight, z = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    dx, dw, db = launch_backward(dy, x, weight, z, ctx.gelu, ctx.has_bias and need_db, need_dx, need_dw)
    return (dx if need_dx else None,
            dw if need_dw else None,
            db.to(ctx.bias_dtype) if (ctx.has_bias and need_db) else None,
            None, None)


def _setup_context(ctx, inputs, output):
    x, weight, bias, gelu, _save_preact = inputs
    _save(ctx, x, weight, bias, output[1], gelu)


def _backward(ctx, dy, _dz):
    return _backward_with(ctx, dy, _dwconv2d_bwd)


_dwconv2d_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerDwConv(torch.autograd.Function):
    """The Triton path for plain tensors in eager mode: same launchers, same saved tensors."""

    @staticmethod
    def forward(ctx, x, weight, bias, gelu, save_preact):
        with dispatch.direct_launch():
            y, z = _launch_forward(x, weight, bias, gelu, save_preact)
        _save(ctx, x, weight, bias, z, gelu)
        return y

    @staticmethod
    def backward(ctx, dy):
        with dispatch.direct_launch():
            return _backward_with(ctx, dy, _launch_backward)


# ----------------------------------------------------------------------------- public op

def _check(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None) -> None:
    if x.dim() != 4:
        raise ValueError(f"dwconv2d: x must be (B, C, H, W); got shape {tuple(x.shape)}")
    C = x.shape[1]
    if weight.dim() != 4 or weight.shape[0] != C or weight.shape[1] != 1:
        raise ValueError(f"dwconv2d: weight must be (C, 1, k, k) with C={C}; got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"dwconv2d: bias must be ({C},); got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"dwconv2d: activation must be None or 'gelu'; got {activation!r}")


def dwconv2d(x, weight, bias=None, *, activation=None, backend="auto"):
    """Depthwise 'same' convolution, stride 1, with optional bias and fused exact GELU.

    Args:
        x: (B, C, H, W), NCHW or channels_last; the output keeps its memory format.
        weight: (C, 1, k, k); the Triton kernel takes odd k up to 15.
        bias: (C,) or None.
        activation: None or "gelu" (exact, erf-based).
        backend: "auto" | "triton" | "reference" (see kernels.dispatch).
    """
    _check(x, weight, bias, activation)
    kh, kw = weight.shape[-2:]
    reasons = triton_reasons(dtype=x.dtype, channels=x.shape[1], kernel_size=kw)
    if kh != kw:
        reasons.append(f"kernel {kh}x{kw} is not square")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        reasons += [r.replace("dtype", "parameter dtype", 1) for r in dispatch.dtype_reasons(weight.dtype)]
    if weight.device != x.device or (bias is not None and bias.device != x.device):
        reasons.append("x, weight and bias are on different devices")
    if dispatch.select(OP, backend, x.device, reasons) == "reference":
        return reference.dwconv2d_reference(x, weight, bias, activation)
    gelu = activation == "gelu"
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    if dispatch.plain_eager(x, weight, bias):
        return _EagerDwConv.apply(x, weight, bias, gelu, gelu and needs_grad)
    y, _ = _dwconv2d_fwd(x, weight, bias, gelu, gelu and needs_grad)
    return y
