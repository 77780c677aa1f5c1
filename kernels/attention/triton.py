"""Fused non-causal attention in Triton: the forward kernel, and the launchers of both passes
(the backward's kernels are in backward.py, the helpers both use in common.py).

Shapes are (B, H, N, D) with arbitrary strides: the attention block passes q,
k, v as views of its packed (B, N, 3, H, D) projection, so every kernel takes
the four strides of every tensor and never asks for a contiguous copy.
D is any size from 1 to 128. Tiles are BLOCK_D = max(16, next power of two)
wide (tl.dot needs every dimension >= 16 and powers of two); the extra columns
are masked to zero in registers, so memory traffic stays D-wide, and D = 16,
32, 64, 128 compile without the mask. (Small heads are not exotic: a one-layer
ViT on CIFAR-10 gains about two points each time it halves its head dim from 16
to 2 at the same width, see BENCHMARKS.md.)

Softmax runs in base 2: scores are scaled by `scale * log2(e)` so that exp2 can
be used, and the forward saves the per-row log-sum-exp in that same domain
(`lse2`, fp32, (B, H, stat_rows(N))). No N x N matrix is ever written to memory.

Forward: one program per (batch, head, query block) walks over key tiles with
an online softmax. Short key tiles behind a 3-stage pipeline are used even when
all of K, V would fit on chip: measured on an H200 in bf16, the best whole-N
tile was 1.2-1.7x slower than the best short tiling (see `_fwd_config`). With a
TAIL size in the launch configuration, every loop over keys or queries takes whole
tiles without a mask and the rest in TAIL-wide steps; with ROW_TAIL, the programs'
own rows are cut the same way (a second launch of ROW_TAIL-row programs): less padding.

Backward (backward.py): `_attn_bwd_delta` forms rowsum(dO * O) (or, with FUSED_DELTA in
the launch configuration, the main kernel does, one O tile per step); then one program per (batch,
head, key block) accumulates that block's dK, dV over all queries, and computes
dQ for the query block of the same index over all keys. Scores are recomputed
twice, but nothing is accumulated across programs: no atomics, deterministic. With
DQ_ATOMIC in the launch configuration, the dK, dV pass instead adds each step's dQ share
to an fp32 buffer with atomics (scores and exponentials formed once; summation order varies
between runs, so `torch.use_deterministic_algorithms(True)` turns it off).
(A variant that kept a whole (batch, head)'s K, V, dK, dV on chip and walked the
query blocks was 1.07-1.8x slower than this one on every benchmark shape, best
configuration against best, and was removed.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import tuning
from kernels.attention.backward import _attn_bwd_delta, _attn_bwd_tiled
from kernels.attention.common import _cols, _load_rows, _row_block_and_head, _rows
from kernels.dispatch import wrap_triton
from kernels.grid import cdiv, next_pow2

LOG2E = 1.4426950408889634

def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32: the tests hold the kernel to
    # fp32 accuracy. For fp16/bf16 the option is ignored by tl.dot.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _fwd_keys(q, K, V, start, end, N, offs_d, m_i, l_i, acc, qk_scale,
              stride_kn, stride_kd, stride_vn, stride_vd,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
              MASK_KEYS: tl.constexpr, NEG_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # keys [start, end) in BLOCK_N tiles into the running (max, sum, output) of the online softmax;
    # without MASK_KEYS every key of every tile must exist
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        kt = tl.load(K + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=_cols(mask_n, offs_d, HEAD_DIM, BLOCK_D), other=0.0)  # (D, BLOCK_N)
        # raw scores: the row max is taken before scaling (qk_scale >= 0, see NEG_SCALE), so that
        # scaling and subtracting the max are one FMA a score
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        if NEG_SCALE:
            s = -s
        if MASK_KEYS:
            s = tl.where(mask_n[None, :], s, float("-inf"))
        # the first tile always holds key 0, so m_new is finite from then on
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(V, cols, mask_n, offs_d, stride_vn, stride_vd, HEAD_DIM, BLOCK_D)  # (BLOCK_N, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE2,
    qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, NP, ROW0, ROW_PROGRAMS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TAIL: tl.constexpr, NEG_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # float arguments arrive as fp64 from inductor-generated launchers: keep the math fp32.
    # qk_scale is |scale| * log2(e); with NEG_SCALE (a negative scale) the scores are negated.
    qk_scale = tl.cast(qk_scale, tl.float32)
    pid_m, pid_bh = _row_block_and_head(ROW_PROGRAMS)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    O += off_b * stride_ob + off_h * stride_oh
    LSE2 += pid_bh.to(tl.int64) * NP   # NP rows of statistics a (batch, head): see stat_rows

    offs_m = ROW0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # this launch's query rows start at ROW0
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    q = _load_rows(Q, offs_m, mask_m, offs_d, stride_qn, stride_qd, HEAD_DIM, BLOCK_D)

    # -- online softmax over key tiles (a single tile when BLOCK_N >= N) --
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if TAIL == 0:
        m_i, l_i, acc = _fwd_keys(q, K, V, 0, N, N, offs_d, m_i, l_i, acc, qk_scale,
                                  stride_kn, stride_kd, stride_vn, stride_vd,
                                  HEAD_DIM, BLOCK_D, BLOCK_N, True, NEG_SCALE, DOT_PRECISION)
    else:
        # whole BLOCK_N tiles without a key mask, then the rest in TAIL-key tiles: less padding
        # (N = 144: 144 keys of work instead of 192 with 64-key tiles)
        n_main = (N // BLOCK_N) * BLOCK_N
        m_i, l_i, acc = _fwd_keys(q, K, V, 0, n_main, N, offs_d, m_i, l_i, acc, qk_scale,
                                  stride_kn, stride_kd, stride_vn, stride_vd,
                                  HEAD_DIM, BLOCK_D, BLOCK_N, False, NEG_SCALE, DOT_PRECISION)
        m_i, l_i, acc = _fwd_keys(q, K, V, n_main, N, N, offs_d, m_i, l_i, acc, qk_scale,
                                  stride_kn, stride_kd, stride_vn, stride_vd,
                                  HEAD_DIM, BLOCK_D, TAIL, True, NEG_SCALE, DOT_PRECISION)

    # -- epilogue: normalise, store O and the row statistics --
    acc = acc / l_i[:, None]
    tl.store(O + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
             acc.to(O.dtype.element_ty), mask=_rows(mask_m, offs_d, HEAD_DIM, BLOCK_D))
    # rows N..NP too: those of zero queries (finite), which the backward reads unmasked
    tl.store(LSE2 + offs_m, m_i + tl.log2(l_i), mask=offs_m < NP)


# ---------------------------------------------------------------- launchers --

def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, next_pow2(n))


def _fwd_config(n: int, d: int, elem: int) -> dict:
    """Forward blocks and launch settings.

    16-bit numbers are CUDA-graph medians of the kernel alone on an H200 (bf16,
    2026-11-26, `composer bench kernels` shapes); fp32 sizes come from sm_90
    compiles (register and spill counts).
    """
    n_pad = _pow2(n)
    if elem == 4:
        # IEEE fp32 dots run on FMA units with both operands in registers: key
        # tiles of at most 2048 elements (larger ones spill)
        block_n = min(n_pad, max(32, 2048 // d))
        num_stages = 1 if block_n >= n_pad else 2
        block_m = 64 if n >= 128 and d <= 64 else max(16, min(32, n_pad))
        num_warps = 8 if block_m >= 64 or d >= 128 else 4
        return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}
    if d >= 128:
        # not swept yet: 64-key tiles, as many queries as 8 warps hold without spilling
        block_m, block_n, num_warps, num_stages = (128 if n >= 512 else 64), 64, 8, 3
    elif n_pad >= 512:
        # B32 H16 N1024 D64: 393 us (128 x 32 keys: 431, 64 x 64: 423)
        block_m, block_n, num_warps, num_stages = 128, 64, 8, 3
    elif d <= 32:
        # B256 H4 N144 D16: 23.7 us; one 256-key tile took 38.6-227 us
        block_m, block_n, num_warps, num_stages = 64, 64, 4, 2
    else:
        # B512 H3 N65 D64: 29.4 us; B256 H6 N197 D64: 92.5 us (one 256-key tile: 160-375)
        block_m, block_n, num_warps, num_stages = 128, 32, 4, 3
    return {"BLOCK_M": min(block_m, n_pad), "BLOCK_N": min(block_n, n_pad),
            "num_warps": num_warps, "num_stages": num_stages}


def _bwd_config(n: int, d: int, elem: int) -> dict:
    """Backward blocks: BLOCK keys (and queries for dQ) per program, BLOCK_STEP per inner step."""
    if elem == 4:
        # IEEE fp32 dots: smaller tiles keep both operands in registers
        return {"BLOCK": 64 if d <= 64 else 32, "BLOCK_STEP": 32 if d <= 64 else 16,
                "num_warps": 8, "num_stages": 2}
    if d >= 128:
        return {"BLOCK": 64, "BLOCK_STEP": 32, "num_warps": 8, "num_stages": 2}
    # H200, bf16: best of 8 tilings on every benchmark shape (B256 H4 N144 D16: 48 us,
    # B512 H3 N65 D64: 80, B256 H6 N197 D64: 261, B32 H16 N1024 D64: 1,159)
    return {"BLOCK": 64, "BLOCK_STEP": 32, "num_warps": 4, "num_stages": 3}


def forward_config(q: torch.Tensor) -> dict:
    """The forward's launch configuration for q: one saved for this card and shape
    (kernels.tuning), else `_fwd_config`."""
    n, d = q.shape[-2:]
    return (tuning.lookup("attention", "forward", q.device, q.dtype, f"N{n} D{d}")
            or _fwd_config(n, _pow2(d), q.element_size()))


def backward_config(q: torch.Tensor) -> dict:
    """The backward's launch configuration for q: saved (kernels.tuning), else `_bwd_config`."""
    n, d = q.shape[-2:]
    return (tuning.lookup("attention", "backward", q.device, q.dtype, f"N{n} D{d}")
            or _bwd_config(n, _pow2(d), q.element_size()))


