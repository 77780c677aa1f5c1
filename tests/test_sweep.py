"""`composer sweep`: every combination of some fields' values, checked first, trained, resumable."""
import json

import pytest

from composer.errors import UserError
from composer.sweep import combinations, parse_axis, run_name
from tests.helpers import assert_user_error, run_cli
from tests.test_train import TINY, read_metrics, write_spec

ONE_EPOCH = TINY.replace("epochs: 2", "epochs: 1")


def test_axes_parse_and_combine():
    assert parse_axis("train.optimizer.lr=1e-3, 3e-3") == ("train.optimizer.lr", ["1e-3", "3e-3"])
    # commas inside a YAML list or mapping belong to its one value
    assert parse_axis("model.blocks=[{kind: vit, heads: 2}],[{kind: mixer}]")[1] == [
        "[{kind: vit, heads: 2}]", "[{kind: mixer}]"]
    for text, fragment in (("train.epochs", "expected KEY.PATH=VALUE1,VALUE2"), ("train.epochs=1,,2", "an empty value"),
                           ("train.epochs=1,1", "a value is given twice"), ("a..b=1", "cannot read the key path")):
        with pytest.raises(UserError, match=fragment):
            parse_axis(text)
    combos = combinations([("model.stem.dim", ["8", "16"]), ("train.optimizer.lr", ["1e-3", "3e-3", "1e-2"])])
    assert len(combos) == 6 and combos[1] == ["model.stem.dim=8", "train.optimizer.lr=3e-3"]
    assert run_name(combos[1]) == "dim=8,lr=3e-3"
    assert run_name(["model.blocks[0].kernel_size=7", "data.root=~/my data"]) == "kernel_size=7,root=_my_data"


def test_sweep_trains_every_combination_and_continues_where_it_stopped(tmp_path):
    spec = write_spec(tmp_path, ONE_EPOCH)
    out = tmp_path / "sweep"
    args = ("sweep", spec, "--vary", "model.stem.dim=8,16", "--vary", "train.optimizer.lr=1e-3,3e-3",
            "--set", "data.num_samples=160", "--out", out)
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    names = ["dim=8,lr=1e-3", "dim=8,lr=3e-3", "dim=16,lr=1e-3", "dim=16,lr=3e-3"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for name in names:
        dim, lr = (part.split("=")[1] for part in name.split(","))
        kept = (out / name / "spec.yaml").read_text()
        assert f"dim: {dim}" in kept and f"lr: {float(lr)}" in kept and "num_samples: 160" in kept
        assert len(read_metrics(out / name)) == 1
    table = [line for line in result.stdout.splitlines() if line.startswith(str(out))]
    accuracies = [float(line.split()[4].rstrip("%")) for line in table]
    assert len(table) == 4 and accuracies == sorted(accuracies, reverse=True)   # best first
    # started again: nothing trains twice; a run stopped half-way would resume
    before = {name: (out / name / "metrics.csv").read_text() for name in names}
    again = run_cli(*args)
    assert again.returncode == 0 and again.stdout.count("nothing to train") == 4
    assert {name: (out / name / "metrics.csv").read_text() for name in names} == before


def test_sweep_checks_every_combination_before_training(tmp_path):
    spec = write_spec(tmp_path, ONE_EPOCH)
    out = tmp_path / "sweep"
    result = run_cli("sweep", spec, "--vary", "model.blocks[1].heads=2,3,5", "--vary", "train.epochs=0,1", "--out", out)
    assert_user_error(result, "--vary model.blocks[1].heads=3: model.blocks[1].heads: 3 does not divide dim 16",
                      "--vary model.blocks[1].heads=5: model.blocks[1].heads: 5 does not divide dim 16",
                      "--vary train.epochs=0: train.epochs: input should be greater than 0")
    assert result.stderr.count("heads=3") == 1   # once, although two combinations have it
    assert not out.exists()   # nothing trained
    # a rule of the file that only some values break names those values
    result = run_cli("sweep", spec, "--vary", "model.stem.dim=16,15", "--out", out)
    assert_user_error(result, f"{spec}:8:26: model.blocks[1].heads: 2 does not divide dim 15",
                      "(model.stem.dim from --vary model.stem.dim=15)")
    assert not out.exists()
    assert_user_error(run_cli("sweep", spec, "--vary", "train.epochs=1", "--vary", "train.epochs=2"),
                      "--vary names train.epochs twice")


def test_a_diverging_run_does_not_end_the_sweep(tmp_path):
    spec = write_spec(tmp_path, ONE_EPOCH)
    out = tmp_path / "sweep"
    result = run_cli("sweep", spec, "--vary", "train.optimizer.lr=1e30,1e-3", "--set", "train.max_nonfinite=1",
                     "--out", out)
    assert result.returncode == 0, result.stderr
    assert "run 1/2 diverged: the loss was not finite" in result.stdout
    assert "No checkpoint was saved before it" in result.stdout   # it diverged within its first epoch
    rows = {line.split()[0]: line.split()[-1] for line in result.stdout.splitlines() if line.startswith(str(out))}
    assert rows == {str(out / "lr=1e30"): "diverged", str(out / "lr=1e-3"): "finished"}
    assert json.loads((out / "lr=1e-3" / "final.json").read_text())["epoch"] == 1
