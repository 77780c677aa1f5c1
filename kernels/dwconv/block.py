"""ConvMixer's spatial mixing as one training op: x + BatchNorm(GELU(dwconv2d(x))).

Composed of the two ops, the block's backward has two extra passes: autograd adds the
residual's gradient (dy itself) to the convolution's input gradient in a separate kernel,
reading both and writing the sum, and the convolution's bias gradient (the sum of its output
gradient) takes a pass over that gradient of its own. As one autograd function the backward
hands dy to the convolution's input-gradient launch, which adds it in its epilogue as it
writes dx, and the BatchNorm backward sums the convolution's output gradient per channel as
it writes it. The forward runs the same two launches as the composition: the convolution
writes only its output, BatchNorm applies GELU, normalizes and adds the residual.

Training mode, eager calls only: under torch.compile, in eval mode or where either op would
take its reference path the composition of the public ops runs instead (same result).
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels import dispatch
from kernels.batch_norm import op as batch_norm_op
from kernels.dwconv import op as dwconv_op


class _DwConvBatchNormResidual(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, eps):
        with dispatch.direct_launch():
            z, _ = dwconv_op._launch_forward(x, weight, bias, gelu=False, save_preact=False)
            y, mean, var, rstd = batch_norm_op._launch_forward(z, bn_weight, bn_bias, x, eps, True)
        ctx.save_for_backward(x, weight, z, bn_weight, mean, rstd)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (bias, bn_weight, bn_bias))
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        from kernels.dwconv import triton as kt

        x, weight, z, bn_weight, mean, rstd = ctx.saved_tensors
        bias_dtype, bn_w_dtype, bn_b_dtype = ctx.dtypes
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        # the convolution's bias gradient, sum(dz), formed by the BatchNorm backward as it writes dz
        db = (torch.empty(x.shape[1], device=x.device, dtype=torch.float32)
              if bias_dtype is not None and need_db else None)
        with dispatch.direct_launch():
            dz, dbn_w, dbn_b = batch_norm_op._launch_backward(dy, z, bn_weight, mean, rstd, True, dx_sum=db)
            # the residual's gradient (dy) goes into dx as the kernel writes it
            dx, dw, _ = kt.conv_backward(dz, x, weight.contiguous(), None, gelu=False, has_bias=False,
                                         need_dx=need_dx, need_dw=need_dw, add_to_dx=dy)
        return (dx,
                dw.to(weight.dtype) if need_dw else None,
                db.to(bias_dtype) if db is not None else None,
                None if bn_w_dtype is None else dbn_w.to(bn_w_dtype),
                None if bn_b_dtype is None else dbn_b.to(bn_b_dtype),
                None)


def dwconv_batch_norm_residual(x: Tensor, weight: Tensor, bias: Tensor | None, bn_weight: Tensor | None,
                               bn_bias: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None,
                               *, momentum: float = 0.1, eps: float = 1e-5, backend: str = "auto") -> Tensor:
    """x + batch_norm(GELU(dwconv2d(x, weight, bias))) in training mode (batch statistics; the
    running buffers, when given, are updated as nn.BatchNorm2d updates them).

    The same result as composing `dwconv2d` and `batch_norm(activation="gelu", residual=x)`,
    with one pass fewer in the backward where both take their Triton path in an eager call
    (see the module docstring); otherwise that composition runs.
    """
    if dispatch.plain_eager(x, weight, bias, bn_weight, bn_bias):
        k = weight.shape[-1]
        reasons = dwconv_op.triton_reasons(dtype=x.dtype, channels=x.shape[1], kernel_size=k)
        reasons += batch_norm_op.triton_reasons(dtype=x.dtype, layout_ok=x.dim() == 4 and x.is_contiguous())
        if weight.shape[-2] != k or x.dim() != 4:
            reasons.append("not a (B, C, H, W) input with a square kernel")
        if dispatch.select("dwconv_batch_norm_residual", backend, x.device, reasons) == "triton":
            y, mean, var = _DwConvBatchNormResidual.apply(x, weight, bias, bn_weight, bn_bias, float(eps))
            batch_norm_op.update_running_stats(running_mean, running_var, mean, var,
                                               x.numel() // x.shape[1], momentum)
            return y
    from kernels.batch_norm.op import batch_norm
    from kernels.dwconv.op import dwconv2d

    z = dwconv2d(x, weight, bias, backend=backend)
    return batch_norm(z, bn_weight, bn_bias, running_mean, running_var, training=True, momentum=momentum, eps=eps,
                      activation="gelu", residual=x, backend=backend)
