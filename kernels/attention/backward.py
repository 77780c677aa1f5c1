"""The attention backward's kernels; their launcher is `backward` in triton.py.

`_attn_bwd_delta` forms rowsum(dO * O) (unless FUSED_DELTA, when the main kernel does);
`_attn_bwd_tiled`, one program per (batch, head, block of rows), accumulates dK, dV of its
key block over all queries, then dQ of its query block over all keys (or, with DQ_ATOMIC,
adds each step's share of dQ to an fp32 buffer as it goes). With WHOLE_HEAD one program
takes a whole (batch, head): its key blocks one after the other, each step's share of dQ
added to an fp32 scratch that no other program touches (plain loads and stores, no atomics,
no second pass over the keys; the last key block writes dQ itself).
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.attention.common import _load_rows, _row_block_and_head, _rows


@triton.jit
def _delta(O, DELTA, do, offs, mask, NP, offs_d, stride_on, stride_od,
           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, FUSED_DELTA: tl.constexpr):
    # rowsum(dO * O) of some query rows (`mask`: those that exist): from the delta kernel's
    # output (NP rows a (batch, head), see triton.stat_rows), or with FUSED_DELTA formed here
    # from O (one more tile load a step instead of one more launch)
    if FUSED_DELTA:
        o = _load_rows(O, offs, mask, offs_d, stride_on, stride_od, HEAD_DIM, BLOCK_D)
        return tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    else:
        return tl.load(DELTA + offs, mask=offs < NP, other=0.0)


@triton.jit
def _query_rows(Q, DO, O, LSE2, DELTA, offs, mask, NP, offs_d, stride_qn, stride_qd, stride_don, stride_dod,
                stride_on, stride_od, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, FUSED_DELTA: tl.constexpr):
    # what the backward reads of some query rows: q, dO, their lse2 and delta (see _delta)
    q = _load_rows(Q, offs, mask, offs_d, stride_qn, stride_qd, HEAD_DIM, BLOCK_D)
    do = _load_rows(DO, offs, mask, offs_d, stride_don, stride_dod, HEAD_DIM, BLOCK_D)
    lse2 = tl.load(LSE2 + offs, mask=offs < NP, other=0.0)
    delta = _delta(O, DELTA, do, offs, mask, NP, offs_d, stride_on, stride_od, HEAD_DIM, BLOCK_D, FUSED_DELTA)
    return q, do, lse2, delta


@triton.jit
def _attn_bwd_delta(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    H, N, NP, ROW_PROGRAMS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # rowsum(dO * O), read once here instead of once per key block later; NP rows a (batch,
    # head), those past N zero
    pid_m, pid_bh = _row_block_and_head(ROW_PROGRAMS)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    O += off_b * stride_ob + off_h * stride_oh
    DO += off_b * stride_dob + off_h * stride_doh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    do = _load_rows(DO, offs_m, mask_m, offs_d, stride_don, stride_dod, HEAD_DIM, BLOCK_D)
    delta = _delta(O, DELTA, do, offs_m, mask_m, NP, offs_d, stride_on, stride_od, HEAD_DIM, BLOCK_D, True)
    tl.store(DELTA + pid_bh.to(tl.int64) * NP + offs_m, delta, mask=offs_m < NP)


@triton.jit
def _bwd_kv_steps(k, v, dk, dv, Q, DO, O, LSE2, DELTA, DQ, DQS, accumulated, last, start, end, N, NP, offs_d,
                  qk_scale, sm_scale,
                  stride_qn, stride_qd, stride_don, stride_dod, stride_on, stride_od, stride_dqn, stride_dqd,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, STEP: tl.constexpr,
                  FUSED_DELTA: tl.constexpr, DQ_ATOMIC: tl.constexpr, WHOLE_HEAD: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    # dK, dV of one key block from queries [start, end) in STEP-row steps. Transposed scores
    # (keys x queries), so dK, dV need no transposed P; padded query rows have do = 0 and
    # delta = 0, so they add nothing. With DQ_ATOMIC, each step also adds its share of dQ,
    # dS^T K, to the fp32 buffer DQ with atomic adds: the scores and exponentials are then
    # formed once instead of twice (dQ's own pass over the keys is skipped), at the price of
    # a summation order that varies from run to run. With WHOLE_HEAD the share goes into the
    # program's own fp32 scratch DQS ((N, BLOCK_D) rows of this (batch, head)) by a plain load
    # and store, in key-block order (`accumulated`: earlier key blocks' sums are there; `last`:
    # the sum is complete, written to DQ scaled and in its dtype instead), a fixed order: the
    # same dQ on every run. The per-row statistics (lse2, delta) are
    # read as far as NP (a multiple of 16, see triton.stat_rows), not N: unmasked within
    # 16-row groups, so in 16-byte loads.
    offs_step = tl.arange(0, STEP)
    for start_m in range(start, end, STEP):
        offs_m = start_m + offs_step
        mask_m = offs_m < N
        q, do, lse2, delta = _query_rows(Q, DO, O, LSE2, DELTA, offs_m, mask_m, NP, offs_d, stride_qn, stride_qd,
                                         stride_don, stride_dod, stride_on, stride_od, HEAD_DIM, BLOCK_D,
                                         FUSED_DELTA)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        pt = tl.exp2(st - lse2[None, :])                                    # (BLOCK, STEP)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk += tl.dot(dst, q, input_precision=DOT_PRECISION)
        if DQ_ATOMIC:
            dq = tl.dot(tl.trans(dst), k, input_precision=DOT_PRECISION) * sm_scale   # (STEP, D)
            tl.atomic_add(DQ + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd, dq,
                          mask=_rows(mask_m, offs_d, HEAD_DIM, BLOCK_D), sem="relaxed")
        if WHOLE_HEAD:
            # scaled before the sum: a product added straight to a loaded tile becomes the dot's
            # accumulator, which Triton 3.6's software pipeliner fails on at 64-row steps
            dq = tl.dot(tl.trans(dst), k, input_precision=DOT_PRECISION) * sm_scale   # (STEP, BLOCK_D)
            at = offs_m[:, None] * BLOCK_D + offs_d[None, :]
            dq += tl.load(DQS + at, mask=mask_m[:, None] & accumulated, other=0.0)
            if last:
                tl.store(DQ + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
                         dq.to(DQ.dtype.element_ty), mask=_rows(mask_m, offs_d, HEAD_DIM, BLOCK_D))
            else:
                tl.store(DQS + at, dq, mask=mask_m[:, None])
    return dk, dv


@triton.jit
def _bwd_q_steps(q, do, lse2, delta, dq, K, V, start, end, N, offs_d, qk_scale,
                 stride_kn, stride_kd, stride_vn, stride_vd,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, STEP: tl.constexpr,
                 MASK_KEYS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # dQ of one query block from keys [start, end) in STEP-key steps; without MASK_KEYS every
    # key of every step must exist
    offs_step = tl.arange(0, STEP)
    for start_n in range(start, end, STEP):
        offs_n = start_n + offs_step
        mask_n = offs_n < N
        kb = _load_rows(K, offs_n, mask_n, offs_d, stride_kn, stride_kd, HEAD_DIM, BLOCK_D)  # (STEP, D)
        vb = _load_rows(V, offs_n, mask_n, offs_d, stride_vn, stride_vd, HEAD_DIM, BLOCK_D)
        s = tl.dot(q, tl.trans(kb), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if MASK_KEYS:
            p = tl.where(mask_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(vb), input_precision=DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dq += tl.dot(ds, kb, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_key_block(Q, K, V, DO, O, DQ, DK, DV, LSE2, DELTA, DQS, accumulated, last, row0, N, NP, n_main, offs_d,
                   sm_scale, qk_scale,
                   stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_don, stride_dod,
                   stride_on, stride_od, stride_dqn, stride_dqd, stride_gn, stride_gd,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_STEP: tl.constexpr,
                   TAIL: tl.constexpr, FUSED_DELTA: tl.constexpr, DQ_ATOMIC: tl.constexpr,
                   WHOLE_HEAD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # dK, dV of the key block starting at row0, over all queries (and its share of dQ, see
    # _bwd_kv_steps), stored
    offs_blk = row0 + tl.arange(0, BLOCK)
    mask_blk = offs_blk < N
    k = _load_rows(K, offs_blk, mask_blk, offs_d, stride_kn, stride_kd, HEAD_DIM, BLOCK_D)  # (BLOCK, D)
    v = _load_rows(V, offs_blk, mask_blk, offs_d, stride_vn, stride_vd, HEAD_DIM, BLOCK_D)
    dk = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    dk, dv = _bwd_kv_steps(k, v, dk, dv, Q, DO, O, LSE2, DELTA, DQ, DQS, accumulated, last, 0, n_main, N, NP, offs_d,
                           qk_scale, sm_scale, stride_qn, stride_qd, stride_don, stride_dod, stride_on, stride_od,
                           stride_dqn, stride_dqd, HEAD_DIM, BLOCK_D, BLOCK_STEP, FUSED_DELTA, DQ_ATOMIC,
                           WHOLE_HEAD, DOT_PRECISION)
    if TAIL > 0:
        dk, dv = _bwd_kv_steps(k, v, dk, dv, Q, DO, O, LSE2, DELTA, DQ, DQS, accumulated, last, n_main, N, N, NP,
                               offs_d, qk_scale, sm_scale, stride_qn, stride_qd, stride_don, stride_dod,
                               stride_on, stride_od, stride_dqn, stride_dqd, HEAD_DIM, BLOCK_D, TAIL,
                               FUSED_DELTA, DQ_ATOMIC, WHOLE_HEAD, DOT_PRECISION)
    tl.store(DK + offs_blk[:, None] * stride_gn + offs_d[None, :] * stride_gd,
             (dk * sm_scale).to(DK.dtype.element_ty), mask=_rows(mask_blk, offs_d, HEAD_DIM, BLOCK_D))
    tl.store(DV + offs_blk[:, None] * stride_gn + offs_d[None, :] * stride_gd,
             dv.to(DV.dtype.element_ty), mask=_rows(mask_blk, offs_d, HEAD_DIM, BLOCK_D))


@triton.jit
def _attn_bwd_tiled(
    Q, K, V, DO, O, DQ, DK, DV, LSE2, DELTA, DQS,
    sm_scale, qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    H, N, NP, ROW0, ROW_PROGRAMS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_STEP: tl.constexpr,
    TAIL: tl.constexpr, FUSED_DELTA: tl.constexpr, DQ_ATOMIC: tl.constexpr, WHOLE_HEAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # DK and DV share the strides stride_g*, DQ has its own (with DQ_ATOMIC it is a zeroed fp32
    # buffer that the dK, dV pass adds to, see _bwd_kv_steps)
    # float arguments arrive as fp64 from inductor-generated launchers: keep the math fp32
    sm_scale = tl.cast(sm_scale, tl.float32)
    qk_scale = tl.cast(qk_scale, tl.float32)
    pid, pid_bh = _row_block_and_head(ROW_PROGRAMS)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    O += off_b * stride_ob + off_h * stride_oh
    g_off = off_b * stride_gb + off_h * stride_gh
    DQ += off_b * stride_dqb + off_h * stride_dqh
    DK += g_off
    DV += g_off
    LSE2 += pid_bh.to(tl.int64) * NP
    DELTA += pid_bh.to(tl.int64) * NP
    DQS += pid_bh.to(tl.int64) * N * BLOCK_D

    offs_d = tl.arange(0, BLOCK_D)
    # with TAIL: whole BLOCK_STEP steps, then the rest in TAIL-row steps (less padding)
    n_main = N if TAIL == 0 else (N // BLOCK_STEP) * BLOCK_STEP
    if WHOLE_HEAD:   # every key block of this (batch, head) in turn, dQ added up on the way
        for kb in range(0, N, BLOCK):
            _bwd_key_block(Q, K, V, DO, O, DQ, DK, DV, LSE2, DELTA, DQS, kb > 0, kb + BLOCK >= N,
                           kb, N, NP, n_main, offs_d, sm_scale, qk_scale,
                           stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_don, stride_dod,
                           stride_on, stride_od, stride_dqn, stride_dqd, stride_gn, stride_gd,
                           HEAD_DIM, BLOCK_D, BLOCK, BLOCK_STEP, TAIL, FUSED_DELTA, False, True, DOT_PRECISION)
            # the next key block reads back the dQ sums this one stored (each row possibly
            # from another thread): make them visible across the program first
            tl.debug_barrier()
    else:
        # -- dK, dV of key block `pid`, over all query blocks --
        _bwd_key_block(Q, K, V, DO, O, DQ, DK, DV, LSE2, DELTA, DQS, False, False,
                       ROW0 + pid * BLOCK, N, NP, n_main, offs_d, sm_scale, qk_scale,
                       stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_don, stride_dod,
                       stride_on, stride_od, stride_dqn, stride_dqd, stride_gn, stride_gd,
                       HEAD_DIM, BLOCK_D, BLOCK, BLOCK_STEP, TAIL, FUSED_DELTA, DQ_ATOMIC, False, DOT_PRECISION)
        if not DQ_ATOMIC:   # else the dK, dV pass has added dQ up already
            # -- dQ of query block `pid`, over all key blocks --
            offs_blk = ROW0 + pid * BLOCK + tl.arange(0, BLOCK)   # this launch's blocks start at row ROW0
            mask_blk = offs_blk < N
            q, do, lse2, delta = _query_rows(Q, DO, O, LSE2, DELTA, offs_blk, mask_blk, NP, offs_d, stride_qn,
                                             stride_qd, stride_don, stride_dod, stride_on, stride_od, HEAD_DIM,
                                             BLOCK_D, FUSED_DELTA)
            dq = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
            dq = _bwd_q_steps(q, do, lse2, delta, dq, K, V, 0, n_main, N, offs_d, qk_scale,
                              stride_kn, stride_kd, stride_vn, stride_vd,
                              HEAD_DIM, BLOCK_D, BLOCK_STEP, TAIL == 0, DOT_PRECISION)
            if TAIL > 0:
                dq = _bwd_q_steps(q, do, lse2, delta, dq, K, V, n_main, N, N, offs_d, qk_scale,
                                  stride_kn, stride_kd, stride_vn, stride_vd,
                                  HEAD_DIM, BLOCK_D, TAIL, True, DOT_PRECISION)
            tl.store(DQ + offs_blk[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
                     (dq * sm_scale).to(DQ.dtype.element_ty), mask=_rows(mask_blk, offs_d, HEAD_DIM, BLOCK_D))
