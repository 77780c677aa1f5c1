"""Triton kernels for the fused token-mixing MLP and their launchers.

Per image X (N, C):  Z = LN_C(X),  A = W1 @ Z + b1,  H = GELU(A),  Y = X + W2 @ H + b2.

A program owns one image and a block of channels. LayerNorm needs whole rows
of C, so a small pass writes the per-token mean/rstd first; the main programs
then hold the full (N, BLOCK_C) slab, which is all that token mixing needs:
both matmuls reduce over tokens or hidden units, never over channels.

Backward (dY given), per image:
    dH = W2^T @ dY     dA = dH * GELU'(A)     dZ = W1^T @ dA
    dW2 = sum dY @ H^T     dW1 = sum dA @ Z^T     (summed over batch and channels)
  - `_bwd_data_kernel` (image, channel block): recomputes A, stores dA, forms dZ
    and the LayerNorm backward up to the per-token row sums, which span every
    channel block; `_ln_finish_kernel` (common.py) applies them.
  - `_bwd_weight_kernel` (hidden block, split of the (image, channel block)
    units): keeps its dW1/dW2 tiles in registers over many units and writes one
    partial per split; the partials are summed afterwards (deterministic, no atomics).
    It re-reads Z and dY once per hidden block.
Only mean/rstd are saved from the forward; A and H are recomputed.

Selectable instead, per launch configuration ("method", timed by `composer bench kernels
--sweep`): "split", the forward or the data backward as per-image GEMMs with large tiles
(gemms.py; with "Z", LayerNorm(X) is written once and the hidden GEMM reads it instead of
normalizing X in its prologue; W1 goes to them in rows padded to a power of two when N is not a multiple
of 16, unless "pad_w1" is False, see `gemms.pad_token_axis`); for the weights "splitk", two
split-K GEMMs over the (image, channel) axis (gemms.py, H then stored by the data pass), or
"gemm", the same two products in PyTorch.
Or, where all tokens and hidden units of a channel chunk fit a program (N <= 64, Hd <= 128),
"image" for the whole backward: `_bwd_image_kernel`, one program per image (or a few), dX and
every parameter gradient with no intermediate through memory but an L2-resident dX partial.
The jit helpers both files use are in common.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import tuning
from kernels.dispatch import wrap_triton
from kernels.gelu import gelu, gelu_grad
from kernels.grid import cdiv, next_pow2, split_units
from kernels.token_mlp import gemms
from kernels.token_mlp.common import (_ln_backward_partials, _ln_finish_kernel, _ln_stats_kernel, _load_z, _mm,
                                     _normalize, _unit)


@triton.jit
def _fwd_kernel(X, Y, MEAN, RSTD, LNW, LNB, W1, B1, W2, B2,
                N, C, HD,
                stride_xb, stride_xn, stride_xc, stride_yb, stride_yn, stride_yc,
                stride_w1h, stride_w1n, stride_w2n, stride_w2h,
                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                IEEE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_h = tl.arange(0, BLOCK_H)
    n_mask = offs_n < N
    c_mask = offs_c < C
    dt = X.dtype.element_ty
    # -- layer norm of the (N, BLOCK_C) slab --
    _, z = _load_z(X, MEAN, RSTD, LNW, LNB, b, N, C, offs_n, offs_c, stride_xb, stride_xn, stride_xc)
    z = z.to(dt)
    # -- token mixing, one block of hidden units at a time --
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for h0 in range(0, HD, BLOCK_H):
        hh = h0 + offs_h
        h_mask = hh < HD
        w1 = tl.load(W1 + hh[:, None] * stride_w1h + offs_n[None, :] * stride_w1n,
                     mask=h_mask[:, None] & n_mask[None, :], other=0.0).to(dt)          # (BH, BN)
        b1 = tl.load(B1 + hh, mask=h_mask, other=0.0).to(tl.float32)
        a = _mm(w1, z, tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32), IEEE) + b1[:, None]
        # padded hidden rows meet the zero columns of W2 below
        h = gelu(a).to(dt)
        w2 = tl.load(W2 + offs_n[:, None] * stride_w2n + hh[None, :] * stride_w2h,
                     mask=n_mask[:, None] & h_mask[None, :], other=0.0).to(dt)          # (BN, BH)
        acc = _mm(w2, h, acc, IEEE)
    # -- bias and residual (x re-read here rather than held across the loop) --
    mask = n_mask[:, None] & c_mask[None, :]
    x = tl.load(X + b * stride_xb + offs_n[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                mask=mask, other=0.0).to(tl.float32)
    b2 = tl.load(B2 + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y = x + acc + b2[:, None]
    tl.store(Y + b * stride_yb + offs_n[:, None] * stride_yn + offs_c[None, :] * stride_yc,
             y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_data_kernel(X, DY, MEAN, RSTD, LNW, LNB, W1, B1, W2,
                     DA, HBUF, P, S1, S2, DGAMMA, DBETA, DB2,
                     N, C, HD, NUM_CB,
                     stride_xb, stride_xn, stride_xc, stride_gb, stride_gn, stride_gc,
                     stride_w1h, stride_w1n, stride_w2n, stride_w2h,
                     BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                     IEEE: tl.constexpr, STORE_H: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_h = tl.arange(0, BLOCK_H)
    n_mask = offs_n < N
    c_mask = offs_c < C
    mask = n_mask[:, None] & c_mask[None, :]
    dt = X.dtype.element_ty
    dy_ptrs = DY + b * stride_gb + offs_n[:, None] * stride_gn + offs_c[None, :] * stride_gc
    # only the matmul operands stay live across the hidden loop
    _, z = _load_z(X, MEAN, RSTD, LNW, LNB, b, N, C, offs_n, offs_c, stride_xb, stride_xn, stride_xc)
    z = z.to(dt)
    dy_lp = tl.load(dy_ptrs, mask=mask, other=0.0).to(dt)
    # -- through the MLP: dZ = W1^T @ (W2^T @ dY * GELU'(A)) --
    dz = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for h0 in range(0, HD, BLOCK_H):
        hh = h0 + offs_h
        h_mask = hh < HD
        w_mask = h_mask[:, None] & n_mask[None, :]
        w1 = tl.load(W1 + hh[:, None] * stride_w1h + offs_n[None, :] * stride_w1n,
                     mask=w_mask, other=0.0).to(dt)                                     # (BH, BN)
        b1 = tl.load(B1 + hh, mask=h_mask, other=0.0).to(tl.float32)
        a = _mm(w1, z, tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32), IEEE) + b1[:, None]
        w2t = tl.load(W2 + hh[:, None] * stride_w2h + offs_n[None, :] * stride_w2n,
                      mask=w_mask, other=0.0).to(dt)                                    # (BH, BN)
        dh = _mm(w2t, dy_lp, tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32), IEEE)
        da_mask = h_mask[:, None] & c_mask[None, :]
        da = tl.where(da_mask, dh * gelu_grad(a), 0.0).to(dt)
        # dA (B, Hd, C) is kept for the weight gradients instead of recomputing it there
        tl.store(DA + b * HD * C + hh[:, None] * C + offs_c[None, :], da, mask=da_mask)
        if STORE_H:  # H = GELU(A) for the GEMM weight gradients (method "gemm")
            tl.store(HBUF + b * HD * C + hh[:, None] * C + offs_c[None, :], gelu(a).to(dt), mask=da_mask)
        dz = _mm(tl.trans(w1), da, dz, IEEE)
    _ln_backward_partials(dz, X, DY, MEAN, RSTD, LNW, LNB, P, S1, S2, DGAMMA, DBETA, DB2, b, cb, N, C, NUM_CB,
                          offs_n, offs_c, stride_xb, stride_xn, stride_xc, stride_gb, stride_gn, stride_gc)


@triton.jit
def _bwd_weight_kernel(X, DY, DA, MEAN, RSTD, LNW, LNB, W1, B1,
                       PART,
                       N, C, HD, NUM_CB, UNITS, UNITS_PER_PROG,
                       stride_xb, stride_xn, stride_xc, stride_gb, stride_gn, stride_gc,
                       stride_w1h, stride_w1n,
                       BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                       IEEE: tl.constexpr):
    hb = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = tl.arange(0, BLOCK_N)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    n_mask = offs_n < N
    h_mask = offs_h < HD
    dt = X.dtype.element_ty
    w1 = tl.load(W1 + offs_h[:, None] * stride_w1h + offs_n[None, :] * stride_w1n,
                 mask=h_mask[:, None] & n_mask[None, :], other=0.0).to(dt)              # (BH, BN)
    b1 = tl.load(B1 + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    dw1 = tl.zeros((BLOCK_H, BLOCK_N), dtype=tl.float32)
    dw2 = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    db1 = tl.zeros((BLOCK_H,), dtype=tl.float32)
    # -- reduce over this split's (image, channel block) units --
    u_end = tl.minimum(split * UNITS_PER_PROG + UNITS_PER_PROG, UNITS)
    for u in range(split * UNITS_PER_PROG, u_end):
        b, offs_c, c_mask = _unit(u, NUM_CB, C, BLOCK_C)
        _, z = _load_z(X, MEAN, RSTD, LNW, LNB, b, N, C, offs_n, offs_c, stride_xb, stride_xn, stride_xc)
        z = z.to(dt)
        dy = tl.load(DY + b * stride_gb + offs_n[:, None] * stride_gn + offs_c[None, :] * stride_gc,
                     mask=n_mask[:, None] & c_mask[None, :], other=0.0).to(dt)
        da = tl.load(DA + b * HD * C + offs_h[:, None] * C + offs_c[None, :],
                     mask=h_mask[:, None] & c_mask[None, :], other=0.0)
        # H is recomputed; its padded channels meet dY's zero columns
        a = _mm(w1, z, tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32), IEEE) + b1[:, None]
        h = gelu(a).to(dt)
        dw1 = _mm(da, tl.trans(z), dw1, IEEE)
        dw2 = _mm(dy, tl.trans(h), dw2, IEEE)
        db1 += tl.sum(da.to(tl.float32), axis=1)
    # one row of the partials per split: dW1 (HD, N), then dW2 (N, HD), then dB1 (HD)
    part = PART + split.to(tl.int64) * (2 * HD * N + HD)
    tl.store(part + offs_h[:, None] * N + offs_n[None, :], dw1,
             mask=h_mask[:, None] & n_mask[None, :])
    tl.store(part + HD * N + offs_n[:, None] * HD + offs_h[None, :], dw2,
             mask=n_mask[:, None] & h_mask[None, :])
    tl.store(part + 2 * HD * N + offs_h, db1, mask=h_mask)


@triton.jit
def _bwd_image_kernel(X, DY, MEAN, RSTD, LNW, LNB, W1, B1, W2,
                      P, DX, PART, DGAMMA, DBETA,
                      B, N, C, HD, IMAGES_PER_PROG,
                      stride_xb, stride_xn, stride_xc, stride_gb, stride_gn, stride_gc,
                      stride_db, stride_dn, stride_dc,
                      stride_w1h, stride_w1n, stride_w2n, stride_w2h,
                      BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                      IEEE: tl.constexpr):
    # The whole backward of a few images in one program (method "image", small N and Hd): all
    # tokens, all hidden units (BLOCK_H >= Hd) and, chunk by chunk, all channels of an image,
    # so that nothing leaves the program but dX and one set of weight-gradient partials: the
    # LayerNorm's row sums over C are complete inside it (no finishing kernel), and dA never
    # goes through memory (the weight gradients are accumulated here). Per channel chunk:
    # A = W1 @ Z + b1, dA = (W2^T @ dY) * GELU'(A), dZ = W1^T @ dA, dW1 += dA @ Z^T,
    # dW2 += dY @ GELU(A)^T; the row-local part of dX goes to P (fp32, read back from L2 by the
    # second loop once the row sums are known).
    pid = tl.program_id(0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_C)
    n_mask = offs_n < N
    h_mask = offs_h < HD
    w_mask = h_mask[:, None] & n_mask[None, :]
    dt = X.dtype.element_ty
    w1 = tl.load(W1 + offs_h[:, None] * stride_w1h + offs_n[None, :] * stride_w1n,
                 mask=w_mask, other=0.0).to(dt)                                         # (BH, BN)
    w2t = tl.load(W2 + offs_h[:, None] * stride_w2h + offs_n[None, :] * stride_w2n,
                  mask=w_mask, other=0.0).to(dt)                                        # (BH, BN): W2^T
    b1 = tl.load(B1 + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    dw1 = tl.zeros((BLOCK_H, BLOCK_N), dtype=tl.float32)
    dw2 = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    db1 = tl.zeros((BLOCK_H,), dtype=tl.float32)
    db2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # Each chunk's loads (x, dy; x, P in the second loop) are issued a chunk ahead, into
    # registers: Triton leaves these loops' loads synchronous (sm_90 TTGIR, Triton 3.6), so
    # without the prefetch every chunk would wait out a round trip to memory.
    for image in range(pid * IMAGES_PER_PROG, tl.minimum(pid * IMAGES_PER_PROG + IMAGES_PER_PROG, B)):
        b = tl.cast(image, tl.int64)
        mean = tl.load(MEAN + b * N + offs_n, mask=n_mask, other=0.0)
        rstd = tl.load(RSTD + b * N + offs_n, mask=n_mask, other=0.0)
        s1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        s2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        x_base = X + b * stride_xb + offs_n[:, None] * stride_xn
        dy_base = DY + b * stride_gb + offs_n[:, None] * stride_gn
        next_mask = n_mask[:, None] & (offs_k < C)[None, :]
        x_next = tl.load(x_base + offs_k[None, :] * stride_xc, mask=next_mask, other=0.0)
        dy_next = tl.load(dy_base + offs_k[None, :] * stride_gc, mask=next_mask, other=0.0)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + offs_k
            c_mask = offs_c < C
            mask = n_mask[:, None] & c_mask[None, :]
            x, dy = x_next, dy_next
            next_mask = n_mask[:, None] & (offs_c + BLOCK_C < C)[None, :]
            x_next = tl.load(x_base + (offs_c + BLOCK_C)[None, :] * stride_xc, mask=next_mask, other=0.0)
            dy_next = tl.load(dy_base + (offs_c + BLOCK_C)[None, :] * stride_gc, mask=next_mask, other=0.0)
            xhat, z = _normalize(x, mean, rstd, LNW, LNB, offs_c, C, mask)
            z = z.to(dt)
            dy32 = dy.to(tl.float32)
            dy = dy.to(dt)
            a = _mm(w1, z, tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32), IEEE) + b1[:, None]
            dh = _mm(w2t, dy, tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32), IEEE)
            da_mask = h_mask[:, None] & c_mask[None, :]
            da = tl.where(da_mask, dh * gelu_grad(a), 0.0).to(dt)
            # padded hidden rows meet zero columns of W2^T's product: H there does not matter
            h = tl.where(da_mask, gelu(a), 0.0).to(dt)
            dz = _mm(tl.trans(w1), da, tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32), IEEE)
            dw1 = _mm(da, tl.trans(z), dw1, IEEE)
            dw2 = _mm(dy, tl.trans(h), dw2, IEEE)
            db1 += tl.sum(da.to(tl.float32), axis=1)
            db2 += tl.sum(dy32, axis=1)
            # the LayerNorm backward of this chunk: per-channel sums (over tokens) now, the
            # row-local part of dX to P, the row sums over channels accumulated
            tl.store(DGAMMA + b * C + offs_c, tl.sum(dz * xhat, axis=0), mask=c_mask)
            tl.store(DBETA + b * C + offs_c, tl.sum(dz, axis=0), mask=c_mask)
            gamma = tl.load(LNW + offs_c, mask=c_mask, other=0.0).to(tl.float32)
            dxhat = dz * gamma[None, :]
            s1 += tl.sum(dxhat, axis=1)
            s2 += tl.sum(dxhat * xhat, axis=1)
            tl.store(P + b * N * C + offs_n[:, None] * C + offs_c[None, :], dy32 + rstd[:, None] * dxhat,
                     mask=mask)
        # dX = dY + rstd * (dxhat - (sum_c dxhat + xhat * sum_c dxhat * xhat) / C)
        p_base = P + b * N * C + offs_n[:, None] * C
        next_mask = n_mask[:, None] & (offs_k < C)[None, :]
        x_next = tl.load(x_base + offs_k[None, :] * stride_xc, mask=next_mask, other=0.0)
        p_next = tl.load(p_base + offs_k[None, :], mask=next_mask, other=0.0)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + offs_k
            mask = n_mask[:, None] & (offs_c < C)[None, :]
            x, p = x_next, p_next
            next_mask = n_mask[:, None] & (offs_c + BLOCK_C < C)[None, :]
            x_next = tl.load(x_base + (offs_c + BLOCK_C)[None, :] * stride_xc, mask=next_mask, other=0.0)
            p_next = tl.load(p_base + (offs_c + BLOCK_C)[None, :], mask=next_mask, other=0.0)
            xhat, _ = _normalize(x, mean, rstd, LNW, LNB, offs_c, C, mask)
            dx = p - (rstd / C)[:, None] * (s1[:, None] + xhat * s2[:, None])
            tl.store(DX + b * stride_db + offs_n[:, None] * stride_dn + offs_c[None, :] * stride_dc,
                     dx.to(DX.dtype.element_ty), mask=mask)
    # one row of the partials per program: dW1 (HD, N), dW2 (N, HD), dB1 (HD), dB2 (N)
    part = PART + pid.to(tl.int64) * (2 * HD * N + HD + N)
    tl.store(part + offs_h[:, None] * N + offs_n[None, :], dw1, mask=w_mask)
    tl.store(part + HD * N + offs_n[:, None] * HD + offs_h[None, :], dw2, mask=n_mask[:, None] & h_mask[None, :])
    tl.store(part + 2 * HD * N + offs_h, db1, mask=h_mask)
    tl.store(part + 2 * HD * N + HD + offs_n, db2, mask=n_mask)


# ----------------------------------------------------------------------------- launchers

_TARGET_PROGRAMS = 264  # ~2 per SM on an H100: enough splits to fill the GPU for dW


def _blocks(n: int, c: int, hd: int, dtype: torch.dtype, backward: bool = False) -> dict:
    """BLOCK_N, BLOCK_C, BLOCK_H, num_warps, num_stages of the (image, channel block) kernels.

    Sizes checked against sm_90 compiles (ptxas register and spill counts, shared
    memory): the whole token axis is one tile, so the slab budget shrinks as N grows.
    """
    block_n = max(16, next_pow2(n))
    if dtype == torch.float32:
        # IEEE fp32 dots run on FMA units with both operands in registers: a
        # quarter of the 16-bit slab and 16 hidden units a step keep them in
        # registers (larger tiles spill, and at N = 256 overflow shared memory)
        budget, block_h = 2048, 16
    else:
        # the fp32 (BLOCK_N, BLOCK_C) accumulator near 64 registers a thread; the
        # data backward holds dY and dZ next to Z, so it gets half the slab
        budget, block_h = (8192 if backward else 16384), 64
    block_c = max(16, min(64, budget // block_n, next_pow2(c)))
    if backward and block_n >= 256 and dtype != torch.float32:
        # two stages of (64, 256) W1 and W2 tiles next to Z and dY needed 233,472 bytes
        # of shared memory on sm_90 (limit 232,448): halve the hidden block
        block_h = 32
    if block_n >= 512 and dtype != torch.float32:
        # 257 to 512 tokens: two stages of (64, 512) W1 and W2 tiles took 224 KiB of shared
        # memory (299 KiB at C >= 256) and the forward hit an illegal memory access on an H100
        # (N = 257, C 64, Hd 128); (32, 512) tiles take 130 KiB, as much as N = 196 does
        block_h = 32
    block_h = max(16, min(block_h, next_pow2(hd)))
    num_warps = 8 if block_n >= 256 or block_n * block_c > 4096 else 4
    # two stages: the hidden loop's W1/W2 tiles are (BLOCK_H, BLOCK_N) each, and
    # three stages of them overflow the 227 KiB of shared memory at N = 256
    return {"BLOCK_N": block_n, "BLOCK_C": block_c, "BLOCK_H": block_h, "num_warps": num_warps, "num_stages": 2}


def _weight_blocks(block_n: int, c: int, hd: int, dtype: torch.dtype) -> dict:
    """BLOCK_C, BLOCK_H, num_warps of the weight-gradient kernel (sizes from sm_90 compiles), or
    the split-K method where the fused kernel cannot keep its tiles in registers."""
    if dtype == torch.float32 and block_n > 128:
        # The fused kernel's fp32 (16, 256) dW tiles: ptxas (Triton 3.6 and 3.8) builds them
        # with 32 registers and 2.4-2.7 KB of stack a thread at every tiling tried (compile
        # report), while the split-K GEMMs compile without spills. Chosen on that, not on a
        # timing: the fp32 path has not been timed on a GPU.
        return {"method": "splitk"}
    if dtype == torch.float32:
        # FMA dots: 16 x 16 steps
        wbh, wbc = 16, 16
        num_warps = 8 if block_n >= 64 else 4
    else:
        # dW1 and dW2 tiles of (BLOCK_H, BLOCK_N) stay in registers over all units
        wbh = 64 if block_n <= 128 else 16
        wbc = 64 if block_n <= 128 else 32
        num_warps = 4 if block_n * wbc <= 4096 else 8
    wbh = max(16, min(wbh, next_pow2(hd)))
    wbc = max(16, min(wbc, next_pow2(c)))
    return {"BLOCK_C": wbc, "BLOCK_H": wbh, "num_warps": num_warps}


# Above this many tokens, 16-bit inputs go through the per-image GEMMs (method "split", with
# split-K weight gradients) by default. On an H100 in bf16 at N 196 (C 512 / 768) they took the
# backward from 3,314 / 2,999 µs (fused kernels) to 934 / 947 and the forward from 376 / 395 to
# 299 / 320; at N 64 the fused kernels were fastest (BENCHMARKS.md). fp32 keeps the fused
# data kernels: it has not been timed.
SPLIT_ABOVE_TOKENS = 128


def _splits(n: int, dtype: torch.dtype) -> bool:
    return n > SPLIT_ABOVE_TOKENS and dtype != torch.float32


def forward_config(x: torch.Tensor, hd: int) -> dict:
    """The forward's launch configuration for x (B, N, C) and hd hidden units: one saved for
    this card and shape (kernels.tuning), else the built-in rule."""
    _, n, c = x.shape
    tuned = tuning.lookup("token_mlp", "forward", x.device, x.dtype, f"N{n} C{c} Hd{hd}")
    if tuned:
        return tuned
    return gemms.split_blocks(n, c, hd, x.dtype) if _splits(n, x.dtype) else _blocks(n, c, hd, x.dtype)


def backward_config(x: torch.Tensor, hd: int) -> dict:
    """{"data": ..., "weights": ...}: the backward's two launch configurations, saved
    together (kernels.tuning: they were timed together), else the built-in rule."""
    _, n, c = x.shape
    tuned = tuning.lookup("token_mlp", "backward", x.device, x.dtype, f"N{n} C{c} Hd{hd}") or {}
    if _splits(n, x.dtype):
        data, weights = gemms.split_blocks(n, c, hd, x.dtype, backward=True), {"method": "splitk"}
    else:
        data, weights = _blocks(n, c, hd, x.dtype, backward=True), _weight_blocks(max(16, next_pow2(n)), c, hd,
                                                                                  x.dtype)
    return {"data": tuned.get("data") or data, "weights": tuned.get("weights") or weights}


def _check_block_n(cfg: dict, n: int) -> None:
    # the whole token axis is one tile: a smaller BLOCK_N would silently drop tokens
    if cfg["BLOCK_N"] < n:
        raise ValueError(f"token_mlp: BLOCK_N {cfg['BLOCK_N']} must cover N = {n}")


def _unit_channel_stride(t: torch.Tensor) -> torch.Tensor:
    # On sm_90 the bf16 backward at N = 196 (BLOCK_N 256, BLOCK_H 64, next to the
    # shared-memory limit) gave a wrong dX for an x with channel stride != 1, and an
    # illegal memory access once such x was copied; the interpreter always agreed with
    # the reference. Halving BLOCK_H there (see _blocks) made the strided test and
    # compute-sanitizer clean. Until the strided path alone is re-checked on a GPU,
    # such views are copied; the Mixer block's activations are contiguous and never
    # pay for this.
    return t if t.stride(-1) == 1 else t.contiguous()


def forward(x, ln_weight, ln_bias, w1, b1, w2, b2, eps: float, config: dict | None = None):
    """(y, mean, rstd): y like x; mean and rstd (B, N) fp32, saved for the backward.

    `config` overrides `forward_config` (benchmark sweeps); BLOCK_N must cover N."""
    B, N, C = x.shape
    HD = w1.shape[0]
    x = _unit_channel_stride(x)
    # the matmuls round the weights to x's dtype anyway; rounding once here halves the
    # shared memory of their pipelined tiles when parameters are fp32 (autocast): fp32
    # tiles overflowed sm_90's 227 KiB at N = 256
    w1, w2 = w1.to(x.dtype), w2.to(x.dtype)
    mean = torch.empty((B, N), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:  # no tokens to mix: nothing to launch (an empty grid is no launch)
        return y, mean, rstd
    ln_weight, ln_bias, b1, b2 = (t.contiguous() for t in (ln_weight, ln_bias, b1, b2))
    R = B * N
    stats_c = min(512, next_pow2(C))
    wrap_triton(_ln_stats_kernel)[(cdiv(R, 8),)](
        x, mean, rstd, R, N, C, *x.stride(), eps, BLOCK_R=8, BLOCK_C=stats_c, num_warps=4)
    cfg = config or forward_config(x, HD)
    if cfg.get("method") == "split":
        h = torch.empty((B, HD, C), device=x.device, dtype=x.dtype)   # GELU(A), through memory once
        z = gemms.layer_norm(x, mean, rstd, ln_weight, ln_bias) if cfg.get("Z") else None
        w1p, padded = gemms.pad_token_axis(w1, cfg)
        gemms.hidden(x, mean, rstd, ln_weight, ln_bias, w1p, b1, cfg["hidden"], h=h, z=z, w1_padded=padded)
        gemms.tokens(h, x, cfg["tokens"], w2=w2, b2=b2, y=y)
        return y, mean, rstd
    _check_block_n(cfg, N)
    wrap_triton(_fwd_kernel)[(B, cdiv(C, cfg["BLOCK_C"]))](
        x, y, mean, rstd, ln_weight, ln_bias, w1, b1, w2, b2, N, C, HD,
        *x.stride(), *y.stride(), *w1.stride(), *w2.stride(),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_C=cfg["BLOCK_C"], BLOCK_H=cfg["BLOCK_H"], IEEE=x.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y, mean, rstd


def backward(dy, x, ln_weight, ln_bias, w1, b1, w2, mean, rstd,
             config: dict | None = None, weight_config: dict | None = None):
    """Gradients (dx, dln_weight, dln_bias, dw1, db1, dw2, db2): dx like x, the rest fp32.

    `config` and `weight_config` override the data and weight halves of `backward_config` (sweeps)."""
    B, N, C = x.shape
    HD = w1.shape[0]
    x, dy = _unit_channel_stride(x), _unit_channel_stride(dy)
    w1, w2 = w1.to(x.dtype), w2.to(x.dtype)
    dev = x.device
    f32 = torch.float32
    ieee = x.dtype == torch.float32
    if x.numel() == 0:  # an empty batch: every parameter gradient is an empty sum
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                torch.zeros(C, device=dev, dtype=f32), torch.zeros(C, device=dev, dtype=f32),
                torch.zeros(HD, N, device=dev, dtype=f32), torch.zeros(HD, device=dev, dtype=f32),
                torch.zeros(N, HD, device=dev, dtype=f32), torch.zeros(N, device=dev, dtype=f32))
    ln_weight, ln_bias, b1 = (t.contiguous() for t in (ln_weight, ln_bias, b1))

    if config is None and weight_config is None:
        both = backward_config(x, HD)
        config, weight_config = both["data"], both["weights"]
    if config is not None and config.get("method") == "image":
        return _backward_by_image(dy, x, ln_weight, ln_bias, w1, b1, w2, mean, rstd, config)
    # -- data gradient: dA, and dZ through the LayerNorm backward up to its row sums --
    cfg = config or _blocks(N, C, HD, x.dtype, backward=True)
    split = cfg.get("method") == "split"
    BN = max(16, next_pow2(N))
    if not split:
        _check_block_n(cfg, N)
        BN = cfg["BLOCK_N"]
    ncb = cdiv(C, cfg["tokens"]["BLOCK_C"] if split else cfg["BLOCK_C"])
    da = torch.empty((B, HD, C), device=dev, dtype=x.dtype)
    wcfg = weight_config or _weight_blocks(BN, C, HD, x.dtype)
    method = wcfg.get("method", "fused")
    # "dx_direct": the LayerNorm backward's row sums from the split-K dW1 kernel, before the token
    # kernel, which then writes dX itself (no fp32 partial of dX through memory, no finishing pass)
    direct = split and bool(cfg.get("dx_direct"))
    if direct and method != "splitk":
        raise ValueError('token_mlp: "dx_direct" takes its row sums from the split-K weight gradients; '
                         'pair it with the weight config {"method": "splitk"}')
    store_h = method in ("gemm", "splitk")   # the fused weight kernel recomputes H instead
    h = torch.empty((B, HD, C), device=dev, dtype=x.dtype) if store_h else None   # H = GELU(A)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    # partial sums: per (image, channel block, token) s1, s2 (summed in _ln_finish_kernel; not with
    # dx_direct) and dB2; per (image, channel) dgamma and dbeta, in one buffer one reduction finishes
    db2_part = torch.empty((B, ncb, N), device=dev, dtype=f32)
    if direct:
        p = s1 = s2 = None   # the whole row sums come from gemms.dw1_row_sums below
    else:
        p = torch.empty((B, N, C), device=dev, dtype=f32)
        s1, s2 = (torch.empty((B, ncb, N), device=dev, dtype=f32) for _ in range(2))
    # (the token kernel's token blocks each write their own, `gemms.token_blocks`)
    ln_rows = B * (gemms.token_blocks(N, cfg["tokens"])[1] if split else 1)
    ln_part = torch.empty((2, ln_rows, C), device=dev, dtype=f32)
    dgamma_part, dbeta_part = ln_part.unbind(0)
    # with "Z": LN(x) written once, read by the hidden GEMM as is
    z = gemms.layer_norm(x, mean, rstd, ln_weight, ln_bias) if split and cfg.get("Z") else None
    if split:
        w1p, padded = gemms.pad_token_axis(w1, cfg)
        gemms.hidden(x, mean, rstd, ln_weight, ln_bias, w1p, b1, cfg["hidden"], h=h, w2=w2, dy=dy, da=da, z=z,
                     w1_padded=padded)
        if direct:
            dw1, db1, s1, s2 = gemms.dw1_row_sums(da, x, mean, rstd, ln_weight, ln_bias, w1, _TARGET_PROGRAMS)
        gemms.tokens(da, x, cfg["tokens"], w1=w1p, dy=dy, mean=mean, rstd=rstd, ln_weight=ln_weight,
                     ln_bias=ln_bias, partials=(p, s1, s2, dgamma_part, dbeta_part, db2_part),
                     dx=dx if direct else None, w1_padded=padded)
    else:   # (image, channel block) programs
        wrap_triton(_bwd_data_kernel)[(B, ncb)](
            x, dy, mean, rstd, ln_weight, ln_bias, w1, b1, w2,
            da, da if h is None else h, p, s1, s2, dgamma_part, dbeta_part, db2_part,
            N, C, HD, ncb, *x.stride(), *dy.stride(), *w1.stride(), *w2.stride(),
            BLOCK_N=BN, BLOCK_C=cfg["BLOCK_C"], BLOCK_H=cfg["BLOCK_H"], IEEE=ieee, STORE_H=store_h,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    if not direct:
        # -- finish the layer norm backward once the row sums span all of C --
        R = B * N
        fin_c = min(256, next_pow2(C))
        wrap_triton(_ln_finish_kernel)[(cdiv(R, 16), cdiv(C, fin_c))](
            p, x, mean, rstd, s1, s2, dx, R, N, C, ncb, *x.stride(), *dx.stride(),
            BLOCK_R=16, BLOCK_C=fin_c, num_warps=4)

    dln_weight, dln_bias = ln_part.sum(1).unbind(0)
    db2 = db2_part.sum((0, 1))
    if method == "gemm":
        # weight gradients as two GEMMs over the (image, channel) axis, in PyTorch (cuBLAS):
        # dW1 = sum_b dA_b Z_b^T, dW2 = sum_b dY_b H_b^T. Selectable only: on an H100 (bf16,
        # B256 N64 C256 Hd128) the whole backward took 386 us with it, 168 with the fused kernel.
        z = ((x.float() - mean[..., None]) * rstd[..., None] * ln_weight.float() + ln_bias.float()).to(x.dtype)
        dw1 = torch.einsum("bhc,bnc->hn", da, z).float()
        dw2 = torch.einsum("bnc,bhc->nh", dy, h).float()
        return dx, dln_weight, dln_bias, dw1, da.float().sum((0, 2)), dw2, db2

    if method == "splitk":
        # dW1 = sum over (image, channel) of dA Z^T, dW2 = the same of dY H^T: two split-K GEMMs
        # with large output tiles, so that each input is read a few times, not once per hidden block
        if not direct:   # else dw1_row_sums formed them
            # LN(X) recomputed from x even with "Z": reading the Z buffer here gave a wrong dW1 on
            # an H100 (bf16, B256 N196 C512 Hd256, 2026-11-27: 29,578 of 75,264 entries off, dX
            # right) while the Triton interpreter agrees with fp64 on the same code; cause not found
            dw1, db1 = gemms.contract_bc(da, None, x, mean, rstd, ln_weight, ln_bias, wcfg, _TARGET_PROGRAMS,
                                         with_rowsum=True)
        dw2, _ = gemms.contract_bc(dy, h, x, mean, rstd, ln_weight, ln_bias, wcfg, _TARGET_PROGRAMS)
        return dx, dln_weight, dln_bias, dw1, db1, dw2, db2

    # -- weight gradients: (hidden block, split) programs, partials summed after --
    WBC, WBH, wwarps = wcfg["BLOCK_C"], wcfg["BLOCK_H"], wcfg["num_warps"]
    wncb = cdiv(C, WBC)
    units = B * wncb
    nhb = cdiv(HD, WBH)
    splits, per_prog = split_units(units, nhb, _TARGET_PROGRAMS)
    part = torch.empty((splits, 2 * HD * N + HD), device=dev, dtype=f32)   # [dW1 | dW2 | dB1] per split
    wrap_triton(_bwd_weight_kernel)[(nhb, splits)](
        x, dy, da, mean, rstd, ln_weight, ln_bias, w1, b1, part,
        N, C, HD, wncb, units, per_prog, *x.stride(), *dy.stride(), *w1.stride(),
        BLOCK_N=BN, BLOCK_C=WBC, BLOCK_H=WBH, IEEE=ieee, num_warps=wwarps, num_stages=wcfg.get("num_stages", 2))
    dw1, dw2, db1 = part.sum(0).split([HD * N, HD * N, HD])
    return dx, dln_weight, dln_bias, dw1.view(HD, N), db1, dw2.view(N, HD), db2


# Past these sizes the "image" backward's tiles (all tokens and all hidden units of a channel
# chunk, and the (Hd, N) weight-gradient accumulators) no longer fit a program's registers.
IMAGE_METHOD_MAX = {"N": 64, "Hd": 128}


def image_method_fits(n: int, hd: int) -> bool:
    return max(16, next_pow2(n)) <= IMAGE_METHOD_MAX["N"] and max(16, next_pow2(hd)) <= IMAGE_METHOD_MAX["Hd"]


def _backward_by_image(dy, x, ln_weight, ln_bias, w1, b1, w2, mean, rstd, cfg: dict):
    """The backward as _bwd_image_kernel: IMAGES images a program (by default about
    _TARGET_PROGRAMS programs), then the partials summed in a fixed order."""
    B, N, C = x.shape
    HD = w1.shape[0]
    if not image_method_fits(N, HD):
        raise ValueError(f"token_mlp: the image backward holds at most {IMAGE_METHOD_MAX['N']} tokens and "
                         f"{IMAGE_METHOD_MAX['Hd']} hidden units; got N = {N}, Hd = {HD}")
    dev, f32 = x.device, torch.float32
    per_prog = cfg.get("IMAGES") or split_units(B, 1, _TARGET_PROGRAMS)[1]
    progs = cdiv(B, per_prog)
    p = torch.empty((B, N, C), device=dev, dtype=f32)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    part = torch.empty((progs, 2 * HD * N + HD + N), device=dev, dtype=f32)   # [dW1 | dW2 | dB1 | dB2]
    ln_part = torch.empty((2, B, C), device=dev, dtype=f32)                    # dgamma, dbeta per image
    wrap_triton(_bwd_image_kernel)[(progs,)](
        x, dy, mean, rstd, ln_weight, ln_bias, w1, b1, w2, p, dx, part, ln_part[0], ln_part[1],
        B, N, C, HD, per_prog, *x.stride(), *dy.stride(), *dx.stride(), *w1.stride(), *w2.stride(),
        BLOCK_N=max(16, next_pow2(N)), BLOCK_C=cfg.get("BLOCK_C", 16), BLOCK_H=max(16, next_pow2(HD)),
        IEEE=x.dtype == torch.float32, num_warps=cfg.get("num_warps", 8), num_stages=cfg.get("num_stages", 2))
    dw1, dw2, db1, db2 = part.sum(0).split([HD * N, HD * N, HD, N])
    dln_weight, dln_bias = ln_part.sum(1).unbind(0)
    return dx, dln_weight, dln_bias, dw1.view(HD, N), db1, dw2.view(N, HD), db2
