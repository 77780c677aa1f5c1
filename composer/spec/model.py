"""Pydantic models of the `model:` section: stem, position embedding, blocks, head.

Every model forbids unknown keys and documents each field: the descriptions
become the JSON Schema that editors use to check specs as they are typed.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

Probability = Annotated[float, Field(ge=0.0, lt=1.0)]
Activation = Literal["gelu", "relu"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# -- stem ---------------------------------------------------------------------

class Stem(Strict):
    """Cuts the image into non-overlapping patches and projects each to `dim` channels."""

    kind: Literal["conv", "linear", "convs"] = Field(
        "conv",
        description="conv: a strided Conv2d (kernel = stride = patch_size), output on the grid; "
        "linear: flatten each patch and apply a Linear layer, output as tokens (same parameters, same math); "
        "convs: a convolutional stem (Xiao et al., 2021, 'Early Convolutions Help Transformers See Better'): "
        "log2(patch_size) 3x3 convolutions of stride 2, each followed by BatchNorm and ReLU, the channels doubling "
        "up to dim, then a 1x1 convolution to dim; output on the grid. Needs a power-of-two patch_size.",
    )
    patch_size: PositiveInt = Field(description="Side of the square patch in pixels; must divide the image size.")
    dim: PositiveInt = Field(description="Channels per token / grid cell after the stem (a downsample block "
                             "changes them for the blocks after it).")
    activation: Optional[Activation] = Field(None, description="Activation after the projection (ConvMixer uses gelu).")
    norm: Literal["none", "batchnorm", "layernorm"] = Field(
        "none", description="Normalization after the projection (ConvMixer uses batchnorm)."
    )
    norm_eps: Annotated[float, Field(gt=0.0)] = Field(1e-6, description="layernorm: its epsilon.")
    bias: bool = Field(True, description="A bias in the projection (CLIP's patch embedding has none).")


# -- blocks -------------------------------------------------------------------

class Repeated(Strict):
    repeat: PositiveInt = Field(1, description="How many copies of this block to stack, each with its own weights.")


class BlockBase(Repeated):
    drop_path: Probability = Field(
        0.0, description="Stochastic-depth probability of skipping the residual branch (for convmixer: of its dwconv).")


class TokenBlock(BlockBase):
    norm_eps: Annotated[float, Field(gt=0.0)] = Field(1e-6, description="LayerNorm epsilon.")
    layer_scale: Optional[Annotated[float, Field(gt=0.0)]] = Field(
        None, description="LayerScale (CaiT, DeiT III): multiply the residual branch by a learned per-channel "
        "factor that starts at this value (e.g. 1e-5 for deep ViTs, 0.1 for shallow ones); none: no factor.")


class AttentionFields(BaseModel):
    heads: PositiveInt = Field(description="Number of attention heads; must divide dim.")
    qkv_bias: bool = Field(True, description="Bias on the query/key/value projection.")
    attn_dropout: Probability = Field(0.0, description="Dropout on the attention probabilities (reference path only).")
    proj_dropout: Probability = Field(0.0, description="Dropout after the output projection.")
    qk_norm: bool = Field(
        False, description="LayerNorm over each head's queries and keys before attention (as ViT-22B: keeps the "
        "attention logits bounded at high learning rates).")
    window: Optional[PositiveInt] = Field(
        None, description="Window attention (Swin): each token attends only to the window x window cells of the "
        "patch grid around it, for a cost that grows with the token count instead of its square; must divide "
        "the grid the block gets. None: every token attends to every token.")
    shift: bool = Field(
        False, description="With window: every second repeat of this block (the 2nd, 4th, ...) shifts its windows "
        "by half a window, so that information crosses the windows' borders (Swin's shifted windows). Needs "
        "repeat >= 2.")


class TokenMlpFields(BaseModel):
    token_hidden: Optional[PositiveInt] = Field(
        None, description="Hidden width of the token-mixing MLP; default token_hidden_ratio x dim (as in MLP-Mixer)."
    )
    token_hidden_ratio: Annotated[float, Field(gt=0.0)] = Field(
        0.5, description="Token-MLP hidden width as a multiple of dim, used when token_hidden is not given."
    )


class ChannelMlpFields(BaseModel):
    mlp_ratio: Annotated[float, Field(gt=0.0)] = Field(4.0, description="Channel-MLP hidden width as a multiple of dim.")
    dropout: Probability = Field(0.0, description="Dropout after each channel-MLP layer.")
    mlp_activation: Literal["gelu", "gelu_tanh", "quick_gelu", "swiglu"] = Field(
        "gelu", description="gelu: Linear, GELU, Linear. gelu_tanh: the same with GELU's tanh approximation (as "
        "SigLIP's encoders); quick_gelu: x * sigmoid(1.702 x) (OpenAI's CLIP). swiglu: a gated MLP (LLaMA, EVA-02): the first Linear makes a value and a gate of the "
        "hidden width each, value * SiLU(gate) goes on; 1.5x the parameters at one mlp_ratio, so mlp_ratio 8/3 "
        "matches gelu's 4.")


class PoolFields(BaseModel):
    pool_size: PositiveInt = Field(
        3, description="Side of the average pooling window on the patch grid (odd, stride 1, 'same' size).")


class ConvFields(BaseModel):
    kernel_size: PositiveInt = Field(9, description="Depthwise kernel side (odd, 'same' padding).")
    activation: Activation = Field("gelu", description="Activation after each convolution.")


class AttentionBlock(TokenBlock, AttentionFields):
    """Pre-norm multi-head self-attention with a residual connection (tokens in, tokens out)."""

    kind: Literal["attention"]


class TokenMlpBlock(TokenBlock, TokenMlpFields):
    """Pre-norm token-mixing MLP (mixes across tokens, per channel) with a residual connection."""

    kind: Literal["token_mlp"]


class ChannelMlpBlock(TokenBlock, ChannelMlpFields):
    """Pre-norm MLP across channels with a residual connection."""

    kind: Literal["channel_mlp"]


class PoolBlock(TokenBlock, PoolFields):
    """Pre-norm average pooling over the patch grid as the token mixer (PoolFormer), minus the token itself,
    with a residual connection; a class token or registers are not mixed."""

    kind: Literal["pool"]


class DwConvBlock(BlockBase, ConvFields):
    """ConvMixer's spatial mixing: depthwise conv -> activation -> BatchNorm, plus a residual (grid layout)."""

    kind: Literal["dwconv"]


