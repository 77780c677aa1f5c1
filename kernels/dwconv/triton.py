"""Triton kernels for the depthwise "same" convolution, and their launchers.

Two formulations. The tensor-core (Toeplitz) kernels in toeplitz.py, the default for
NCHW inputs at K >= 7 (see TOEPLITZ_MIN_K), turn each kernel row into a batched matmul
of input rows by a banded matrix. The tap kernels here, the default elsewhere, add
K * K shifted loads times one weight each; `forward_tile` and `weight_grad_tile` choose.

Both tap kernels work on one tile of shape (BLOCK_C, BLOCK_P): BLOCK_C channels by
BLOCK_P = BB * TILE_H * TILE_W pixels (BB images, a TILE_H x TILE_W window of
each). Every tensor is addressed through its own strides, so NCHW and
channels_last (and strided views) run through the same code; Triton
specializes a stride of 1, which lets it vectorize along whichever axis is
contiguous (W for NCHW, C for channels_last).

  _dwconv_fwd_kernel   y = act(bias + sum_taps w * x), fp32 accumulation. With
                       FLIP it correlates with the flipped kernel, which is the
                       input gradient: dx = conv(g, flip(w)).
  _dwconv_bwd_w_kernel g = dy * gelu'(z) (stored for the dx pass when GELU),
                       and per-program partial sums of the weight and bias
                       gradients; the launcher adds the partials in a fixed
                       order, so the result is deterministic (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import tuning
from kernels.dispatch import wrap_triton
from kernels.dwconv import toeplitz
from kernels.gelu import gelu, gelu_grad
from kernels.grid import cdiv, next_pow2


@triton.jit
def _tile_coords(pid, n_th, n_tw, BB: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    # program -> (batch group, tile row, tile col); pixel p -> (b, h, w)
    tw = pid % n_tw
    th = (pid // n_tw) % n_th
    bg = pid // (n_tw * n_th)
    p = tl.arange(0, BB * TILE_H * TILE_W)
    b = bg * BB + p // (TILE_H * TILE_W)
    h = th * TILE_H + (p // TILE_W) % TILE_H
    w = tw * TILE_W + p % TILE_W
    return b, h, w


@triton.jit
def _dwconv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, z_ptr, add_ptr,
    B, C, H, W, n_th, n_tw,
    sxb, sxc, sxh, sxw,
    syb, syc, syh, syw,
    szb, szc, szh, szw,
    sab, sac, sah, saw,
    K: tl.constexpr, FLIP: tl.constexpr, HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr, STORE_PREACT: tl.constexpr, HAS_ADD: tl.constexpr,
    BLOCK_C: tl.constexpr, BB: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
):
    b, h, w = _tile_coords(tl.program_id(0), n_th, n_tw, BB, TILE_H, TILE_W)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    tile_ok = c_ok[:, None] & ((b < B) & (h < H) & (w < W))[None, :]
    # 64-bit plane offsets: B * C * H * W can pass 2**31 on big batches
    b64 = b.to(tl.int64)
    c64 = c.to(tl.int64)
    x_plane = x_ptr + c64[:, None] * sxc + (b64 * sxb)[None, :]
    PAD: tl.constexpr = K // 2

    # -- accumulate taps: each x element of the tile + halo comes from L1/L2 --
    acc = tl.zeros((BLOCK_C, BB * TILE_H * TILE_W), dtype=tl.float32)
    for i in range(K):
        hi = h + (i - PAD)
        row_ok = tile_ok & ((hi >= 0) & (hi < H))[None, :]
        x_row = x_plane + (hi * sxh)[None, :]
        for j in tl.static_range(K):
            wj = w + (j - PAD)
            ok = row_ok & ((wj >= 0) & (wj < W))[None, :]
            xv = tl.load(x_row + (wj * sxw)[None, :], mask=ok, other=0.0).to(tl.float32)
            if FLIP:
                tap = (K - 1 - i) * K + (K - 1 - j)
            else:
                tap = i * K + j
            wv = tl.load(w_ptr + tap * C + c, mask=c_ok, other=0.0).to(tl.float32)
            acc += xv * wv[:, None]

    # -- epilogue: bias, keep the pre-activation for backward, GELU --
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    if STORE_PREACT:
        z_off = c64[:, None] * szc + (b64 * szb + h * szh + w * szw)[None, :]
        tl.store(z_ptr + z_off, acc.to(z_ptr.dtype.element_ty), mask=tile_ok)
    if GELU:
        acc = gelu(acc)
    if HAS_ADD:   # another path's share of y (the input gradient: the residual's gradient)
        a_off = c64[:, None] * sac + (b64 * sab + h * sah + w * saw)[None, :]
        acc += tl.load(add_ptr + a_off, mask=tile_ok, other=0.0).to(tl.float32)
    y_off = c64[:, None] * syc + (b64 * syb + h * syh + w * syw)[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _dwconv_bwd_w_kernel(
    x_ptr, dy_ptr, z_ptr, g_ptr, dw_part_ptr, db_part_ptr,
    B, C, H, W, n_th, n_tw,
    sxb, sxc, sxh, sxw,
    syb, syc, syh, syw,
    szb, szc, szh, szw,
    sgb, sgc, sgh, sgw,
    K: tl.constexpr, GELU: tl.constexpr, HAS_BIAS: tl.constexpr, NEED_DW: tl.constexpr,
    BLOCK_C: tl.constexpr, BB: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
):
    pid = tl.program_id(0)
    b, h, w = _tile_coords(pid, n_th, n_tw, BB, TILE_H, TILE_W)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    tile_ok = c_ok[:, None] & ((b < B) & (h < H) & (w < W))[None, :]
    b64 = b.to(tl.int64)
    c64 = c.to(tl.int64)

    # -- upstream gradient through GELU: g = dy * gelu'(z) --
    dy_off = c64[:, None] * syc + (b64 * syb + h * syh + w * syw)[None, :]
    g = tl.load(dy_ptr + dy_off, mask=tile_ok, other=0.0).to(tl.float32)
    if GELU:
        z_off = c64[:, None] * szc + (b64 * szb + h * szh + w * szw)[None, :]
        z = tl.load(z_ptr + z_off, mask=tile_ok, other=0.0).to(tl.float32)
        g = g * gelu_grad(z)
        g_off = c64[:, None] * sgc + (b64 * sgb + h * sgh + w * sgw)[None, :]
        tl.store(g_ptr + g_off, g.to(g_ptr.dtype.element_ty), mask=tile_ok)

    # -- partial sums of this program, laid out (program, tap, C) for coalesced stores --
    if HAS_BIAS:
        tl.store(db_part_ptr + pid.to(tl.int64) * C + c, tl.sum(g, axis=1), mask=c_ok)
    if NEED_DW:
        x_plane = x_ptr + c64[:, None] * sxc + (b64 * sxb)[None, :]
        PAD: tl.constexpr = K // 2
        for i in range(K):
            hi = h + (i - PAD)
            row_ok = tile_ok & ((hi >= 0) & (hi < H))[None, :]
            x_row = x_plane + (hi * sxh)[None, :]
            for j in tl.static_range(K):
                wj = w + (j - PAD)
                ok = row_ok & ((wj >= 0) & (wj < W))[None, :]
                xv = tl.load(x_row + (wj * sxw)[None, :], mask=ok, other=0.0).to(tl.float32)
                dst = dw_part_ptr + (pid.to(tl.int64) * (K * K) + (i * K + j)) * C + c
                tl.store(dst, tl.sum(g * xv, axis=1), mask=c_ok)


# ----------------------------------------------------------------------------- launchers

def _channels_last(x: torch.Tensor) -> bool:
    # channels contiguous (a single channel is contiguous either way: counted as NCHW)
    return x.stride(1) == 1 and x.shape[1] > 1


def _tiles(x: torch.Tensor, k: int, elems: int, c_bytes: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_C, BB, TILE_H, TILE_W, num_warps) for a tile of about `elems` elements.

    channels_last: channels are contiguous, so a tile spans `c_bytes` of channels
    (vector loads) and a compact spatial window (small halo). NCHW: a tile spans
    whole rows of one plane (W contiguous), then as many rows, images and
    channels as fit.
    """
    B, C, H, W = x.shape
    if k > 9:  # K loads of a kernel row are in flight at once: keep them in registers
        elems //= 2
    if _channels_last(x):
        block_c = min(next_pow2(C), max(1, c_bytes // x.element_size()))
        tile_w = min(next_pow2(W), 16)
        tile_h = min(next_pow2(H), max(1, elems // (block_c * tile_w)))
    else:
        block_c = 1
        tile_w = min(next_pow2(W), 64)
        tile_h = min(next_pow2(H), max(1, elems // tile_w))
    bb = min(next_pow2(B), max(1, elems // (block_c * tile_h * tile_w)))
    if block_c == 1:  # small NCHW planes: fill the tile with channels after images
        block_c = min(next_pow2(C), max(1, elems // (bb * tile_h * tile_w)))
    n = block_c * bb * tile_h * tile_w
    return block_c, bb, tile_h, tile_w, (8 if n >= 2048 else 4)


def _grid(x: torch.Tensor, block_c: int, bb: int, tile_h: int, tile_w: int):
    B, C, H, W = x.shape
    n_th, n_tw = cdiv(H, tile_h), cdiv(W, tile_w)
    return (cdiv(B, bb) * n_th * n_tw, cdiv(C, block_c)), n_th, n_tw


# The tensor-core (banded Toeplitz) kernels' launches where they are the default: NCHW
# with K >= 7. Their cost per output barely depends on K while the tap kernel's grows
# as K^2. Kernel alone on an H100 (bf16, CUDA-graph medians, 2026-11-27, second sweep), this
# forward against the tap kernel: 499 against 1,688 us (B256 C256 32x32 k9), 1,054 against
# 1,798 (B128 C768 32x32 k7), 1,251 against ~2,300 (B64 C1536 28x28 k9), within 10% of each
# shape's best; this weight gradient: 1,071 against 2,143, 1,734 against 2,474, 3,288 (the
# best) against ~4,000. On channels_last the Toeplitz forward lost to the tap kernel (2,187
# against 1,070 us: its loads run along channels, 8 to 16 at a time), so that layout keeps
# the tap kernel. K below 7 is not measured: it keeps the tap kernel too.
TOEPLITZ_MIN_K = 7
TOEPLITZ_FORWARD = {"method": "toeplitz", "BLOCK_C": 2, "TILE_H": 32, "TILE_W": 16, "num_warps": 4, "IMAGES": 4}
TOEPLITZ_WEIGHT_GRAD = {"method": "toeplitz", "BLOCK_C": 2, "TILE_H": 16, "num_warps": 4, "UNITS": 8}


def _toeplitz_default(x: torch.Tensor, k: int) -> bool:
    return not _channels_last(x) and k >= TOEPLITZ_MIN_K


def _shape_key(x: torch.Tensor, k: int) -> str:
    """How saved launch configurations name a dwconv2d input (kernels.tuning)."""
    return f"C{x.shape[1]} {x.shape[2]}x{x.shape[3]} k{k} {'channels_last' if _channels_last(x) else 'NCHW'}"


def forward_tile(x: torch.Tensor, k: int, role: str = "forward") -> dict:
    """The forward launch for input x and kernel size k: a saved configuration for this card
    and shape (kernels.tuning) if there is one, else the Toeplitz kernel where it is the default
    (see TOEPLITZ_MIN_K), else the tap kernel's tile budget, `elems` per program and channel
    runs of `c_bytes` (channels_last). With role "input grad", the input gradient's launch (the
    flipped convolution of the output gradient, the same kernels): its saved configurations are
    its own, since a forward's winner need not win there (its epilogue also reads the residual's
    gradient). On an H100 (bf16, 2026-11-27, third run) the streaming kernels won the forward and
    weight-gradient sweeps (248 against 479 us, 590 against 786 at B256 C256 32x32 k9), yet
    forward+backward with the streaming forward serving the input gradient took 2,489 us against
    the second run's 1,880 (CUDA graph): its rotated kernel compiled to scalar shared-memory
    loads (see toeplitz._banded_row), fixed since. The shipped "input grad" entries are the
    forward's streaming winners, whose code the input gradient now shares (the same sm_90 SASS
    instruction mix); not yet timed as the input gradient.

    The tap kernel's budgets are the fastest of a sweep on an H200 (bf16, 2026-11-26, the
    benchmark shapes): channels_last 8192 elements with 128-byte channel runs (1,066 us
    against 1,295 for 4096 / 64 at B256 C256 32x32 k9); NCHW barely cares (2048).
    """
    tuned = tuning.lookup("dwconv2d", role, x.device, x.dtype, _shape_key(x, k))
    if tuned:
        return tuned
    if _toeplitz_default(x, k):
        return TOEPLITZ_FORWARD
    return _CHANNELS_LAST_FORWARD_TILE if _channels_last(x) else {"elems": 2048, "c_bytes": 64}


# Triton 3.8's ptxas builds the 8192-element channels_last tile with 32 registers and about
# 6 KB of stack a thread (`python -m kernels.compile_report`; Triton 3.6: 255 registers and
# 592 bytes), so newer Tritons take a 2048-element tile, which compiles without spills on
# both (on Triton 3.6 it measured 1,232 us against 1,070 on the H100, same sweep). Its speed
# under Triton 3.8 is not measured yet.
_CHANNELS_LAST_FORWARD_TILE = ({"elems": 8192, "c_bytes": 128}
                               if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7)
                               else {"elems": 2048, "c_bytes": 128})


def weight_grad_tile(x: torch.Tensor, k: int) -> dict:
    """The weight-gradient launch: a saved configuration (kernels.tuning), else the Toeplitz
    kernel where it is the default, else the tap kernel (see `_tap_weight_grad_tile`)."""
    tuned = tuning.lookup("dwconv2d", "weight grad", x.device, x.dtype, _shape_key(x, k))
    if tuned:
        return tuned
    return TOEPLITZ_WEIGHT_GRAD if _toeplitz_default(x, k) else _tap_weight_grad_tile(x)


def _tap_weight_grad_tile(x: torch.Tensor) -> dict:
    """The tap kernel's tile budget, same sweep: channels_last 16384 / 64 (2,475 us
    against 3,061 for 8192 / 32 at B256 C256 32x32 k9); NCHW keeps 8192."""
    return {"elems": 16384, "c_bytes": 64} if _channels_last(x) else {"elems": 8192, "c_bytes": 32}


def conv_forward(x, weight, bias, y, z, *, gelu: bool, flip: bool = False, tile: dict | None = None,
                 add=None) -> None:
    """y = act(conv(x, weight) + bias) (+ add, a tensor like y, when given); z (pre-activation)
    is written when given.

    `tile` overrides `forward_tile(x, K)` (benchmark sweeps)."""
    B, C, H, W = x.shape
    K = weight.shape[-1]
    if y.numel() == 0:  # nothing to compute; Triton rejects an empty grid
        return
    tile = tile or forward_tile(x, K)
    if tile.get("method") == "toeplitz":
        toeplitz.conv_forward(x, weight, bias, y, z, gelu=gelu, flip=flip, tile=tile, add=add)
        return
    block_c, bb, tile_h, tile_w, warps = _tiles(x, K, tile["elems"], tile["c_bytes"])
    grid, n_th, n_tw = _grid(x, block_c, bb, tile_h, tile_w)
    zz = y if z is None else z
    aa = y if add is None else add
    w_taps = weight.reshape(C, K * K).t().contiguous()  # (K*K, C): one tap's weights are contiguous
    wrap_triton(_dwconv_fwd_kernel)[grid](
        x, w_taps, x if bias is None else bias, y, zz, aa,
        B, C, H, W, n_th, n_tw,
        *x.stride(), *y.stride(), *zz.stride(), *aa.stride(),
        K=K, FLIP=flip, HAS_BIAS=bias is not None, GELU=gelu, STORE_PREACT=z is not None, HAS_ADD=add is not None,
        BLOCK_C=block_c, BB=bb, TILE_H=tile_h, TILE_W=tile_w, num_warps=warps,
    )


def conv_backward(dy, x, weight, z, *, gelu: bool, has_bias: bool, need_dx: bool, need_dw: bool,
                  tile: dict | None = None, add_to_dx=None):
    """(dx, dw, db) with dw shaped like weight (fp32) and db (C,) fp32 or None. With
    `add_to_dx` (a tensor like x: another path's gradient of x, e.g. a residual's) dx includes it.

    `tile` overrides `weight_grad_tile(x, K)` for the weight-gradient kernel (sweeps)."""
    B, C, H, W = x.shape
    K = weight.shape[-1]
    dx = dw = db = None
    g = dy
    if x.numel() == 0:  # no pixels: zero parameter gradients, empty input gradient
        dw = torch.zeros((C, 1, K, K), device=x.device, dtype=torch.float32) if need_dw else None
        db = torch.zeros((C,), device=x.device, dtype=torch.float32) if has_bias else None
        return (torch.empty_like(x) if need_dx else None), dw, db
    tile = tile or weight_grad_tile(x, K)
    toeplitz_dw = need_dw and tile.get("method") == "toeplitz"
    # the streaming Toeplitz kernels form the bias gradient (and g = dy * gelu'(z)) themselves
    fused_g = toeplitz_dw and toeplitz.forms_output_grad(tile, gelu)
    if not fused_g and (gelu or has_bias or (need_dw and not toeplitz_dw)):   # else nothing to do here
        g = torch.empty_like(dy) if gelu else dy
        # the tap kernel forms g = dy * gelu'(z) and the bias partials; with the Toeplitz
        # method the weight gradient comes from its own kernel below
        tap_tile = _tap_weight_grad_tile(x) if toeplitz_dw else tile
        block_c, bb, tile_h, tile_w, warps = _tiles(x, K, tap_tile["elems"], tap_tile["c_bytes"])
        grid, n_th, n_tw = _grid(x, block_c, bb, tile_h, tile_w)
        tap_dw = need_dw and not toeplitz_dw
        dw_part = torch.empty((grid[0], K * K, C) if tap_dw else (1,), device=x.device, dtype=torch.float32)
        db_part = torch.empty((grid[0], C) if has_bias else (1,), device=x.device, dtype=torch.float32)
        zz = dy if z is None else z
        wrap_triton(_dwconv_bwd_w_kernel)[grid](
            x, dy, zz, g, dw_part, db_part,
            B, C, H, W, n_th, n_tw,
            *x.stride(), *dy.stride(), *zz.stride(), *g.stride(),
            K=K, GELU=gelu, HAS_BIAS=has_bias, NEED_DW=tap_dw,
            BLOCK_C=block_c, BB=bb, TILE_H=tile_h, TILE_W=tile_w, num_warps=warps,
        )
        dw = dw_part.sum(0).t().reshape(C, 1, K, K) if tap_dw else None
        db = db_part.sum(0) if has_bias else None
    if fused_g:
        g = torch.empty_like(dy) if (gelu and need_dx) else dy   # g itself only for the input gradient
        dw, db = toeplitz.weight_grad(dy, x, K, tile, z=z if gelu else None, g_out=g if need_dx else None,
                                      has_bias=has_bias)
    elif toeplitz_dw:
        dw, _ = toeplitz.weight_grad(g, x, K, tile)
    if need_dx:
        dx = torch.empty_like(x)
        conv_forward(g, weight, None, dx, None, gelu=False, flip=True, add=add_to_dx,
                     tile=forward_tile(g, K, role="input grad"))
    return dx, dw, db
