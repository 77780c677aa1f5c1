"""Composite kinds: a spec entry that expands into two registered blocks.

vit = attention + channel_mlp, mixer = token_mlp + channel_mlp, convmixer = dwconv + pointwise,
poolformer = pool + channel_mlp.
The composite's fields are shared by both halves (each half reads the ones it knows).
"""
COMPOSITES: dict[str, tuple[str, str]] = {
    "vit": ("attention", "channel_mlp"),
    "mixer": ("token_mlp", "channel_mlp"),
    "convmixer": ("dwconv", "pointwise"),
    "poolformer": ("pool", "channel_mlp"),
}
