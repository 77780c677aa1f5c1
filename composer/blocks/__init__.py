"""Block kinds: one file each, registered by kind in `REGISTRY`."""
from composer.blocks import (  # noqa: F401  (registration)
    attention, channel_mlp, convnext, downsample, dwconv, pointwise, pool, token_mlp)
from composer.blocks.base import REGISTRY, Block, Context, Cost, set_backend
from composer.blocks.composites import COMPOSITES

__all__ = ["REGISTRY", "COMPOSITES", "Block", "Context", "Cost", "set_backend"]