def _row_launches(n: int, block: int, row_tail: int, num_warps: int) -> list[tuple[int, int, int, int]]:
    """(first row, rows, block, warps) of each launch over the N rows of a (batch, head): one
    launch of `block`-row programs, or with `row_tail`, the whole blocks in one launch and the
    rest in `row_tail`-row programs on at most 4 warps in a second (N = 197 with 64-row blocks:
    192 + 16 rows of work instead of 256)."""
    if not row_tail or n % block == 0:
        return [(0, n, block, num_warps)]
    full = n // block * block
    return ([(0, full, block, num_warps)] if full else []) + [(full, n - full, row_tail, min(num_warps, 4))]


def stat_rows(n: int) -> int:
    """Rows of per-row statistics (lse2, delta) a (batch, head): N rounded up to a multiple of
    16, so that each (batch, head)'s rows start 64-byte aligned and the backward reads them
    without a mask inside 16-row groups (at N 197 they were read 4 bytes a lane). The rows past
    N hold finite values: zero queries' log-sum-exp, a zero delta."""
    return cdiv(n, 16) * 16


def _forward_qk_scale(scale: float) -> float:
    """The forward kernel's qk_scale: |scale| * log2(e), at least 1e-30 so that a masked key's
    -inf score times it stays -inf (0 * -inf would be NaN). At scale 0 the scores times 1e-30
    round to 0 in fp32 (exp2 of them is exactly 1 for any score below 1e20): uniform weights, as
    softmax(0 * s) gives."""
    return max(abs(scale), 1e-30) * LOG2E


