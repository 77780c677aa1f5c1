"""Spec -> nn.Module: registry lookup, layout tracking, einops adapters where layouts change.

The model is a flat list of layers (stem, adapters, blocks, head) so that the
summary, visualization and tests can walk it; `Layer` records say where each
layer came from in the spec and what shapes it sees.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops.layers.torch import Rearrange
from torch import nn

from composer.blocks import COMPOSITES, REGISTRY, Block, Context, Cost
from composer.blocks.base import ChannelLayerNorm, FusedBatchNorm, activation
from composer.spec import ModelSpec, Spec


@dataclass
class Layer:
    """One row of the model: where it came from and the shapes it sees (per image)."""

    name: str           # "blocks[2].attention #1"
    kind: str
    layout: str         # layout it consumes: "image" | "tokens" | "grid" | "tokens->grid" ...
    in_shape: tuple
    out_shape: tuple
    module: nn.Module
    ctx: Context
    cost: Cost


class Stem(FusedBatchNorm, nn.Module):
    """Patchify + project: image (B, Cin, H, W) -> grid (B, C, h, w) [conv, convs] or tokens (B, N, C) [linear].

    A conv stem with GELU and BatchNorm (ConvMixer's) trains them as one kernels.batch_norm
    where the ConvMixer blocks do (`FusedBatchNorm.uses_fused_norm`)."""

    def __init__(self, spec: ModelSpec, backend: str = "auto"):
        super().__init__()
        s, p = spec.stem, spec.stem.patch_size
        self.resize, self.backend, self.patch = spec.resize, backend, p
        if s.kind == "conv" and s.norm == "batchnorm" and s.activation == "gelu":
            self.norm_op = "batch_norm"
        if s.kind == "conv":
            self.project = nn.Conv2d(spec.in_channels, s.dim, p, stride=p, bias=s.bias)
        elif s.kind == "convs":
            self.project = conv_stem(spec.in_channels, s.dim, p, bias=s.bias)
        else:
            self.project = nn.Sequential(Rearrange("b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p),
                                         nn.Linear(p * p * spec.in_channels, s.dim, bias=s.bias))
        self.out_layout = "tokens" if s.kind == "linear" else "grid"
        self.act = activation(s.activation) if s.activation else nn.Identity()
        if s.norm == "batchnorm":
            self.norm = nn.BatchNorm2d(s.dim) if s.kind != "linear" else _TokenBatchNorm(s.dim)
        elif s.norm == "layernorm":
            norm = nn.LayerNorm if s.kind == "linear" else ChannelLayerNorm
            self.norm = norm(s.dim, eps=s.norm_eps)
        else:
            self.norm = nn.Identity()

    def cost(self, image: int) -> Cost:
        """FLOPs of the projection of one `image` x `image` input (after any resize), and the
        activations it keeps (input and output of each convolution)."""
        flops = activations = 0
        side = image
        for conv in (m for m in self.project.modules() if isinstance(m, (nn.Conv2d, nn.Linear))):
            if isinstance(conv, nn.Linear):   # a linear stem: one Linear over every patch
                cells = (side // self.patch) ** 2
                flops += 2 * cells * conv.in_features * conv.out_features
                activations += 2 * cells * conv.out_features
                continue
            side = side // conv.stride[0]
            k = conv.kernel_size[0] * conv.kernel_size[1]
            flops += 2 * side * side * k * conv.in_channels * conv.out_channels
            activations += 2 * side * side * conv.out_channels
        return Cost(flops, activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize and x.shape[-1] != self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        if self.norm_op:   # GELU then BatchNorm (exact GELU, as `activation` builds it)
            return self.normalize(self.norm, self.project(x), gelu=True)
        return self.norm(self.act(self.project(x)))


def conv_stem(in_channels: int, dim: int, patch: int, bias: bool = True) -> nn.Sequential:
    """ViT_C's convolutional stem (Xiao et al., 2021): log2(patch) 3x3 convolutions of stride 2
    (BatchNorm, ReLU after each; no bias before BatchNorm), their channels doubling to end at dim,
    then a 1x1 convolution to dim. For ViT-S/16: 48, 96, 192, 384, then 384."""
    steps = patch.bit_length() - 1
    layers, cin = [], in_channels
    for i in range(steps):
        cout = max(1, dim >> (steps - 1 - i))
        layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        cin = cout
    return nn.Sequential(*layers, nn.Conv2d(cin, dim, 1, bias=bias))


class TokenNorm(nn.Module):
    """A LayerNorm over every token (B, N, C): model.norm_pre, CLIP's ln_pre."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        return self.norm(x)


class _TokenBatchNorm(nn.BatchNorm1d):
    def forward(self, x):  # (B, N, C)
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class PositionEmbedding(nn.Module):
    """Adds a learned or fixed 2-D sin-cos embedding to tokens (B, N, C)."""

    def __init__(self, kind: str, tokens: int, dim: int, grid: tuple[int, int], prefix: int = 0):
        """`prefix`: tokens before the patches (class and distillation tokens), which the fixed
        table leaves as they are (zero rows); a learned table learns a row for each."""
        super().__init__()
        if kind == "learned":
            self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        else:
            table = sincos_2d(grid, dim)
            if prefix:
                table = torch.cat([torch.zeros(prefix, dim), table])
            self.register_buffer("pos", table[None], persistent=False)

    def forward(self, x):
        return x + self.pos.to(x.dtype)


def sincos_2d(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine table (h*w, dim): a quarter of the channels per sin/cos of y/x."""
    h, w = grid
    quarter = max(1, dim // 4)
    freq = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    parts = [f(c.reshape(-1, 1) * freq) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    table = torch.cat(parts, dim=1)
    table = F.pad(table, (0, max(0, dim - table.shape[1])))[:, :dim]
    return table.float()


class ClassToken(nn.Module):
    """Prepends a learned class token: (B, N, C) -> (B, N + 1, C); with `distill`, DeiT's
    distillation token after it: (B, N + 2, C)."""

    def __init__(self, dim: int, distill: bool = False):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim))
        # DeiT starts it at random (truncated normal), so that it does not start as the class token's twin
        self.dist_token = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, 1, dim), std=0.02)) if distill else None

    def forward(self, x):
        tokens = self.token if self.dist_token is None else torch.cat([self.token, self.dist_token], dim=1)
        return torch.cat([tokens.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)


class RegisterTokens(nn.Module):
    """Learned register tokens without a position: (B, N, C) -> (B, N + R, C), placed after the
    class (and distillation) token when there is one, else first; the head drops them."""

    def __init__(self, dim: int, count: int, after: int):
        super().__init__()
        self.after = after
        # distinct starting values: identical registers would get identical gradients and stay alike
        self.tokens = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, count, dim), std=0.02))

    def forward(self, x):
        registers = self.tokens.expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([x[:, :self.after], registers, x[:, self.after:]], dim=1)


class AttentionPool(nn.Module):
    """Multi-head attention pooling (MAP: Zhai et al., 2022, "Scaling Vision Transformers"; SigLIP):
    one learned query attends over the tokens (B, N, C) -> (B, C), then an MLP adds to the result
    (pre-norm, with a residual), as timm's AttentionPoolLatent."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, norm_eps: float = 1e-6, mlp_activation: str = "gelu"):
        super().__init__()
        self.heads = heads
        self.latent = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, 1, dim), std=dim ** -0.5))
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), activation(mlp_activation), nn.Linear(hidden, dim))

    def forward(self, x, key_bias=None):
        """`key_bias`: (B, 1, 1, N) added to the query's logits (merged tokens: log of their sizes)."""
        b, n, c = x.shape
        q = self.q(self.latent.to(x.dtype)).view(1, 1, self.heads, -1).transpose(1, 2).expand(b, -1, -1, -1)
        k, v = self.kv(x).view(b, n, 2, self.heads, -1).permute(2, 0, 3, 1, 4)   # each (B, heads, N, d)
        pooled = self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias).reshape(b, c))
        return pooled + self.mlp(self.norm(pooled))

    def probs(self, x) -> torch.Tensor:
        """The query's attention over the tokens, (B, heads, N): what `visualize` draws."""
        from kernels.attention.reference import attention_probs

        b, n, c = x.shape
        q = self.q(self.latent.to(x.dtype)).view(1, 1, self.heads, -1).transpose(1, 2).expand(b, -1, -1, -1)
        k = self.kv(x)[..., :c].view(b, n, self.heads, -1).transpose(1, 2)
        return attention_probs(q, k)[:, :, 0]

    def cost(self, tokens: int, dim: int) -> Cost:
        hidden = self.mlp[0].out_features
        flops = 2 * (dim * dim + tokens * dim * 2 * dim + 2 * tokens * dim + dim * dim + 2 * dim * hidden)
        return Cost(flops, tokens * 3 * dim + 2 * dim + hidden)


