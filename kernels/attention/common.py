"""@triton.jit helpers of both attention passes (triton.py: forward; backward.py)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_block_and_head(ROW_PROGRAMS):
    # (row block, batch * head) of this program. The grid is one axis of ROW_PROGRAMS x B x H
    # programs: B * H past 65,535 (a large batch) would not fit the grid's second axis. A
    # (batch, head)'s row blocks stay adjacent, so that they read its K and V while in L2.
    pid = tl.program_id(0)
    return pid % ROW_PROGRAMS, pid // ROW_PROGRAMS


@triton.jit
def _rows(mask_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # mask of a (rows, BLOCK_D) tile; the head-dim test exists only when D is padded
    # (tiles are a power of two >= 16 wide, since tl.dot needs that)
    if BLOCK_D == HEAD_DIM:
        return mask_rows[:, None]
    else:
        return mask_rows[:, None] & (offs_d < HEAD_DIM)[None, :]


@triton.jit
def _cols(mask_cols, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # the same for a transposed (BLOCK_D, cols) tile
    if BLOCK_D == HEAD_DIM:
        return mask_cols[None, :]
    else:
        return (offs_d < HEAD_DIM)[:, None] & mask_cols[None, :]


@triton.jit
def _load_rows(ptr, rows, mask_rows, offs_d, stride_row, stride_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # a (rows, BLOCK_D) tile of one (batch, head): zero past the sequence and the head dim
    return tl.load(ptr + rows[:, None] * stride_row + offs_d[None, :] * stride_d,
                   mask=_rows(mask_rows, offs_d, HEAD_DIM, BLOCK_D), other=0.0)