def _bhnd_like(q: torch.Tensor) -> torch.Tensor:
    # (B, H, N, D) view of a (B, N, H, D) buffer: the block's out-projection
    # reads out.transpose(1, 2).reshape(B, N, H * D) without a copy.
    b, h, n, d = q.shape
    return q.new_empty(b, n, h, d).transpose(1, 2)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns out (B, H, N, D) stored as (B, N, H, D), and lse2 (B, H, stat_rows(N)) fp32."""
    b, h, n, d = q.shape
    block_d = _pow2(d)  # D, or the next power of two >= 16 (zero-padded in registers)
    cfg = dict(config or forward_config(q))
    out = _bhnd_like(q)
    lse2 = torch.empty((b, h, stat_rows(n)), device=q.device, dtype=torch.float32)
    if q.numel() == 0:
        return out, lse2
    for row0, rows, block_m, warps in _row_launches(n, cfg["BLOCK_M"], cfg.get("ROW_TAIL", 0), cfg["num_warps"]):
        # each launch's programs cover whole multiples of 16 rows, so every row of lse2 is written
        if block_m % 16:
            raise ValueError(f"forward: row blocks must be multiples of 16 (got {block_m})")
        programs = cdiv(rows, block_m)
        wrap_triton(_attn_fwd)[(programs * b * h,)](
            q, k, v, out, lse2, _forward_qk_scale(scale),
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            h, n, stat_rows(n), row0, programs,
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], TAIL=cfg.get("TAIL", 0),
            NEG_SCALE=scale < 0, DOT_PRECISION=_dot_precision(q.dtype), num_warps=warps,
            num_stages=cfg["num_stages"],
        )
    return out, lse2


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             out: torch.Tensor, lse2: torch.Tensor, scale: float,
             config: dict | None = None,
             grads: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv, each (B, H, N, D) stored as (B, N, H, D), or written into `grads` (three
    (B, H, N, D) tensors of any strides, e.g. views of a packed (B, N, 3, H, D) gradient)."""
    b, h, n, d = q.shape
    if lse2.shape != (b, h, stat_rows(n)):
        raise ValueError(f"backward: lse2 must be the forward's, {(b, h, stat_rows(n))}; got {tuple(lse2.shape)}")
    block_d = _pow2(d)  # D, or the next power of two >= 16 (zero-padded in registers)
    cfg = dict(config or backward_config(q))
    dq_out, dk, dv = grads if grads is not None else (_bhnd_like(q), _bhnd_like(q), _bhnd_like(q))
    if dk.stride() != dv.stride():
        raise ValueError("backward: dk and dv must share their strides (the kernel addresses both with one set)")
    dq = dq_out
    if q.numel() == 0:
        return dq, dk, dv
    whole_head = cfg.get("WHOLE_HEAD", False)
    if whole_head and cfg.get("DQ_ATOMIC", False):
        raise ValueError("backward: WHOLE_HEAD and DQ_ATOMIC are two ways of summing dQ; choose one")
    # atomic dQ sums in a run-dependent order: not when PyTorch is asked for deterministic results
    dq_atomic = cfg.get("DQ_ATOMIC", False) and not torch.are_deterministic_algorithms_enabled()
    if dq_atomic and q.dtype == torch.float32:   # the kernel adds straight into dQ
        dq.zero_()
    elif dq_atomic:   # an fp32 buffer of dQ's layout that the kernel adds to, converted once after
        dq = q.new_zeros((b, n, h, d), dtype=torch.float32).transpose(1, 2)
    prec = _dot_precision(q.dtype)
    fused_delta = cfg.get("FUSED_DELTA", False)
    if fused_delta:   # the main kernel forms rowsum(dO * O) itself
        delta = lse2  # never read
    else:
        delta = torch.empty((b, h, stat_rows(n)), device=q.device, dtype=torch.float32)
        block_m = 64
        wrap_triton(_attn_bwd_delta)[(cdiv(n, block_m) * b * h,)](
            out, do, delta, *out.stride(), *do.stride(), h, n, stat_rows(n), cdiv(n, block_m),
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m,
        )
    # (first row, programs along the rows, rows a program, warps) of each launch
    if whole_head:   # one program a (batch, head), walking its key blocks; no row tails to split off
        launches = [(0, 1, cfg["BLOCK"], cfg["num_warps"])]
        dq_scratch = torch.empty((b * h, n, block_d), device=q.device, dtype=torch.float32)
    else:
        launches = [(row0, cdiv(rows, block), block, warps)
                    for row0, rows, block, warps in _row_launches(n, cfg["BLOCK"], cfg.get("ROW_TAIL", 0),
                                                                  cfg["num_warps"])]
        dq_scratch = lse2   # never read
    for row0, programs, block, warps in launches:
        wrap_triton(_attn_bwd_tiled)[(programs * b * h,)](
            q, k, v, do, out, dq, dk, dv, lse2, delta, dq_scratch, scale, scale * LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *out.stride(), *dq.stride(), *dk.stride(),
            h, n, stat_rows(n), row0, programs,
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK=block, BLOCK_STEP=cfg["BLOCK_STEP"], TAIL=cfg.get("TAIL", 0),
            FUSED_DELTA=fused_delta, DQ_ATOMIC=dq_atomic, WHOLE_HEAD=whole_head, DOT_PRECISION=prec, num_warps=warps,
            num_stages=cfg["num_stages"],
        )
    if dq is not dq_out:
        dq_out.copy_(dq)
    return dq_out, dk, dv