class ConvNextBlock(BlockBase):
    """ConvNeXt's block: depthwise conv -> LayerNorm -> MLP over channels -> layer scale, plus a residual (grid)."""

    kind: Literal["convnext"]
    kernel_size: PositiveInt = Field(7, description="Depthwise kernel side (odd, 'same' padding).")
    mlp_ratio: Annotated[float, Field(gt=0.0)] = Field(4.0, description="The MLP's hidden width as a multiple of dim.")
    norm_eps: Annotated[float, Field(gt=0.0)] = Field(1e-6, description="LayerNorm epsilon.")
    layer_scale: Optional[Annotated[float, Field(gt=0.0)]] = Field(
        1e-6, description="LayerScale's initial value (ConvNeXt uses 1e-6); none: no factor.")


class DownsampleBlock(Repeated):
    """Between the stages of a hierarchical model: merges each factor x factor patch of the grid into one cell
    with `dim` channels (a normalization, then a strided convolution; ConvNeXt's downsampling layer, Swin's
    patch merging). The blocks after it see the smaller grid and the new width (grid layout)."""

    kind: Literal["downsample"]
    dim: Optional[PositiveInt] = Field(
        None, description="Channels after it; default twice the channels before it (as ConvNeXt and Swin).")
    factor: Annotated[int, Field(ge=2)] = Field(
        2, description="Side of the patch merged into one cell: the grid's sides shrink by this factor, which "
        "must divide them.")
    norm: Literal["layernorm", "batchnorm", "none"] = Field(
        "layernorm", description="Normalization over the channels before the convolution.")
    norm_eps: Annotated[float, Field(gt=0.0)] = Field(1e-6, description="The normalization's epsilon.")
    style: Literal["conv", "merge"] = Field(
        "conv", description="conv: the norm over each cell's channels, then a factor x factor convolution of "
        "stride factor (ConvNeXt); merge: Swin's patch merging, each patch's factor^2 x channels values side by "
        "side, a LayerNorm over them, then a Linear without bias (norm layernorm or none).")