class DistilledLogits(NamedTuple):
    """What a model with a distillation token returns when asked for each classifier's logits
    (training with a teacher: the loss gives the first the labels, the second the teacher's
    predictions; evaluating: each one's accuracy)."""
    cls: torch.Tensor
    dist: torch.Tensor

    def mean(self) -> torch.Tensor:
        """The model's prediction: what it returns otherwise."""
        return (self.cls + self.dist) / 2


class Head(nn.Module):
    """(norm) -> pool (class token, mean or attention) -> (norm) -> dropout -> Linear to classes.

    `prefix`: tokens before the patches (class token, registers) that mean pooling leaves out.
    `distill`: DeiT's head, a second classifier on the distillation token (token 1). It returns the
    mean of both classifiers' logits (the model's prediction), or with `both_logits` set, both
    (`DistilledLogits`): a teacher's term trains one of them (`ComposedModel.distilled_training`),
    and evaluation reports each one's accuracy (`each_classifier`)."""

    def __init__(self, dim: int, classes: int, pool: str, layout: str, norm: str, dropout: float, prefix: int = 0,
                 norm_eps: float = 1e-6, distill: bool = False, attention: AttentionPool | None = None):
        super().__init__()
        self.pool, self.layout, self.prefix = pool, layout, prefix
        # where the LayerNorm goes: on every token before pooling, or on the pooled vector
        self.norm_pooled = norm == "pooled" or layout == "grid"
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if norm != "none" else nn.Identity()
        self.attend = attention   # pool: attention (over the patches' tokens, registers left out, as timm's)
        self.dropout = nn.Dropout(dropout)
        self.classify = nn.Linear(dim, classes)
        self.classify_dist = nn.Linear(dim, classes) if distill else None
        self.both_logits = False
        self.token_merging = None   # a composer.merging.TokenMerging while the model merges tokens

    def _pooled(self, x, token: int = 0):
        if self.layout == "grid":                        # (B, C, H, W)
            return self.norm(x.mean(dim=(2, 3)))
        if not self.norm_pooled:                         # (B, N, C)
            x = self.norm(x)
        merged = self.token_merging is not None and self.token_merging.size is not None
        if self.attend is not None:
            bias = self.token_merging.key_bias(x.dtype)[..., self.prefix:] if merged else None
            pooled = self.attend(x[:, self.prefix:], bias)     # (pooling_probs: where it looks)
        elif self.pool == "cls":
            pooled = x[:, token]
        elif merged:   # each token weighed by the patches it stands for: the mean over the patches
            size = self.token_merging.size[:, self.prefix:]
            pooled = ((x[:, self.prefix:] * size).sum(1) / size.sum(1)).to(x.dtype)
        else:
            pooled = x[:, self.prefix:].mean(dim=1)
        return self.norm(pooled) if self.norm_pooled else pooled

    def pooling_probs(self, x) -> torch.Tensor:
        """With attention pooling: its query's attention over the patch tokens of `x`, (B, heads, N),
        from the same input `_pooled` gives it."""
        return self.attend.probs((x if self.norm_pooled else self.norm(x))[:, self.prefix:])

    def features(self, x):
        """The pooled feature vector per image (with a distillation token: the mean of the two tokens')."""
        if self.classify_dist is None:
            return self._pooled(x)
        return (self._pooled(x, 0) + self._pooled(x, 1)) / 2

    def forward(self, x):
        logits = self.classify(self.dropout(self._pooled(x)))
        if self.classify_dist is None:
            return logits
        both = DistilledLogits(logits, self.classify_dist(self.dropout(self._pooled(x, 1))))
        return both if self.both_logits else both.mean()


