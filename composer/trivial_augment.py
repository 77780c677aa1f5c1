"""TrivialAugment (wide), batched on the training device: each image gets one operation, drawn
uniformly from OPS, at a strength drawn uniformly from BINS levels (Müller & Hutter, 2021,
"TrivialAugment: Tuning-free Yet State-of-the-Art Data Augmentation").

The operations and their ranges are torchvision's `TrivialAugmentWide`, and each one matches
torchvision's functional op on that image (tests/test_trivial_augment.py), but here every image
draws its own operation and strength in one pass over the batch, on the GPU, with no host
synchronization: each operation is computed for the whole batch and kept where it was drawn.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
       "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
SIGNED = {"shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast",
          "sharpness"}
BINS = 31
# The strength of level 0 .. BINS - 1, as torchvision tabulates it (float32 tables)
MAX_SHEAR, MAX_TRANSLATE, MAX_ROTATE, MAX_ENHANCE = 0.99, 32.0, 135.0, 0.99


def trivial_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 (B, C, H, W) -> uint8, one random operation an image; randomness from `generator`
    (on the images' device)."""
    b, dev = images.shape[0], images.device
    op = torch.randint(0, len(OPS), (b,), generator=generator, device=dev)
    level = torch.randint(0, BINS, (b,), generator=generator, device=dev)
    negative = torch.rand(b, generator=generator, device=dev) <= 0.5
    return apply(images, op, level, negative)


