"""The depthwise convolution on tensor cores: each kernel row as a batched matmul of input rows
by a banded (Toeplitz) matrix. The default for NCHW inputs at K >= 7 (see
triton.TOEPLITZ_MIN_K); triton.py holds the tap kernels and picks between them.

  _dwconv_fwd_toeplitz_kernel    y = act(bias + conv(x, w)); the input gradient is the same
                                 with w rotated by 180 degrees on the host (`conv_forward`)
  _dwconv_bwd_w_toeplitz_kernel  the weight gradient, as diagonals of per-window products
  _dwconv_fwd_stream_kernel      the forward streaming down the image with the K input rows in
                                 use held in registers: x read once, not K times ("stream")
  _dwconv_bwd_w_stream_kernel    the weight gradient streaming likewise, forming g itself
  _dwconv_bwd_w_reload_kernel    the same with g read from memory, each row once per product
                                 ("reload": no GELU to form, fewer conversions, see the kernel)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dispatch import wrap_triton
from kernels.gelu import gelu, gelu_grad
from kernels.grid import cdiv, next_pow2, split_units


@triton.jit
def _aligned(v, ROW_ALIGN: tl.constexpr):
    # v (the width or a row stride, a multiple of ROW_ALIGN: `_row_align`) restated so that
    # Triton knows it is one; it knows of an integer argument only whether it divides by 16
    return v // ROW_ALIGN * ROW_ALIGN


@triton.jit
def _dwconv_fwd_toeplitz_kernel(
    x_ptr, t_ptr, bias_ptr, y_ptr, z_ptr, add_ptr,
    B, C, H, W, n_th, n_tw,
    sxb, sxc, sxh, sxw,
    syb, syc, syh, syw,
    szb, szc, szh, szw,
    sab, sac, sah, saw,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, STORE_PREACT: tl.constexpr, HAS_ADD: tl.constexpr,
    BLOCK_C: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, KP: tl.constexpr, LEAD: tl.constexpr,
    ROW_ALIGN: tl.constexpr, IMAGES: tl.constexpr, IEEE: tl.constexpr, GATHER: tl.constexpr,
):
    # One program: BLOCK_C channels x a TILE_H x TILE_W output window of IMAGES images.
    # For kernel row i, the window is a matmul per channel: rows of the input
    # (M = IMAGES * TILE_H rows: the window's rows of each image, stacked; KP columns from LEAD
    # before the window: its TILE_W columns and the halo, see `_lead`) times that channel's
    # banded Toeplitz matrix T_i (KP, TILE_W), T_i[j, n] = w[i, j - n - (LEAD - PAD)]. The K
    # products run on tensor cores as one batched dot over the channel block. T comes from
    # memory (t_ptr: the (C, K, KP, TILE_W) matrices), or with GATHER is gathered from the
    # (C, K, K) weights themselves at t_ptr: K * K values a channel that stay in L1 instead of
    # K * KP * TILE_W read through L2. Stacking images makes each T_i load serve IMAGES times the outputs: at B256
    # C256 32x32 k9 with one image a program, the banded matrices, not x, are most of the
    # forward's reads (~2.4 GB from L2 against 0.4 GB of x, y and z). With HAS_ADD, y also gets the
    # tensor at add_ptr (the input gradient: the residual's gradient, see conv_backward's add_to_dx).
    M: tl.constexpr = IMAGES * TILE_H
    W, sxh, syh = _aligned(W, ROW_ALIGN), _aligned(sxh, ROW_ALIGN), _aligned(syh, ROW_ALIGN)
    szh, sah = _aligned(szh, ROW_ALIGN), _aligned(sah, ROW_ALIGN)
    pid = tl.program_id(0)
    tw = pid % n_tw
    th = (pid // n_tw) % n_th
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c3 = c[:, None, None]
    c_ok = c3 < C
    c64 = c3.to(tl.int64)
    PAD: tl.constexpr = K // 2
    r = tl.arange(0, M)[None, :, None]                                          # (1, M, 1)
    img = (pid // (n_tw * n_th) * IMAGES + r // TILE_H).to(tl.int64)
    h_out = th * TILE_H + r % TILE_H
    img_ok = img < B     # the last program's images may run past the batch
    j = tl.arange(0, KP)[None, None, :]                                         # (1, 1, KP)
    col = tw * TILE_W + j - LEAD
    col_ok = (col >= 0) & (col < W)
    n = tl.arange(0, TILE_W)[None, None, :]
    w_out = tw * TILE_W + n
    out_ok = c_ok & img_ok & (h_out < H) & (w_out < W)
    t_base = (t_ptr + c64 * (K * KP * TILE_W)
              + tl.arange(0, KP)[None, :, None] * TILE_W + tl.arange(0, TILE_W)[None, None, :])
    x_base = x_ptr + img * sxb + c64 * sxc + col * sxw
    acc = tl.zeros((BLOCK_C, M, TILE_W), dtype=tl.float32)
    for i in range(K):
        row = h_out + (i - PAD)
        xv = tl.load(x_base + row * sxh, mask=img_ok & c_ok & col_ok & (row >= 0) & (row < H), other=0.0)
        if GATHER:
            tv = _banded_row(t_ptr, c64, c_ok, i, K, KP, TILE_W, LEAD).to(x_ptr.dtype.element_ty)
        else:
            tv = tl.load(t_base + i * (KP * TILE_W), mask=c_ok, other=0.0)
        if IEEE:
            acc = tl.dot(xv, tv, acc, input_precision="ieee")
        else:
            acc = tl.dot(xv, tv, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c3, mask=c_ok, other=0.0).to(tl.float32)
    if STORE_PREACT:
        tl.store(z_ptr + img * szb + c64 * szc + h_out * szh + w_out * szw,
                 acc.to(z_ptr.dtype.element_ty), mask=out_ok)
    if GELU:
        acc = gelu(acc)
    if HAS_ADD:
        acc += tl.load(add_ptr + img * sab + c64 * sac + h_out * sah + w_out * saw, mask=out_ok,
                       other=0.0).to(tl.float32)
    tl.store(y_ptr + img * syb + c64 * syc + h_out * syh + w_out * syw,
             acc.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _window(u, n_th, n_tw, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    # (image, first row, first column) of work unit u: windows row-major, image by image
    return (u // (n_tw * n_th)).to(tl.int64), ((u // n_tw) % n_th) * TILE_H, (u % n_tw) * TILE_W


@triton.jit
def _dwconv_bwd_w_toeplitz_kernel(
    x_ptr, g_ptr, dw_part_ptr,
    C, H, W, n_th, n_tw, UNITS, UNITS_PER_PROG,
    sxb, sxc, sxh, sxw,
    sgb, sgc, sgh, sgw,
    K: tl.constexpr, BLOCK_C: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, KP: tl.constexpr,
    LEAD: tl.constexpr, ROW_ALIGN: tl.constexpr, IEEE: tl.constexpr,
):
    # Weight gradient on tensor cores. For kernel row i and one window (unit):
    # P[c, n, j] = sum_m g[h0 + m, w0 + n] * x[h0 + m + i - PAD, w0 + j - LEAD], a batched
    # (TILE_W, TILE_H) @ (TILE_H, KP) product per channel, summed over this program's
    # units; then dw[c, i, kj] = sum_n P[c, n, n + kj + LEAD - PAD], the kj-th diagonal. Each program
    # writes one partial per (channel, tap); the launcher sums them in a fixed order.
    W, sxh, sgh = _aligned(W, ROW_ALIGN), _aligned(sxh, ROW_ALIGN), _aligned(sgh, ROW_ALIGN)
    split = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c3 = c[:, None, None]
    c_ok = c3 < C
    c64 = c3.to(tl.int64)
    PAD: tl.constexpr = K // 2
    n_g = tl.arange(0, TILE_W)[None, :, None]        # G^T rows: output columns
    m_g = tl.arange(0, TILE_H)[None, None, :]        # G^T columns: output rows
    m_x = tl.arange(0, TILE_H)[None, :, None]
    j_x = tl.arange(0, KP)[None, None, :]
    diag = tl.arange(0, KP)[None, None, :] - tl.arange(0, TILE_W)[None, :, None] - (LEAD - PAD)   # tap
    u_end = tl.minimum(split * UNITS_PER_PROG + UNITS_PER_PROG, UNITS)
    for i in range(K):
        p = tl.zeros((BLOCK_C, TILE_W, KP), dtype=tl.float32)
        for u in range(split * UNITS_PER_PROG, u_end):
            img, h0, w0 = _window(u, n_th, n_tw, TILE_H, TILE_W)
            gt = tl.load(g_ptr + img * sgb + c64 * sgc + (h0 + m_g) * sgh + (w0 + n_g) * sgw,
                         mask=c_ok & (h0 + m_g < H) & (w0 + n_g < W), other=0.0)
            row = h0 + m_x + (i - PAD)
            col = w0 + j_x - LEAD
            ok = c_ok & (row >= 0) & (row < H) & (col >= 0) & (col < W)
            xv = tl.load(x_ptr + img * sxb + c64 * sxc + row * sxh + col * sxw, mask=ok, other=0.0)
            if IEEE:
                p = tl.dot(gt, xv, p, input_precision="ieee")
            else:
                p = tl.dot(gt, xv, p)
        base = dw_part_ptr + (split.to(tl.int64) * C + c) * (K * K) + i * K
        for kj in tl.static_range(K):
            tl.store(base + kj, tl.sum(tl.sum(tl.where(diag == kj, p, 0.0), axis=2), axis=1), mask=c < C)


@triton.jit
def _output_grad_inputs(dy_ptrs, z_ptrs, ok, GELU: tl.constexpr):
    # what a tile of the output gradient is formed from: dy, and z with GELU (else dy again)
    dy = tl.load(dy_ptrs, mask=ok, other=0.0)
    if GELU:
        return dy, tl.load(z_ptrs, mask=ok, other=0.0)
    return dy, dy


@triton.jit
def _form_output_grad(dy, z, g_ptrs, ok, GELU: tl.constexpr, STORE_G: tl.constexpr):
    # a tile of the output gradient g: dy * gelu'(z) with GELU (written to g if STORE_G), else
    # dy; in the input's dtype for the tensor cores and in fp32 for the bias gradient (summed
    # before rounding, as the tap kernel sums it)
    g = dy
    g32 = g.to(tl.float32)
    if GELU:
        g32 = g32 * gelu_grad(z.to(tl.float32))
        g = g32.to(g_ptrs.dtype.element_ty)
        if STORE_G:
            tl.store(g_ptrs, g, mask=ok)
    return g, g32


@triton.jit
def _output_grad(dy_ptrs, z_ptrs, g_ptrs, ok, GELU: tl.constexpr, STORE_G: tl.constexpr):
    # `_form_output_grad` of the tile at dy_ptrs (and z_ptrs)
    dy, z = _output_grad_inputs(dy_ptrs, z_ptrs, ok, GELU)
    return _form_output_grad(dy, z, g_ptrs, ok, GELU, STORE_G)


@triton.jit
def _banded_row(w_ptr, c64, c_ok, i, K: tl.constexpr, KP: tl.constexpr, TILE_W: tl.constexpr,
                LEAD: tl.constexpr):
    # kernel row i's banded matrix of a channel block, T_i[j, n] = w[c, i, tap], tap = j - n -
    # (LEAD - K // 2), inside the band 0 <= tap < K, else 0, gathered from the (C, K, K) weights
    # as a (BLOCK_C, KP, TILE_W) tensor. (The input gradient's rotated kernel is rotated on the
    # host: indexing it here as w[c, K - 1 - i, K - 1 - tap] made the address decrease along j,
    # which Triton's contiguity analysis cannot see, and the streaming kernel then fed its dots
    # through scalar shared-memory loads: 68 instead of 180 HMMA and 288 instead of 37 LDS in
    # its sm_90 SASS, Triton 3.6; on an H100, forward+backward at B256 C256 32x32 k9 with it as
    # the input gradient took ~1,650 us more than its forward and weight gradient alone.)
    tap = tl.arange(0, KP)[None, :, None] - tl.arange(0, TILE_W)[None, None, :] - (LEAD - K // 2)
    band = c_ok & (tap >= 0) & (tap < K)
    return tl.load(w_ptr + c64 * (K * K) + i * K + tap, mask=band, other=0.0)


@triton.jit
def _banded_rows(w_ptr, c64, c_ok, dtype, K: tl.constexpr, KP: tl.constexpr, TILE_W: tl.constexpr,
                 LEAD: tl.constexpr):
    # all K of them (`_banded_row`), as a tuple, in the activations' dtype
    ts = ()
    for i in tl.static_range(K):
        ts = ts + (_banded_row(w_ptr, c64, c_ok, i, K, KP, TILE_W, LEAD).to(dtype),)
    return ts


@triton.jit
def _add_input_row(accs, xr, ts, K: tl.constexpr, IEEE: tl.constexpr):
    # input row r's share of output rows r - PAD .. r + PAD (accs[m] is row r - PAD + m, which
    # takes r through kernel row K - 1 - m): K products of the same operand
    new = ()
    for m in tl.static_range(K):
        if IEEE:
            new = new + (tl.dot(xr, ts[K - 1 - m], accs[m], input_precision="ieee"),)
        else:
            new = new + (tl.dot(xr, ts[K - 1 - m], accs[m]),)
    return new


@triton.jit
def _dwconv_fwd_stream_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, z_ptr, add_ptr,
    B, C, H, W, n_th, n_tw, ROWS,
    sxb, sxc, sxh, sxw,
    syb, syc, syh, syw,
    szb, szc, szh, szw,
    sab, sac, sah, saw,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, STORE_PREACT: tl.constexpr,
    HAS_ADD: tl.constexpr, BLOCK_C: tl.constexpr, TILE_W: tl.constexpr, KP: tl.constexpr, LEAD: tl.constexpr,
    ROW_ALIGN: tl.constexpr, IMAGES: tl.constexpr, IEEE: tl.constexpr,
):
    # The Toeplitz forward streaming down the image: one program, BLOCK_C channels x IMAGES
    # images x a TILE_W-wide column window x ROWS output rows. Output row h of every image at
    # once is sum_i X_{h+i-PAD} @ T_i, X_r the (IMAGES, KP) block of input row r (the window's
    # columns plus the halo) and T_i channel c's banded matrix of kernel row i. The program
    # walks the input rows, each loaded once and multiplied into the K output rows it feeds,
    # whose accumulators stay in registers (a tuple, oldest first); the oldest is then complete
    # and stored. _dwconv_fwd_toeplitz_kernel instead reads each input row once per kernel row
    # (K times) and converts it for the tensor cores each time. The banded matrices are built
    # once a program. X_r's KP columns start LEAD before the window (`_lead`). With HAS_ADD a
    # tensor like y is added last (a residual's gradient into the input gradient).
    W, sxh, syh = _aligned(W, ROW_ALIGN), _aligned(sxh, ROW_ALIGN), _aligned(syh, ROW_ALIGN)
    szh, sah = _aligned(szh, ROW_ALIGN), _aligned(sah, ROW_ALIGN)
    pid = tl.program_id(0)
    tw = pid % n_tw
    th = (pid // n_tw) % n_th
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c3 = c[:, None, None]
    c_ok = c3 < C
    c64 = c3.to(tl.int64)
    PAD: tl.constexpr = K // 2
    img = (pid // (n_tw * n_th) * IMAGES + tl.arange(0, IMAGES))[None, :, None].to(tl.int64)
    j = tl.arange(0, KP)[None, None, :]
    col = tw * TILE_W + j - LEAD
    x_ok = c_ok & (img < B) & (col >= 0) & (col < W)
    x_base = x_ptr + img * sxb + c64 * sxc + col * sxw
    w_out = tw * TILE_W + tl.arange(0, TILE_W)[None, None, :]
    out_ok = c_ok & (img < B) & (w_out < W)
    y_base = y_ptr + img * syb + c64 * syc + w_out * syw
    z_base = z_ptr + img * szb + c64 * szc + w_out * szw
    add_base = add_ptr + img * sab + c64 * sac + w_out * saw
    ts = _banded_rows(w_ptr, c64, c_ok, x_ptr.dtype.element_ty, K, KP, TILE_W, LEAD)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c3, mask=c_ok, other=0.0).to(tl.float32)
    h0 = th * ROWS
    h1 = tl.minimum(h0 + ROWS, H)
    zero = tl.zeros((BLOCK_C, IMAGES, TILE_W), dtype=tl.float32)
    accs = ()
    for m in tl.static_range(K):
        accs = accs + (zero,)
    # the first 2 * PAD input rows complete no output row of this program
    for r in range(h0 - PAD, h0 + PAD):
        xr = tl.load(x_base + r * sxh, mask=x_ok & (r >= 0) & (r < H), other=0.0)
        accs = _add_input_row(accs, xr, ts, K, IEEE)[1:] + (zero,)
    for r in range(h0 + PAD, h1 + PAD):
        xr = tl.load(x_base + r * sxh, mask=x_ok & (r < H), other=0.0)
        accs = _add_input_row(accs, xr, ts, K, IEEE)
        acc = accs[0]    # output row r - PAD: complete
        accs = accs[1:] + (zero,)
        if HAS_BIAS:
            acc += bias
        if STORE_PREACT:
            tl.store(z_base + (r - PAD) * szh, acc.to(z_ptr.dtype.element_ty), mask=out_ok)
        if GELU:
            acc = gelu(acc)
        if HAS_ADD:
            acc += tl.load(add_base + (r - PAD) * sah, mask=out_ok, other=0.0).to(tl.float32)
        tl.store(y_base + (r - PAD) * syh, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _zero_products(K: tl.constexpr, KP: tl.constexpr, TILE_W: tl.constexpr):
    # the streaming weight gradients' K products Q_0 .. Q_{K-1}, (KP, TILE_W) fp32 each, zeroed
    qs = ()
    for i in tl.static_range(K):
        qs = qs + (tl.zeros((KP, TILE_W), dtype=tl.float32),)
    return qs


@triton.jit
def _stream_unit(u, n_tw, B, W, x_ptr, c64, sxb, sxc, sxw, TILE_W: tl.constexpr, KP: tl.constexpr,
                 LEAD: tl.constexpr, IMAGES: tl.constexpr):
    # unit u of the streaming weight gradients (IMAGES images x a TILE_W-wide column window):
    # the images (IMAGES, 1) and output columns (1, TILE_W) of its output-gradient tiles and
    # which of them exist; the pointers (row 0) and mask of its input tiles X^T, (KP, IMAGES):
    # the window's columns from LEAD before it
    w0 = (u % n_tw) * TILE_W
    img_g = ((u // n_tw) * IMAGES + tl.arange(0, IMAGES)[:, None]).to(tl.int64)
    col_g = w0 + tl.arange(0, TILE_W)[None, :]
    img_x = ((u // n_tw) * IMAGES + tl.arange(0, IMAGES)[None, :]).to(tl.int64)
    col_x = w0 + tl.arange(0, KP)[:, None] - LEAD
    x_ok = (img_x < B) & (col_x >= 0) & (col_x < W)
    return img_g, col_g, (img_g < B) & (col_g < W), x_ptr + img_x * sxb + c64 * sxc + col_x * sxw, x_ok


@triton.jit
def _dwconv_bwd_w_stream_kernel(
    x_ptr, dy_ptr, z_ptr, g_ptr, dw_part_ptr, db_part_ptr,
    B, C, H, W, n_tw, UNITS, UNITS_PER_PROG,
    sxb, sxc, sxh, sxw,
    syb, syc, syh, syw,
    szb, szc, szh, szw,
    sgb, sgc, sgh, sgw,
    K: tl.constexpr, KB: tl.constexpr, TILE_W: tl.constexpr, KP: tl.constexpr, LEAD: tl.constexpr,
    ROW_ALIGN: tl.constexpr, IMAGES: tl.constexpr, GELU: tl.constexpr, STORE_G: tl.constexpr,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
):
    # The weight gradient streaming down the image, one channel a program. A unit is IMAGES
    # images x a TILE_W-wide column window, all rows. For kernel row i,
    # Q_i[j, n] = sum_{img, h} x[img, h + i - PAD, w0 + j - LEAD] * g[img, h, w0 + n]; walking
    # the input rows r, Q_i += X_r^T @ G_{r-i+PAD}, a (KP, IMAGES) @ (IMAGES, TILE_W) product.
    # Each input row is loaded (and converted for the tensor cores) once for its K products;
    # the K output-gradient rows it meets, G_{r-PAD} .. G_{r+PAD}, the smaller operands, stay
    # in registers (a tuple, oldest first), each formed once: g = dy * gelu'(z) with GELU
    # (stored for the input gradient's pass if STORE_G), else dy; with HAS_BIAS their sum is
    # the bias partial. After the program's units, dw[i, kj] = sum_n Q_i[n + kj + LEAD - PAD, n],
    # the kj-th diagonal.
    W, sxh, syh = _aligned(W, ROW_ALIGN), _aligned(sxh, ROW_ALIGN), _aligned(syh, ROW_ALIGN)
    szh, sgh = _aligned(szh, ROW_ALIGN), _aligned(sgh, ROW_ALIGN)
    split = tl.program_id(0)
    c = tl.program_id(1)
    c64 = c.to(tl.int64)
    PAD: tl.constexpr = K // 2
    qs = _zero_products(K, KP, TILE_W)
    db = tl.zeros((IMAGES, TILE_W), dtype=tl.float32)
    for u in range(split * UNITS_PER_PROG, tl.minimum(split * UNITS_PER_PROG + UNITS_PER_PROG, UNITS)):
        img_g, col_g, g_ok, x_base, x_ok = _stream_unit(u, n_tw, B, W, x_ptr, c64, sxb, sxc, sxw,
                                                        TILE_W, KP, LEAD, IMAGES)
        dy_base = dy_ptr + img_g * syb + c64 * syc + col_g * syw
        z_base = z_ptr + img_g * szb + c64 * szc + col_g * szw
        g_base = g_ptr + img_g * sgb + c64 * sgc + col_g * sgw
        gs = ()    # output-gradient rows r - PAD .. r + PAD - 1 on entry to step r
        for m in tl.static_range(K - 1):
            gs = gs + (tl.zeros((IMAGES, TILE_W), dtype=g_ptr.dtype.element_ty),)
        for h in range(0, PAD):
            gr, g32 = _output_grad(dy_base + h * syh, z_base + h * szh, g_base + h * sgh, g_ok & (h < H),
                                   GELU, STORE_G)
            if HAS_BIAS:
                db += g32
            gs = gs[1:] + (gr,)
        # each step's loads are issued a step ahead, into registers: Triton does not pipeline this
        # loop's loads (sm_90 TTGIR, Triton 3.6: synchronous loads), so without the prefetch every
        # row would wait out a round trip to memory before its K small products
        dy_next, z_next = _output_grad_inputs(dy_base + PAD * syh, z_base + PAD * szh, g_ok & (PAD < H), GELU)
        xt_next = tl.load(x_base, mask=x_ok, other=0.0)
        for r in range(0, H):
            h = r + PAD
            dy_r, z_r, xt = dy_next, z_next, xt_next
            dy_next, z_next = _output_grad_inputs(dy_base + (h + 1) * syh, z_base + (h + 1) * szh,
                                                  g_ok & (h + 1 < H), GELU)
            xt_next = tl.load(x_base + (r + 1) * sxh, mask=x_ok & (r + 1 < H), other=0.0)
            gr, g32 = _form_output_grad(dy_r, z_r, g_base + h * sgh, g_ok & (h < H), GELU, STORE_G)
            if HAS_BIAS:
                db += g32
            gs = gs + (gr,)
            new = ()
            for i in tl.static_range(K):
                if IEEE:
                    new = new + (tl.dot(xt, gs[K - 1 - i], qs[i], input_precision="ieee"),)
                else:
                    new = new + (tl.dot(xt, gs[K - 1 - i], qs[i]),)
            qs = new
            gs = gs[1:]
    if HAS_BIAS:
        tl.store(db_part_ptr + split.to(tl.int64) * C + c, tl.sum(tl.sum(db, axis=1), axis=0))
    _store_diagonals(qs, dw_part_ptr + (split.to(tl.int64) * C + c) * (K * K), K, KB, KP, TILE_W, LEAD)


@triton.jit
def _store_diagonals(qs, dw_ptr, K: tl.constexpr, KB: tl.constexpr, KP: tl.constexpr, TILE_W: tl.constexpr,
                     LEAD: tl.constexpr):
    # the K * K weight-gradient values at dw_ptr from the streaming kernel's products:
    # dw[i, kj] = sum_n qs[i][n + kj + LEAD - PAD, n], the kj-th diagonal; all K diagonals of a
    # product in one reduction (K reductions, not K * K)
    kj = tl.arange(0, KB)
    tap = tl.arange(0, KP)[:, None] - tl.arange(0, TILE_W)[None, :] - (LEAD - K // 2)
    on_diag = tap[None, :, :] == kj[:, None, None]                              # (KB, KP, TILE_W)
    for i in tl.static_range(K):
        dw_row = tl.sum(tl.sum(tl.where(on_diag, qs[i][None, :, :], 0.0), axis=2), axis=1)
        tl.store(dw_ptr + i * K + kj, dw_row, mask=kj < K)


@triton.jit
def _dwconv_bwd_w_reload_kernel(
    x_ptr, g_ptr, q_part_ptr, db_part_ptr,
    B, C, H, W, n_tw, UNITS, UNITS_PER_PROG,
    sxb, sxc, sxh, sxw,
    sgb, sgc, sgh, sgw,
    K: tl.constexpr, TILE_W: tl.constexpr, KP: tl.constexpr, LEAD: tl.constexpr,
    ROW_ALIGN: tl.constexpr, IMAGES: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
):
    # The streaming weight gradient (same units, same products Q_i += X_r^T @ G_{r-i+PAD}) with
    # the output gradient g read from memory, and each of its rows read again for each of its K
    # products instead of held in registers. Held rows are converted for the tensor cores once
    # a product, through shared memory with two barriers each (sm_90 SASS, Triton 3.6, B256 C256
    # 32x32 k9: 9 conversions and 18 barriers an input row); rows loaded right before their dot
    # are pipelined by Triton into asynchronous copies to shared memory (10 copies and 2
    # barriers an input row). The K reads of a row after the first come from L1/L2. With
    # HAS_BIAS, the bias partial sums each row once (its read for Q_PAD). The program stores
    # its K products themselves, not their diagonals: the launcher adds the splits up and reads
    # the diagonals as one strided view (`_diagonals`). Extracted here, as the streaming kernel
    # does, they compile to ~8,000 instructions a warp, 10-25% of a program's work at the
    # benchmark shapes.
    W, sxh, sgh = _aligned(W, ROW_ALIGN), _aligned(sxh, ROW_ALIGN), _aligned(sgh, ROW_ALIGN)
    split = tl.program_id(0)
    c = tl.program_id(1)
    c64 = c.to(tl.int64)
    PAD: tl.constexpr = K // 2
    qs = _zero_products(K, KP, TILE_W)
    db = tl.zeros((IMAGES, TILE_W), dtype=tl.float32)
    for u in range(split * UNITS_PER_PROG, tl.minimum(split * UNITS_PER_PROG + UNITS_PER_PROG, UNITS)):
        img_g, col_g, g_ok, x_base, x_ok = _stream_unit(u, n_tw, B, W, x_ptr, c64, sxb, sxc, sxw,
                                                        TILE_W, KP, LEAD, IMAGES)
        g_base = g_ptr + img_g * sgb + c64 * sgc + col_g * sgw
        for r in range(0, H):
            xt = tl.load(x_base + r * sxh, mask=x_ok, other=0.0)             # (KP, IMAGES)
            new = ()
            for i in tl.static_range(K):
                h = r - i + PAD
                gr = tl.load(g_base + h * sgh, mask=g_ok & (h >= 0) & (h < H), other=0.0)   # (IMAGES, TILE_W)
                if HAS_BIAS and i == PAD:
                    db += gr.to(tl.float32)
                if IEEE:
                    new = new + (tl.dot(xt, gr, qs[i], input_precision="ieee"),)
                else:
                    new = new + (tl.dot(xt, gr, qs[i]),)
            qs = new
    if HAS_BIAS:
        tl.store(db_part_ptr + split.to(tl.int64) * C + c, tl.sum(tl.sum(db, axis=1), axis=0))
    q_out = (q_part_ptr + (split.to(tl.int64) * C + c) * (K * KP * TILE_W)
             + tl.arange(0, KP)[:, None] * TILE_W + tl.arange(0, TILE_W)[None, :])
    for i in tl.static_range(K):
        tl.store(q_out + i * (KP * TILE_W), qs[i])


# ----------------------------------------------------------------------------- launchers

@triton.jit
def _banded_kernel(w_ptr, t_ptr, K: tl.constexpr, KP: tl.constexpr, TILE_W: tl.constexpr, LEAD: tl.constexpr):
    # one program: channel c's banded matrix of kernel row i (`_banded_row`, a block of one channel)
    c = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1)
    c64 = tl.full((1, 1, 1), c, tl.int64)
    v = _banded_row(w_ptr, c64, c64 >= 0, i, K, KP, TILE_W, LEAD)                   # (1, KP, TILE_W)
    jn = tl.arange(0, KP)[None, :, None] * TILE_W + tl.arange(0, TILE_W)[None, None, :]
    tl.store(t_ptr + (c * K + i) * (KP * TILE_W) + jn, v.to(t_ptr.dtype.element_ty))


def toeplitz_matrices(weight: torch.Tensor, tile_w: int, kp: int, dtype: torch.dtype,
                      lead: int | None = None) -> torch.Tensor:
    """(C, K, KP, TILE_W) banded matrices: T[c, i, j, n] = w[c, i, tap] for 0 <= tap < K, else 0,
    tap = j - n - (lead - K // 2) (`lead`: where the window's input columns start, K // 2 by default).

    One launch: built with PyTorch ops it took about ten kernels and ~150 us of host time a call."""
    C, K = weight.shape[0], weight.shape[-1]
    t = torch.empty((C, K, kp, tile_w), device=weight.device, dtype=dtype)
    if C:
        wrap_triton(_banded_kernel)[(C, K)](weight.reshape(C, K * K).contiguous(), t,
                                           K=K, KP=kp, TILE_W=tile_w, LEAD=K // 2 if lead is None else lead,
                                           num_warps=1)
    return t


def _tiles(x: torch.Tensor, K: int, tile: dict) -> tuple[int, int, int, int, int, int]:
    """(TILE_W, TILE_H, KP, BLOCK_C, row tiles, column tiles) of both Toeplitz kernels: windows of
    at most 32 x 32 outputs (at least 16: the smallest tensor-core dot), KP = TILE_W plus the halo."""
    H, W = x.shape[-2:]
    tile_w = max(16, min(next_pow2(W), tile.get("TILE_W", 32)))
    tile_h = max(16, min(next_pow2(H), tile.get("TILE_H", 32)))
    kp = max(16, next_pow2(tile_w + K - 1))
    return tile_w, tile_h, kp, tile.get("BLOCK_C", 8), cdiv(H, tile_h), cdiv(W, tile_w)


def _lead(x: torch.Tensor, K: int, tile_w: int, kp: int) -> int:
    """How many input columns before its window a program's KP-column rows start: K // 2 (the
    halo) rounded up to 16 bytes of elements, when that still fits the window and the halo after
    it in KP columns (always, at TILE_W 16 or 32 and K <= 15), else K // 2. Why: a row load
    starting at the halo (window start - K // 2) is aligned to K // 2 elements at best, so
    Triton split it into 2-byte (k7, k3) or 8-byte (k9) loads, and those under 4 bytes outside
    the async-copy pipeline (sm_90 SASS); a 16-byte-aligned start (with rows whose pitch is a
    multiple of 16 elements) lets every load be 16 bytes and pipelined. The extra columns meet
    zeros in the banded matrices: same products, same KP."""
    pad = K // 2
    align = max(1, 16 // x.element_size())
    lead = -(-pad // align) * align
    return lead if lead + tile_w + pad <= kp else pad


def _row_align(x: torch.Tensor, *tensors: torch.Tensor) -> int:
    """The largest power of two, up to 16 bytes of elements, that divides the width and the row
    stride of x and of every tensor given; the kernels restate the width and row strides as
    multiples of it (`_aligned`). Why: Triton knows of an integer argument only
    whether it is a multiple of 16, so a 28-wide image's rows (a pitch of 28 elements) looked
    unaligned and every row was loaded and stored 2 bytes a lane, outside the async-copy
    pipeline; as multiples of 4 they go 8 bytes a lane, pipelined (sm_90 SASS)."""
    align = max(1, 16 // x.element_size())
    while align > 1 and any(v % align for v in (x.shape[-1], *(t.stride(-2) for t in (x, *tensors)))):
        align //= 2
    return align


def conv_forward(x, weight, bias, y, z, *, gelu: bool, flip: bool, tile: dict, add=None) -> None:
    """The tensor-core formulation: the default for NCHW at K >= 7 (TOEPLITZ_FORWARD), else
    selectable through `tile`. A tile without BLOCK_C / TILE_H / num_warps gets 8 channels
    x 32 x 32 outputs on 8 warps (238 registers on sm_90, no spills). With "IMAGES" (a power
    of two), each program stacks the rows of its window in that many images into one matmul
    (one image by default). With "copy_to_nchw", a
    channels_last x is read from a contiguous copy (the kernel's loads run along W) and y, z
    keep their own strides. With `flip` (the input gradient) the kernel is rotated by 180
    degrees here, a (C, K, K) copy, so that every launch runs the forward's code (see
    `_banded_row`)."""
    B, C, H, W = x.shape
    K = weight.shape[-1]
    if flip:
        weight = weight.flip((-2, -1))
    if tile.get("copy_to_nchw"):
        x = x.contiguous()
    if tile.get("stream"):
        _stream_forward(x, weight, bias, y, z, gelu=gelu, tile=tile, add=add)
        return
    tile_w, tile_h, kp, block_c, n_th, n_tw = _tiles(x, K, tile)
    lead = _lead(x, K, tile_w, kp)
    gather = tile.get("gather", False)
    # with "gather" the kernel reads the banded matrices' entries from the weights directly
    t = (weight.reshape(C, K * K).contiguous() if gather
         else toeplitz_matrices(weight, tile_w, kp, x.dtype, lead))
    zz = y if z is None else z
    aa = y if add is None else add
    images = min(next_pow2(tile.get("IMAGES", 1)), next_pow2(B))   # M = IMAGES * TILE_H: a power of two
    wrap_triton(_dwconv_fwd_toeplitz_kernel)[(cdiv(B, images) * n_th * n_tw, cdiv(C, block_c))](
        x, t, x if bias is None else bias, y, zz, aa,
        B, C, H, W, n_th, n_tw,
        *x.stride(), *y.stride(), *zz.stride(), *aa.stride(),
        K=K, HAS_BIAS=bias is not None, GELU=gelu, STORE_PREACT=z is not None, HAS_ADD=add is not None,
        BLOCK_C=block_c, TILE_H=tile_h, TILE_W=tile_w, KP=kp, LEAD=lead, ROW_ALIGN=_row_align(x, y, zz, aa),
        IMAGES=images,
        IEEE=x.dtype == torch.float32, GATHER=gather, num_warps=tile.get("num_warps", 8),
    )


def stream_supported() -> bool:
    """The streaming kernels keep their rows in flight in tuples, which Triton compiles from
    3.3 on (3.2 rejects them; its interpreter runs them)."""
    from kernels.dispatch import interpreter_mode

    return interpreter_mode() or tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 3)


def _check_stream_supported() -> None:
    if not stream_supported():
        raise RuntimeError(f"the streaming dwconv2d kernels need Triton 3.3 or newer (installed: "
                           f"{triton.__version__}); use another launch configuration")


def _stream_tiles(x: torch.Tensor, K: int, tile: dict) -> tuple[int, int, int]:
    """(TILE_W, KP, IMAGES) of both streaming kernels: 16-wide column windows by default (a k9
    row's 24 inputs pad to 32 columns; 32-wide ones pad 40 to 64, twice the tensor-core work an
    output), IMAGES >= 16 (the smallest tensor-core dot; its M, or its K for the weight gradient)."""
    tile_w = max(16, min(next_pow2(x.shape[-1]), tile.get("TILE_W", 16)))
    return tile_w, max(16, next_pow2(tile_w + K - 1)), max(16, next_pow2(tile.get("IMAGES", 16)))


def _stream_forward(x, weight, bias, y, z, *, gelu: bool, tile: dict, add=None) -> None:
    """_dwconv_fwd_stream_kernel: BLOCK_C channels x IMAGES images x one column window a
    program, down ROWS rows (all by default; fewer give more programs, each re-reading K - 1
    rows of halo). By default 4 channels on 4 warps: Triton lays the warps of the batched dot
    along its channel axis (at M = IMAGES = 16 nothing else is left to split), so fewer
    channels than warps would have warps computing the same products (sm_90, Triton 3.6)."""
    _check_stream_supported()
    B, C, H, W = x.shape
    K = weight.shape[-1]
    tile_w, kp, images = _stream_tiles(x, K, tile)
    block_c = tile.get("BLOCK_C", 4)
    rows = min(H, tile.get("ROWS", H))
    n_th, n_tw = cdiv(H, rows), cdiv(W, tile_w)
    zz = y if z is None else z
    aa = y if add is None else add
    wrap_triton(_dwconv_fwd_stream_kernel)[(cdiv(B, images) * n_th * n_tw, cdiv(C, block_c))](
        x, weight.reshape(C, K * K).contiguous(), x if bias is None else bias, y, zz, aa,
        B, C, H, W, n_th, n_tw, rows,
        *x.stride(), *y.stride(), *zz.stride(), *aa.stride(),
        K=K, HAS_BIAS=bias is not None, GELU=gelu, STORE_PREACT=z is not None, HAS_ADD=add is not None,
        BLOCK_C=block_c, TILE_W=tile_w, KP=kp, LEAD=_lead(x, K, tile_w, kp), ROW_ALIGN=_row_align(x, y, zz, aa),
        IMAGES=images, IEEE=x.dtype == torch.float32,
        num_warps=tile.get("num_warps", block_c), num_stages=tile.get("num_stages", 2),
    )


_TARGET_PROGRAMS = 264  # ~2 per SM on an H100/H200: enough splits to fill the GPU


def forms_output_grad(tile: dict, gelu: bool) -> bool:
    """True when `weight_grad` with this tile takes the raw output gradient dy (and with `gelu` the
    pre-activation z) and forms what the tap kernel's pass over dy would: g = dy * gelu'(z) and
    the bias gradient (the streaming kernel). The re-reading one ("reload") reads g from memory:
    it forms the bias gradient, and only where there is no GELU (g is dy)."""
    if tile.get("stream") and tile.get("reload"):
        return not gelu
    return bool(tile.get("stream"))


def weight_grad(g: torch.Tensor, x: torch.Tensor, K: int, tile: dict, *, z: torch.Tensor | None = None,
                g_out: torch.Tensor | None = None, has_bias: bool = False):
    """(C, 1, K, K) fp32 weight gradient from the tensor-core kernel (from contiguous copies of
    g and x with "copy_to_nchw"). With "UNITS", each program sums that many windows; by default
    the windows are split over about _TARGET_PROGRAMS programs. With "stream",
    _dwconv_bwd_w_stream_kernel (see `_stream_weight_grad`), which alone also takes the raw
    output gradient in `g` with the pre-activation `z` (GELU: it writes g = dy * gelu'(z) into
    `g_out` unless that is None) and `has_bias` (see `forms_output_grad`); with "stream" and
    "reload", _dwconv_bwd_w_reload_kernel, which takes g itself and `has_bias`.

    Returns (dw, db): db (C,) fp32 when has_bias, else None."""
    if (z is not None or has_bias) and not forms_output_grad(tile, z is not None):
        raise ValueError("only the streaming weight-gradient kernels form g (without 'reload') and the bias gradient")
    B, C, H, W = x.shape
    if tile.get("copy_to_nchw"):
        g, x = g.contiguous(), x.contiguous()
        z = None if z is None else z.contiguous()
    if tile.get("stream"):
        return _stream_weight_grad(g, x, K, tile, z=z, g_out=g_out, has_bias=has_bias)
    tile_w, tile_h, kp, block_c, n_th, n_tw = _tiles(x, K, tile)
    units = B * n_th * n_tw
    n_cb = cdiv(C, block_c)
    if "UNITS" in tile:
        # a few windows a program: the K passes over them (one per kernel row) re-read g and x
        # from L1/L2; spread over ~2 programs an SM, each pass re-reads them from memory
        per_prog = min(tile["UNITS"], units)
        splits = cdiv(units, per_prog)
    else:
        splits, per_prog = split_units(units, n_cb, _TARGET_PROGRAMS)
    dw_part = torch.empty((splits, C, K * K), device=x.device, dtype=torch.float32)
    wrap_triton(_dwconv_bwd_w_toeplitz_kernel)[(splits, n_cb)](
        x, g, dw_part, C, H, W, n_th, n_tw, units, per_prog,
        *x.stride(), *g.stride(),
        K=K, BLOCK_C=block_c, TILE_H=tile_h, TILE_W=tile_w, KP=kp, LEAD=_lead(x, K, tile_w, kp),
        ROW_ALIGN=_row_align(x, g), IEEE=x.dtype == torch.float32, num_warps=tile.get("num_warps", 8),
    )
    return dw_part.sum(0).reshape(C, 1, K, K), None


def _diagonals(q: torch.Tensor, K: int, offset: int) -> torch.Tensor:
    """(C, K, K) weight gradient from the (C, K, KP, TILE_W) products the re-reading kernel stores:
    dw[c, i, kj] = sum_n q[c, i, n + kj + offset, n], the kj-th diagonal of each product (offset
    = LEAD - K // 2 >= 0, and n + kj + offset < KP by the choice of KP), read as one view (what
    `_store_diagonals` does inside the streaming kernel)."""
    C, _, _, tile_w = q.shape
    s0, s1, s2, s3 = q.stride()
    view = q.as_strided((C, K, K, tile_w), (s0, s1, s2, s2 + s3), q.storage_offset() + offset * s2)
    return view.sum(-1)


def _stream_weight_grad(dy, x, K: int, tile: dict, *, z, g_out, has_bias: bool):
    """_dwconv_bwd_w_stream_kernel: one channel a program, UNITS units (IMAGES images x one
    column window, all rows) each; by default the units are split over about
    2 * _TARGET_PROGRAMS programs (the diagonals at a program's end cost about one unit).
    Takes the raw output gradient and forms g itself (see `weight_grad`); with "reload",
    _dwconv_bwd_w_reload_kernel over the same units, g = dy (no GELU), its diagonals read
    here (`_diagonals`)."""
    _check_stream_supported()
    B, C, H, W = x.shape
    tile_w, kp, images = _stream_tiles(x, K, tile)
    n_tw = cdiv(W, tile_w)
    units = cdiv(B, images) * n_tw
    if "UNITS" in tile:
        per_prog = min(tile["UNITS"], units)
        splits = cdiv(units, per_prog)
    else:
        splits, per_prog = split_units(units, C, 2 * _TARGET_PROGRAMS)
    db_part = torch.empty((splits, C) if has_bias else (1,), device=x.device, dtype=torch.float32)
    if tile.get("reload"):
        lead = _lead(x, K, tile_w, kp)
        q_part = torch.empty((splits, C, K, kp, tile_w), device=x.device, dtype=torch.float32)
        # 2 warps at KP 32: each warp's share of a (KP, TILE_W) product is then one 16-row
        # tensor-core tile (with 4, sm_90 SASS shows each product's instructions issued twice)
        wrap_triton(_dwconv_bwd_w_reload_kernel)[(splits, C)](
            x, dy, q_part, db_part, B, C, H, W, n_tw, units, per_prog, *x.stride(), *dy.stride(),
            K=K, TILE_W=tile_w, KP=kp, LEAD=lead,
            ROW_ALIGN=_row_align(x, dy), IMAGES=images, HAS_BIAS=has_bias, IEEE=x.dtype == torch.float32,
            num_warps=tile.get("num_warps", max(1, kp // 16)), num_stages=tile.get("num_stages", 2),
        )
        dw = _diagonals(q_part.sum(0), K, lead - K // 2)
        return dw.reshape(C, 1, K, K), (db_part.sum(0) if has_bias else None)
    gelu = z is not None
    g_store = dy if g_out is None or not gelu else g_out
    zz = z if gelu else dy
    dw_part = torch.empty((splits, C, K * K), device=x.device, dtype=torch.float32)
    wrap_triton(_dwconv_bwd_w_stream_kernel)[(splits, C)](
        x, dy, zz, g_store, dw_part, db_part, B, C, H, W, n_tw, units, per_prog,
        *x.stride(), *dy.stride(), *zz.stride(), *g_store.stride(),
        K=K, KB=next_pow2(K), TILE_W=tile_w, KP=kp, LEAD=_lead(x, K, tile_w, kp),
        ROW_ALIGN=_row_align(x, dy, zz, g_store), IMAGES=images, GELU=gelu, STORE_G=gelu and g_out is not None,
        HAS_BIAS=has_bias, IEEE=x.dtype == torch.float32,
        num_warps=tile.get("num_warps", 4), num_stages=tile.get("num_stages", 2),
    )
    return dw_part.sum(0).reshape(C, 1, K, K), (db_part.sum(0) if has_bias else None)
