"""Window attention's geometry (Swin, Liu et al., 2021): tokens attend only within their window.

The grid is cut into window x window cells, optionally offset by `shift` cells (Swin's shifted
windows). Swin computes shifted windows by rolling the grid and masking the windows that wrap
around; the same attention is a partition whose first and last rows and columns of windows are
narrower (`bands`), which needs no mask: every window, whole or narrow, is an ordinary attention
over its own tokens. Windows of one shape are batched into one call of the attention op
(the fused kernel on GPU), at most nine groups, usually one (no shift) or four (shift of half a
window: whole windows, two kinds of border windows, corners).
"""
from __future__ import annotations

import torch
from einops import rearrange


def bands(n: int, window: int, shift: int) -> list[tuple[int, int, int]]:
    """(start, stop, band size) of the runs of equal bands along a side of n cells: a first band of
    `shift` cells, whole windows, and a last band of the rest."""
    runs = [(0, shift, shift)] if shift else []
    whole_end = shift + (n - shift) // window * window
    if whole_end > shift:
        runs.append((shift, whole_end, window))
    if whole_end < n:
        runs.append((whole_end, n, n - whole_end))
    return runs


def window_shapes(grid: tuple[int, int], window: int, shift: int) -> list[tuple[int, int]]:
    """The (rows, columns) of every window (for the cost and the benchmark's shapes)."""
    return [(a, c) for r0, r1, a in bands(grid[0], window, shift) for c0, c1, c in bands(grid[1], window, shift)
            for _ in range((r1 - r0) // a * ((c1 - c0) // c))]


def window_ids(grid: tuple[int, int], window: int, shift: int) -> torch.Tensor:
    """(h * w,) the window of each token, row-major: two tokens attend to each other iff equal."""
    h, w = grid
    rows = torch.zeros(h, dtype=torch.long)
    cols = torch.zeros(w, dtype=torch.long)
    for side, ids in ((h, rows), (w, cols)):
        index = 0
        for start, stop, size in bands(side, window, shift):
            for s in range(start, stop, size):
                ids[s:s + size] = index
                index += 1
    return (rows[:, None] * (w + 1) + cols[None, :]).flatten()


def in_windows(tokens: torch.Tensor, grid: tuple[int, int], window: int, shift: int, attend) -> torch.Tensor:
    """`attend` (a (B', n, K) batch of windows of (rows, columns) cells -> (B', n, C)) applied within
    each window of the (B, h * w, K) tokens on the grid; returns (B, h * w, C)."""
    b, (h, w) = tokens.shape[0], grid
    cells = tokens.view(b, h, w, -1)
    pieces = []   # per band of rows: [(windows, band height, band width)] along the columns
    for r0, r1, a in bands(h, window, shift):
        pieces.append([(rearrange(cells[:, r0:r1, c0:c1], "b (i a) (j c) k -> (b i j) (a c) k", a=a, c=c), a, c,
                        (c1 - c0) // c) for c0, c1, c in bands(w, window, shift)])
    by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
    for row in pieces:
        for windows, a, c, _ in row:
            by_shape.setdefault((a, c), []).append(windows)
    outs = {}
    for shape, group in by_shape.items():   # one call per window shape
        done = attend(group[0] if len(group) == 1 else torch.cat(group), shape)
        outs[shape] = list(done.split([g.shape[0] for g in group]))
    rows = []
    for row in pieces:   # the windows' outputs back in place, in the order they were cut
        parts = [rearrange(outs[(a, c)].pop(0), "(b i j) (a c) k -> b (i a) (j c) k", b=b, a=a, c=c, j=j)
                 for _, a, c, j in row]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)
    return out.reshape(b, h * w, -1)
