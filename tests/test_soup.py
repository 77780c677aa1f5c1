"""`composer soup`: the average of runs fine-tuned from the same weights, uniform and greedy."""
import json

import pytest
import torch

from composer.checkpoint import load_run
from composer.spec import load_spec_text
from composer.train import train
from tests.helpers import assert_user_error, run_cli

SPEC = """\
name: ft
model:
  image_size: 8
  num_classes: 4
  stem: {patch_size: 2, dim: 16}
  blocks: [{kind: vit, heads: 2, mlp_ratio: 2}]
data: {kind: synthetic, num_samples: 160, val_split: 0.25}
train: {epochs: 1, batch_size: 40, device: cpu, optimizer: {lr: 3.0e-3}}
"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A pretrained run and three runs fine-tuned from it at other learning rates, in one folder."""
    root = tmp_path_factory.mktemp("soup")
    quiet = dict(echo=lambda *a, **k: None)
    train(load_spec_text(SPEC, "pre.yaml", [f"train.out_dir={root / 'pre'}"]), **quiet)
    for lr in ("1e-3", "3e-3", "1e-2"):
        overrides = [f"train.out_dir={root / 'sweep' / f'lr={lr}'}", f"train.init_from={root / 'pre'}",
                     f"train.optimizer.lr={lr}", "train.seed=1"]
        train(load_spec_text(SPEC, "ft.yaml", overrides), **quiet)
    return root


def test_uniform_soup_is_the_mean_of_the_runs_weights(sweep, tmp_path):
    result = run_cli("soup", sweep / "sweep", "--out", tmp_path / "soup", "--uniform")
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'soup' / 'best.pt'}: a uniform soup of 3 runs" in result.stdout
    runs = [load_run(sweep / "sweep" / f"lr={lr}", backend="reference") for lr in ("1e-3", "3e-3", "1e-2")]
    spec, souped, state = load_run(tmp_path / "soup", backend="reference")
    for key, value in souped.state_dict().items():
        parts = [model.state_dict()[key] for _, model, _ in runs]
        if value.is_floating_point():
            # the same mean up to float32 rounding (the order of the additions may differ)
            torch.testing.assert_close(value, torch.stack(parts).mean(0), rtol=1e-6, atol=1e-6)
    assert len(state["souped_from"]) == 3 and state["normalization"] == runs[0][2]["normalization"]
    evaluated = run_cli("evaluate", tmp_path / "soup")
    assert evaluated.returncode == 0, evaluated.stderr


def test_greedy_soup_keeps_a_run_only_when_the_soups_accuracy_holds(sweep, tmp_path):
    lines = []
    from composer.soup import soup

    result = soup([str(sweep / "sweep")], str(tmp_path / "soup"), echo=lines.append)
    accuracies = dict(result["runs"])
    best = max(accuracies, key=accuracies.get)
    assert result["kept"][0] == best and result["accuracy"] >= accuracies[best]   # never worse than the best
    assert sum(line.startswith("  + ") or line.startswith("  - ") for line in lines) == 2
    _, _, state = load_run(tmp_path / "soup", backend="reference")
    assert state["souped_from"] == result["kept"] and state["soup"] == "greedy"
    listed = run_cli("runs", tmp_path / "soup", "--json")   # listed with its validation accuracy
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["state"] == f"greedy soup of {len(result['kept'])}" and row["best_val_acc"] == result["accuracy"]


def test_soup_mistakes(sweep, tmp_path):
    assert_user_error(run_cli("soup", sweep / "sweep" / "lr=1e-3", "--out", tmp_path / "a"),
                      "a soup needs two runs or more; found 1")
    other = tmp_path / "others"
    train(load_spec_text(SPEC.replace("dim: 16", "dim: 32"), "o.yaml", [f"train.out_dir={other / 'wide'}"]),
          echo=lambda *a, **k: None)
    assert_user_error(run_cli("soup", sweep / "sweep" / "lr=1e-3", other / "wide", "--out", tmp_path / "b"),
                      "has another model than", "fine-tuned from the same weights")
    assert_user_error(run_cli("soup", sweep / "sweep", "--out", sweep / "pre"), "already holds a model")