class PointwiseBlock(Repeated):
    """ConvMixer's channel mixing: 1x1 conv -> activation -> BatchNorm, no residual (grid layout)."""

    kind: Literal["pointwise"]
    activation: Activation = Field("gelu", description="Activation after the 1x1 convolution.")


class VitBlock(TokenBlock, AttentionFields, ChannelMlpFields):
    """A transformer encoder layer: attention then channel_mlp."""

    kind: Literal["vit"]


class MixerBlock(TokenBlock, TokenMlpFields, ChannelMlpFields):
    """An MLP-Mixer layer: token_mlp then channel_mlp."""

    kind: Literal["mixer"]


class PoolFormerBlock(TokenBlock, PoolFields, ChannelMlpFields):
    """A PoolFormer (MetaFormer) layer: pool then channel_mlp."""

    kind: Literal["poolformer"]


class ConvMixerBlock(BlockBase, ConvFields):
    """A ConvMixer layer: dwconv (with residual) then pointwise."""

    kind: Literal["convmixer"]


Block = Annotated[
    Union[
        AttentionBlock, TokenMlpBlock, ChannelMlpBlock, PoolBlock, DwConvBlock, PointwiseBlock,
        VitBlock, MixerBlock, PoolFormerBlock, ConvMixerBlock, ConvNextBlock, DownsampleBlock,
    ],
    Field(discriminator="kind"),
]
BLOCK_KINDS = ["attention", "token_mlp", "channel_mlp", "pool", "dwconv", "pointwise", "vit", "mixer", "poolformer",
               "convmixer", "convnext", "downsample"]


# -- head ---------------------------------------------------------------------

class Head(Strict):
    """Pools the features into one vector per image and classifies it."""

    pool: Literal["cls", "mean", "attention"] = Field(
        "mean", description="cls: a learned class token (needs token layout at the end); mean: average over "
        "tokens/grid; attention: attention pooling (MAP: Zhai et al., 2022; SigLIP), a learned query attending "
        "over the final tokens, then an MLP with a residual (needs token layout at the end; see heads, mlp_ratio)."
    )
    heads: Optional[PositiveInt] = Field(
        None, description="pool: attention: the pooling attention's heads (default: the last attention block's, "
        "or 1 without one).")
    mlp_ratio: Optional[Annotated[float, Field(gt=0.0)]] = Field(
        None, description="pool: attention: hidden width of the MLP after the pooling attention, times the "
        "channels (default 4).")
    mlp_activation: Optional[Literal["gelu", "gelu_tanh"]] = Field(
        None, description="pool: attention: that MLP's GELU, exact (default) or its tanh approximation (SigLIP's).")
    norm: Literal["auto", "layernorm", "pooled", "none"] = Field(
        "auto", description="layernorm: LayerNorm of every token before pooling; pooled: LayerNorm of the pooled "
        "vector (timm's fc_norm, usual with mean pooling); auto = layernorm when the last block uses tokens, else none."
    )
    dropout: Probability = Field(0.0, description="Dropout before the classifier.")
    norm_eps: Annotated[float, Field(gt=0.0)] = Field(1e-6, description="The head's LayerNorm epsilon.")
    distill_token: bool = Field(
        False, description="DeiT's distillation token (needs pool: cls): a second learned token beside the class "
        "token, with a classifier of its own that learns the teacher's predictions (train.distill) while the "
        "class token's learns the labels; the model's prediction is the mean of the two classifiers' logits.")


