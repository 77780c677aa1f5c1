"""Token merging (ToMe: Bolya et al., 2023, "Token Merging: Your ViT But Faster"): in a model built
with model.token_merging (training and inference), or for a while with `merging` (evaluate,
predict, export, summarize and bench infer --merge).

In each merging attention block, after the attention and its residual, `r` pairs of similar patch
tokens become one (so the channel MLP and every later block see r tokens fewer): the tokens are
split into two alternating sets, each token of the first set finds its most similar token of the
second (cosine similarity of the attention's keys, averaged over heads), and the r most similar
pairs are merged into the average of their tokens, weighted by how many patches each already stands
for. Later attention adds log(size) to every key's logit (proportional attention: a token that
stands for s patches is attended as s copies of it would be), and mean pooling weighs each token by
its size. Class, distillation and register tokens are never merged.

Merging needs nothing to depend on where a token is on the grid after it, so it runs in the
attention blocks of the model's last run of attention and channel-MLP blocks, and not in windowed
attention or attention with rope or relative position bias (positions); earlier attention blocks
(before a token-mixing MLP, a convolution, a downsample) keep all their tokens.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from composer.errors import UserError


class TokenMerging:
    """What the merging blocks and the head share during one forward pass: `r` (pairs merged in
    each merging block), `prefix` (tokens before the patches, never merged), and `size`, how many
    patches each token stands for ((B, N, 1), None until the first merge)."""

    def __init__(self, r: int, prefix: int):
        self.r, self.prefix = r, prefix
        self.size: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """x (B, N, C) -> (B, N - r', C), r' = min(r, patches // 2); `keys` (B, N, D) the metric."""
        p = self.prefix
        r = min(self.r, (x.shape[1] - p) // 2)
        if r <= 0:
            return x
        wide = torch.promote_types(x.dtype, torch.float32)   # sums of 16-bit tokens in fp32
        size = self.size if self.size is not None else x.new_ones(x.shape[0], x.shape[1], 1, dtype=wide)
        plan = match(keys[:, p:], r)
        patches = merge(x[:, p:].to(wide) * size[:, p:], plan)
        sizes = merge(size[:, p:], plan)
        self.size = torch.cat([size[:, :p], sizes], 1)
        return torch.cat([x[:, :p], (patches / sizes).to(x.dtype)], 1)

    def key_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Proportional attention's (B, 1, 1, N) bias of every key's logits: log(size); None
        before the first merge."""
        return None if self.size is None else self.size.log().to(dtype)[:, None, None, :, 0]


def match(metric: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bipartite soft matching of tokens (B, T, D): tokens 0, 2, 4, ... (set A) each pick their most
    similar token of 1, 3, 5, ... (set B) by cosine similarity; the r best-matched A tokens merge
    into their B token. Returns (A tokens kept, in their order; A tokens merged; the B token each
    merges into), each (B, index) into its set."""
    metric = F.normalize(metric.float(), dim=-1)
    a, b = metric[:, ::2], metric[:, 1::2]
    best, partner = (a @ b.transpose(1, 2)).max(-1)
    order = best.argsort(-1, descending=True)
    merged = order[:, :r]
    return order[:, r:].sort(-1).values, merged, partner.gather(1, merged)


def merge(t: torch.Tensor, plan) -> torch.Tensor:
    """(B, T, C) -> (B, T - r, C) by `match`'s plan: the kept A tokens, then the B tokens with the
    merged A tokens added to theirs (sums: divide by the merged sizes for means)."""
    kept, merged, into = plan
    a, b = t[:, ::2], t[:, 1::2]
    along = lambda index: index[..., None].expand(-1, -1, t.shape[-1])
    moved = a.gather(1, along(merged))
    return torch.cat([a.gather(1, along(kept)), b.scatter_add(1, along(into), moved)], 1)


def merging_blocks(model) -> list:
    """The layers (composer.build.Layer) of `model` whose attention merges tokens: the attention
    blocks of its last run of attention and channel-MLP blocks before the head (see the module's
    docstring). Raises UserError naming what stops a model that has none."""
    from composer.blocks.attention import Attention

    found, stop = [], None
    for layer in reversed(model.layers[:-1]):   # from the block before the head back
        module = layer.module
        if layer.kind == "channel_mlp":
            continue
        if isinstance(module, Attention) and not (module.windows or module.rotary or module.relative is not None):
            found.append(layer)
            continue
        stop = layer
        break
    if found:
        return found[::-1]
    if stop is not None and isinstance(stop.module, Attention):
        what = ("windowed attention (Swin)" if stop.module.windows else
                "rope" if stop.module.rotary else "relative position bias")
        raise UserError(f"token merging cannot run in {stop.name}: {what} needs each token's place on the grid, "
                        "which merging loses")
    where = ("it has no attention blocks" if not any(isinstance(layer.module, Attention) for layer in model.layers)
             else f"{stop.name} comes after its last attention block")
    raise UserError(f"token merging runs in the attention blocks at the end of a model (a ViT, or the attention half "
                    f"of a hybrid); in this model {where}")


def attach(model, r: int) -> list:
    """From now on `model` (a ComposedModel) merges `r` tokens in each of `merging_blocks(model)`
    (0: in none); returns those layers. What model.token_merging builds in, and `merging` does
    for a while."""
    from composer.blocks.attention import Attention

    for module in model.modules():   # whatever merged before
        if isinstance(module, Attention) or module is model.stages[-1] or module is model:
            module.token_merging = None
    if r == 0:
        return []
    layers = merging_blocks(model)
    ctx = layers[0].ctx
    state = TokenMerging(r, ctx.tokens - ctx.grid[0] * ctx.grid[1])
    for part in [layer.module for layer in layers] + [model.stages[-1], model]:
        part.token_merging = state
    return layers


@contextmanager
def merging(model, r: int):
    """Within it, `model` merges `r` tokens in each of `merging_blocks(model)` (0: none); yields those
    layers. Afterwards it merges as before (a model built with model.token_merging: its own)."""
    if r < 0:
        raise UserError(f"--merge {r}: the tokens merged in each block cannot be negative")
    before = model.token_merging.r if model.token_merging is not None else 0
    try:
        yield attach(model, r)
    finally:
        attach(model, before)


def tokens_after(model, r: int) -> list[tuple[str, int, int]]:
    """(layer name, tokens in, tokens out) of each merging block with `r` (no forward pass)."""
    layers = merging_blocks(model)
    ctx = layers[0].ctx
    prefix, patches = ctx.tokens - ctx.grid[0] * ctx.grid[1], ctx.grid[0] * ctx.grid[1]
    out = []
    for layer in layers:
        merged = min(r, patches // 2)
        out.append((layer.name, prefix + patches, prefix + patches - merged))
        patches -= merged
    return out


def describe(model, r: int) -> dict:
    """What merging `r` tokens a block does to `model`: {"r", "blocks" (how many merge), "tokens":
    [the first merging block's input, the last one's output], "flops": [an image without merging,
    with]}."""
    counts = tokens_after(model, r)
    return {"r": r, "blocks": len(counts), "tokens": [counts[0][1], counts[-1][2]],
            "flops": [sum(layer.cost.flops for layer in model.layers), flops_with(model, r)]}


def merge_note(info: dict, flops: bool = True) -> str:
    """ "token merging: 8 a block in 12 attention blocks, 197 -> 101 tokens, 9.20G -> 6.84G FLOPs an
    image" from `describe`'s `info` (without the FLOPs where they are said elsewhere)."""
    from composer.summarize import human

    blocks = info["blocks"]
    said = (f"token merging: {info['r']} a block in {blocks} attention block{'s' * (blocks != 1)}, "
            f"{info['tokens'][0]} -> {info['tokens'][1]} tokens")
    return said + (f", {human(info['flops'][0])} -> {human(info['flops'][1])} FLOPs an image" if flops else "")


def flops_with(model, r: int) -> int:
    """FLOPs an image forward while merging `r` tokens a merging block: the sum of `layer_costs`."""
    return sum(flops for _, _, flops in layer_costs(model, r))


def layer_costs(model, r: int) -> list[tuple[int | None, int | None, int]]:
    """(tokens in, tokens out, FLOPs an image) of each of the model's `layers` while merging `r`
    tokens a merging block (tokens None: as the layer was built, before any merge): the layers'
    own costs, each block after the first merge at the tokens it then sees, a merging block's
    matching (its similarities: a multiply-add is 2 FLOPs, as everywhere) in its own."""
    from dataclasses import replace

    from composer.blocks import Block

    layers = merging_blocks(model)
    after = {layer.name: out for layer, (_, _, out) in zip(layers, tokens_after(model, r))}
    ctx = layers[0].ctx
    prefix = ctx.tokens - ctx.grid[0] * ctx.grid[1]
    rows, tokens = [], None
    for layer in model.layers:
        seen = tokens
        if seen is not None and isinstance(layer.module, Block):
            flops = layer.module.cost(replace(layer.ctx, tokens=seen)).flops
        else:
            flops = layer.cost.flops
        if layer.name in after:
            patches = (seen or ctx.tokens) - prefix
            if after[layer.name] < prefix + patches:   # matched (a block that merges nothing skips it)
                flops += 2 * (patches - patches // 2) * (patches // 2) * (ctx.dim // layer.module.heads)
            tokens = after[layer.name]
        rows.append((seen, tokens, flops))
    return rows
