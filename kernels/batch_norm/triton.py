"""Triton kernels for training-mode BatchNorm over NCHW, with an optional fused activation
(before the normalization) and residual (after it), and their launchers.

    y = residual + (act(x) - mean) * rstd * weight + bias,   mean, var over (B, H, W) per channel

Forward: `_stats_kernel` (channel, split of the images) sums act(x) - shift and its square,
shift being each channel's first value, so that the variance is not the difference of two
large sums; `_finalize_kernel` turns the partial sums into mean, variance, rstd and the
per-channel scale and shift; `_apply_kernel` (a few (image, channel) planes, a block of H*W)
writes y.
Backward (dy given; the residual's gradient is dy itself):
    da = k1 * dy + k2 * a + k0,   a = act(x),  dx = da * act'(x)
with per-channel k1 = w * rstd, k2 = -w * rstd^3 * sum(dy * (a - mean)) / n and
k0 = -w * rstd * sum(dy) / n - k2 * mean: `_stats_kernel` (BACKWARD) forms the two sums,
`_bwd_finalize_kernel` the constants and the weight and bias gradients, `_bwd_apply_kernel` dx.
Each pass streams x (and dy, residual, y) once; only per-channel statistics are saved.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dispatch import wrap_triton
from kernels.gelu import gelu, gelu_grad
from kernels.grid import cdiv, next_pow2

_TARGET_PROGRAMS = 528   # ~4 per SM on an H100: enough (channel, split) programs to fill it


@triton.jit
def _act(v, GELU: tl.constexpr):
    if GELU:
        return gelu(v)
    return v


@triton.jit
def _stats_kernel(X, DY, CENTER, PART, B, C, HW, IMAGES_PER_PROG, NS,
                  BACKWARD: tl.constexpr, GELU: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # Channel c's partial sums over a split of the images, ROWS images x BLOCK pixels a step
    # (several loads in flight per thread): with a = act(x) and d = a - center,
    #   forward:  sum d, sum d * d      center: the channel's first value (not the mean, unknown yet)
    #   backward: sum dy, sum dy * d    center: the mean
    c = tl.program_id(0)
    s = tl.program_id(1)
    offs = tl.arange(0, BLOCK)[None, :]
    rows = tl.arange(0, ROWS)[:, None]
    if BACKWARD:
        center = tl.load(CENTER + c)
    else:
        center = _act(tl.load(X + c * HW).to(tl.float32), GELU)   # x[0, c, 0]
    acc1 = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    acc2 = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    b_end = tl.minimum(s * IMAGES_PER_PROG + IMAGES_PER_PROG, B)
    for b0 in range(s * IMAGES_PER_PROG, b_end, ROWS):
        b = b0 + rows
        base = (b * C + c).to(tl.int64) * HW
        for h0 in range(0, HW, BLOCK):
            m = (b < b_end) & (h0 + offs < HW)
            d = tl.where(m, _act(tl.load(X + base + h0 + offs, mask=m, other=0.0).to(tl.float32), GELU) - center,
                         0.0)
            p = d
            if BACKWARD:
                p = tl.load(DY + base + h0 + offs, mask=m, other=0.0).to(tl.float32)
            acc1 += p
            acc2 += p * d
    tl.store(PART + s * C + c, tl.sum(tl.sum(acc1, axis=1), axis=0))
    tl.store(PART + (NS + s) * C + c, tl.sum(tl.sum(acc2, axis=1), axis=0))


@triton.jit
def _channel_sums(PART, c, cm, C, NS, BLOCK_C: tl.constexpr):
    # the statistics kernel's two partial sums of channels c, added in split order (the same
    # sums on every run)
    s1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s in range(0, NS):
        s1 += tl.load(PART + s * C + c, mask=cm, other=0.0)
        s2 += tl.load(PART + (NS + s) * C + c, mask=cm, other=0.0)
    return s1, s2


@triton.jit
def _load_or(P, c, cm, HAS: tl.constexpr, value: tl.constexpr, BLOCK_C: tl.constexpr):
    # an affine parameter of channels c in fp32, or `value` where there is none
    if HAS:
        return tl.load(P + c, mask=cm, other=value).to(tl.float32)
    return tl.full((BLOCK_C,), value, tl.float32)


@triton.jit
def _finalize_kernel(PART, X, W, BIAS, MEAN, VAR, RSTD, SCALE, SHIFT, C, HW, NS, n, eps,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, GELU: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    s1, s2 = _channel_sums(PART, c, cm, C, NS, BLOCK_C)
    shift = _act(tl.load(X + c * HW, mask=cm, other=0.0).to(tl.float32), GELU)
    d = s1 / n
    var = tl.maximum(s2 / n - d * d, 0.0)
    mean = shift + d
    rstd = 1.0 / tl.sqrt(var + tl.cast(eps, tl.float32))
    w = _load_or(W, c, cm, HAS_W, 1.0, BLOCK_C)
    bias = _load_or(BIAS, c, cm, HAS_B, 0.0, BLOCK_C)
    scale = w * rstd
    tl.store(MEAN + c, mean, mask=cm)
    tl.store(VAR + c, var, mask=cm)
    tl.store(RSTD + c, rstd, mask=cm)
    tl.store(SCALE + c, scale, mask=cm)
    tl.store(SHIFT + c, bias - mean * scale, mask=cm)


@triton.jit
def _apply_kernel(X, RES, Y, SCALE, SHIFT, R, C, HW,
                  GELU: tl.constexpr, HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]     # (image, channel) planes
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
    rm = row < R
    m = rm & (offs < HW)
    c = row % C
    at = row.to(tl.int64) * HW + offs
    scale = tl.load(SCALE + c, mask=rm, other=0.0)
    shift = tl.load(SHIFT + c, mask=rm, other=0.0)
    y = _act(tl.load(X + at, mask=m, other=0.0).to(tl.float32), GELU) * scale + shift
    if HAS_RES:
        y += tl.load(RES + at, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + at, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _bwd_finalize_kernel(PART, W, MEAN, RSTD, DW, DB, K1, K2, K0, C, NS, n,
                         HAS_W: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    sum_dy, sum_dy_amu = _channel_sums(PART, c, cm, C, NS, BLOCK_C)
    mean = tl.load(MEAN + c, mask=cm, other=0.0)
    rstd = tl.load(RSTD + c, mask=cm, other=0.0)
    w = _load_or(W, c, cm, HAS_W, 1.0, BLOCK_C)
    k1 = w * rstd
    k2 = -k1 * rstd * rstd * sum_dy_amu / n
    tl.store(DW + c, sum_dy_amu * rstd, mask=cm)
    tl.store(DB + c, sum_dy, mask=cm)
    tl.store(K1 + c, k1, mask=cm)
    tl.store(K2 + c, k2, mask=cm)
    tl.store(K0 + c, -k1 * sum_dy / n - k2 * mean, mask=cm)


@triton.jit
def _bwd_apply_kernel(DY, X, DX, K1, K2, K0, DX_PART, R, C, HW,
                      GELU: tl.constexpr, SUM_DX: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
    rm = row < R
    m = rm & (offs < HW)
    c = row % C
    at = row.to(tl.int64) * HW + offs
    dy = tl.load(DY + at, mask=m, other=0.0).to(tl.float32)
    x = tl.load(X + at, mask=m, other=0.0).to(tl.float32)
    k1 = tl.load(K1 + c, mask=rm, other=0.0)
    k2 = tl.load(K2 + c, mask=rm, other=0.0)
    k0 = tl.load(K0 + c, mask=rm, other=0.0)
    da = k1 * dy + k2 * _act(x, GELU) + k0
    if GELU:
        da = da * gelu_grad(x)
    tl.store(DX + at, da.to(DX.dtype.element_ty), mask=m)
    if SUM_DX:   # each plane's share of sum(dx) over this block of pixels (before rounding)
        tl.store(DX_PART + row * tl.num_programs(1) + tl.program_id(1),
                 tl.sum(tl.where(m, da, 0.0), axis=1, keep_dims=True), mask=rm)


# ----------------------------------------------------------------------------- launchers

def _splits(B: int, C: int, HW: int) -> tuple[int, int]:
    """(splits of the images, images per split) for the statistics passes: enough (channel,
    split) programs to fill the card, but each with at least one tile's worth of pixels
    (small images: a program summing a handful of pixels costs more to launch than it saves)."""
    per = cdiv(B, max(1, min(B, cdiv(_TARGET_PROGRAMS, C))))
    per = max(per, min(B, cdiv(_TILE_ELEMENTS, HW)))
    return cdiv(B, per), per


_TILE_ELEMENTS = 4096


def _tile(hw: int, planes: int) -> tuple[int, int]:
    """(ROWS, BLOCK): planes and pixels a program step, ~4096 elements (8 KiB in 16 bits: several
    loads in flight per thread, which a memory-bound kernel needs to approach the bandwidth),
    with no more rows than the `planes` a program has (masked rows would be wasted lanes)."""
    block = min(2048, max(16, next_pow2(hw)))
    return max(1, min(_TILE_ELEMENTS // block, next_pow2(planes))), block


def forward(x: torch.Tensor, weight, bias, residual, eps: float, gelu_input: bool):
    """(y, mean, var, rstd): y like x (NCHW, contiguous); mean, biased var and rstd (C,) fp32."""
    B, C, H, W = x.shape
    HW = H * W
    f32 = torch.float32
    mean, var, rstd, scale, shift = (torch.empty(C, device=x.device, dtype=f32) for _ in range(5))
    y = torch.empty_like(x)
    ns, per = _splits(B, C, HW)
    part = torch.empty((2, ns, C), device=x.device, dtype=f32)
    rows, block = _tile(HW, per)
    wrap_triton(_stats_kernel)[(C, ns)](x, x, x, part, B, C, HW, per, ns,
                                        BACKWARD=False, GELU=gelu_input, ROWS=rows, BLOCK=block, num_warps=4)
    block_c = min(1024, next_pow2(C))
    wrap_triton(_finalize_kernel)[(cdiv(C, block_c),)](
        part, x, weight if weight is not None else x, bias if bias is not None else x,
        mean, var, rstd, scale, shift, C, HW, ns, float(B * HW), eps,
        HAS_W=weight is not None, HAS_B=bias is not None, GELU=gelu_input, BLOCK_C=block_c, num_warps=4)
    rows, block = _tile(HW, B * C)
    wrap_triton(_apply_kernel)[(cdiv(B * C, rows), cdiv(HW, block))](
        x, residual if residual is not None else x, y, scale, shift, B * C, C, HW,
        GELU=gelu_input, HAS_RES=residual is not None, ROWS=rows, BLOCK=block, num_warps=4)
    return y, mean, var, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, weight, mean, rstd, gelu_input: bool, dx_sum=None):
    """(dx, dweight, dbias): dx like x, the others (C,) fp32. With `dx_sum` ((C,) fp32), also
    each channel's sum of dx into it, formed as dx is written (what a bias before this
    BatchNorm, e.g. a convolution's, gets as its gradient: no pass of its own over dx)."""
    B, C, H, W = x.shape
    HW = H * W
    f32 = torch.float32
    dy = dy.contiguous()
    ns, per = _splits(B, C, HW)
    part = torch.empty((2, ns, C), device=x.device, dtype=f32)
    rows, block = _tile(HW, per)
    wrap_triton(_stats_kernel)[(C, ns)](x, dy, mean, part, B, C, HW, per, ns,
                                        BACKWARD=True, GELU=gelu_input, ROWS=rows, BLOCK=block, num_warps=4)
    dw, db, k1, k2, k0 = (torch.empty(C, device=x.device, dtype=f32) for _ in range(5))
    block_c = min(1024, next_pow2(C))
    wrap_triton(_bwd_finalize_kernel)[(cdiv(C, block_c),)](
        part, weight if weight is not None else x, mean, rstd, dw, db, k1, k2, k0, C, ns, float(B * HW),
        HAS_W=weight is not None, BLOCK_C=block_c, num_warps=4)
    dx = torch.empty_like(x)
    rows, block = _tile(HW, B * C)
    n_blocks = cdiv(HW, block)
    dx_part = torch.empty((B, C, n_blocks) if dx_sum is not None else (1,), device=x.device, dtype=f32)
    wrap_triton(_bwd_apply_kernel)[(cdiv(B * C, rows), n_blocks)](
        dy, x, dx, k1, k2, k0, dx_part, B * C, C, HW, GELU=gelu_input, SUM_DX=dx_sum is not None,
        ROWS=rows, BLOCK=block, num_warps=4)
    if dx_sum is not None:
        torch.sum(dx_part, dim=(0, 2), out=dx_sum)
    return dx, dw, db
