"""`composer lr-find`: the learning-rate range test's curve, its reading, its outputs and mistakes."""
import csv
import math

import pytest
import torch

from composer import lr_find as finder
from composer.spec import load_spec_text
from tests.helpers import assert_user_error, run_cli

SPEC = """\
name: tiny
model:
  image_size: 8
  num_classes: 4
  stem: {patch_size: 2, dim: 16}
  blocks: [{kind: mixer, token_hidden: 8, mlp_ratio: 2}, {kind: vit, heads: 2, mlp_ratio: 2}]
data:
  kind: synthetic
  num_samples: 96
  val_split: 0.0
  augment: {crop_padding: 1, hflip: true, mixup: 0.2}
train:
  batch_size: 32
  optimizer: {kind: adamw, lr: 3.0e-3, layer_decay: 0.5}
  grad_clip: 1.0
  device: cpu
"""


def test_suggestions_read_the_curve_where_it_falls_fastest_and_where_it_is_lowest():
    """A made-up curve over lr 1e-5..1 (smoothed column): flat, a fall that is steepest between
    1e-3 and 1.26e-3, lowest at 1e-2, then a rise. The warm steps are not read."""
    lrs = [10 ** (-5 + i / 10) for i in range(51)]
    smoothed = []
    for lr in lrs:
        x = math.log10(lr)
        smoothed.append(2.0 if x < -3.5 else 2.0 - 2.0 * (x + 3.5) if x < -3 else
                        1.0 - 0.1 * (x + 3) if x <= -2 else 0.9 + 0.5 * (x + 2))
    smoothed[2] = -5.0   # a warm step's value: not read
    rows = [(lr, s, s) for lr, s in zip(lrs, smoothed)]
    got = finder.suggest(rows)
    assert got["minimum"] == pytest.approx(1e-2)
    assert got["suggested"] == pytest.approx(1e-3)
    assert 10 ** -3.5 <= got["steepest"] <= 1e-3   # within the steep segment
    assert finder.suggest(rows[:finder.WARM_STEPS + 2])["minimum"] is None   # too short to read


def test_range_test_grows_the_rate_geometrically_and_smooths_the_loss(tmp_path, monkeypatch):
    """Every step's peak learning rate is start * (end / start) ** (step / (steps - 1)), each
    parameter group at its layer-decay share of it; the smoothed column is the bias-corrected
    moving average of the losses; a loss that blows up stops the test; the CSV and the figure are
    written where asked, and no run directory."""
    spec = load_spec_text(SPEC, "tiny.yaml")
    seen = []
    real_step = torch.optim.AdamW.step

    def spy_step(self, *args, **kwargs):
        seen.append([group["lr"] for group in self.param_groups])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy_step)
    monkeypatch.chdir(tmp_path)
    lines = []
    result = finder.lr_find(spec, start=1e-4, end=1e3, steps=40, out=str(tmp_path / "out"), echo=lines.append)
    rows = result["rows"]
    assert 2 * finder.WARM_STEPS < len(rows) < 40 and "passed 4x its lowest" in result["stopped"]
    for step, (lr, _, _) in enumerate(rows):
        assert lr == pytest.approx(1e-4 * (1e7 ** (step / 39)))
    # the head's group at the step's rate, the stem's at 0.5 ** depth of it, the same shares every step
    assert [max(groups) for groups in seen] == pytest.approx([row[0] for row in rows[:len(seen)]])
    shares = {tuple(round(lr / max(groups), 9) for lr in groups) for groups in seen}
    assert len(shares) == 1 and min(next(iter(shares))) == pytest.approx(0.5 ** 3)
    average = 0.0
    for step, (_, loss, smoothed) in enumerate(rows):
        average = finder.SMOOTHING * average + (1 - finder.SMOOTHING) * loss
        assert smoothed == pytest.approx(average / (1 - finder.SMOOTHING ** (step + 1)))
    assert result["suggested"] == pytest.approx(result["minimum"] / 10)
    with open(result["csv"]) as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows) and float(written[3]["lr"]) == pytest.approx(rows[3][0], rel=1e-5)
    assert (tmp_path / "out" / "lr_find.png").stat().st_size > 0
    assert not (tmp_path / "runs").exists()
    assert any("learning-rate range test: 40 steps of 32 images" in line for line in lines)


def test_range_test_orders_and_weighs_batches_as_training_does(tmp_path, monkeypatch):
    """Repeated augmentation: each batch holds each drawn image twice, side by side (before
    augmentation); class weights reach the loss, as in training."""
    from composer import data, train as training

    batches, weighed = [], []
    real_batch, real_ce = data.training_batch, training.soft_cross_entropy

    def spy_batch(batch, *args, **kwargs):
        batches.append(batch.clone())
        return real_batch(batch, *args, **kwargs)

    def spy_ce(logits, targets, weights=None):
        weighed.append(weights)
        return real_ce(logits, targets, weights)

    monkeypatch.setattr(data, "training_batch", spy_batch)
    monkeypatch.setattr(training, "soft_cross_entropy", spy_ce)
    spec = load_spec_text(SPEC.replace("mixup: 0.2}", "mixup: 0.2, repeats: 2}").replace(
        "  grad_clip: 1.0\n", "  grad_clip: 1.0\n  class_weights: balanced\n"), "tiny.yaml")
    finder.lr_find(spec, start=1e-5, end=1e-3, steps=20, out=str(tmp_path / "out"), echo=lambda *a: None)
    assert len(batches) == 20 and all(torch.equal(b[0::2], b[1::2]) for b in batches)
    assert len(weighed) == 20 and all(w is not None and w.shape == (4,) for w in weighed)


def test_range_test_command_and_its_mistakes(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(SPEC)
    result = run_cli("lr-find", path, "--steps", 24, "--start", 1e-4, "--end", 0.1, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "suggested peak learning rate: " in result.stdout and f"wrote {tmp_path / 'out' / 'lr_find.csv'}" in \
        result.stdout
    # from a pretrained run: its weights and its input statistics, as train takes them
    from composer.train import train

    train(load_spec_text(SPEC, "pre.yaml", [f"train.out_dir={tmp_path / 'pre'}", "train.epochs=1"]),
          echo=lambda *a, **k: None)
    tuned = run_cli("lr-find", path, "--steps", 20, "--out", tmp_path / "tuned", "--set",
                    f"train.init_from={tmp_path / 'pre'}")
    assert tuned.returncode == 0, tuned.stderr
    assert "weights from" in tuned.stdout and "input normalization: the pretrained run's" in tuned.stdout
    assert_user_error(run_cli("lr-find", path, "--start", 1, "--end", 0.1), "--start 1 must be below --end 0.1")
    assert_user_error(run_cli("lr-find", path, "--set", "train.batch_size=500", "--out", tmp_path / "o"),
                      "--set train.batch_size=500: train.batch_size 500 is larger than the 96 training images")
    path.write_text(SPEC.replace("batch_size: 32", "batch_size: 500"))
    assert_user_error(run_cli("lr-find", path, "--out", tmp_path / "o"),
                      "tiny.yaml:13:15: train.batch_size 500 is larger than the 96 training images")
