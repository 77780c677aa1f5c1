"""ConvMixer's channel mixing: 1x1 conv -> activation -> BatchNorm (no residual).

Grid (B, C, H, W) -> (B, C, H, W).
"""
from __future__ import annotations

import torch
from torch import nn

from composer.blocks.base import Block, Context, Cost, activation, register


@register
class Pointwise(Block):
    """Args: dim: channels C; activation: gelu | relu."""

    kind, layout = "pointwise", "grid"

    def __init__(self, dim, activation_name="gelu"):
        super().__init__()
        self.mix_channels = nn.Sequential(nn.Conv2d(dim, dim, 1), activation(activation_name), nn.BatchNorm2d(dim))

    @classmethod
    def from_spec(cls, spec, ctx: Context) -> "Pointwise":
        return cls(ctx.dim, spec.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix_channels(x)

    def cost(self, ctx: Context) -> Cost:
        (h, w), c = ctx.grid, ctx.dim
        return Cost(2 * h * w * c * c, c * h * w * 3)
