"""Pre-norm MLP across channels with a residual: tokens (B, N, C) -> (B, N, C)."""
from __future__ import annotations

import torch
from torch import nn

from composer.blocks.base import Block, Context, Cost, DropPath, layer_scale, register


@register
class ChannelMlp(Block):
    """Args:
        dim: channels C; hidden: hidden width; dropout: after each Linear;
        drop_path: stochastic depth; norm_eps: LayerNorm eps; scale: LayerScale's initial value (None: none).
    """

    kind, layout = "channel_mlp", "tokens"

    def __init__(self, dim, hidden, dropout=0.0, drop_path=0.0, norm_eps=1e-6, scale=None):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mix_channels = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout))
        self.scale = layer_scale(dim, scale)
        self.drop_path = DropPath(drop_path)

    @classmethod
    def from_spec(cls, spec, ctx: Context) -> "ChannelMlp":
        hidden = max(1, int(spec.mlp_ratio * ctx.dim))
        return cls(ctx.dim, hidden, spec.dropout, spec.drop_path, spec.norm_eps, spec.layer_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.scale(self.mix_channels(self.norm(x))))

    def cost(self, ctx: Context) -> Cost:
        n, c, h = ctx.tokens, ctx.dim, self.mix_channels[0].out_features
        return Cost(2 * 2 * n * c * h, n * c * 2 + n * h * 2)