class ModelSpec(Strict):
    """The network: stem, a list of blocks, a head."""

    image_size: PositiveInt = Field(description="Side of the (square) input images as the data provides them.")
    resize: Optional[PositiveInt] = Field(
        None, description="Resize images to this side inside the model (bilinear) before the stem."
    )
    in_channels: PositiveInt = Field(3, description="Image channels (3 for RGB, 1 for grayscale).")
    num_classes: PositiveInt = Field(description="Number of output classes.")
    stem: Stem
    pos_embed: Literal["none", "learned", "sincos", "rope", "relative"] = Field(
        "none", description="learned / sincos: a position embedding added to the tokens after the stem; rope: "
        "2-D rotary embedding (axial RoPE) in every attention block instead, turning queries and keys by their "
        "patch's row and column (nothing is added; a new image size needs no resizing). rope needs attention "
        "blocks and a head dimension divisible by 4. relative: Swin's relative position bias in every "
        "attention block, a learned logit bias per head for each offset between two patches (within a window, "
        "or across the grid); such blocks run PyTorch's attention (the fused kernel takes no bias)."
    )
    blocks: list[Block] = Field(min_length=1, description="The mixing blocks, applied in order; hybrids are just lists.")
    drop_path: Probability = Field(
        0.0, description="Stochastic depth for the whole network, rising linearly with depth: 0 at the first "
        "block, this rate at the last (DeiT's rule; timm's drop_path_rate). Each repeat is one step; the two halves "
        "of a vit, mixer or convmixer block share a rate. The blocks' own drop_path must then stay 0.")
    registers: Annotated[int, Field(ge=0)] = Field(
        0, description="Learned register tokens (Darcet et al., 2024, 'Vision Transformers Need Registers'): extra "
        "tokens without a position that join the sequence where a class token would (after it) and are dropped at "
        "the head; they give attention a place for global information other than background patches. Needs "
        "token layout at the end.")
    norm_pre: bool = Field(
        False, description="A LayerNorm over every token before the first block, after the class token, the "
        "position table and registers have joined (CLIP's ln_pre). Needs a token block first.")
    norm_pre_eps: Annotated[float, Field(gt=0.0)] = Field(1e-6, description="norm_pre's epsilon.")
    token_merging: Annotated[int, Field(ge=0)] = Field(
        0, description="Token merging (ToMe, Bolya et al., 2023), in training and inference: this many pairs of "
        "similar patch tokens merged into one in each attention block of the model's last run of attention and "
        "channel-MLP blocks (fewer tokens for every later layer: faster). Not with windows, rope or relative "
        "position bias, nor train.recompute. evaluate, predict, export and summarize --merge R override it. 0: off.")
    head: Head = Field(default_factory=Head)

    @property
    def input_size(self) -> int:
        return self.resize or self.image_size

    @property
    def grid(self) -> int:
        """Patches per side after the stem (exact only when patch_size divides input_size; checked by the rules)."""
        return self.input_size // self.stem.patch_size

    def stages(self) -> list[tuple[int, int]]:
        """(channels, grid side) entering each entry of `blocks`, and after the last: a downsample
        block divides the side by its factor (each repeat) and sets the channels. Integer division:
        the rules report a factor that does not divide the side."""
        dim, side, out = self.stem.dim, self.grid, []
        for block in self.blocks:
            out.append((dim, side))
            if block.kind == "downsample":
                for _ in range(block.repeat):
                    dim, side = block.dim or 2 * dim, side // block.factor
        return out + [(dim, side)]

    def pool_heads(self) -> int:
        """Attention pooling's heads (head.pool: attention): head.heads, else the last attention
        block's, else 1."""
        if self.head.heads:
            return self.head.heads
        return next((block.heads for block in reversed(self.blocks) if getattr(block, "heads", None)), 1)
