"""Public attention op: backend choice, autograd and torch.library registration.

The Triton path is two `torch.library.triton_op`s (forward, backward) tied
together with `register_autograd`, so torch.compile(fullgraph=True) sees them
as ordinary graph nodes (and inductor can still see the kernels inside). Plain
eager calls skip that layer: `_EagerAttention` runs the same launchers under a
plain autograd.Function (see `dispatch.plain_eager`). Triton itself is imported
only inside the op bodies.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels import dispatch
from kernels.attention import reference

OP = "attention"
MAX_HEAD_DIM = 128  # any D up to this: tiles are max(16, next power of two) wide, padded in registers


def triton_reasons(*, dtype: torch.dtype, head_dim: int) -> list[str]:
    """Why the Triton kernel cannot take inputs of this dtype and head dim (empty when it can)."""
    reasons = dispatch.dtype_reasons(dtype)
    if head_dim > MAX_HEAD_DIM:
        reasons.append(f"head_dim {head_dim} is not supported (the kernel takes 1 to {MAX_HEAD_DIM}; use more heads)")
    return reasons


@torch.library.triton_op("kernels::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    from kernels.attention import triton as kt

    return kt.forward(q, k, v, scale)


@torch.library.triton_op("kernels::attention_bwd", mutates_args=())
def _attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse2: Tensor,
                   scale: float) -> tuple[Tensor, Tensor, Tensor]:
    from kernels.attention import triton as kt

    return kt.backward(do, q, k, v, out, lse2, scale)


def _save(ctx, q, k, v, scale, out, lse2):
    ctx.save_for_backward(q, k, v, out, lse2)
    ctx.scale = scale


def _backward_with(ctx, dout, launch_backward):
    dq, dk, dv = launch_backward(dout, *ctx.saved_tensors, ctx.scale)
    return dq, dk, dv, None


def _setup_context(ctx, inputs, output):
    _save(ctx, *inputs, *output)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dout, _dlse2):
    return _backward_with(ctx, dout, _attention_bwd)


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The Triton path for plain tensors in eager mode: same launchers, same saved tensors."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        from kernels.attention import triton as kt

        with dispatch.direct_launch():
            out, lse2 = kt.forward(q, k, v, scale)
        _save(ctx, q, k, v, scale, out, lse2)
        return out

    @staticmethod
    def backward(ctx, dout):
        from kernels.attention import triton as kt

        with dispatch.direct_launch():
            return _backward_with(ctx, dout, kt.backward)


# ----------------------------------------------------------------------------- packed q, k, v

def _split(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, H, N, D) views q, k, v of a packed (B, N, 3 * H * D) projection: no copy."""
    b, n, c3 = qkv.shape
    return qkv.unflatten(-1, (3, heads, c3 // (3 * heads))).permute(2, 0, 3, 1, 4).unbind(0)


def _head_views(t: Tensor, heads: int, parts: int) -> list[Tensor]:
    """The `parts` (B, H, N, D) views of a (B, N, parts * H * D) tensor, one as_strided each: what
    `_split` gives, in fewer host operations, for the eager launches (autograd never sees them)."""
    b, n, c = t.shape
    d = c // (parts * heads)
    sb, sn, sc = t.stride()
    offset = t.storage_offset()
    return [t.as_strided((b, heads, n, d), (sb, d * sc, sn, sc), offset + i * heads * d * sc)
            for i in range(parts)]


@torch.library.triton_op("kernels::attention_packed_fwd", mutates_args=())
def _attention_packed_fwd(qkv: Tensor, heads: int, scale: float) -> tuple[Tensor, Tensor]:
    from kernels.attention import triton as kt

    out, lse2 = kt.forward(*_split(qkv, heads), scale)
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d), lse2   # a view: out's memory is (B, N, H, D)


@torch.library.triton_op("kernels::attention_packed_bwd", mutates_args=())
def _attention_packed_bwd(dout: Tensor, qkv: Tensor, out: Tensor, lse2: Tensor, heads: int,
                          scale: float) -> Tensor:
    """The packed gradient (B, N, 3 * H * D) inside the torch.library op (what torch.compile
    traces): dq, dk, dv written apart, then stacked. Eager calls (_EagerAttentionPacked) have the
    kernel write them straight into the packed gradient instead, so that autograd hands it to
    the projection's backward as it is; in a traced launch those three mutated views of one
    buffer would each be cloned by functionalization, a path not yet checked on a GPU."""
    from kernels.attention import triton as kt

    as_heads = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)   # (B, N, H*D) -> (B, H, N, D)
    grads = kt.backward(as_heads(dout), *_split(qkv, heads), as_heads(out), lse2, scale)
    return torch.stack([g.transpose(1, 2) for g in grads], dim=2).flatten(2)


def _setup_packed_context(ctx, inputs, output):
    qkv, heads, scale = inputs
    out, lse2 = output
    ctx.save_for_backward(qkv, out, lse2)
    ctx.heads, ctx.scale = heads, scale
    ctx.mark_non_differentiable(lse2)


