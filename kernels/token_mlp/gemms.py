"""The token-mixing MLP as per-image GEMMs with fused prologues and epilogues.

The fused kernels (triton.py) hold all N tokens of an image times a block of channels and
walk the hidden units, so nothing but dA leaves the chip; at N ~ 200 that leaves room for
16-64 channels and 32-64 hidden units a step, small tensor-core tiles chained through
registers. Here each stage is its own GEMM per image, tiled for the tensor cores, and the
intermediates go through memory once (method "split" of the forward and data-backward
configs; "splitk" of the weight config):

  forward    _hidden_kernel   H = GELU(W1 @ LN(X) + b1)            (hidden, channel) tiles, over N
             _tokens_kernel   Y = X + W2 @ H + b2                  (all tokens, channel) tiles, over Hd
                              (or blocks of tokens: `token_blocks`)
  backward   _hidden_kernel   A = W1 @ LN(X) + b1 and dH = W2^T @ dY in one pass over N;
                              stores dA = dH * GELU'(A) (and H for the split-K weight gradients)
             _tokens_kernel   dZ = W1^T @ dA, then the LayerNorm backward partials of the fused
                              data kernel (`_ln_backward_partials`), finished by `_ln_finish_kernel`
  weights    _contract_bc_kernel  dW1 = sum dA Z^T, dW2 = sum dY H^T: split-K over (image, channel)
  "dx_direct" _dw1_row_sums_kernel  dW1 with whole images a program, and from each image's product
                              the LayerNorm backward's row sums over channels; the token kernel
                              then writes dX itself (`_ln_backward_direct`): no fp32 partial of dX
                              through memory, no finishing pass

LN(X) is recomputed wherever it is read, from the saved per-token mean and rstd.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dispatch import launch_options, wrap_triton
from kernels.gelu import gelu, gelu_grad
from kernels.grid import cdiv, next_pow2, split_units
from kernels.token_mlp.common import (_ln_apply_kernel, _ln_backward_direct, _ln_backward_partials, _load_z,
                                      _mm, _unit)


@triton.jit
def _hidden_kernel(X, MEAN, RSTD, LNW, LNB, ZP, W1, B1, W2, DY, H, DA,
                   N, C, HD,
                   stride_xb, stride_xn, stride_xc, stride_gb, stride_gn, stride_gc,
                   stride_w1h, stride_w1n, stride_w2n, stride_w2h,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                   BACKWARD: tl.constexpr, STORE_H: tl.constexpr, Z_IN_MEMORY: tl.constexpr,
                   W1_PADDED: tl.constexpr, IEEE: tl.constexpr):
    # one (BLOCK_M hidden units, BLOCK_C channels) tile of image b, reducing over tokens. One grid
    # axis, hidden tiles fastest: the programs that read the same LN(X) slab run side by side
    # (and a batch past 65,535 images still fits, which a second or third axis would not).
    num_m = tl.cdiv(HD, BLOCK_M)
    num_c = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_c = (pid // num_m) % num_c
    b = (pid // (num_m * num_c)).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < HD
    c_mask = offs_c < C
    dt = X.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)     # W1 @ LN(X)
    dh = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)      # W2^T @ dY (backward only)
    for k0 in range(0, N, BLOCK_K):
        kk = k0 + offs_k
        w_mask = m_mask[:, None] & (kk < N)[None, :]
        # W1_PADDED: W1's rows hold zeros past N up to a whole step (`pad_token_axis`), so its
        # tiles load without a mask along the row: vectorized and through the async-copy pipeline
        w1 = tl.load(W1 + offs_m[:, None] * stride_w1h + kk[None, :] * stride_w1n,
                     mask=m_mask[:, None] if W1_PADDED else w_mask, other=0.0).to(dt)  # (BM, BK)
        # padded tokens of Z are exact zeros (and W1's padded columns too)
        if Z_IN_MEMORY:   # LN(X) written by _ln_apply_kernel, contiguous (B, N, C)
            z = tl.load(ZP + b * N * C + kk[:, None] * C + offs_c[None, :],
                        mask=(kk < N)[:, None] & c_mask[None, :], other=0.0)
        else:
            _, z = _load_z(X, MEAN, RSTD, LNW, LNB, b, N, C, kk, offs_c, stride_xb, stride_xn, stride_xc)
        acc = _mm(w1, z.to(dt), acc, IEEE)
        if BACKWARD:
            w2t = tl.load(W2 + offs_m[:, None] * stride_w2h + kk[None, :] * stride_w2n,
                          mask=w_mask, other=0.0).to(dt)                                # (BM, BK)
            dy = tl.load(DY + b * stride_gb + kk[:, None] * stride_gn + offs_c[None, :] * stride_gc,
                         mask=(kk < N)[:, None] & c_mask[None, :], other=0.0).to(dt)     # (BK, BC)
            dh = _mm(w2t, dy, dh, IEEE)
    b1 = tl.load(B1 + offs_m, mask=m_mask, other=0.0).to(tl.float32)
    a = acc + b1[:, None]
    mask = m_mask[:, None] & c_mask[None, :]
    out = b * HD * C + offs_m[:, None] * C + offs_c[None, :]                             # (B, Hd, C)
    if BACKWARD:
        tl.store(DA + out, (dh * gelu_grad(a)).to(dt), mask=mask)
    if STORE_H:
        tl.store(H + out, gelu(a).to(dt), mask=mask)


@triton.jit
def _tokens_kernel(W, T, X, DY, MEAN, RSTD, LNW, LNB, B2, Y, P, S1, S2, DGAMMA, DBETA, DB2,
                   N, C, HD, NUM_CB,
                   stride_wn, stride_wh, stride_xb, stride_xn, stride_xc, stride_gb, stride_gn, stride_gc,
                   stride_yb, stride_yn, stride_yc,
                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                   BACKWARD: tl.constexpr, W_PADDED: tl.constexpr, DX_DIRECT: tl.constexpr, IEEE: tl.constexpr):
    # one (BLOCK_N tokens, BLOCK_C channels) tile of image b: W (N, Hd) @ T_b (Hd, C) over the
    # hidden units, T a (B, Hd, C) buffer; token block tl.program_id(2) (one block of all tokens
    # by default). Forward: W = W2, T = H, out Y = X + . + b2. Backward: W = W1^T (a strided
    # view), T = dA, and the product is dZ, which the LayerNorm backward takes over: into partials
    # (`_ln_backward_partials`), or with DX_DIRECT, the row sums S1, S2 given (`dw1_row_sums`),
    # straight into dX, written through Y's pointer and strides. Its per-channel sums (dgamma,
    # dbeta) go to row (token block, image) of DGAMMA, DBETA ((token blocks * B, C) partials).
    # W_PADDED: W's rows past N exist and are zeros (W1^T of `pad_token_axis`): no row mask.
    b = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    nb = tl.program_id(2)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    c_mask = offs_c < C
    dt = X.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, HD, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < HD
        w = tl.load(W + offs_n[:, None] * stride_wn + kk[None, :] * stride_wh,
                    mask=k_mask[None, :] if W_PADDED else n_mask[:, None] & k_mask[None, :],
                    other=0.0).to(dt)                                                     # (BN, BK)
        t = tl.load(T + b * HD * C + kk[:, None] * C + offs_c[None, :],
                    mask=k_mask[:, None] & c_mask[None, :], other=0.0).to(dt)            # (BK, BC)
        acc = _mm(w, t, acc, IEEE)
    ln_rows = nb.to(tl.int64) * tl.num_programs(0) * C    # this token block's (B, C) partials
    DGAMMA += ln_rows
    DBETA += ln_rows
    if BACKWARD and DX_DIRECT:
        _ln_backward_direct(acc, X, DY, MEAN, RSTD, LNW, LNB, S1, S2, Y, DGAMMA, DBETA, DB2, b, cb, N, C,
                            NUM_CB, offs_n, offs_c, stride_xb, stride_xn, stride_xc,
                            stride_gb, stride_gn, stride_gc, stride_yb, stride_yn, stride_yc)
    elif BACKWARD:
        _ln_backward_partials(acc, X, DY, MEAN, RSTD, LNW, LNB, P, S1, S2, DGAMMA, DBETA, DB2, b, cb, N, C,
                              NUM_CB, offs_n, offs_c, stride_xb, stride_xn, stride_xc,
                              stride_gb, stride_gn, stride_gc)
    else:
        mask = n_mask[:, None] & c_mask[None, :]
        x = tl.load(X + b * stride_xb + offs_n[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                    mask=mask, other=0.0).to(tl.float32)
        b2 = tl.load(B2 + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(Y + b * stride_yb + offs_n[:, None] * stride_yn + offs_c[None, :] * stride_yc,
                 (x + acc + b2[:, None]).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _contract_bc_kernel(P, Q, X, MEAN, RSTD, LNW, LNB, OUT, ROWSUM,
                        I, J, N, C, NUM_CB, UNITS, UNITS_PER_PROG,
                        stride_pb, stride_pi, stride_pc, stride_qb, stride_qj, stride_qc,
                        stride_xb, stride_xn, stride_xc,
                        BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                        Q_IS_LN: tl.constexpr, WITH_ROWSUM: tl.constexpr, IEEE: tl.constexpr):
    # OUT[split, i, j] = sum over this split's (image, channel block) units of P[b, i, c] * Q[b, j, c]:
    # one weight gradient as a split-K GEMM whose reduction axis is (image, channel). With
    # Q_IS_LN, Q is LN(X) recomputed from the saved mean / rstd (j runs over tokens).
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    split = tl.program_id(2)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    i_mask = offs_i < I
    j_mask = offs_j < J
    dt = P.dtype.element_ty
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    rowsum = tl.zeros((BLOCK_I,), dtype=tl.float32)
    u_end = tl.minimum(split * UNITS_PER_PROG + UNITS_PER_PROG, UNITS)
    for u in range(split * UNITS_PER_PROG, u_end):
        b, offs_c, c_mask = _unit(u, NUM_CB, C, BLOCK_K)
        p = tl.load(P + b * stride_pb + offs_i[:, None] * stride_pi + offs_c[None, :] * stride_pc,
                    mask=i_mask[:, None] & c_mask[None, :], other=0.0)                   # (BI, BK)
        if Q_IS_LN:
            _, q = _load_z(X, MEAN, RSTD, LNW, LNB, b, N, C, offs_j, offs_c,
                           stride_xb, stride_xn, stride_xc)                               # (BJ, BK)
            q = q.to(dt)
        else:
            q = tl.load(Q + b * stride_qb + offs_j[:, None] * stride_qj + offs_c[None, :] * stride_qc,
                        mask=j_mask[:, None] & c_mask[None, :], other=0.0).to(dt)
        acc = _mm(p.to(dt), tl.trans(q), acc, IEEE)
        if WITH_ROWSUM:
            rowsum += tl.sum(p.to(tl.float32), axis=1)
    base = split.to(tl.int64) * I * J
    tl.store(OUT + base + offs_i[:, None] * J + offs_j[None, :], acc, mask=i_mask[:, None] & j_mask[None, :])
    if WITH_ROWSUM:
        if pid_j == 0:  # one column of programs is enough for the row sums
            tl.store(ROWSUM + split.to(tl.int64) * I + offs_i, rowsum, mask=i_mask)


@triton.jit
def _dw1_row_sums_kernel(DA, X, MEAN, RSTD, LNW, LNB, W1, OUT, ROWSUM, BETA_SUM, S2P, U,
                         HD, N, C, B, NUM_CB, IMAGES_PER_PROG,
                         stride_ab, stride_ah, stride_ac, stride_xb, stride_xn, stride_xc,
                         stride_w1h, stride_w1n,
                         BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                         IEEE: tl.constexpr):
    # dW1 = sum over images b and channels c of dA[b, h, c] * LN(X)[b, n, c], as a split-K GEMM
    # whose programs each take whole images, so that it also yields, image by image, the
    # LayerNorm backward's row sums over channels without dZ in memory: dZ_b = W1^T dA_b, so
    # with dxhat = dZ * gamma
    #   sum_c dxhat[n, c]            = sum_h W1[h, n] U[b, h],    U[b, h] = sum_c dA[b, h, c] gamma[c]
    #   sum_c dxhat[n, c] xhat[n, c] = sum_h W1[h, n] M_b[h, n],  M_b = dA_b (xhat_b * gamma)^T
    # The product here is M_b (S2P[b, i-block, n]: the second sum over this program's block of
    # hidden units); beta's part of LN(X) is the same for every token, so its share of dW1 is
    # one column, sum over b, c of dA[b, h, c] beta[c] (BETA_SUM, per split, like ROWSUM: db1).
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    split = tl.program_id(2)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_k = tl.arange(0, BLOCK_K)
    i_mask = offs_i < HD
    j_mask = offs_j < N
    dt = DA.dtype.element_ty
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    rowsum = tl.zeros((BLOCK_I,), dtype=tl.float32)
    beta_sum = tl.zeros((BLOCK_I,), dtype=tl.float32)
    # the W1 block of the second row sum, the same for every image (kept in its 16 bits: registers)
    w1 = tl.load(W1 + offs_i[:, None] * stride_w1h + offs_j[None, :] * stride_w1n,
                 mask=i_mask[:, None] & j_mask[None, :], other=0.0)
    # loaded a step ahead into registers (Triton leaves loads that feed no dot synchronous, a
    # round trip to memory each): the image's per-token statistics, the channel block's beta
    b_first = split * IMAGES_PER_PROG
    b_end = tl.minimum(b_first + IMAGES_PER_PROG, B)
    mean_next = tl.load(MEAN + b_first.to(tl.int64) * N + offs_j, mask=j_mask, other=0.0)
    rstd_next = tl.load(RSTD + b_first.to(tl.int64) * N + offs_j, mask=j_mask, other=0.0)
    beta_next = tl.load(LNB + offs_k, mask=offs_k < C, other=0.0)
    for img in range(b_first, b_end):
        b = tl.cast(img, tl.int64)
        mean, rstd = mean_next, rstd_next
        following = tl.minimum(b + 1, B - 1)
        mean_next = tl.load(MEAN + following * N + offs_j, mask=j_mask, other=0.0)
        rstd_next = tl.load(RSTD + following * N + offs_j, mask=j_mask, other=0.0)
        m = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        u = tl.zeros((BLOCK_I,), dtype=tl.float32)
        for cb in range(0, NUM_CB):
            offs_c = cb * BLOCK_K + offs_k
            c_mask = offs_c < C
            beta = beta_next.to(tl.float32)
            offs_c_next = ((cb + 1) % NUM_CB) * BLOCK_K + offs_k   # (then the next image's first)
            beta_next = tl.load(LNB + offs_c_next, mask=offs_c_next < C, other=0.0)
            p = tl.load(DA + b * stride_ab + offs_i[:, None] * stride_ah + offs_c[None, :] * stride_ac,
                        mask=i_mask[:, None] & c_mask[None, :], other=0.0)                # (BI, BK)
            x_mask = j_mask[:, None] & c_mask[None, :]
            x = tl.load(X + b * stride_xb + offs_j[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                        mask=x_mask, other=0.0)                                            # (BJ, BK)
            gamma = tl.load(LNW + offs_c, mask=c_mask, other=0.0).to(tl.float32)
            xhat = tl.where(x_mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
            m = _mm(p.to(dt), tl.trans((xhat * gamma[None, :]).to(dt)), m, IEEE)
            pf = p.to(tl.float32)
            rowsum += tl.sum(pf, axis=1)
            u += tl.sum(pf * gamma[None, :], axis=1)
            beta_sum += tl.sum(pf * beta[None, :], axis=1)
        tl.store(S2P + (b * tl.num_programs(0) + pid_i) * N + offs_j, tl.sum(w1.to(tl.float32) * m, axis=0),
                 mask=j_mask)
        if pid_j == 0:   # one column of programs is enough for the row sums of dA
            tl.store(U + b * HD + offs_i, u, mask=i_mask)
        acc += m
    base = split.to(tl.int64) * HD * N
    tl.store(OUT + base + offs_i[:, None] * N + offs_j[None, :], acc, mask=i_mask[:, None] & j_mask[None, :])
    if pid_j == 0:
        tl.store(ROWSUM + split.to(tl.int64) * HD + offs_i, rowsum, mask=i_mask)
        tl.store(BETA_SUM + split.to(tl.int64) * HD + offs_i, beta_sum, mask=i_mask)


# ----------------------------------------------------------------------------- launchers

def split_blocks(n: int, c: int, hd: int, dtype: torch.dtype, backward: bool = False) -> dict:
    """Tiles of the per-image GEMMs (method "split"), for the forward or the data backward."""
    block_n = max(16, next_pow2(n))
    if dtype == torch.float32:
        # IEEE fp32 dots run on FMA units with both operands in registers: small tiles
        hidden = {"BLOCK_M": 64, "BLOCK_C": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
        tokens = {"BLOCK_C": 2048 // block_n, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
    else:
        # the backward's token slabs hold the LayerNorm backward's dZ, xhat and dY after the
        # loop: half the forward's channels. Sizes from an H100 sweep (bf16, N 196, C 512 and
        # 768): hidden tiles 128 channels wide in the backward too (934 / 947 µs against
        # 1,031 / 1,049 at 64), forward token steps of 32 hidden units (299 / 320 against 310 / 331)
        hidden = {"BLOCK_M": 128, "BLOCK_C": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}
        tokens = {"BLOCK_C": (8192 if backward else 16384) // block_n, "BLOCK_K": 64 if backward else 32,
                  "num_warps": 8,
                  # (BLOCK_N, 64) weight tiles: three stages of them overflow shared memory at N > 256
                  "num_stages": 3 if block_n <= 256 else 2}
    hidden["BLOCK_M"] = max(16, min(hidden["BLOCK_M"], next_pow2(hd)))
    hidden["BLOCK_C"] = max(16, min(hidden["BLOCK_C"], next_pow2(c)))
    hidden["BLOCK_K"] = max(16, min(hidden["BLOCK_K"], block_n))
    tokens["BLOCK_C"] = max(16, min(128, tokens["BLOCK_C"], next_pow2(c)))
    tokens["BLOCK_K"] = max(16, min(tokens["BLOCK_K"], next_pow2(hd)))
    return {"method": "split", "hidden": hidden, "tokens": tokens}


def pad_token_axis(w1: torch.Tensor, cfg: dict) -> tuple[torch.Tensor, bool]:
    """(W1 (Hd, N) as the first N columns of a zeroed (Hd, max(16, next_pow2(N))) buffer, True)
    when N is not a multiple of 16 and the configuration does not say "pad_w1": False, else
    (W1, False); pass both to `hidden` and `tokens`. Why: at N = 196 the rows start at
    addresses Triton cannot prove 16-byte aligned and every tile is masked along them, so W1's tiles loaded one
    element a lane, outside the async-copy pipeline (sm_90 TTGIR: a synchronous load of 128 x 32
    scalars a step in the hidden kernel, and of 256 x 64 in the backward's token kernel). Padded,
    the kernels drop that mask and the tiles load 16 bytes a lane, pipelined. One small copy a
    pass (Hd x 256 elements at N = 196)."""
    n = w1.shape[1]
    if n % 16 == 0 or not cfg.get("pad_w1", True):
        return w1, False
    return torch.nn.functional.pad(w1, (0, max(16, next_pow2(n)) - n))[:, :n], True


def _padded_past(w1: torch.Tensor, w1_padded: bool, rows: int) -> bool:
    """Whether tiles may read W1's rows unmasked up to `rows` columns: padded by `pad_token_axis`
    at least that far."""
    return w1_padded and w1.stride(1) == 1 and w1.stride(0) >= rows


def hidden(x, mean, rstd, ln_weight, ln_bias, w1, b1, cfg: dict, h=None, w2=None, dy=None, da=None,
           z=None, w1_padded: bool = False) -> None:
    """Forward (dy None): H = GELU(W1 @ LN(x) + b1) into h. Backward: dA into da, and H into h
    unless h is None. h and da are (B, Hd, C) buffers in x's dtype. With z (LN(x) from
    `layer_norm`), the kernel reads it instead of normalizing x itself. w1, w1_padded: as
    `pad_token_axis` returns them."""
    B, N, C = x.shape
    HD = w1.shape[0]
    backward = dy is not None
    bm, bc = cfg["BLOCK_M"], cfg["BLOCK_C"]
    # pointers a pass never touches get a stand-in tensor (and its strides)
    w2, dy = (w2, dy) if backward else (w1, x)
    h_ptr, da_ptr = (h if h is not None else da), (da if da is not None else h)
    wrap_triton(_hidden_kernel)[(cdiv(HD, bm) * cdiv(C, bc) * B,)](
        x, mean, rstd, ln_weight, ln_bias, x if z is None else z, w1, b1, w2, dy, h_ptr, da_ptr,
        N, C, HD, *x.stride(), *dy.stride(), *w1.stride(), *w2.stride(),
        BLOCK_M=bm, BLOCK_C=bc, BLOCK_K=cfg["BLOCK_K"], BACKWARD=backward, STORE_H=h is not None,
        Z_IN_MEMORY=z is not None, W1_PADDED=_padded_past(w1, w1_padded, cdiv(N, cfg["BLOCK_K"]) * cfg["BLOCK_K"]),
        IEEE=x.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch_options(cfg))


def layer_norm(x, mean, rstd, ln_weight, ln_bias) -> torch.Tensor:
    """LN(x) as a contiguous (B, N, C) tensor in x's dtype, from the saved statistics: for
    configurations with "Z" (one pass writing it, so that the hidden GEMM's tiles load it with
    pipelined plain loads instead of normalizing x in their prologues)."""
    B, N, C = x.shape
    z = torch.empty((B, N, C), device=x.device, dtype=x.dtype)
    block_c = min(128, next_pow2(C))
    wrap_triton(_ln_apply_kernel)[(cdiv(B * N, 16), cdiv(C, block_c))](
        x, mean, rstd, ln_weight, ln_bias, z, B * N, N, C, *x.stride(), BLOCK_R=16, BLOCK_C=block_c, num_warps=4)
    return z


def token_blocks(n: int, cfg: dict) -> tuple[int, int]:
    """(BLOCK_N, number of token blocks) of the token kernel with tiles `cfg`: all tokens in one
    block unless cfg["BLOCK_N"] says fewer (a power of two, at least 16). Smaller token blocks
    with wider channel blocks read the other operand less: the tiles' reads of W and T together
    are B N Hd C (1 / BLOCK_C + 1 / BLOCK_N) elements (at N 196, 256 x 32 tiles: 0.035 of that;
    128 x 64 tiles, the same registers: 0.023)."""
    whole = max(16, next_pow2(n))
    block_n = min(cfg.get("BLOCK_N") or whole, whole)
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"token_mlp: the token kernel's BLOCK_N must be a power of two >= 16; got {block_n}")
    return block_n, cdiv(n, block_n)


def tokens(t, x, cfg: dict, *, w2=None, b2=None, y=None, w1=None, dy=None, mean=None, rstd=None,
           ln_weight=None, ln_bias=None, partials=None, dx=None, w1_padded: bool = False) -> None:
    """Forward (w2, b2, y given): y = x + W2 @ t + b2 with t = H. Backward (w1, dy, the LayerNorm
    tensors and `partials` = (p, s1, s2, dgamma, dbeta, db2) given): dZ = W1^T @ t with t = dA,
    into the LayerNorm backward partials, one per block of cfg["BLOCK_C"] channels (dgamma and
    dbeta: (token blocks * B, C), see `token_blocks`); with `dx`, s1 and s2 are the whole row sums
    (B, N) (`dw1_row_sums`; p unused) and dX is written into dx. w1, w1_padded: as
    `pad_token_axis` returns them."""
    B, N, C = x.shape
    HD = t.shape[1]
    backward = w1 is not None
    bc = cfg["BLOCK_C"]
    block_n, n_blocks = token_blocks(N, cfg)
    if backward:
        w, (stride_wn, stride_wh) = w1, (w1.stride(1), w1.stride(0))   # W1^T: (N, Hd)
        p, s1, s2, dgamma, dbeta, db2 = partials
        b2, y = ln_bias, (x if dx is None else dx)                        # b2: an untouched stand-in
        p = x if p is None else p
    else:
        w, (stride_wn, stride_wh) = w2, w2.stride()
        dy, mean, rstd, ln_weight, ln_bias = x, b2, b2, b2, b2             # untouched stand-ins
        p = s1 = s2 = dgamma = dbeta = db2 = y
    wrap_triton(_tokens_kernel)[(B, cdiv(C, bc), n_blocks)](
        w, t, x, dy, mean, rstd, ln_weight, ln_bias, b2, y, p, s1, s2, dgamma, dbeta, db2,
        N, C, HD, cdiv(C, bc), stride_wn, stride_wh, *x.stride(), *dy.stride(), *y.stride(),
        BLOCK_N=block_n, BLOCK_C=bc, BLOCK_K=cfg["BLOCK_K"], BACKWARD=backward,
        W_PADDED=backward and _padded_past(w1, w1_padded, block_n * n_blocks), DX_DIRECT=dx is not None,
        IEEE=x.dtype == torch.float32, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def splitk_blocks(wcfg: dict, dtype: torch.dtype) -> dict:
    """Tiles of the split-K weight-gradient GEMMs (method "splitk"); keys in `wcfg` win."""
    if dtype == torch.float32:
        # IEEE fp32 dots run on FMA units with both operands in registers: small tiles (16
        # channels a step: 32 spilled 504 bytes a thread at N = 196 with the LayerNorm recompute)
        base = {"BLOCK_I": 64, "BLOCK_J": 64, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
    else:
        base = {"BLOCK_I": 128, "BLOCK_J": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    return {**base, **{k: v for k, v in wcfg.items() if k != "method"}}


def contract_bc(p, q, x, mean, rstd, ln_weight, ln_bias, wcfg: dict, target_programs: int,
                with_rowsum: bool = False):
    """(sum over b, c of p[b, i, c] * q[b, j, c] as an (I, J) fp32 tensor, the row sums of p or None).

    p is (B, I, C); q is (B, J, C), or None for LN(x) (J = N tokens) recomputed in the kernel."""
    B, rows, C = p.shape
    cols = x.shape[1] if q is None else q.shape[1]
    cfg = splitk_blocks(wcfg, p.dtype)
    bi = max(16, min(cfg["BLOCK_I"], next_pow2(rows)))
    bj = max(16, min(cfg["BLOCK_J"], next_pow2(cols)))
    bk = max(16, min(cfg["BLOCK_K"], next_pow2(C)))
    ncb = cdiv(C, bk)
    units = B * ncb
    tiles = cdiv(rows, bi) * cdiv(cols, bj)
    splits, per_prog = split_units(units, tiles, target_programs)
    out = torch.empty((splits, rows, cols), device=p.device, dtype=torch.float32)
    rowsum = torch.empty((splits, rows), device=p.device, dtype=torch.float32) if with_rowsum else out
    q_or_x = x if q is None else q
    wrap_triton(_contract_bc_kernel)[(cdiv(rows, bi), cdiv(cols, bj), splits)](
        p, q_or_x, x, mean, rstd, ln_weight, ln_bias, out, rowsum,
        rows, cols, x.shape[1], C, ncb, units, per_prog,
        *p.stride(), *q_or_x.stride(), *x.stride(),
        BLOCK_I=bi, BLOCK_J=bj, BLOCK_K=bk, Q_IS_LN=q is None, WITH_ROWSUM=with_rowsum,
        IEEE=p.dtype == torch.float32, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out.sum(0), (rowsum.sum(0) if with_rowsum else None)


def dw1_row_sums(da, x, mean, rstd, ln_weight, ln_bias, w1, target_programs: int):
    """(dW1 (Hd, N), db1 (Hd,), s1 (B, N), s2 (B, N)), all fp32, from `_dw1_row_sums_kernel`: the
    first weight gradient and the LayerNorm backward's row sums over channels (s1 = sum_c dxhat,
    s2 = sum_c dxhat * xhat, dxhat = (W1^T dA) * gamma), so that the token kernel writes dX
    directly (`tokens(..., dx=)`). w1 (Hd, N) as the token kernel multiplies by it (x's dtype)."""
    B, HD, C = da.shape
    N = x.shape[1]
    # (in 16 bits) half the token width of contract_bc's tiles: this kernel holds a second
    # accumulator (the image's product) and a W1 block too, which at 128 x 128 spilled
    cfg = splitk_blocks({"BLOCK_J": 64} if da.dtype != torch.float32 else {}, da.dtype)
    bi = max(16, min(cfg["BLOCK_I"], next_pow2(HD)))
    bj = max(16, min(cfg["BLOCK_J"], next_pow2(N)))
    bk = max(16, min(cfg["BLOCK_K"], next_pow2(C)))
    n_i = cdiv(HD, bi)
    splits, per_prog = split_units(B, n_i * cdiv(N, bj), target_programs)   # whole images a program
    f32 = torch.float32
    out = torch.empty((splits, HD, N), device=da.device, dtype=f32)
    rowsum, beta_sum = torch.empty((2, splits, HD), device=da.device, dtype=f32).unbind(0)
    s2_part = torch.empty((B, n_i, N), device=da.device, dtype=f32)
    u = torch.empty((B, HD), device=da.device, dtype=f32)
    wrap_triton(_dw1_row_sums_kernel)[(n_i, cdiv(N, bj), splits)](
        da, x, mean, rstd, ln_weight, ln_bias, w1, out, rowsum, beta_sum, s2_part, u,
        HD, N, C, B, cdiv(C, bk), per_prog, *da.stride(), *x.stride(), *w1.stride(),
        BLOCK_I=bi, BLOCK_J=bj, BLOCK_K=bk, IEEE=da.dtype == f32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    # beta's part of LN(X) is the same for every token: its share of dW1 is a column added to all
    dw1 = out.sum(0) + beta_sum.sum(0)[:, None]
    return dw1, rowsum.sum(0), u @ w1.float(), s2_part.sum(1)