class ComposedModel(nn.Module):
    """The built network. `layers` lists every stage with its spec origin and shapes."""

    def __init__(self, spec: ModelSpec, layers: list[Layer]):
        super().__init__()
        self.spec = spec
        self.layers = layers
        self.stages = nn.ModuleList(layer.module for layer in layers)
        self.recomputed: frozenset[int] = frozenset()   # stages whose activations the backward recomputes
        self.frozen = 0   # the first stages that keep their weights (train.freeze)
        self.token_merging = None   # a composer.merging.TokenMerging while it merges tokens (composer.merging)

    def recompute_token_blocks(self) -> int:
        """Activation checkpointing (train.recompute): from now on, each block in token layout
        (attention, token and channel MLPs) keeps only its input for the backward, which runs its
        forward again to get the rest. Grid blocks are left alone: recomputing their BatchNorm
        would update its running statistics twice. Returns how many stages recompute."""
        self.recomputed = frozenset(i for i, layer in enumerate(self.layers)
                                    if isinstance(layer.module, Block) and layer.module.layout == "tokens")
        return len(self.recomputed)

    def freeze(self, stages: int) -> int:
        """Fine-tuning (train.freeze): the first `stages` stages keep their weights. They get no
        gradients, stay in evaluation mode while the rest trains (BatchNorm keeps its running
        statistics, dropout and drop path are off: the features the rest learns on do not drift),
        and run without autograd: nothing before them trains, so the backward stops where they
        end and none of their activations is kept. Returns the parameters frozen."""
        self.frozen = stages
        for stage in self.stages[:stages]:
            stage.requires_grad_(False)
        frozen = sum(p.numel() for stage in self.stages[:stages] for p in stage.parameters())
        head = self.stages[-1]
        if stages == len(self.stages) - 1 and getattr(head, "attend", None) is not None:
            # A linear probe of a model that pools by attention (SigLIP's encoder ends with it): the
            # pooling, and the LayerNorm before it, are features too; the classifier alone trains.
            for part in (head.attend,) + ((head.norm,) if not head.norm_pooled else ()):
                part.requires_grad_(False)
                frozen += sum(p.numel() for p in part.parameters())
        self.train(self.training)
        return frozen

    def train(self, mode: bool = True):
        super().train(mode)
        for stage in self.stages[:self.frozen]:
            stage.eval()
        return self

    def distilled_training(self, enabled: bool = True) -> bool:
        """With a distillation token (model.head.distill_token): from now on, return each
        classifier's logits (`DistilledLogits`), for the loss to give one the labels and the other
        a teacher's predictions (evaluation takes their mean). Returns whether the model has such a
        token."""
        head = self.stages[-1]
        if getattr(head, "classify_dist", None) is None:
            return False
        head.both_logits = enabled
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_merging is not None:   # every image starts with one token a patch
            self.token_merging.size = None
        if self.frozen:
            with torch.no_grad():
                for stage in self.stages[:self.frozen]:
                    x = stage(x)
        recompute = self.training and torch.is_grad_enabled()
        for i, stage in enumerate(self.stages[self.frozen:], start=self.frozen):
            if recompute and i in self.recomputed:
                # non-reentrant: the recomputation restores the RNG (dropout, drop path draw the same)
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return x

    def blocks(self) -> list[Layer]:
        return [layer for layer in self.layers if isinstance(layer.module, Block)]


