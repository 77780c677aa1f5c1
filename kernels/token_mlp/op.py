"""token_mlp: x + W2 @ GELU(W1 @ LayerNorm(x) + b1) + b2 per image, with backend dispatch.

The Triton path is a pair of `torch.library.triton_op`s (forward, backward)
tied together with `register_autograd`, so `torch.compile(fullgraph=True)`
traces straight through them (Inductor even sees the kernels). Plain eager
calls skip that layer: `_EagerTokenMlp` runs the same launchers under a plain
autograd.Function (see `dispatch.plain_eager`). The kernels module is imported
only inside the op bodies: a machine without Triton registers the ops, never
calls them, and runs the reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels import dispatch
from kernels.token_mlp.reference import token_mlp_reference

# The whole token axis is one tile: it is the reduction axis of W1 @ Z.
MAX_TOKENS = 512


def triton_reasons(*, dtype: torch.dtype, tokens: int, channels: int, hidden: int) -> list[str]:
    """Why the Triton kernel cannot take x of this dtype and (tokens, channels), hidden units."""
    reasons = dispatch.dtype_reasons(dtype)
    if tokens > MAX_TOKENS:
        reasons.append(f"{tokens} tokens > {MAX_TOKENS}: the kernel holds all tokens of an image in one tile")
    for name, value in (("tokens", tokens), ("channels", channels), ("hidden", hidden)):
        if value < 1:
            reasons.append(f"{name} must be at least 1 (got {value})")
    return reasons


@torch.library.triton_op("kernels::token_mlp_fwd", mutates_args=())
def _token_mlp_fwd(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, w1: Tensor, b1: Tensor,
                   w2: Tensor, b2: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    from kernels.token_mlp import triton as kernels_triton

    return kernels_triton.forward(x, ln_weight, ln_bias, w1, b1, w2, b2, eps)


@torch.library.triton_op("kernels::token_mlp_bwd", mutates_args=())
def _token_mlp_bwd(dy: Tensor, x: Tensor, ln_weight: Tensor, ln_bias: Tensor, w1: Tensor, b1: Tensor,
                   w2: Tensor, mean: Tensor, rstd: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from kernels.token_mlp import triton as kernels_triton

    dx, dlnw, dlnb, dw1, db1, dw2, db2 = kernels_triton.backward(dy, x, ln_weight, ln_bias, w1, b1, w2, mean, rstd)
    # The launcher finishes several gradients with one reduction and returns views of its
    # result (dlnw and dlnb; dw1, dw2 and db1 of the fused weight kernel); an operator's
    # outputs must not alias each other, so the library op hands back copies of the later
    # ones. Plain eager calls (_EagerTokenMlp) keep the views.
    return dx, dlnw, dlnb.clone(), dw1, db1.clone(), dw2.clone(), db2


def _save(ctx, x, ln_weight, ln_bias, w1, b1, w2, b2, mean, rstd):
    # only the LayerNorm statistics are saved; A and H are recomputed in the backward
    ctx.save_for_backward(x, ln_weight, ln_bias, w1, b1, w2, mean, rstd)
    ctx.b2_dtype = b2.dtype


def _backward_with(ctx, dy, launch_backward):
    saved = ctx.saved_tensors   # unpacked once: each unpack re-checks every tensor's version
    dx, dlnw, dlnb, dw1, db1, dw2, db2 = launch_backward(dy, *saved)
    # the kernels accumulate parameter gradients in fp32; hand each back in its parameter's dtype
    _, ln_weight, ln_bias, w1, b1, w2, _, _ = saved
    return (dx, dlnw.to(ln_weight.dtype), dlnb.to(ln_bias.dtype), dw1.to(w1.dtype), db1.to(b1.dtype),
            dw2.to(w2.dtype), db2.to(ctx.b2_dtype), None)


def _setup_context(ctx, inputs, output):
    _, mean, rstd = output
    _save(ctx, *inputs[:7], mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    return _backward_with(ctx, dy, _token_mlp_bwd)


_token_mlp_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerTokenMlp(torch.autograd.Function):
    """The Triton path for plain tensors in eager mode: same launchers, same saved tensors."""

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, w1, b1, w2, b2, eps):
        from kernels.token_mlp import triton as kernels_triton

        with dispatch.direct_launch():
            y, mean, rstd = kernels_triton.forward(x, ln_weight, ln_bias, w1, b1, w2, b2, eps)
        _save(ctx, x, ln_weight, ln_bias, w1, b1, w2, b2, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        from kernels.token_mlp import triton as kernels_triton

        with dispatch.direct_launch():
            return _backward_with(ctx, dy, kernels_triton.backward)


def _check_shapes(x, ln_weight, ln_bias, w1, b1, w2, b2) -> None:
    if x.dim() != 3:
        raise ValueError(f"token_mlp: x must be (B, N, C); got shape {tuple(x.shape)}")
    _, n, c = x.shape
    hd = w1.shape[0] if w1.dim() == 2 else -1
    expected = {"ln_weight": (ln_weight, (c,)), "ln_bias": (ln_bias, (c,)), "w1": (w1, (hd, n)),
                "b1": (b1, (hd,)), "w2": (w2, (n, hd)), "b2": (b2, (n,))}
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"token_mlp: {name} must have shape {shape} for x {tuple(x.shape)} "
                             f"and w1 {tuple(w1.shape)}; got {tuple(t.shape)}")


def token_mlp(x, ln_weight, ln_bias, w1, b1, w2, b2, *, eps=1e-5, backend="auto"):
    """x + W2 @ GELU(W1 @ LayerNorm_C(x) + b1) + b2, mixing the N tokens of each image.

    Args:
        x: (B, N, C) tokens, float32 / float16 / bfloat16.
        ln_weight, ln_bias: (C,) LayerNorm affine parameters.
        w1: (Hd, N), b1: (Hd,) expansion over tokens; w2: (N, Hd), b2: (N,) projection back.
        eps: LayerNorm epsilon.
        backend: "auto" | "triton" | "reference" (see kernels.dispatch).
    Returns:
        (B, N, C), x's dtype. Differentiable in x and every parameter.
    """
    _check_shapes(x, ln_weight, ln_bias, w1, b1, w2, b2)
    reasons = triton_reasons(dtype=x.dtype, tokens=x.shape[1], channels=x.shape[2], hidden=w1.shape[0])
    if dispatch.select("token_mlp", backend, x.device, reasons) == "triton":
        if dispatch.plain_eager(x, ln_weight, ln_bias, w1, b1, w2, b2):
            return _EagerTokenMlp.apply(x, ln_weight, ln_bias, w1, b1, w2, b2, float(eps))
        return _token_mlp_fwd(x, ln_weight, ln_bias, w1, b1, w2, b2, float(eps))[0]
    return token_mlp_reference(x, ln_weight, ln_bias, w1, b1, w2, b2, eps)
