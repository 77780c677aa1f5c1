"""ConvNeXt's block (Liu et al., 2022), isotropic as in the paper's ViT-style variant: grid (B, C, H, W)
-> (B, C, H, W).

    x + drop_path(gamma * Linear(GELU(Linear(LayerNorm(dwconv_k(x))))))

The depthwise convolution runs as kernels.dwconv2d (with its bias, no activation); LayerNorm and
the MLP act on each position's channels, on a channels-last view of the grid (a view without a
copy when the model trains in channels_last).
"""
from __future__ import annotations

import torch
from torch import nn

import kernels
from composer.blocks.base import Block, Context, Cost, DropPath, autocast_input, layer_scale, register


@register
class ConvNext(Block):
    """Args:
        dim: channels C; kernel_size: odd k ('same' padding); hidden: the MLP's width;
        drop_path: stochastic depth; norm_eps: LayerNorm eps; scale: LayerScale's initial value (None: none).
    """

    kind, layout, kernel_op = "convnext", "grid", "dwconv2d"

    def __init__(self, dim, kernel_size=7, hidden=None, drop_path=0.0, norm_eps=1e-6, scale=1e-6, backend="auto"):
        super().__init__()
        self.backend = backend
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)   # (C, 1, k, k)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        hidden = hidden or 4 * dim
        self.mix_channels = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.scale = layer_scale(dim, scale)
        self.drop_path = DropPath(drop_path)

    @classmethod
    def from_spec(cls, spec, ctx: Context) -> "ConvNext":
        return cls(ctx.dim, spec.kernel_size, max(1, int(spec.mlp_ratio * ctx.dim)), spec.drop_path, spec.norm_eps,
                   spec.layer_scale, ctx.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)
        y = self.fused(kernels.dwconv2d, x, self.conv.weight, self.conv.bias, backend=self.backend)
        y = self.scale(self.mix_channels(self.norm(y.permute(0, 2, 3, 1))))   # (B, H, W, C)
        return x + self.drop_path(y.permute(0, 3, 1, 2))

    def cost(self, ctx: Context) -> Cost:
        (h, w), c, k = ctx.grid, ctx.dim, self.conv.kernel_size[0]
        hidden = self.mix_channels[0].out_features
        # saved for backward: x, the convolution's output, LayerNorm's, the hidden layer before and after GELU
        return Cost(2 * c * h * w * k * k + 2 * 2 * h * w * c * hidden, c * h * w * 3 + h * w * hidden * 2)

    def kernel_dims(self, ctx: Context) -> dict:
        return {"channels": ctx.dim, "kernel_size": self.conv.kernel_size[0]}
