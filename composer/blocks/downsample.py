"""Downsampling between stages of a hierarchical model: grid (B, C, H, W) -> (B, C', H / f, W / f).

    Conv2d(C, C', kernel f, stride f)(norm(x))

Each f x f patch of the grid becomes one cell with C' channels: ConvNeXt's downsampling layer
(LayerNorm over the channels, then the strided convolution), which is also Swin's patch merging
(concatenate each 2 x 2 patch's channels, LayerNorm, Linear 4C -> 2C) up to where the
normalization's statistics are taken. The blocks after it see the smaller grid and the new
width; attention on a grid four times smaller costs sixteen times less.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from composer.blocks.base import Block, ChannelLayerNorm, Context, Cost, register


@register
class Downsample(Block):
    """Args:
        dim: channels C in; out_dim: channels C' out; factor: f, the side of the patch merged into
        one cell (divides the grid); norm: layernorm | batchnorm | none, before the convolution;
        norm_eps: its epsilon.
    """

    kind, layout = "downsample", "grid"

    def __init__(self, dim, out_dim, factor=2, norm="layernorm", norm_eps=1e-6):
        super().__init__()
        self.factor = factor
        if norm == "layernorm":
            self.norm = ChannelLayerNorm(dim, eps=norm_eps)
        elif norm == "batchnorm":
            self.norm = nn.BatchNorm2d(dim, eps=norm_eps)
        else:
            self.norm = nn.Identity()
        self.merge = nn.Conv2d(dim, out_dim, factor, stride=factor)

    @classmethod
    def from_spec(cls, spec, ctx: Context) -> "Downsample":
        return cls(ctx.dim, spec.dim or 2 * ctx.dim, spec.factor, spec.norm, spec.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(self.norm(x))

    def output_context(self, ctx: Context) -> Context:
        h, w = ctx.grid[0] // self.factor, ctx.grid[1] // self.factor
        return replace(ctx, dim=self.merge.out_channels, grid=(h, w), tokens=h * w)

    def cost(self, ctx: Context) -> Cost:
        (h, w), c, f = ctx.grid, ctx.dim, self.factor
        out = self.merge.out_channels
        # saved for backward: the input and the normalized input
        return Cost(2 * (h // f) * (w // f) * f * f * c * out, 2 * c * h * w)
