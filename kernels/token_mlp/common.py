"""What the fused kernels (triton.py) and the per-image GEMMs (gemms.py) share: the LayerNorm
statistics and finishing kernels, and @triton.jit helpers."""
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
                mask=mask, other=0.0)
    mean = tl.load(MEAN + b * N + offs_n, mask=offs_n < N, other=0.0)
    rstd = tl.load(RSTD + b * N + offs_n, mask=offs_n < N, other=0.0)
    return _normalize(x, mean, rstd, LNW, LNB, offs_c, C, mask)


@triton.jit
def _normalize(x, mean, rstd, LNW, LNB, offs_c, C, mask):
    """(xhat, z) in fp32 of a loaded slab x of one image, zero outside `mask`."""
    gamma = tl.load(LNW + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
    beta = tl.load(LNB + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
    # padded tokens must be exact zeros: they are summed over in W1 @ Z and dA @ Z^T
    z = tl.where(mask, xhat * gamma[None, :] + beta[None, :], 0.0)
    return xhat, z


@triton.jit
def _unit(u, NUM_CB, C, BLOCK_C: tl.constexpr):
    """Work unit u of the weight-gradient reductions -> (image, its block of channels, their mask)."""
    offs_c = (u % NUM_CB) * BLOCK_C + tl.arange(0, BLOCK_C)
    return (u // NUM_CB).to(tl.int64), offs_c, offs_c < C


@triton.jit
def _ln_backward_slab(dz, X, DY, MEAN, RSTD, LNW, LNB, DGAMMA, DBETA, DB2, b, cb, N, C, NUM_CB,
                      offs_n, offs_c, stride_xb, stride_xn, stride_xc, stride_gb, stride_gn, stride_gc):
    """What the LayerNorm backward of one (BLOCK_N, BLOCK_C) slab of image b holding all its
    tokens, given dZ, can finish on its own: dgamma, dbeta per channel and this channel block's
    share of dB2 per token, stored; returns (xhat, dy, dxhat, rstd) for the rest."""
    n_mask = offs_n < N
    c_mask = offs_c < C
    # xhat and dY are re-read (from L2) here rather than held in registers across the matmuls
    xhat, _ = _load_z(X, MEAN, RSTD, LNW, LNB, b, N, C, offs_n, offs_c, stride_xb, stride_xn, stride_xc)
    dy = tl.load(DY + b * stride_gb + offs_n[:, None] * stride_gn + offs_c[None, :] * stride_gc,
                 mask=n_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
    gamma = tl.load(LNW + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + b * N + offs_n, mask=n_mask, other=0.0)
    tl.store(DGAMMA + b * C + offs_c, tl.sum(dz * xhat, axis=0), mask=c_mask)
    tl.store(DBETA + b * C + offs_c, tl.sum(dz, axis=0), mask=c_mask)
    tl.store(DB2 + (b * NUM_CB + cb) * N + offs_n, tl.sum(dy, axis=1), mask=n_mask)
    return xhat, dy, dz * gamma[None, :], rstd


@triton.jit
def _ln_backward_partials(dz, X, DY, MEAN, RSTD, LNW, LNB, P, S1, S2, DGAMMA, DBETA, DB2, b, cb, N, C, NUM_CB,
                          offs_n, offs_c, stride_xb, stride_xn, stride_xc, stride_gb, stride_gn, stride_gc):
    """`_ln_backward_slab`, then the residual plus the row-local part of dX in P and this channel
    block's partial row sums over channels (S1, S2), which `_ln_finish_kernel` completes once
    every channel block has written its own."""
    xhat, dy, dxhat, rstd = _ln_backward_slab(dz, X, DY, MEAN, RSTD, LNW, LNB, DGAMMA, DBETA, DB2, b, cb, N, C,
                                              NUM_CB, offs_n, offs_c, stride_xb, stride_xn, stride_xc,
                                              stride_gb, stride_gn, stride_gc)
    n_mask = offs_n < N
    row = (b * NUM_CB + cb) * N + offs_n
    tl.store(S1 + row, tl.sum(dxhat, axis=1), mask=n_mask)
    tl.store(S2 + row, tl.sum(dxhat * xhat, axis=1), mask=n_mask)
    tl.store(P + b * N * C + offs_n[:, None] * C + offs_c[None, :], dy + rstd[:, None] * dxhat,
             mask=n_mask[:, None] & (offs_c < C)[None, :])


@triton.jit
def _ln_backward_direct(dz, X, DY, MEAN, RSTD, LNW, LNB, S1, S2, DX, DGAMMA, DBETA, DB2, b, cb, N, C, NUM_CB,
                        offs_n, offs_c, stride_xb, stride_xn, stride_xc, stride_gb, stride_gn, stride_gc,
                        stride_db, stride_dn, stride_dc):
    """`_ln_backward_slab`, then dX = dY + rstd * (dxhat - (S1 + xhat * S2) / C) written, given
    the whole row sums over channels S1 = sum_c dxhat, S2 = sum_c dxhat * xhat (B, N) (from
    gemms.dw1_row_sums)."""
    xhat, dy, dxhat, rstd = _ln_backward_slab(dz, X, DY, MEAN, RSTD, LNW, LNB, DGAMMA, DBETA, DB2, b, cb, N, C,
                                              NUM_CB, offs_n, offs_c, stride_xb, stride_xn, stride_xc,
                                              stride_gb, stride_gn, stride_gc)
    n_mask = offs_n < N
    s1 = tl.load(S1 + b * N + offs_n, mask=n_mask, other=0.0)
    s2 = tl.load(S2 + b * N + offs_n, mask=n_mask, other=0.0)
    dx = dy + rstd[:, None] * (dxhat - (s1[:, None] + xhat * s2[:, None]) / C)
    tl.store(DX + b * stride_db + offs_n[:, None] * stride_dn + offs_c[None, :] * stride_dc,
             dx.to(DX.dtype.element_ty), mask=n_mask[:, None] & (offs_c < C)[None, :])


@triton.jit
def _ln_stats_kernel(X, MEAN, RSTD, R, N, C, stride_xb, stride_xn, stride_xc, eps,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)   # flattened (b, n)
    r_mask = rows < R
    base = X + (rows // N).to(tl.int64) * stride_xb + (rows % N) * stride_xn
    # -- mean --
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = r_mask[:, None] & (cols < C)[None, :]
        acc += tl.load(base[:, None] + cols[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=1) / C
    # -- variance, second pass: exact even when |mean| >> std --
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = r_mask[:, None] & (cols < C)[None, :]
        x = tl.load(base[:, None] + cols[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - mean[:, None], 0.0)
        acc += d * d
    # eps arrives as fp64 from inductor-generated launchers: keep the math fp32
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / C + tl.cast(eps, tl.float32))
    tl.store(MEAN + rows, mean, mask=r_mask)
    tl.store(RSTD + rows, rstd, mask=r_mask)


@triton.jit
def _xhat_tile(X, MEAN, RSTD, R, N, stride_xb, stride_xn, stride_xc, C,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The program's (BLOCK_R flattened (b, n) rows, BLOCK_C channels) tile of the normalized
    input, from the saved statistics: (rows, cols, row mask, tile mask, b, n, xhat, rstd)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_mask = rows < R
    mask = r_mask[:, None] & (cols < C)[None, :]
    bi = (rows // N).to(tl.int64)
    ni = rows % N
    x = tl.load(X + (bi * stride_xb + ni * stride_xn)[:, None] + cols[None, :] * stride_xc,
                mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + rows, mask=r_mask, other=0.0)
    rstd = tl.load(RSTD + rows, mask=r_mask, other=0.0)
    return rows, cols, r_mask, mask, bi, ni, (x - mean[:, None]) * rstd[:, None], rstd


@triton.jit
def _ln_apply_kernel(X, MEAN, RSTD, LNW, LNB, Z, R, N, C, stride_xb, stride_xn, stride_xc,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Z = LN(X) from the saved statistics, into a contiguous (B, N, C) buffer in X's dtype: the
    # per-image GEMMs then read Z tiles with plain (pipelined) loads instead of normalizing
    # each tile in their prologue
    rows, cols, _, mask, _, _, xhat, _ = _xhat_tile(X, MEAN, RSTD, R, N, stride_xb, stride_xn, stride_xc, C,
                                                    BLOCK_R, BLOCK_C)
    gamma = tl.load(LNW + cols, mask=cols < C, other=0.0).to(tl.float32)
    beta = tl.load(LNB + cols, mask=cols < C, other=0.0).to(tl.float32)
    z = xhat * gamma[None, :] + beta[None, :]
    tl.store(Z + rows.to(tl.int64)[:, None] * C + cols[None, :], z.to(Z.dtype.element_ty), mask=mask)


@triton.jit
def _ln_finish_kernel(P, X, MEAN, RSTD, S1, S2, DX, R, N, C, NUM_CB,
                      stride_xb, stride_xn, stride_xc, stride_db, stride_dn, stride_dc,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # dX = dY + rstd * (dxhat - (sum_c dxhat + xhat * sum_c dxhat*xhat) / C); the two sums
    # over C arrive as one partial per channel block of the data kernel, (B, NUM_CB, N)
    rows, cols, r_mask, mask, bi, ni, xhat, rstd = _xhat_tile(X, MEAN, RSTD, R, N, stride_xb, stride_xn,
                                                              stride_xc, C, BLOCK_R, BLOCK_C)
    s1 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    part = bi * NUM_CB * N + ni
    for cb in range(NUM_CB):
        s1 += tl.load(S1 + part + cb * N, mask=r_mask, other=0.0)
        s2 += tl.load(S2 + part + cb * N, mask=r_mask, other=0.0)
    p = tl.load(P + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0)
    dx = p - (rstd / C)[:, None] * (s1[:, None] + xhat * s2[:, None])
    tl.store(DX + (bi * stride_db + ni * stride_dn)[:, None] + cols[None, :] * stride_dc,
             dx.to(DX.dtype.element_ty), mask=mask)
