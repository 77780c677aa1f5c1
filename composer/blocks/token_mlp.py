"""Pre-norm token-mixing MLP with a residual (MLP-Mixer): tokens (B, N, C) -> (B, N, C).

Mixing tokens is a left multiplication per image, Y = W2 GELU(W1 LN(X) + b1) + b2,
so the fused op never transposes; the weights live in plain Linear layers.
"""
from __future__ import annotations

import torch
from torch import nn

import kernels
from composer.blocks.base import Block, Context, Cost, DropPath, autocast_input, layer_scale, register


@register
class TokenMlp(Block):
    """Args:
        dim: channels C; tokens: sequence length N (fixed); hidden: hidden width Hd;
        drop_path: stochastic depth; norm_eps: LayerNorm eps; scale: LayerScale's initial value (None: none).
    """

    kind, layout, kernel_op = "token_mlp", "tokens", "token_mlp"

    def __init__(self, dim, tokens, hidden, drop_path=0.0, norm_eps=1e-6, backend="auto", scale=None):
        super().__init__()
        self.backend = backend
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mix_in = nn.Linear(tokens, hidden)    # weight (Hd, N)
        self.mix_out = nn.Linear(hidden, tokens)   # weight (N, Hd)
        self.scale = layer_scale(dim, scale)
        self.drop_path = DropPath(drop_path)

    @classmethod
    def from_spec(cls, spec, ctx: Context) -> "TokenMlp":
        hidden = spec.token_hidden or max(1, int(spec.token_hidden_ratio * ctx.dim))
        return cls(ctx.dim, ctx.tokens, hidden, spec.drop_path, spec.norm_eps, ctx.backend, spec.layer_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)
        y = self.fused(kernels.token_mlp, x, self.norm.weight, self.norm.bias, self.mix_in.weight,
                       self.mix_in.bias, self.mix_out.weight, self.mix_out.bias, eps=self.norm.eps,
                       backend=self.backend)
        if isinstance(self.scale, nn.Identity) and not (self.drop_path.p and self.training):
            return y
        # The op returns x + mix(x). Taking x back out costs a rounding of y (at |x|'s precision), which
        # the scale (< 1 in practice) shrinks below the rounding of the sum returned.
        return x + self.drop_path(self.scale(y - x))

    def cost(self, ctx: Context) -> Cost:
        n, c, hd = ctx.tokens, ctx.dim, self.mix_in.out_features
        return Cost(2 * 2 * n * hd * c, n * c * 2 + hd * c * 2)

    def kernel_dims(self, ctx: Context) -> dict:
        return {"tokens": ctx.tokens, "channels": ctx.dim, "hidden": self.mix_in.out_features}
