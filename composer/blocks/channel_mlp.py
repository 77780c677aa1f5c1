"""Pre-norm MLP across channels with a residual: tokens (B, N, C) -> (B, N, C)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from composer.blocks.base import Block, Context, Cost, DropPath, layer_scale, register
from composer.blocks.base import activation as make_activation


@register
class ChannelMlp(Block):
    """Args:
        dim: channels C; hidden: hidden width; dropout: after each Linear;
        drop_path: stochastic depth; norm_eps: LayerNorm eps; scale: LayerScale's initial value (None: none);
        activation: gelu, gelu_tanh (its tanh approximation), quick_gelu (CLIP's), or swiglu (a gated
        MLP: the first Linear makes value and gate, hidden each).
    """

    kind, layout = "channel_mlp", "tokens"

    def __init__(self, dim, hidden, dropout=0.0, drop_path=0.0, norm_eps=1e-6, scale=None, activation="gelu"):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        gated = activation == "swiglu"
        self.mix_channels = nn.Sequential(   # the same indices either way: 0 and 3 are the Linears
            nn.Linear(dim, 2 * hidden if gated else hidden), SwiGLU() if gated else make_activation(activation),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim), nn.Dropout(dropout))
        self.scale = layer_scale(dim, scale)
        self.drop_path = DropPath(drop_path)

    @classmethod
    def from_spec(cls, spec, ctx: Context) -> "ChannelMlp":
        hidden = max(1, int(spec.mlp_ratio * ctx.dim))
        return cls(ctx.dim, hidden, spec.dropout, spec.drop_path, spec.norm_eps, spec.layer_scale, spec.mlp_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.scale(self.mix_channels(self.norm(x))))

    def cost(self, ctx: Context) -> Cost:
        n, c, h, first = ctx.tokens, ctx.dim, self.mix_channels[3].in_features, self.mix_channels[0].out_features
        # saved for backward: x, LayerNorm's output, the first Linear's output, the activation's
        return Cost(2 * n * c * first + 2 * n * h * c, n * c * 2 + n * first + n * h)


class SwiGLU(nn.Module):
    """(..., 2 H) -> (..., H): value * SiLU(gate), the halves of the first Linear's output (Shazeer, 2020)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = x.chunk(2, dim=-1)
        return value * F.silu(gate)
