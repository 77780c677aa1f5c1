"""DeiT III's 3-Augment and colour jitter, batched on the training device (Touvron et al., 2022,
"DeiT III: Revenge of the ViT").

3-Augment gives each image one of three operations, drawn uniformly: grayscale, solarization
(pixels from 128 up inverted) or a Gaussian blur of standard deviation uniform in 0.1..2 pixels.
Colour jitter then scales brightness, contrast and saturation by factors drawn uniformly in
1 - s .. 1 + s, in a random order an image, as torchvision's ColorJitter does. DeiT III's recipe
uses both (s = 0.3) after its crop and flip. Each operation matches torchvision's functional op on
that image (tests/test_three_augment.py); every image draws its own in one pass over the batch,
with no host synchronization.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from composer.trivial_augment import blend, luma

THREE = ("grayscale", "solarize", "blur")
SOLARIZE_THRESHOLD = 128
BLUR_SIGMA = (0.1, 2.0)
BLUR_RADIUS = 6          # taps each side: 3 standard deviations of the widest blur
JITTER = ("brightness", "contrast", "saturation")


def three_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 (B, C, H, W) -> uint8: one of grayscale, solarize, blur an image."""
    b, dev = images.shape[0], images.device
    op = torch.randint(0, len(THREE), (b,), generator=generator, device=dev)
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * torch.rand(b, generator=generator, device=dev)
    return apply_three(images, op, sigma)


def apply_three(images: torch.Tensor, op: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Operation THREE[op[i]] on image i (`sigma[i]`: its blur's standard deviation, if blurred)."""
    x = images.float()
    gray = luma(x).expand_as(x).to(torch.uint8) if x.shape[1] == 3 else images
    solarized = torch.where(images >= SOLARIZE_THRESHOLD, 255 - images, images)
    pick = op.view(-1, 1, 1, 1)
    out = torch.where(pick == 0, gray, torch.where(pick == 1, solarized, images))
    return torch.where(pick == 2, gaussian_blur(x, sigma), out)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """float (B, C, H, W) -> uint8, each image blurred by its own standard deviation: a separable
    Gaussian of 2 * BLUR_RADIUS + 1 taps (fewer on images too small for them), reflected at the
    borders, rounded: torchvision's `gaussian_blur` with that kernel size."""
    b, c, h, w = x.shape
    radius = min(BLUR_RADIUS, h - 1, w - 1)
    if radius < 1:
        return x.round().to(torch.uint8)
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma.float()[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)                              # (B, taps)
    weight = kernel.repeat_interleave(c, 0)                                    # (B * C, taps): one a plane
    planes = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    planes = F.conv2d(planes, weight.view(b * c, 1, 1, -1), groups=b * c)      # along rows
    planes = F.conv2d(planes, weight.view(b * c, 1, -1, 1), groups=b * c)      # along columns
    return planes.view(b, c, h, w).round().clamp(0, 255).to(torch.uint8)


def color_jitter(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """uint8 (B, C, H, W) -> uint8: brightness, contrast and saturation each scaled by a factor
    uniform in max(0, 1 - strength) .. 1 + strength, in a random order an image."""
    b, dev = images.shape[0], images.device
    low, high = max(0.0, 1.0 - strength), 1.0 + strength
    factors = low + (high - low) * torch.rand((b, len(JITTER)), generator=generator, device=dev)
    order = torch.rand((b, len(JITTER)), generator=generator, device=dev).argsort(1)
    return apply_jitter(images, factors, order)


def apply_jitter(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Image i through JITTER[order[i, 0]], then [order[i, 1]], then [order[i, 2]], operation k at
    strength factors[i, k]; each step truncated to uint8 as torchvision's ops on uint8 images."""
    out, factors = images, factors.double()
    for step in range(len(JITTER)):
        before = out
        x = before.float()
        for k, name in enumerate(JITTER):
            factor = factors[:, k].view(-1, 1, 1, 1)
            if name == "brightness":
                result = blend(x, None, factor)
            elif name == "contrast":
                result = blend(x, luma(x).mean(dim=(1, 2, 3), keepdim=True), factor)
            else:
                result = blend(x, luma(x), factor) if x.shape[1] == 3 else before
            out = torch.where((order[:, step] == k).view(-1, 1, 1, 1), result, out)
    return out