@contextmanager
def each_classifier(model):
    """Within it, a model with a distillation token returns each classifier's logits
    (`DistilledLogits`); yields whether it has one (other models are left as they are)."""
    head = model.stages[-1] if isinstance(model, ComposedModel) else None
    if getattr(head, "classify_dist", None) is None:
        yield False
        return
    before, head.both_logits = head.both_logits, True
    try:
        yield True
    finally:
        head.both_logits = before


def expand_blocks(spec: ModelSpec) -> list[tuple[str, str, object, int]]:
    """(name, kind, block spec, which repeat) for every block instance, composites and repeats unrolled. With
    `model.drop_path`, each instance's spec carries its rate on the linear ramp over depth (a
    repeat of a block with a residual branch is one step of depth; the two halves of a vit, mixer
    or convmixer block share it; pointwise and downsample blocks, which have no residual branch
    to drop, are not steps)."""
    residual = [("drop_path" in type(block).model_fields) for block in spec.blocks]
    depth = sum(block.repeat for block, has in zip(spec.blocks, residual) if has)
    out, step = [], 0
    for i, block in enumerate(spec.blocks):
        for r in range(block.repeat):
            if spec.drop_path and residual[i]:   # as timm's linspace(0, rate, depth)
                rate = spec.drop_path * step / (depth - 1) if depth > 1 else 0.0
                block = block.model_copy(update={"drop_path": rate})
            for kind in COMPOSITES.get(block.kind, (block.kind,)):
                suffix = f" #{r + 1}" if block.repeat > 1 else ""
                out.append((f"blocks[{i}].{kind}{suffix}", kind, block, r))
            step += residual[i]
    return out