def _packed_backward(ctx, dout, _dlse2):
    return _attention_packed_bwd(dout, *ctx.saved_tensors, ctx.heads, ctx.scale), None, None


_attention_packed_fwd.register_autograd(_packed_backward, setup_context=_setup_packed_context)


class _EagerAttentionPacked(torch.autograd.Function):
    """The packed Triton path for plain tensors in eager mode (see _EagerAttention)."""

    # Same kernels as the library op, with its views made once and kept (host time: every view
    # op is a dispatcher call, and small ViTs train host-bound).

    @staticmethod
    def forward(ctx, qkv, heads, scale):
        from kernels.attention import triton as kt

        q, k, v = _head_views(qkv, heads, 3)
        with dispatch.direct_launch():
            out, lse2 = kt.forward(q, k, v, scale)                       # out: (B, H, N, D) view
        ctx.save_for_backward(q, k, v, out, lse2)
        ctx.heads, ctx.scale, ctx.packed_shape = heads, scale, qkv.shape
        b, h, n, d = out.shape
        return out.as_strided((b, n, h * d), (n * h * d, h * d, 1))   # its (B, N, H, D) memory

    @staticmethod
    def backward(ctx, dout):
        from kernels.attention import triton as kt

        q, k, v, out, lse2 = ctx.saved_tensors
        # dq, dk, dv written straight into one gradient laid out like qkv (see _attention_packed_bwd)
        dqkv = q.new_empty(ctx.packed_shape)
        with dispatch.direct_launch():
            kt.backward(_head_views(dout, ctx.heads, 1)[0], q, k, v, out, lse2, ctx.scale,
                        grads=_head_views(dqkv, ctx.heads, 3))
        return dqkv, None, None


def attention_packed(qkv: Tensor, heads: int, *, scale: float | None = None, backend: str = "auto") -> Tensor:
    """Attention on a packed projection, as a ViT block computes it: qkv (B, N, 3 * H * D), the
    output of one Linear(C, 3 * C), holds q, k, v side by side (each H heads of D). Returns the
    (B, N, H * D) input of the out-projection.

    Same math, dtypes and backends as `attention`. On the Triton path called eagerly nothing is
    copied either way: q, k, v are read in place, the output is written in the out-projection's
    layout, and the gradient comes back as one (B, N, 3 * H * D) tensor in the projection's
    layout (with `attention` on views of qkv, autograd stacks dq, dk, dv and copies the result
    back into that layout: two passes over three activations' worth of memory in every
    backward). Under torch.compile the gradient is assembled with one stack (see
    `_attention_packed_bwd`).
    """
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"attention_packed: heads must be a positive int; got {heads!r}")
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * heads) != 0:
        raise ValueError(f"attention_packed expects qkv of shape (B, N, 3 * heads * D) with heads={heads}; "
                         f"got {tuple(qkv.shape)}")
    if qkv.shape[1] < 1:
        raise ValueError("attention needs at least one token (N >= 1)")
    b, n, c3 = qkv.shape
    d = c3 // (3 * heads)
    scale = d ** -0.5 if scale is None else float(scale)
    reasons = triton_reasons(dtype=qkv.dtype, head_dim=d)
    if dispatch.select(OP, backend, qkv.device, reasons) == "reference":
        out = reference.attention(*_split(qkv, heads), scale)
        return out.transpose(1, 2).reshape(b, n, heads * d)
    if dispatch.plain_eager(qkv):
        return _EagerAttentionPacked.apply(qkv, heads, scale)
    out, _ = _attention_packed_fwd(qkv, heads, scale)
    return out


# ----------------------------------------------------------------------------- public op

def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"attention expects q, k, v of one shape (B, H, N, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention expects one dtype for q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] < 1:
        raise ValueError("attention needs at least one token (N >= 1)")


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, backend: str = "auto") -> Tensor:
    """Non-causal multi-head attention softmax(q k^T * scale) v.

    Args:
        q, k, v: (B, H, N, D), one dtype; any strides (views of a packed qkv are read in place).
        scale: score scale, D ** -0.5 when None.
        backend: "auto" (Triton for supported CUDA tensors, else reference), "triton"
            (raises BackendUnavailable with the reasons when it cannot run), or "reference".

    Returns:
        (B, H, N, D) in the input dtype. On the Triton path its memory is (B, N, H, D),
        so `out.transpose(1, 2).reshape(B, N, H * D)` is a view.
    """
    _check_inputs(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    reasons = triton_reasons(dtype=q.dtype, head_dim=q.shape[-1])
    if dispatch.select(OP, backend, q.device, reasons) == "reference":
        return reference.attention(q, k, v, scale)
    if dispatch.plain_eager(q, k, v):
        return _EagerAttention.apply(q, k, v, scale)
    out, _ = _attention_fwd(q, k, v, scale)
    return out
