"""ConvMixer's spatial mixing: depthwise conv -> activation -> BatchNorm, plus a residual.

Grid (B, C, H, W) -> (B, C, H, W). The conv and a GELU run as one fused op; when
`Block.uses_fused_norm` says so, the whole block does (kernels.dwconv_batch_norm_residual).
"""
from __future__ import annotations

import torch
from torch import nn

import kernels
from composer.blocks.base import Block, Context, Cost, DropPath, autocast_input, register


@register
class DwConv(Block):
    """Args:
        dim: channels C; kernel_size: odd k ('same' padding); activation: gelu | relu;
        drop_path: stochastic depth.
    """

    kind, layout, kernel_op, norm_op = "dwconv", "grid", "dwconv2d", "batch_norm"

    def __init__(self, dim, kernel_size=9, activation="gelu", drop_path=0.0, backend="auto"):
        super().__init__()
        self.activation, self.backend = activation, backend
        # Conv2d holds the weight (C, 1, k, k) and bias so that checkpoints and init match nn.Conv2d.
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.BatchNorm2d(dim)
        self.drop_path = DropPath(drop_path)

    @classmethod
    def from_spec(cls, spec, ctx: Context) -> "DwConv":
        return cls(ctx.dim, spec.kernel_size, spec.activation, spec.drop_path, ctx.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)
        dropping = self.drop_path.p > 0.0 and self.training   # the branch is dropped per image before the add
        if self.activation == "gelu" and not dropping and self.uses_fused_norm(self.norm, x):
            # the whole block as one op: GELU moves into the BatchNorm (the convolution writes
            # only its output and its backward receives the gradient past GELU), and the
            # residual's gradient is added as the convolution's backward writes dx
            norm = self.norm
            out = kernels.dwconv_batch_norm_residual(
                x, self.conv.weight, self.conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var,
                momentum=norm.momentum, eps=norm.eps, backend=self.fused_norm_backend())
            norm.num_batches_tracked.add_(1)   # as nn.BatchNorm2d counts its training calls
            return out
        gelu = "gelu" if self.activation == "gelu" else None
        y = self.fused(kernels.dwconv2d, x, self.conv.weight, self.conv.bias, activation=gelu, backend=self.backend)
        if self.activation == "relu":
            y = torch.relu(y)
        if dropping:
            return x + self.drop_path(self.normalize(self.norm, y))
        return self.normalize(self.norm, y, residual=x)

    def cost(self, ctx: Context) -> Cost:
        (h, w), c, k = ctx.grid, ctx.dim, self.conv.kernel_size[0]
        return Cost(2 * c * h * w * k * k, c * h * w * 3)

    def kernel_dims(self, ctx: Context) -> dict:
        return {"channels": ctx.dim, "kernel_size": self.conv.kernel_size[0]}