def build_model(spec: Spec | ModelSpec, backend: str = "auto") -> ComposedModel:
    """Assemble the model described by a validated spec."""
    m = spec.model if isinstance(spec, Spec) else spec
    dim, size = m.stem.dim, m.input_size
    grid = (size // m.stem.patch_size, size // m.stem.patch_size)
    patches = grid[0] * grid[1]
    instances = expand_blocks(m)
    layouts = [REGISTRY[kind].layout for _, kind, _, _ in instances]
    # The class token and register tokens join where the trailing run of token blocks starts, so
    # grid blocks never see them.
    join_at = len(layouts)
    while join_at > 0 and layouts[join_at - 1] == "tokens":
        join_at -= 1
    cls_at = join_at if m.head.pool == "cls" else None
    registers_at = join_at if m.registers else None
    tokens = patches

    layers: list[Layer] = []
    image = (m.in_channels, m.image_size, m.image_size)

    def shape(layout, n):
        return (n, dim) if layout == "tokens" else (dim,) + grid

    rotary = m.pos_embed == "rope"
    embedded = m.pos_embed in ("learned", "sincos")   # a table added to the tokens

    def add(name, kind, layout, in_shape, out_shape, module, cost=Cost(0, 0)):
        layers.append(Layer(name, kind, layout, in_shape, out_shape, module, Context(dim, tokens, grid, backend),
                            cost))

    stem = Stem(m, backend)
    layout = stem.out_layout
    add("stem", f"stem ({m.stem.kind})", "image", image, shape(layout, tokens), stem, stem.cost(size))

    def to(new_layout, n):
        nonlocal layout
        if layout == new_layout:
            return
        pattern = "b c h w -> b (h w) c" if new_layout == "tokens" else "b (h w) c -> b c h w"
        module = Rearrange(pattern) if new_layout == "tokens" else Rearrange(pattern, h=grid[0], w=grid[1])
        add("rearrange", "rearrange", f"{layout}->{new_layout}", shape(layout, n), shape(new_layout, n), module)
        layout = new_layout

    def add_registers():
        nonlocal tokens
        add("registers", "registers", "tokens", shape("tokens", tokens), shape("tokens", tokens + m.registers),
            RegisterTokens(dim, m.registers, after=class_tokens if cls_at is not None else 0))
        tokens += m.registers

    class_tokens = 1 + m.head.distill_token   # the class token, and DeiT's distillation token beside it

    def add_class_token():
        nonlocal tokens
        name = "class + distillation tokens" if m.head.distill_token else "class token"
        add(name, "cls_token", "tokens", shape("tokens", tokens), shape("tokens", tokens + class_tokens),
            ClassToken(dim, distill=m.head.distill_token))
        tokens += class_tokens

    if embedded or join_at == 0:
        to("tokens", tokens)
    if cls_at == 0:
        add_class_token()
    if embedded:
        add("pos_embed", f"pos_embed ({m.pos_embed})", "tokens", shape("tokens", tokens), shape("tokens", tokens),
            PositionEmbedding(m.pos_embed, tokens, dim, grid, class_tokens if cls_at == 0 else 0))
    if registers_at == 0:   # after the position embedding: registers have no position
        add_registers()
    if m.norm_pre:   # over all of them (the rules: the first block works on tokens)
        to("tokens", tokens)
        add("norm_pre", "norm_pre", "tokens", shape("tokens", tokens), shape("tokens", tokens),
            TokenNorm(dim, m.norm_pre_eps))

    for index, (name, kind, block_spec, repeat) in enumerate(instances):
        cls = REGISTRY[kind]
        to(cls.layout, tokens)
        if index == cls_at and index > 0:
            add_class_token()
        if index == registers_at and index > 0:
            add_registers()
        ctx = Context(dim, tokens, grid, backend, rotary, repeat, m.pos_embed == "relative")
        module = cls.from_spec(block_spec, ctx)
        in_shape = shape(layout, tokens)
        after = module.output_context(ctx)   # a downsample block: fewer, wider cells from here on
        if after != ctx:
            dim, grid, tokens = after.dim, after.grid, after.tokens
            patches = tokens
        layers.append(Layer(name, kind, cls.layout, in_shape, shape(layout, tokens), module, ctx, module.cost(ctx)))

    norm = "layernorm" if m.head.norm == "auto" and layout == "tokens" else m.head.norm
    norm = "none" if norm == "auto" else norm
    attention = AttentionPool(dim, m.pool_heads(), m.head.mlp_ratio or 4.0, m.head.norm_eps,
                              m.head.mlp_activation or "gelu") if m.head.pool == "attention" else None
    head = Head(dim, m.num_classes, m.head.pool, layout, norm, m.head.dropout, prefix=tokens - patches,
                norm_eps=m.head.norm_eps, distill=m.head.distill_token, attention=attention)
    classifiers = 1 + m.head.distill_token
    cost = Cost(classifiers * 2 * dim * m.num_classes, classifiers * dim)
    if attention is not None:
        pooling = attention.cost(patches, dim)
        cost = Cost(cost.flops + pooling.flops, cost.activations + pooling.activations)
    add("head", f"head ({m.head.pool}{' + distillation' if m.head.distill_token else ''})", layout,
        shape(layout, tokens), (m.num_classes,), head, cost)
    model = ComposedModel(m, layers)
    _init_weights(model)
    if m.token_merging:   # ToMe in training and inference (composer.merging)
        from composer.merging import attach

        attach(model, m.token_merging)
    return model


def _init_weights(model: nn.Module) -> None:
    """Truncated-normal Linear weights and zero biases (ViT / Mixer practice); convs keep PyTorch's init."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_backend(kernels: str, compile_model: bool) -> str:
    """The block backend a training run builds: "auto" under torch.compile means the PyTorch
    reference blocks, which inductor fuses itself (`prepare_for_compile` then hands the
    depthwise convolutions back to the Triton kernels on CUDA)."""
    return "reference" if compile_model and kernels == "auto" else kernels


def prepare_for_compile(model: nn.Module, kernels: str, device: torch.device) -> list[str]:
    """Before torch.compile of a training model: which blocks run their fused op as Triton
    kernels, each eagerly between compiled regions (a graph break on either side). Returns
    the ops so run.

    Our Triton ops inside a compiled training graph crashed with an illegal memory access on
    sm_90 (tests/test_gpu_end_to_end.py), while the same kernels run correctly in eager mode
    and in compiled inference; outside the graph they run as in eager mode, and inductor
    still fuses everything around them (normalization, activations, residual adds).
    - kernels "triton": every block's op.
    - kernels "auto", on CUDA: the depthwise convolution only. cuDNN's, which the compiled
      reference block would use, was 4-9x slower than the Triton kernels at kernel sizes 7 and
      9 (H100, BENCHMARKS.md) and inductor has nothing faster; attention and token mixing stay
      in the graph as PyTorch blocks (SDPA and inductor's own fusion).
    """
    chosen = []
    for module in model.modules():
        if not (isinstance(module, Block) and module.kernel_op):
            continue
        if kernels == "triton" or (kernels == "auto" and device.type == "cuda" and module.kernel_op == "dwconv2d"):
            module.backend = kernels
            module.kernel_outside_graph = True
            chosen.append(module.kernel_op)
    return sorted(set(chosen))
