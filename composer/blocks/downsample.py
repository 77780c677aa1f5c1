"""Downsampling between stages of a hierarchical model: grid (B, C, H, W) -> (B, C', H / f, W / f).

    Conv2d(C, C', kernel f, stride f)(norm(x))

Each f x f patch of the grid becomes one cell with C' channels: ConvNeXt's downsampling layer
(LayerNorm over the channels, then the strided convolution), or with style merge Swin's patch
merging (each 2 x 2 patch's channels side by side, LayerNorm over the 4C, Linear 4C -> 2C): the
same linear map of the patch, the statistics taken over the patch rather than each cell. The
blocks after it see the smaller grid and the new width; attention on a grid four times smaller
costs sixteen times less.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from einops import rearrange
from torch import nn

from composer.blocks.base import Block, ChannelLayerNorm, Context, Cost, register


@register
class Downsample(Block):
    """Args:
        dim: channels C in; out_dim: channels C' out; factor: f, the side of the patch merged into
        one cell (divides the grid); norm: layernorm | batchnorm | none; norm_eps: its epsilon;
        style: conv (the norm over C, then the strided convolution) or merge (Swin's patch merging:
        each patch's f * f * C values side by side, the norm over them, then a Linear without bias).
    """

    kind, layout = "downsample", "grid"

    def __init__(self, dim, out_dim, factor=2, norm="layernorm", norm_eps=1e-6, style="conv"):
        super().__init__()
        self.factor, self.style, self.out_dim = factor, style, out_dim
        merged = factor * factor * dim if style == "merge" else dim   # the norm's width
        if norm == "layernorm":
            self.norm = nn.LayerNorm(merged, eps=norm_eps) if style == "merge" else ChannelLayerNorm(dim, eps=norm_eps)
        elif norm == "batchnorm":
            self.norm = nn.BatchNorm2d(dim, eps=norm_eps)
        else:
            self.norm = nn.Identity()
        if style == "merge":
            self.merge = nn.Linear(merged, out_dim, bias=False)
        else:
            self.merge = nn.Conv2d(dim, out_dim, factor, stride=factor)

    @classmethod
    def from_spec(cls, spec, ctx: Context) -> "Downsample":
        return cls(ctx.dim, spec.dim or 2 * ctx.dim, spec.factor, spec.norm, spec.norm_eps, spec.style)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "conv":
            return self.merge(self.norm(x))
        f = self.factor
        # (B, C, H, W) -> each f x f patch's values in timm's PatchMerging order: column offset, row offset, channel
        patches = rearrange(x, "b c (h i) (w j) -> b h w (j i c)", i=f, j=f)
        return rearrange(self.merge(self.norm(patches)), "b h w c -> b c h w")

    def output_context(self, ctx: Context) -> Context:
        h, w = ctx.grid[0] // self.factor, ctx.grid[1] // self.factor
        return replace(ctx, dim=self.out_dim, grid=(h, w), tokens=h * w)

    def cost(self, ctx: Context) -> Cost:
        (h, w), c, f = ctx.grid, ctx.dim, self.factor
        # saved for backward: the input and the normalized input
        return Cost(2 * (h // f) * (w // f) * f * f * c * self.out_dim, 2 * c * h * w)
