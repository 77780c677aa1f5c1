"""Pre-norm multi-head self-attention with a residual: tokens (B, N, C) -> (B, N, C)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import kernels
from composer.blocks.base import Block, Context, Cost, DropPath, layer_scale, register


@register
class Attention(Block):
    """Args:
        dim: channels C; heads: number of heads (divides dim); qkv_bias: bias on to_qkv;
        attn_dropout: dropout on probabilities (forces the reference path while training);
        proj_dropout: dropout after to_out; drop_path: stochastic depth; norm_eps: LayerNorm eps;
        qk_norm: LayerNorm over each head's queries and keys; scale: LayerScale's initial value (None: none).
    """

    kind, layout, kernel_op = "attention", "tokens", "attention"

    def __init__(self, dim, heads, qkv_bias=True, attn_dropout=0.0, proj_dropout=0.0, drop_path=0.0,
                 norm_eps=1e-6, backend="auto", qk_norm=False, scale=None):
        super().__init__()
        self.heads, self.attn_dropout, self.backend = heads, attn_dropout, backend
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)
        self.proj_dropout = nn.Dropout(proj_dropout)
        head_dim = dim // heads
        self.q_norm = nn.LayerNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = nn.LayerNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.scale = layer_scale(dim, scale)
        self.drop_path = DropPath(drop_path)

    @classmethod
    def from_spec(cls, spec, ctx: Context) -> "Attention":
        return cls(ctx.dim, spec.heads, spec.qkv_bias, spec.attn_dropout, spec.proj_dropout, spec.drop_path,
                   spec.norm_eps, ctx.backend, spec.qk_norm, spec.layer_scale)

    def packed_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """The projection (B, N, 3 H D), queries and keys normalized per head with qk_norm."""
        qkv = self.to_qkv(self.norm(x))
        if self.q_norm is None:
            return qkv
        q, k, v = rearrange(qkv, "b n (three h d) -> three b n h d", three=3, h=self.heads).unbind(0)
        # LayerNorm runs in fp32 under autocast: back to the projection's dtype, or the op would get fp32
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        return torch.stack([q, k, v], dim=2).flatten(2)   # one copy, so the packed op still reads one tensor

    def qkv(self, x: torch.Tensor):
        # Strided views of the packed projection, no copy: each (B, H, N, D).
        return rearrange(self.packed_qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads).unbind(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.attn_dropout > 0:
            q, k, v = self.qkv(x)
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout)
            out = rearrange(out, "b h n d -> b n (h d)")
        else:
            # the packed op reads q, k, v in place, writes the out-projection's layout and hands
            # the gradient back in the projection's layout: no copy either way
            out = self.fused(kernels.attention_packed, self.packed_qkv(x), self.heads, backend=self.backend)
        return x + self.drop_path(self.scale(self.proj_dropout(self.to_out(out))))

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax(Q K^T / sqrt(D)) of this layer for input x, recomputed exactly: (B, H, N, N)."""
        from kernels.attention.reference import attention_probs

        q, k, _ = self.qkv(x)
        return attention_probs(q, k)

    def cost(self, ctx: Context) -> Cost:
        n, c = ctx.tokens, ctx.dim
        flops = 2 * n * c * 3 * c + 2 * 2 * n * n * c + 2 * n * c * c
        # saved for backward: x, LN out, qkv, attention out, per-row statistics
        return Cost(flops, n * c * 6 + self.heads * n)

    def kernel_dims(self, ctx: Context) -> dict:
        return {"head_dim": ctx.dim // self.heads}
