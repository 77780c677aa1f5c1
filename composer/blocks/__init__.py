"""Block kinds: one file each, registered by kind in `REGISTRY`."""
from composer.blocks import attention, channel_mlp, convnext, downsample, dwconv, pointwise, token_mlp  # noqa: F401  (registration)
from composer.blocks.base import REGISTRY, Block, Context, Cost, set_backend
from composer.blocks.composites import COMPOSITES

__all__ = ["REGISTRY", "COMPOSITES", "Block", "Context", "Cost", "set_backend"]
