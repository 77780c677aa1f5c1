"""@triton.jit helpers shared by the fused kernels (triton.py) and the per-image GEMMs (gemms.py)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mm(a, b, acc, IEEE: tl.constexpr):
    # fp32 inputs: full-precision products, matching PyTorch's default fp32
    # matmul (no TF32); fp16/bf16 inputs use the tensor cores as they are.
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load_z(X, MEAN, RSTD, LNW, LNB, b, N, C, offs_n, offs_c, stride_xb, stride_xn, stride_xc):
    """LayerNorm of one (BLOCK_N, BLOCK_C) slab of image b: (xhat, z) in fp32, zero outside."""
    mask = (offs_n < N)[:, None] & (offs_c < C)[None, :]
    x = tl.load(X + b * stride_xb + offs_n[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + b * N + offs_n, mask=offs_n < N, other=0.0)
    rstd = tl.load(RSTD + b * N + offs_n, mask=offs_n < N, other=0.0)
    gamma = tl.load(LNW + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
    beta = tl.load(LNB + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    # padded tokens must be exact zeros: they are summed over in W1 @ Z and dA @ Z^T
    z = tl.where(mask, xhat * gamma[None, :] + beta[None, :], 0.0)
    return xhat, z


@triton.jit
def _unit(u, NUM_CB, C, BLOCK_C: tl.constexpr):
    """Work unit u of the weight-gradient reductions -> (image, its block of channels, their mask)."""
    offs_c = (u % NUM_CB) * BLOCK_C + tl.arange(0, BLOCK_C)
    return (u // NUM_CB).to(tl.int64), offs_c, offs_c < C


@triton.jit
def _ln_backward_partials(dz, X, DY, MEAN, RSTD, LNW, LNB, P, S1, S2, DGAMMA, DBETA, DB2, b, cb, N, C, NUM_CB,
                          offs_n, offs_c, stride_xb, stride_xn, stride_xc, stride_gb, stride_gn, stride_gc):
    """The LayerNorm backward of one (BLOCK_N, BLOCK_C) slab of image b holding all its tokens,
    given dZ: what this channel block can finish (dgamma, dbeta per channel; the residual
    plus the row-local part of dX in P) and its partial row sums over channels (S1, S2, and
    dB2), which `_ln_finish_kernel` completes once every channel block has written its own."""
    n_mask = offs_n < N
    c_mask = offs_c < C
    mask = n_mask[:, None] & c_mask[None, :]
    # xhat and dY are re-read (from L2) here rather than held in registers across the matmuls
    xhat, _ = _load_z(X, MEAN, RSTD, LNW, LNB, b, N, C, offs_n, offs_c, stride_xb, stride_xn, stride_xc)
    dy = tl.load(DY + b * stride_gb + offs_n[:, None] * stride_gn + offs_c[None, :] * stride_gc,
                 mask=mask, other=0.0).to(tl.float32)
    gamma = tl.load(LNW + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + b * N + offs_n, mask=n_mask, other=0.0)
    tl.store(DGAMMA + b * C + offs_c, tl.sum(dz * xhat, axis=0), mask=c_mask)
    tl.store(DBETA + b * C + offs_c, tl.sum(dz, axis=0), mask=c_mask)
    dxhat = dz * gamma[None, :]
    row = (b * NUM_CB + cb) * N + offs_n
    tl.store(S1 + row, tl.sum(dxhat, axis=1), mask=n_mask)
    tl.store(S2 + row, tl.sum(dxhat * xhat, axis=1), mask=n_mask)
    tl.store(DB2 + row, tl.sum(dy, axis=1), mask=n_mask)
    # residual gradient plus the row-local part of dX; the row sums come in _ln_finish_kernel
    p = dy + rstd[:, None] * dxhat
    tl.store(P + b * N * C + offs_n[:, None] * C + offs_c[None, :], p, mask=mask)
