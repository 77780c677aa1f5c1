"""ConvMixer's channel mixing: 1x1 conv -> activation -> BatchNorm (no residual).

Grid (B, C, H, W) -> (B, C, H, W). GELU and BatchNorm run as one fused op when
`Block.uses_fused_norm` says so.
"""
from __future__ import annotations

import torch
from torch import nn

from composer.blocks.base import Block, Context, Cost, activation, register


@register
class Pointwise(Block):
    """Args: dim: channels C; activation: gelu | relu."""

    kind, layout, norm_op = "pointwise", "grid", "batch_norm"

    def __init__(self, dim, activation_name="gelu", backend="auto"):
        super().__init__()
        self.backend = backend
        self.mix_channels = nn.Sequential(nn.Conv2d(dim, dim, 1), activation(activation_name), nn.BatchNorm2d(dim))

    @classmethod
    def from_spec(cls, spec, ctx: Context) -> "Pointwise":
        return cls(ctx.dim, spec.activation, ctx.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, act, norm = self.mix_channels
        if isinstance(act, nn.GELU):   # exact GELU (activation() builds it so)
            return self.normalize(norm, conv(x), gelu=True)
        return self.mix_channels(x)

    def cost(self, ctx: Context) -> Cost:
        (h, w), c = ctx.grid, ctx.dim
        return Cost(2 * h * w * c * c, c * h * w * 3)
