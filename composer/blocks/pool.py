"""Pooling as the token mixer (PoolFormer: Yu et al., 2022, "MetaFormer Is Actually What You Need
for Vision"): tokens (B, N, C) -> (B, N, C).

    x + drop_path(gamma * (AvgPool_k(LayerNorm(x)) - LayerNorm(x)))

on the patch grid: each patch takes the mean of the k x k cells around it (stride 1; at the
borders, of the cells inside the grid), minus itself, which the residual adds back. Tokens
before the patches (a class token, registers) are not mixed: their branch is zero. Nothing is
learned but the LayerNorm (and LayerScale), so `poolformer` (pool, then channel_mlp) differs
from a vit or mixer block by its token mixer alone: the MetaFormer paper's comparison.
PoolFormer normalizes with GroupNorm over (C, H, W); here, as the other token blocks, with a
LayerNorm per token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from composer.blocks.base import Block, Context, Cost, DropPath, layer_scale, register


@register
class Pool(Block):
    """Args:
        dim: channels C; grid: the patch grid (H, W); pool_size: odd k; drop_path: stochastic depth;
        norm_eps: LayerNorm eps; scale: LayerScale's initial value (None: none).
    """

    kind, layout = "pool", "tokens"

    def __init__(self, dim, grid, pool_size=3, drop_path=0.0, norm_eps=1e-6, scale=None):
        super().__init__()
        self.grid, self.pool_size = tuple(grid), pool_size
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.scale = layer_scale(dim, scale)
        self.drop_path = DropPath(drop_path)

    @classmethod
    def from_spec(cls, spec, ctx: Context) -> "Pool":
        return cls(ctx.dim, ctx.grid, spec.pool_size, spec.drop_path, spec.norm_eps, spec.layer_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        (h, w), k = self.grid, self.pool_size
        prefix = n - h * w
        y = self.norm(x)
        cells = y[:, prefix:].transpose(1, 2).reshape(b, c, h, w)
        pooled = F.avg_pool2d(cells, k, stride=1, padding=k // 2, count_include_pad=False)
        mixed = (pooled - cells).flatten(2).transpose(1, 2)
        if prefix:
            mixed = F.pad(mixed, (0, 0, prefix, 0))   # nothing mixed into the class token or registers
        return x + self.drop_path(self.scale(mixed))

    def cost(self, ctx: Context) -> Cost:
        # no matrix product: flop_counter counts nothing (the pooling's k * k additions a cell aside);
        # saved for backward: x and the LayerNorm's output
        return Cost(0, 2 * ctx.tokens * ctx.dim)
