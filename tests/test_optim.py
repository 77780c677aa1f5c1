"""Optimizer groups, learning-rate schedules and EMA."""
import math

import pytest
import torch

from composer.build import build_model
from composer.optim import Ema, lr_factor, param_groups
from composer.spec import load_spec_text

SPEC = """
model:
  image_size: 16
  num_classes: 3
  stem: {patch_size: 4, dim: 8}
  pos_embed: learned
  blocks: [{kind: vit, heads: 2}, {kind: dwconv, kernel_size: 3}, {kind: mixer}]
  head: {pool: mean}
train: {epochs: 10}
"""


def test_no_weight_decay_on_norms_biases_embeddings():
    model = build_model(load_spec_text(SPEC))
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(n.endswith(".pos") for n in skipped) and not any(n.endswith(".pos") for n in decayed)
    assert any("norm" in n for n in skipped) and any(n.endswith("bias") for n in skipped)
    assert any("conv.weight" in n for n in decayed)  # depthwise kernels are decayed like other weights
    assert len(decayed) + len(skipped) == len(list(model.parameters()))


@pytest.mark.parametrize("kind", ["cosine", "onecycle", "constant"])
def test_schedules(kind):
    text = SPEC.replace("train: {epochs: 10}", f"train: {{epochs: 10, schedule: {{kind: {kind}, warmup_epochs: 2}}}}")
    spec = load_spec_text(text)
    steps = 100
    f = [lr_factor(spec, s, steps) for s in range(10 * steps)]
    assert all(0.0 <= v <= 1.0 for v in f)
    if kind == "constant":
        assert set(f) == {1.0}
    elif kind == "cosine":
        assert f[0] == pytest.approx(1 / 200) and f[199] == pytest.approx(1.0)  # linear warmup over 2 epochs
        assert all(a >= b for a, b in zip(f[199:], f[200:]))                  # then never rises
        assert f[-1] < 1e-4 and f[200 + 400] == pytest.approx(0.5 * (1 + math.cos(math.pi * 400 / 800)))
    else:
        peak = f.index(max(f))
        assert max(f) == pytest.approx(1.0) and peak == int(0.3 * 1000) - 1 and f[-1] < 0.01


def test_ema_tracks_weights():
    model = torch.nn.Linear(3, 2)
    ema = Ema(model, 0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update()
    torch.testing.assert_close(ema.state["weight"], start + 1.0)
