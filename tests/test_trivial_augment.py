"""TrivialAugment on batches: each image's operation against torchvision's functional op."""
import math

import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from composer.trivial_augment import OPS, apply, magnitudes, trivial_augment


def torchvision_op(image: torch.Tensor, name: str, m: float) -> torch.Tensor:
    """TrivialAugmentWide's definition of operation `name` at magnitude m, on one image."""
    nearest = InterpolationMode.NEAREST
    if name == "identity":
        return image
    if name in ("shear_x", "shear_y"):
        shear = [math.degrees(math.atan(m)), 0.0] if name == "shear_x" else [0.0, math.degrees(math.atan(m))]
        return TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=nearest,
                         center=[0, 0])
    if name in ("translate_x", "translate_y"):
        move = [int(m), 0] if name == "translate_x" else [0, int(m)]
        return TF.affine(image, angle=0.0, translate=move, scale=1.0, shear=[0.0, 0.0], interpolation=nearest)
    if name == "rotate":
        return TF.rotate(image, angle=m, interpolation=nearest)
    enhance = {"brightness": TF.adjust_brightness, "color": TF.adjust_saturation,
               "contrast": TF.adjust_contrast, "sharpness": TF.adjust_sharpness}
    if name in enhance:
        return enhance[name](image, 1.0 + m)
    if name == "posterize":
        return TF.posterize(image, int(m))
    if name == "solarize":
        return TF.solarize(image, 255 * m)
    return {"autocontrast": TF.autocontrast, "equalize": TF.equalize}[name](image)


def photo(b, c, h, w, seed=0):
    """Smooth images with structure (gradients and blobs), not noise: operations show."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.rand(b, c, 1, 1, generator=g) * xs + torch.rand(b, c, 1, 1, generator=g) * ys
    blobs = torch.rand(b, c, h, w, generator=g)
    return (255 * (0.7 * base / 2 + 0.3 * blobs)).round().clamp(0, 255).to(torch.uint8)


# rotations resample at coordinates computed in another order than torchvision's: a pixel whose
# source lies on a rounding boundary between two may take its neighbour's value (36 of 25,296
# pixels at 17x24, none on square images); every other operation matches to the bit
RESAMPLED = {"rotate"}


@pytest.mark.parametrize("channels, size", [(3, (32, 32)), (3, (17, 24)), (1, (16, 16))])
@pytest.mark.parametrize("name", OPS)
def test_each_operation_matches_torchvision(name, channels, size):
    k = OPS.index(name)
    levels = torch.arange(31)
    b = 2 * len(levels)   # every level, each sign
    images = photo(b, channels, *size, seed=k)
    op = torch.full((b,), k)
    level = levels.repeat(2)
    negative = torch.arange(b) >= len(levels)
    out = apply(images, op, level, negative)
    m = magnitudes(op, level, negative)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    off = 0
    for i in range(b):
        want = torchvision_op(images[i], name, float(m[i]))
        if name in RESAMPLED:
            off += (out[i] != want).any(0).sum().item()
        else:
            assert torch.equal(out[i], want), (name, i, float(m[i]), (out[i].int() - want.int()).abs().max())
    assert off <= 0.002 * b * size[0] * size[1], (name, off)


def test_magnitudes_are_torchvisions_tables():
    ops = torch.tensor([OPS.index(n) for n in ("rotate", "rotate", "posterize", "posterize", "solarize", "identity")])
    level = torch.tensor([30, 30, 0, 30, 30, 7])
    negative = torch.tensor([False, True, True, False, True, True])
    assert magnitudes(ops, level, negative).tolist() == [135.0, -135.0, 8.0, 2.0, 0.0, 0.0]


def test_draws_are_seeded_and_every_operation_occurs():
    images = photo(512, 3, 8, 8)
    a = trivial_augment(images, torch.Generator().manual_seed(3))
    assert torch.equal(a, trivial_augment(images, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, trivial_augment(images, torch.Generator().manual_seed(4)))
    g = torch.Generator().manual_seed(3)
    op = torch.randint(0, len(OPS), (512,), generator=g)
    assert set(op.tolist()) == set(range(len(OPS)))   # 512 draws: each of the 14 operations
    changed = (a != images).flatten(1).any(1)
    assert 0.7 < changed.float().mean() < 1.0          # identity (and weak levels) leave some alone


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_as_on_the_cpu():
    """The same draws on CUDA: the same images, up to a unit where float rounding differs there
    (fused multiply-adds) and a rare resampled pixel."""
    images = photo(2048, 3, 32, 32)
    op, level = torch.randint(0, len(OPS), (2048,)), torch.randint(0, 31, (2048,))
    negative = torch.rand(2048) <= 0.5
    cpu = apply(images, op, level, negative)
    gpu = apply(images.cuda(), op.cuda(), level.cuda(), negative.cuda()).cpu()
    diff = (gpu.int() - cpu.int()).abs()
    assert (diff > 1).any(1).float().mean() < 1e-3, (diff > 1).any(1).float().mean()


def test_the_batch_pipeline_never_waits_on_the_device(monkeypatch):
    """Augmentation and mixing run once a step on the GPU: nothing in them may make the host wait
    for the device (each wait leaves the GPU idle while the host prepares the next step). Here on
    the CPU, with TrivialAugment selecting as it does on a GPU."""
    import composer.trivial_augment as ta
    from composer.data import augment, mix, random_erasing

    monkeypatch.setattr(ta, "by_subsets", lambda device: False)
    from composer.spec.data import Augment
    from tests.test_graphed_step import _SYNCING

    images, labels = photo(64, 3, 32, 32), torch.randint(0, 10, (64,))
    g = torch.Generator().manual_seed(0)
    crops = (Augment(crop_padding=4, hflip=True, trivial=True, cutout=8, mixup=0.2, cutmix=1.0),
             Augment(resized_crop=0.08, trivial=True, three_augment=True, color_jitter=0.3))
    for aug in crops:   # the strength tables are made once, before
        mix(random_erasing(augment(images, aug, g).float(), 0.25, g), labels, 10, aug, g, 0.1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for aug in crops:
            mix(random_erasing(augment(images, aug, g).float(), 0.25, g), labels, 10, aug, g, 0.1)
    # (one_hot checks its labels' range with .item() on the CPU only; on CUDA it leaves that to
    # a device-side assert)
    def inside_one_hot(event):
        while event.cpu_parent is not None:
            event = event.cpu_parent
            if event.name == "aten::one_hot":
                return True
        return False

    syncing = sorted({e.name for e in prof.events() if e.name in _SYNCING and not inside_one_hot(e)})
    assert not syncing, syncing


def test_the_gpu_way_of_selecting_gives_the_same_images(monkeypatch):
    """On a GPU every operation runs on the whole batch and each image keeps its own; on the CPU
    each runs on its own images: the same result."""
    import composer.trivial_augment as ta

    images = photo(256, 3, 12, 12)
    op, level = torch.randint(0, len(OPS), (256,)), torch.randint(0, 31, (256,))
    negative = torch.rand(256) <= 0.5
    by_subsets = apply(images, op, level, negative)
    monkeypatch.setattr(ta, "by_subsets", lambda device: False)
    assert torch.equal(apply(images, op, level, negative), by_subsets)
