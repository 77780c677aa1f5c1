"""Pre-norm multi-head self-attention with a residual: tokens (B, N, C) -> (B, N, C)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import kernels
from composer.blocks.base import Block, Context, Cost, DropPath, layer_scale, register
from composer.blocks.windows import in_windows, window_ids, window_shapes


@register
class Attention(Block):
    """Args:
        dim: channels C; heads: number of heads (divides dim); qkv_bias: bias on to_qkv;
        attn_dropout: dropout on probabilities (forces the reference path while training);
        proj_dropout: dropout after to_out; drop_path: stochastic depth; norm_eps: LayerNorm eps;
        qk_norm: LayerNorm over each head's queries and keys; scale: LayerScale's initial value (None: none);
        rotary: (grid, tokens) to rotate queries and keys by their patch's position (2-D RoPE), or None;
        windows: (grid, window, shift) to attend within windows of the patch grid (Swin), or None;
        relative: (grid, tokens) to add a learned bias by the two patches' offset to every logit
            (Swin's relative position bias), or None.
    """

    kind, layout, kernel_op = "attention", "tokens", "attention"
    token_merging = None   # a composer.merging.TokenMerging while the model merges tokens (inference)

    def __init__(self, dim, heads, qkv_bias=True, attn_dropout=0.0, proj_dropout=0.0, drop_path=0.0,
                 norm_eps=1e-6, backend="auto", qk_norm=False, scale=None, rotary=None, windows=None, relative=None):
        super().__init__()
        self.windows = windows
        self.relative = None
        if relative is not None:   # offsets span a window, or the whole grid
            (h, w), tokens = relative
            self.relative = RelativePositionBias(heads, (windows[1],) * 2 if windows else (h, w), tokens - h * w)
            self.kernel_op = None   # the fused kernel takes no bias: PyTorch's attention runs it
        self.heads, self.attn_dropout, self.backend = heads, attn_dropout, backend
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)
        self.proj_dropout = nn.Dropout(proj_dropout)
        head_dim = dim // heads
        self.q_norm = nn.LayerNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = nn.LayerNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.scale = layer_scale(dim, scale)
        self.drop_path = DropPath(drop_path)
        self.rotary = rotary is not None
        if self.rotary:   # not saved: computed from the grid, so a new image size just gets its own
            cos, sin = rotary_tables(*rotary, head_dim)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)

    @classmethod
    def from_spec(cls, spec, ctx: Context) -> "Attention":
        windows = None
        if spec.window:   # with shift, every second repeat shifts its windows by half a window (Swin)
            windows = (ctx.grid, spec.window, spec.window // 2 if spec.shift and ctx.repeat % 2 else 0)
        return cls(ctx.dim, spec.heads, spec.qkv_bias, spec.attn_dropout, spec.proj_dropout, spec.drop_path,
                   spec.norm_eps, ctx.backend, spec.qk_norm, spec.layer_scale,
                   (ctx.grid, ctx.tokens) if ctx.rotary else None, windows,
                   (ctx.grid, ctx.tokens) if ctx.relative else None)

    def packed_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """The projection (B, N, 3 H D), queries and keys normalized per head with qk_norm and
        rotated by their positions with rotary."""
        qkv = self.to_qkv(self.norm(x))
        if self.q_norm is None and not self.rotary:
            return qkv
        qkv = qkv.unflatten(-1, (3, self.heads, -1))   # (B, N, 3, H, D)
        qk, v = qkv[:, :, :2], qkv[:, :, 2:]
        if self.q_norm is not None:
            qk = torch.stack([self.q_norm(qk[:, :, 0]), self.k_norm(qk[:, :, 1])], dim=2)
        if self.rotary:   # queries and keys in one go
            qk = rotate(qk, self.rotary_cos, self.rotary_sin)
        # LayerNorm and the rotation run in fp32 under autocast: back to the projection's dtype, or the
        # op would get fp32; one copy, so that the packed op still reads one tensor
        return torch.cat([qk.to(v.dtype), v], dim=2).flatten(2)

    def qkv(self, x: torch.Tensor):
        # Strided views of the packed projection (no copy beyond packed_qkv's): each (B, H, N, D).
        return rearrange(self.packed_qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads).unbind(0)

    def attend(self, qkv: torch.Tensor, cells: tuple[int, int]) -> torch.Tensor:
        """Attention over a packed projection (B, N, 3 H D) -> (B, N, H D), whose last tokens are a
        `cells` (rows, columns) rectangle of the grid, row by row (for the relative bias)."""
        bias = self.relative(cells) if self.relative is not None else None
        if bias is not None or (self.training and self.attn_dropout > 0):
            q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.heads).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
                                                 dropout_p=self.attn_dropout if self.training else 0.0)
            return rearrange(out, "b h n d -> b n (h d)")
        # the packed op reads q, k, v in place, writes the out-projection's layout and hands the
        # gradient back in the projection's layout: no copy either way
        return self.fused(kernels.attention_packed, qkv, self.heads, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.packed_qkv(x)
        merging = self.token_merging
        if merging is not None and merging.size is not None:   # tokens merged before: proportional attention
            q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.heads).unbind(0)
            out = rearrange(F.scaled_dot_product_attention(q, k, v, attn_mask=merging.key_bias(q.dtype)),
                            "b h n d -> b n (h d)")
        elif self.windows is None:
            out = self.attend(qkv, self.relative.grid if self.relative is not None else (0, 0))
        else:
            out = in_windows(qkv, *self.windows, self.attend)
        x = x + self.drop_path(self.scale(self.proj_dropout(self.to_out(out))))
        if merging is not None:   # keys averaged over heads: what tokens are compared by
            x = merging(x, qkv.unflatten(-1, (3, self.heads, -1))[:, :, 1].mean(2))
        return x

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax(Q K^T / sqrt(D)) of this layer for input x, recomputed exactly: (B, H, N, N); with
        windows, zero between tokens of different windows."""
        from kernels.attention.reference import attention_probs

        q, k, _ = self.qkv(x)
        if self.windows is None and self.relative is None:
            return attention_probs(q, k)
        scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        if self.relative is not None:
            grid = self.windows[0] if self.windows else self.relative.grid
            scores = scores + self.relative.between(grid_cells(grid), grid_cells(grid), q.shape[-2] - grid[0] * grid[1])
        if self.windows is not None:
            ids = window_ids(*self.windows).to(q.device)
            scores = scores.masked_fill(ids[:, None] != ids[None, :], float("-inf"))
        return torch.softmax(scores, dim=-1)

    def cost(self, ctx: Context) -> Cost:
        n, c = ctx.tokens, ctx.dim
        # scores and their product with v: every token with every token, or within each window
        pairs = n * n if self.windows is None else sum((rows * cols) ** 2 for rows, cols in window_shapes(*self.windows))
        flops = 2 * n * c * 3 * c + 2 * 2 * pairs * c + 2 * n * c * c
        # saved for backward: x, LN out, qkv, attention out, per-row statistics
        return Cost(flops, n * c * 6 + self.heads * n)

    def kernel_dims(self, ctx: Context) -> dict:
        return {"head_dim": ctx.dim // self.heads}


def grid_cells(cells: tuple[int, int]) -> torch.Tensor:
    """(rows * cols, 2) the (row, column) of each cell of a rectangle, row by row."""
    rows, cols = torch.meshgrid(torch.arange(cells[0]), torch.arange(cells[1]), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=1)


class RelativePositionBias(nn.Module):
    """Swin's relative position bias: a learned logit bias per head for each offset (dy, dx) between
    two cells, |dy| < extent[0], |dx| < extent[1] (a window's side, or the grid's); `prefix` tokens
    before the cells (class token, registers) get none. `grid`: the cells' rectangle when the block
    attends over the whole grid."""

    def __init__(self, heads: int, extent: tuple[int, int], prefix: int = 0):
        super().__init__()
        self.extent, self.prefix, self.grid = extent, prefix, extent
        rows, cols = 2 * extent[0] - 1, 2 * extent[1] - 1
        self.table = nn.Parameter(nn.init.trunc_normal_(torch.empty(rows * cols, heads), std=0.02))   # Swin's init
        # the table rows of a rectangle's pairs, by (rectangle, device): made once, not every step
        self._indices: dict[tuple, torch.Tensor] = {}

    def index(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(n, m) the table rows of queries at cells a (n, 2) for keys at cells b (m, 2)."""
        offset = a[:, None] - b[None, :]   # (n, m, 2)
        # pairs farther apart than a window (masked out by window attention anyway) take the edge
        reach = torch.tensor(self.extent) - 1
        offset = torch.maximum(torch.minimum(offset, reach), -reach)
        return (offset[..., 0] + self.extent[0] - 1) * (2 * self.extent[1] - 1) + offset[..., 1] + self.extent[1] - 1

    def between(self, a: torch.Tensor, b: torch.Tensor, prefix: int = 0) -> torch.Tensor:
        """(H, P + n, P + m) biases of queries at cells a (n, 2) for keys at cells b (m, 2), after P
        prefix tokens (zero bias)."""
        return self.lookup(self.index(a, b).to(self.table.device), prefix)

    def lookup(self, index: torch.Tensor, prefix: int) -> torch.Tensor:
        bias = self.table[index].permute(2, 0, 1)
        return F.pad(bias, (prefix, 0, prefix, 0)) if prefix else bias

    def forward(self, cells: tuple[int, int]) -> torch.Tensor:
        """The bias of attention among the tokens of a cells rectangle (after this block's prefix
        tokens when it attends over the whole grid)."""
        key = (cells, self.table.device)
        if key not in self._indices:
            positions = grid_cells(cells)
            self._indices[key] = self.index(positions, positions).to(self.table.device)
        return self.lookup(self._indices[key], self.prefix if cells == self.grid else 0)


ROTARY_BASE = 100.0   # the axial 2-D RoPE's base (Heo et al., 2024): patch grids are short sequences


def rotary_tables(grid: tuple[int, int], tokens: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (N, D/2) of 2-D axial rotary position embedding: each pair of a head's channels
    turns by an angle; the first D/4 pairs by the patch's column times a frequency, the last D/4 by
    its row, frequencies ROTARY_BASE^(-i/(D/4)). q·k then depends on the two patches' offset, not
    on where they are. Tokens before the patches (class token, registers) do not turn."""
    h, w = grid
    quarter = head_dim // 4
    freqs = ROTARY_BASE ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    angles = torch.cat([cols.reshape(-1, 1) * freqs, rows.reshape(-1, 1) * freqs], dim=1)   # (h w, D/2)
    angles = torch.cat([angles.new_zeros(tokens - h * w, 2 * quarter), angles])   # prefix tokens: angle 0
    return angles.cos().float(), angles.sin().float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, N, ..., D) with each channel pair (2i, 2i + 1) turned by the angle of cos, sin (N, D/2); fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))   # (B, N, ..., D/2, 2)
    even, odd = pairs.unbind(-1)
    shape = (cos.shape[0],) + (1,) * (x.dim() - 3) + (cos.shape[1],)   # (N, 1, ..., D/2)
    cos, sin = cos.view(shape), sin.view(shape)
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