def magnitudes(op: torch.Tensor, level: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Each image's strength (float64), as torchvision's TrivialAugmentWide draws it: its op's
    table at `level`, negated where `negative` and the op is signed."""
    rows, signed = _tables(level.device)
    value = rows[op, level]
    return torch.where(signed[op] & negative, -value, value)


@functools.lru_cache(maxsize=None)
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(strength of each op at each level (len(OPS), BINS), whether each op is signed), kept on
    `device`: made there once, not copied over at every batch (a copy from the host would wait
    for the GPU)."""
    table = {
        "shear_x": torch.linspace(0.0, MAX_SHEAR, BINS), "shear_y": torch.linspace(0.0, MAX_SHEAR, BINS),
        "translate_x": torch.linspace(0.0, MAX_TRANSLATE, BINS), "translate_y": torch.linspace(0.0, MAX_TRANSLATE, BINS),
        "rotate": torch.linspace(0.0, MAX_ROTATE, BINS),
        **{name: torch.linspace(0.0, MAX_ENHANCE, BINS) for name in ("brightness", "color", "contrast", "sharpness")},
        "posterize": (8 - (torch.arange(BINS) / ((BINS - 1) / 6))).round(),
        "solarize": torch.linspace(1.0, 0.0, BINS),
    }
    rows = torch.stack([table[name] if name in table else torch.zeros(BINS) for name in OPS]).to(torch.float64)
    signed = torch.tensor([name in SIGNED for name in OPS])
    return rows.to(device), signed.to(device)


def apply(images: torch.Tensor, op: torch.Tensor, level: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """The operation `OPS[op[i]]` at `level[i]` (sign `negative[i]`) on image i, for every i."""
    m = magnitudes(op, level, negative)
    if by_subsets(images.device):
        # each operation on its own images only: finding them waits for the device, free on the host
        out = images.clone()
        for k, name in enumerate(OPS):
            pick = (op == k).nonzero()[:, 0]
            if len(pick):
                out[pick] = _operation(name, images[pick], images[pick].float(), op[pick], m[pick])
        return out
    # on a GPU: every operation on the whole batch, each image keeping its own (no host sync)
    x, out, geometric = images.float(), images, None
    for k, name in enumerate(OPS):
        if name in GEOMETRIC:   # one resampling serves the five
            geometric = _affine(x, op, m) if geometric is None else geometric
            result = geometric
        else:
            result = _operation(name, images, x, op, m)
        out = torch.where((op == k).view(-1, 1, 1, 1), result, out)
    return out.contiguous()


def by_subsets(device: torch.device) -> bool:
    """Whether `apply` runs each operation on its own images (the CPU, where telling them apart
    costs nothing: ~10x less work) or all of them on the whole batch (a GPU: no host sync)."""
    return device.type == "cpu"


GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")


def _operation(name: str, images: torch.Tensor, x: torch.Tensor, op: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Operation `name` on every image of the batch (uint8 `images`, `x` the same as float32) at
    its own magnitude `m` (op: each image's operation code, for the geometric ones)."""
    if name == "identity":
        return images
    if name in GEOMETRIC:
        return _affine(x, op, m)
    factor = (1.0 + m).view(-1, 1, 1, 1)
    if name == "brightness":
        return blend(x, None, factor)
    if name == "color":
        return blend(x, luma(x), factor) if x.shape[1] == 3 else images
    if name == "contrast":
        return blend(x, luma(x).mean(dim=(1, 2, 3), keepdim=True), factor)
    if name == "sharpness":
        return _sharpen(x, factor)
    if name == "posterize":
        bits = m.clamp(0, 8).to(torch.int64).view(-1, 1, 1, 1)
        return images & ((0xFF << (8 - bits)) & 0xFF).to(torch.uint8)
    if name == "solarize":
        return torch.where(x >= (255 * m).view(-1, 1, 1, 1).float(), 255 - images, images)
    if name == "autocontrast":
        return _autocontrast(x)
    # equalize: per image and channel already, with no strength, and free of host syncs: torchvision's
    from torchvision.transforms.v2 import functional as TF

    return TF.equalize(images)


def _affine(x: torch.Tensor, op: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Shear, translation or rotation of each image by its own magnitude (identity for the other
    ops), nearest neighbour, zeros outside: torchvision's `affine`/`rotate` conventions, in pixel
    coordinates centred on the image (pixel edges at +-W/2). Each output pixel p reads the input
    at q = A p + t."""
    b, _, h, w = x.shape
    dev = x.device
    code = {name: k for k, name in enumerate(OPS)}
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    shear_x, shear_y = op == code["shear_x"], op == code["shear_y"]
    move_x, move_y = op == code["translate_x"], op == code["translate_y"]
    rotate = op == code["rotate"]
    # shears about the top-left corner (torchvision's center=[0, 0] for them), tan(angle) = m
    # translations by whole pixels (int() of the magnitude); rotations counter-clockwise in degrees
    theta = torch.where(rotate, m, zero) * (math.pi / 180)
    cos, sin = torch.where(rotate, theta.cos(), one), torch.where(rotate, theta.sin(), zero)
    a = torch.stack([torch.stack([cos, torch.where(shear_x, m, zero) - sin], -1),
                     torch.stack([torch.where(shear_y, m, zero) + sin, cos], -1)], -2)   # (B, 2, 2)
    t = torch.stack([torch.where(shear_x, m * (h / 2), zero) - torch.where(move_x, m.trunc(), zero),
                     torch.where(shear_y, m * (w / 2), zero) - torch.where(move_y, m.trunc(), zero)], -1)
    ys = torch.arange(h, device=dev, dtype=torch.float64) - (h - 1) / 2
    xs = torch.arange(w, device=dev, dtype=torch.float64) - (w - 1) / 2
    p = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), -1).view(1, h * w, 2)   # (1, HW, 2) as (x, y)
    q = p @ a.transpose(1, 2) + t[:, None, :]                                                  # (B, HW, 2)
    grid = torch.stack([q[..., 0] / (w / 2), q[..., 1] / (h / 2)], -1).view(b, h, w, 2)
    return F.grid_sample(x, grid.float(), mode="nearest", padding_mode="zeros", align_corners=False).to(torch.uint8)


def blend(x: torch.Tensor, other: torch.Tensor | None, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other (None: 0), clamped and truncated to uint8: torchvision's
    `_blend`, to the bit. Both weights are rounded to float32 from float64 (as a Python float
    multiplying a float32 tensor is), and the second product is added in one rounding (addcmul,
    as torchvision's add with alpha): blends that land on a whole number stay on it."""
    out = x.mul(factor.float())
    if other is not None:
        out = out.addcmul_(other.expand_as(x), (1.0 - factor).float())
    return out.clamp_(0, 255).to(torch.uint8)


def luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma, floored: what torchvision blends uint8 colour images with."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)   # torchvision's order


def _sharpen(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with a 3x3 smoothing (1s around a 5, over 13, rounded) inside a 1-pixel border that stays."""
    c, h, w = x.shape[1:]
    if h <= 2 or w <= 2:
        return x.to(torch.uint8)
    kernel = torch.full((3, 3), 1 / 13, device=x.device)
    kernel[1, 1] = 5 / 13
    smooth = F.conv2d(x, kernel.expand(c, 1, 3, 3), groups=c).round()
    inner = x[:, :, 1:-1, 1:-1]
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = inner + (smooth - inner) * (1.0 - factor).float()
    return out.clamp(0, 255).to(torch.uint8)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Each channel of each image stretched to 0..255 (one of a single value stays), truncated:
    torchvision's `autocontrast`, without its masked assignments (each a host sync on a GPU)."""
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    flat = high == low
    scale = torch.where(flat, 1.0, (high - low).mul_(1.0 / 255))
    return (x - torch.where(flat, 0.0, low)).div_(scale).clamp_(0, 255).to(torch.uint8)
