"""What every block shares: the registry, the context a block is built in, drop-path.

A block class declares the layout it consumes (`tokens` (B, N, C) or `grid`
(B, C, H, W)), the fused op it calls, and how to count its cost; the builder and
the summary read these instead of special-casing kinds.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

import kernels

REGISTRY: dict[str, type["Block"]] = {}


@dataclass(frozen=True)
class Context:
    """What a block knows about its input when it is built."""

    dim: int                 # channels C
    tokens: int              # sequence length N in token layout (class token included)
    grid: tuple[int, int]    # (H, W) patch grid in grid layout
    backend: str = "auto"    # kernel backend of the fused ops
    rotary: bool = False     # positions as rotations of queries and keys (model.pos_embed: rope)
    repeat: int = 0          # which copy of its spec entry the block is (0-based; `repeat` in the spec)
    relative: bool = False   # a learned bias of attention logits by offset (model.pos_embed: relative)


@dataclass
class Cost:
    """Per-image cost of one block; a multiply-add counts as 2 FLOPs."""

    flops: int
    activations: int  # elements the block keeps for backward (an estimate, see each block)


# The ConvMixer blocks' BatchNorm runs as kernels.batch_norm (fused with the activation
# before it and the residual add after it) while training eagerly with kernels "triton", and
# with kernels "auto" when this is True (on CUDA); otherwise as nn.BatchNorm2d. On an H100
# (bf16, batch 512, synthetic data, 2026-11-27) `composer bench train specs/convmixer_cifar.yaml`
# trained at 6,944 img/s with the fused op (`--set train.kernels=triton`) against 5,021 with
# nn.BatchNorm2d (cuDNN), same run.
FUSED_BATCH_NORM_IN_AUTO = True


@torch.compiler.disable
def _outside_compiled_graph(op, *args, **kwargs):
    # torch.compile breaks its graph before and after this call and runs it eagerly
    return op(*args, **kwargs)


class FusedBatchNorm:
    """What a module whose BatchNorm may train as kernels.batch_norm shares (the ConvMixer
    blocks, a conv stem): `normalize`, and when it applies. Its `backend` is the model's."""

    backend: str = "auto"
    norm_op: str | None = None    # "batch_norm" when its BatchNorm can run as kernels.batch_norm (`normalize`)

    def normalize(self, norm: nn.BatchNorm2d, y: torch.Tensor, *, gelu: bool = False,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
        """residual + norm(GELU(y) if gelu else y), through kernels.batch_norm when
        `uses_fused_norm` says so (one op instead of GELU, BatchNorm and the add), else nn.BatchNorm2d."""
        if self.uses_fused_norm(norm, y):
            out = kernels.batch_norm(y, norm.weight, norm.bias, norm.running_mean, norm.running_var,
                                     training=True, momentum=norm.momentum, eps=norm.eps,
                                     activation="gelu" if gelu else None, residual=residual,
                                     backend=self.fused_norm_backend())
            norm.num_batches_tracked.add_(1)   # as nn.BatchNorm2d counts its training calls
            return out
        y = norm(nn.functional.gelu(y) if gelu else y)
        return y if residual is None else residual + y

    def fused_norm_backend(self) -> str:
        """The backend of the fused BatchNorm ops where `uses_fused_norm` holds."""
        return "triton" if self.backend == "triton" else "auto"

    def uses_fused_norm(self, norm: nn.BatchNorm2d, y: torch.Tensor) -> bool:
        """Whether `normalize` runs kernels.batch_norm: eager training with batch statistics
        kept in running buffers (the kernels compute batch statistics only), on contiguous NCHW
        (channels_last stays with cuDNN), with backend "triton", or "auto" and
        FUSED_BATCH_NORM_IN_AUTO on CUDA. Under torch.compile inductor fuses nn.BatchNorm2d
        with its neighbours itself, so it stays in the graph."""
        if not (norm.training and norm.track_running_stats and norm.momentum is not None
                and y.is_contiguous() and not torch.compiler.is_compiling()):
            return False
        backend = getattr(self, "backend", "auto")
        return backend == "triton" or (backend == "auto" and FUSED_BATCH_NORM_IN_AUTO and y.is_cuda)


class Block(FusedBatchNorm, nn.Module):
    """Base of registered blocks."""

    kind: str = ""
    layout: str = ""            # "tokens" or "grid"
    kernel_op: str | None = None  # the public op of `kernels` this block runs, if any
    # set by `composer.build.prepare_for_compile`: run the fused op outside torch.compile's graph
    kernel_outside_graph: bool = False

    def fused(self, op, *args, **kwargs):
        """Call the block's fused op (one of `kernels`), eagerly between compiled regions when
        `kernel_outside_graph` is set (see `composer.build.prepare_for_compile`)."""
        if self.kernel_outside_graph:
            return _outside_compiled_graph(op, *args, **kwargs)
        return op(*args, **kwargs)

    def cost(self, ctx: Context) -> Cost:
        raise NotImplementedError

    def kernel_dims(self, ctx: Context) -> dict:
        """Keywords of `kernels.backend_for` describing this block's op input."""
        return {}

    def output_context(self, ctx: Context) -> Context:
        """What the blocks after this one see: the same channels and grid, except after a block
        that changes them (downsample)."""
        return ctx


def register(cls: type[Block]) -> type[Block]:
    if cls.kind in REGISTRY:
        raise ValueError(f"block kind {cls.kind!r} registered twice")
    REGISTRY[cls.kind] = cls
    return cls


def set_backend(model: nn.Module, backend: str) -> None:
    """Point every block of `model` at one kernel backend ("auto" | "triton" | "reference")."""
    for module in model.modules():
        if isinstance(module, Block) and (module.kernel_op or module.norm_op):
            module.backend = backend


@contextmanager
def using_backend(model: nn.Module, backend: str):
    """`set_backend` for the duration of a `with` block; each block's own backend comes back afterwards."""
    saved = [(m, m.backend) for m in model.modules() if isinstance(m, Block) and (m.kernel_op or m.norm_op)]
    set_backend(model, backend)
    try:
        yield model
    finally:
        for module, previous in saved:
            module.backend = previous


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class LayerScale(nn.Module):
    """LayerScale (Touvron et al., 2021, CaiT): a residual branch multiplied by a learned
    per-channel factor `gamma` that starts small, so that deep stacks start near the identity.
    Channels are the last dimension (token layout)."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.to(x.dtype)


def layer_scale(dim: int, init: float | None) -> nn.Module:
    return LayerScale(dim, init) if init is not None else nn.Identity()


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """Cast x to the autocast dtype when autocast is on.

    Custom ops are opaque to autocast, so without this a fused op would receive the fp32
    residual stream and run its slow fp32 path; with it the op works in bf16/fp16 like the
    matmuls it replaces (and returns that dtype).
    """
    kind = x.device.type
    if x.dtype == torch.float32 and kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return x.to(torch.get_autocast_dtype(kind))
    return x


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a grid (B, C, H, W), at every position."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def activation(name: str) -> nn.Module:
    """gelu (exact), gelu_tanh (its tanh approximation: SigLIP's), quick_gelu (OpenAI CLIP's) or relu."""
    if name == "relu":
        return nn.ReLU()
    if name == "quick_gelu":
        return QuickGELU()
    return nn.GELU(approximate={"gelu": "none", "gelu_tanh": "tanh"}[name])


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)
