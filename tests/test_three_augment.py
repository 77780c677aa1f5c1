"""3-Augment and colour jitter on batches: each image's operation against torchvision's functional op."""
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from composer.three_augment import (BLUR_RADIUS, JITTER, THREE, apply_jitter, apply_three, color_jitter,
                                    three_augment)
from tests.test_trivial_augment import photo


def torchvision_three(image: torch.Tensor, name: str, sigma: float) -> torch.Tensor:
    """DeiT III's operation `name` on one uint8 image, as torchvision defines it."""
    if name == "grayscale":
        return TF.rgb_to_grayscale(image, num_output_channels=3) if image.shape[0] == 3 else image
    if name == "solarize":
        return TF.solarize(image, 128)
    size = 2 * min(BLUR_RADIUS, image.shape[1] - 1, image.shape[2] - 1) + 1
    return TF.gaussian_blur(image, [size, size], [sigma, sigma])


@pytest.mark.parametrize("channels, size", [(3, (32, 32)), (3, (17, 24)), (1, (16, 16)), (3, (5, 9))])
def test_each_three_augment_operation_matches_torchvision(channels, size):
    b = 24
    images = photo(b, channels, *size, seed=channels + size[0])
    op = torch.arange(b) % len(THREE)
    sigma = torch.linspace(0.1, 2.0, b)
    out = apply_three(images, op, sigma)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    for i in range(b):
        name = THREE[int(op[i])]
        want = torchvision_three(images[i], name, float(sigma[i]))
        diff = (out[i].int() - want.int()).abs()
        if name == "blur":
            # torchvision convolves with the 2-D kernel in one pass, here rows then columns: a sum
            # within float rounding of a .5 may round the other way (never by more than 1)
            assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, (name, i, diff.max())
            assert not torch.equal(out[i], images[i]) or float(sigma[i]) < 0.3
        else:
            assert torch.equal(out[i], want), (name, i, diff.max())


def test_three_augment_draws_each_operation_and_blur_width_uniformly(monkeypatch):
    import composer.three_augment as ta

    images, calls, real = photo(3000, 3, 8, 8), [], ta.apply_three
    monkeypatch.setattr(ta, "apply_three", lambda im, op, sigma: calls.append((op, sigma)) or real(im, op, sigma))
    a = three_augment(images, torch.Generator().manual_seed(0))
    assert torch.equal(a, three_augment(images, torch.Generator().manual_seed(0)))
    op, sigma = calls[0]
    shares = torch.bincount(op, minlength=3).float() / len(op)
    assert (shares - 1 / 3).abs().max() < 0.03, shares   # 3 sd of a share over 3,000 draws: 0.026
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0
    assert abs(sigma.mean().item() - 1.05) < 0.03 and abs(sigma.std().item() - 1.9 / 12 ** 0.5) < 0.02


def torchvision_jitter(image: torch.Tensor, factors, order) -> torch.Tensor:
    ops = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation}
    for k in order:
        image = ops[JITTER[k]](image, factors[k])
    return image


@pytest.mark.parametrize("channels", [3, 1])
def test_color_jitter_matches_torchvision_in_every_order(channels):
    import itertools

    orders = list(itertools.permutations(range(len(JITTER))))
    b = 4 * len(orders)
    images = photo(b, channels, 20, 16, seed=5)
    factors = 0.7 + 0.6 * torch.rand(b, len(JITTER), generator=torch.Generator().manual_seed(1))
    order = torch.tensor(orders).repeat(4, 1)
    out = apply_jitter(images, factors, order)
    for i in range(b):
        want = torchvision_jitter(images[i], [float(f) for f in factors[i]], order[i].tolist())
        assert torch.equal(out[i], want), (i, order[i].tolist(), (out[i].int() - want.int()).abs().max())


def test_color_jitter_factors_and_orders_as_drawn(monkeypatch):
    import composer.three_augment as ta

    images, calls, real = photo(2000, 3, 8, 8), [], ta.apply_jitter
    monkeypatch.setattr(ta, "apply_jitter", lambda im, f, o: calls.append((f, o)) or real(im, f, o))
    color_jitter(images, 0.3, torch.Generator().manual_seed(0))
    factors, order = calls[0]
    assert factors.min() >= 0.7 and factors.max() <= 1.3 and abs(factors.mean().item() - 1.0) < 0.01
    assert sorted(order[0].tolist()) == [0, 1, 2]
    firsts = torch.bincount(order[:, 0], minlength=3).float() / len(order)
    assert (firsts - 1 / 3).abs().max() < 0.05, firsts
    # a strength of 1 or more would allow factors of 0 and below: the spec refuses it
    from pydantic import ValidationError

    from composer.spec.data import Augment
    with pytest.raises(ValidationError):
        Augment(color_jitter=1.0)
