"""Optimizer groups, learning-rate schedules and EMA."""
import math

import pytest
import torch

from composer.build import build_model
from composer.optim import Ema, frozen_stages, lr_factor, make_optimizer, param_groups
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


def test_layer_decay_scales_each_depth_and_keeps_weight_decay_rules():
    text = SPEC.replace("{kind: vit, heads: 2}", "{kind: vit, heads: 2, repeat: 2}")
    text = text.replace("train: {epochs: 10}", "train: {epochs: 10, optimizer: {lr: 0.01, layer_decay: 0.5}}")
    spec = load_spec_text(text)
    model = build_model(spec)
    optimizer = make_optimizer(spec, model)
    lr_of, decay_of = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lr_of[id(p)], decay_of[id(p)] = group["lr"], group["weight_decay"]
    by_layer: dict[str, set] = {}
    for name, p in model.named_parameters():
        layer = model.layers[int(name.split(".")[1])].name
        by_layer.setdefault(layer, set()).add(lr_of[id(p)])
        assert decay_of[id(p)] == (0.0 if p.ndim <= 1 or name.endswith(".pos") else 0.05), name
    # depths: stem and position embedding 0, vit #1 and #2 (both halves each) 1 and 2, dwconv 3, mixer 4, head 5
    expected = {"stem": 5, "pos_embed": 5, "blocks[0].attention #1": 4, "blocks[0].channel_mlp #1": 4,
                "blocks[0].attention #2": 3, "blocks[0].channel_mlp #2": 3, "blocks[1].dwconv": 2,
                "blocks[2].token_mlp": 1, "blocks[2].channel_mlp": 1, "head": 0}
    assert by_layer == {layer: {0.01 * 0.5 ** k} for layer, k in expected.items()}  # the same float expression
    # the schedule scales every group's rate alike
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(spec, s, 4))
    rates = scheduler.get_last_lr()
    assert max(rates) == pytest.approx(0.01 * lr_factor(spec, 0, 4))
    assert sorted(r / max(rates) for r in set(rates)) == pytest.approx([0.5 ** k for k in range(5, -1, -1)])


def test_class_token_between_blocks_takes_the_next_blocks_rate():
    text = SPEC.replace("[{kind: vit, heads: 2}, {kind: dwconv, kernel_size: 3}, {kind: mixer}]",
                        "[{kind: convmixer, kernel_size: 3}, {kind: vit, heads: 2}]").replace("pool: mean", "pool: cls")
    spec = load_spec_text(text.replace("train: {epochs: 10}", "train: {optimizer: {layer_decay: 0.5}}"))
    model = build_model(spec)
    lr_of = {id(p): g["lr"] for g in make_optimizer(spec, model).param_groups for p in g["params"]}
    lrs = {model.layers[int(n.split(".")[1])].name: lr_of[id(p)] for n, p in model.named_parameters()}
    assert lrs["class token"] == lrs["blocks[1].attention"] == 2 * lrs["blocks[0].dwconv"] == 4 * lrs["stem"]


def test_freeze_counts_blocks_as_layer_decay_does():
    text = SPEC.replace("[{kind: vit, heads: 2}, {kind: dwconv, kernel_size: 3}, {kind: mixer}]",
                        "[{kind: convmixer, kernel_size: 3, repeat: 2}, {kind: vit, heads: 2}]")
    model = build_model(load_spec_text(text.replace("pool: mean", "pool: cls")))
    names = [layer.name for layer in model.layers]

    def frozen(freeze):
        return names[:frozen_stages(model, freeze)]

    assert frozen(None) == []
    embedding = ["stem", "rearrange", "pos_embed", "rearrange"]   # the embedding on tokens, back to the grid
    assert frozen(0) == embedding
    # a convmixer block is one (both its halves); the class token joins with the block after it
    assert frozen(2) == embedding + ["blocks[0].dwconv #1", "blocks[0].pointwise #1", "blocks[0].dwconv #2",
                                     "blocks[0].pointwise #2"]
    assert names[len(frozen(2)):] == ["rearrange", "class token", "blocks[1].attention", "blocks[1].channel_mlp",
                                      "head"]
    assert frozen(3) == frozen("backbone") == names[:-1]


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
