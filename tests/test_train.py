"""Training, checkpoints, resume, the NaN guard, evaluation and DDP, end to end on tiny synthetic data."""
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from composer import train as train_module
from composer.checkpoint import load_run
from composer.cli import main
from composer.spec import load_spec_text
from composer.train import train
from tests.helpers import ROOT, SPECS, assert_user_error, run_cli

TINY = """\
name: tiny
model:
  image_size: 8
  num_classes: 4
  stem: {patch_size: 2, dim: 16}
  blocks:
    - {kind: mixer, token_hidden: 8, mlp_ratio: 2}
    - {kind: vit, heads: 2, mlp_ratio: 2}
  head: {pool: mean}
data:
  kind: synthetic
  num_samples: 320
  val_split: 0.2
  augment: {crop_padding: 1, hflip: true, trivial: true, cutout: 2, erasing: 0.25, mixup: 0.2}
train:
  epochs: 2
  batch_size: 32
  optimizer: {lr: 3.0e-3}
  schedule: {kind: cosine, warmup_epochs: 0.5}
  label_smoothing: 0.1
  grad_clip: 1.0
  ema: 0.9
  device: cpu
  deterministic: true
"""


def write_spec(tmp_path, text=TINY, name="tiny.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_train_end_to_end_writes_run_directory(tmp_path):
    spec = load_spec_text(TINY, "tiny.yaml", [f"train.out_dir={tmp_path / 'run'}"])
    result = train(spec, echo=lambda *a: None)
    run = tmp_path / "run"
    assert {"last.pt", "best.pt", "metrics.csv", "spec.yaml", "final.json"} <= {p.name for p in run.iterdir()}
    rows = read_metrics(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert result["final"]["val_acc"] > 0.5  # 4 learnable classes: far above chance
    assert json.loads((run / "final.json").read_text())["epoch"] == 2
    state = torch.load(run / "last.pt", weights_only=False)
    for key in ("model", "optimizer", "scheduler", "scaler", "ema", "rng", "epoch", "step_in_epoch", "spec_yaml",
                "versions", "normalization"):
        assert key in state, key
    assert state["epoch"] == 2 and state["step_in_epoch"] == 0
    assert set(state["rng"]) >= {"python", "numpy", "torch", "cuda", "augment"}


def _kill_when_checkpointed(cmd, run_dir, env):
    """Start training, SIGKILL it as soon as a mid-epoch checkpoint exists; returns that checkpoint's step."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            last = run_dir / "last.pt"
            if last.exists():
                state = torch.load(last, weights_only=False)
                if state["step_in_epoch"] > 0:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return state["epoch"], state["step_in_epoch"]
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
    raise AssertionError(f"no mid-epoch checkpoint appeared: {proc.stderr.read().decode()[-2000:]}")


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    spec = write_spec(tmp_path, TINY.replace("epochs: 2", "epochs: 3"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "composer", "train", str(spec), "--set", "train.checkpoint_every=2"]
    full = run_cli("train", spec, "--set", "train.checkpoint_every=2", "--out", tmp_path / "full", env=env)
    assert full.returncode == 0, full.stderr

    killed = tmp_path / "killed"
    epoch, step = _kill_when_checkpointed(base + ["--out", str(killed)], killed, env)
    assert step > 0 and epoch < 3
    resumed = run_cli("train", spec, "--set", "train.checkpoint_every=2", "--out", killed, "--resume", "auto", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from epoch" in resumed.stdout

    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    b = torch.load(killed / "last.pt", weights_only=False)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"weights differ after resume: {name}"
    for name, tensor in a["ema"].items():
        assert torch.equal(tensor, b["ema"][name]), f"EMA differs after resume: {name}"
    drop = {"img_per_s", "epoch_s"}  # wall-clock columns
    clean = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    assert clean(read_metrics(tmp_path / "full")) == clean(read_metrics(killed))


def test_nonfinite_loss_guard_stops_with_exit_3(tmp_path, monkeypatch):
    spec = write_spec(tmp_path, TINY.replace("epochs: 2", "epochs: 3"))
    real = train_module.soft_cross_entropy
    calls = {"n": 0}

    def poisoned(logits, targets, weights=None):
        calls["n"] += 1
        loss = real(logits, targets, weights)
        return loss * float("nan") if calls["n"] > 10 else loss  # epoch 1 has 8 steps: it completes

    monkeypatch.setattr(train_module, "soft_cross_entropy", poisoned)
    result = CliRunner().invoke(main, ["train", str(spec), "--out", str(tmp_path / "run"),
                                       "--set", "train.max_nonfinite=3"])
    assert result.exit_code == 3, result.output
    assert "not finite for 3 steps in a row" in result.output
    assert f"The last good checkpoint is {tmp_path / 'run' / 'last.pt'}" in result.output
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert state["epoch"] == 1 and state["step_in_epoch"] == 0  # the last good checkpoint stays
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_isolated_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    real = train_module.soft_cross_entropy
    calls = {"n": 0}

    def sometimes(logits, targets, weights=None):
        calls["n"] += 1
        loss = real(logits, targets, weights)
        return loss * float("inf") if calls["n"] in (3, 5) else loss

    monkeypatch.setattr(train_module, "soft_cross_entropy", sometimes)
    spec = load_spec_text(TINY, "tiny.yaml", [f"train.out_dir={tmp_path / 'run'}"])
    train(spec, echo=lambda *a: None)
    rows = read_metrics(tmp_path / "run")
    assert [int(r["nonfinite_skipped"]) for r in rows] == [2, 0]


def test_missing_and_corrupt_data(tmp_path):
    folder = TINY.replace("kind: synthetic", f"kind: folder\n  root: {tmp_path / 'nowhere'}")
    result = run_cli("train", write_spec(tmp_path, folder), "--out", tmp_path / "run")
    assert_user_error(result, str(tmp_path / "nowhere"), "does not exist")
    not_archive = tmp_path / "data.zip"
    not_archive.write_bytes(b"this is not a zip file")
    result = run_cli("train", write_spec(tmp_path, TINY.replace("kind: synthetic", f"kind: folder\n  root: {not_archive}")))
    assert_user_error(result, str(not_archive))


def test_run_time_mistakes_point_at_the_line_of_the_spec(tmp_path):
    """Mistakes only the data or the machine reveal (more batch than images, other classes than
    the model has) name the spec's line, as load-time problems do; from --set, the override."""
    spec = write_spec(tmp_path, TINY.replace("batch_size: 32", "batch_size: 512"))
    line = TINY.splitlines().index("  batch_size: 32") + 1
    result = run_cli("train", spec, "--out", tmp_path / "run")
    assert_user_error(result, f"error: {spec}:{line}:15: train.batch_size 512 is larger than the 256 training images")
    plain = write_spec(tmp_path, TINY, name="plain.yaml")
    result = run_cli("train", plain, "--out", tmp_path / "run", "--set", "train.batch_size=300")
    assert_user_error(result, "error: --set train.batch_size=300: train.batch_size 300 is larger than the 256")
    result = run_cli("train", plain, "--out", tmp_path / "run", "--set", "train.init_from=nowhere")
    assert_user_error(result, "error: --set train.init_from=nowhere: train.init_from: nowhere does not exist")
    # `composer bench train` trains a copy of the spec: its errors still point at the user's file
    from composer.bench import bench_train
    from composer.errors import UserError
    from composer.spec import load_spec

    with pytest.raises(UserError, match=rf"^{re.escape(str(spec))}:{line}:15: train.batch_size 512 is larger"):
        bench_train(load_spec(spec), steps=11, source="real", echo=lambda *a: None)


def test_resume_errors(tmp_path):
    spec = write_spec(tmp_path)
    run = tmp_path / "run"
    result = run_cli("train", spec, "--out", run, "--resume", tmp_path / "missing.pt")
    assert_user_error(result, "missing.pt does not exist")
    assert not (run / "last.pt").exists()  # never a silent fresh start

    assert run_cli("train", spec, "--out", run, "--epochs", "1").returncode == 0
    before = (run / "last.pt").read_bytes()
    result = run_cli("train", spec, "--out", run, "--epochs", "1")
    assert_user_error(result, "already holds a run", "--resume auto")
    assert (run / "last.pt").read_bytes() == before  # a second plain `train` never overwrites a run
    result = run_cli("train", spec, "--out", run, "--resume", "auto", "--set", "model.stem.dim=32")
    assert_user_error(result, "the checkpoint does not match the spec", "model.stem.dim: checkpoint has 16, spec has 32")
    result = run_cli("train", spec, "--out", run, "--resume", "auto", "--set", "train.optimizer.layer_decay=0.7")
    assert_user_error(result, "train.optimizer.layer_decay: checkpoint has None, spec has 0.7")

    (run / "last.pt").write_bytes(b"\x00garbage, as after a disk error")
    result = run_cli("train", spec, "--out", run, "--resume", "auto")
    assert_user_error(result, f"checkpoint {run / 'last.pt'} cannot be read",
                      f"resume from the best epoch's checkpoint instead (--resume {run / 'best.pt'}")
    assert (run / "last.pt").read_bytes().startswith(b"\x00garbage")  # left in place
    # as the message says: the best epoch's checkpoint resumes the run
    result = run_cli("train", spec, "--out", run, "--resume", run / "best.pt", "--epochs", "2")
    assert result.returncode == 0, result.stderr
    assert torch.load(run / "last.pt", weights_only=False)["epoch"] == 2


def test_resume_auto_without_checkpoint_starts_fresh_and_finished_run_is_kept(tmp_path):
    spec = load_spec_text(TINY, "tiny.yaml", [f"train.out_dir={tmp_path / 'run'}", "train.epochs=1"])
    train(spec, resume="auto", echo=lambda *a: None)
    first = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["model"]
    said = []
    result = train(spec, resume="auto", echo=said.append)  # nothing left to do
    again = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert result["final"]["epoch"] == 1 and isinstance(result["final"]["step"], int)
    assert any("finished its 1 epoch: nothing to train" in line and "--epochs" in line for line in said), said


def test_kept_epochs_evaluate_and_resume_as_they_were(tmp_path):
    """train.keep_every: every N-th epoch's checkpoint stays as epoch_NNN.pt; each is a checkpoint
    like last.pt (evaluate it, or resume the run from it)."""
    spec = write_spec(tmp_path, TINY.replace("epochs: 2", "epochs: 4"))
    result = run_cli("train", spec, "--out", tmp_path / "run", "--set", "train.keep_every=2")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "run").glob("epoch_*.pt")) == ["epoch_002.pt", "epoch_004.pt"]
    kept, last = (torch.load(tmp_path / "run" / n, weights_only=False) for n in ("epoch_004.pt", "last.pt"))
    assert kept["epoch"] == 4 and all(torch.equal(kept["model"][k], last["model"][k]) for k in last["model"])
    second = json.loads(run_cli("evaluate", tmp_path / "run" / "epoch_002.pt", "--json", "--split", "val").stdout)
    assert second["epoch"] == 2
    resumed = run_cli("train", spec, "--out", tmp_path / "run", "--resume", tmp_path / "run" / "epoch_002.pt")
    assert resumed.returncode == 0, resumed.stderr
    # from epoch 2 the run goes the same way again (deterministic on the CPU)
    again = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert again["epoch"] == 4 and all(torch.equal(again["model"][k], last["model"][k]) for k in last["model"])


def test_evaluate_saved_run(tmp_path):
    spec = load_spec_text(TINY, "tiny.yaml", [f"train.out_dir={tmp_path / 'run'}"])
    train(spec, echo=lambda *a: None)
    result = run_cli("evaluate", tmp_path / "run", "--json", "--split", "val")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert 0.5 < report["accuracy"] <= 1 and report["loss"] > 0 and report["top5"] >= report["accuracy"]
    assert len(report["per_class"]) == 4 and report["images"] == 64
    confusion = torch.tensor(report["confusion"])   # rows: true class, columns: prediction
    assert confusion.shape == (4, 4) and int(confusion.sum()) == 64
    assert int(confusion.trace()) == round(report["accuracy"] * 64)
    assert [int(h) / int(n) for h, n in zip(confusion.diagonal(), confusion.sum(1))] == report["per_class"]
    text = run_cli("evaluate", tmp_path / "run" / "last.pt", "--split", "test")
    assert text.returncode == 0 and "accuracy" in text.stdout
    flipped = json.loads(run_cli("evaluate", tmp_path / "run", "--json", "--split", "val", "--flip").stdout)
    assert flipped["flip"] is True and flipped["images"] == 64 and "note" not in flipped   # TINY trains with hflip
    assert_user_error(run_cli("evaluate", tmp_path / "nothing-here"), "does not exist")
    # a file of the run that is not a checkpoint: named, kept, and the fix is evaluate's own
    metrics = tmp_path / "run" / "metrics.csv"
    before = metrics.read_bytes()
    assert_user_error(run_cli("evaluate", metrics), f"checkpoint {metrics} cannot be read",
                      "give a run directory or a checkpoint written by composer train")
    assert metrics.read_bytes() == before


def test_accumulated_slices_train_as_the_whole_batch(tmp_path):
    """train.accumulate: the same run (TINY has no BatchNorm) with each batch of 32 taken in 4
    slices of 8, and with the slicing changed at a resume; equal up to float summation order."""
    class Crash(Exception):
        pass

    def crash_after_epoch_1(line, *args, **kwargs):   # after its checkpoint, as a crash would
        if str(line).startswith("epoch 1/2"):
            raise Crash

    def run(name, *overrides, resume=None, echo=lambda *a, **k: None):
        spec = load_spec_text(TINY, "tiny.yaml", [f"train.out_dir={tmp_path / name}", *overrides])
        return train(spec, resume=resume, echo=echo)

    run("whole")
    run("sliced", "train.accumulate=4")
    with pytest.raises(Crash):
        run("changed", "train.accumulate=4", echo=crash_after_epoch_1)
    run("changed", "train.accumulate=2", resume="auto")
    # the models compared by what they compute: the token MLPs' output biases add one value to all
    # channels of a token, which the next LayerNorm removes; with no gradient but rounding noise,
    # which Adam scales up to full steps, those differ with the summation order
    images = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    _, model, whole = load_run(tmp_path / "whole" / "last.pt")
    with torch.no_grad():
        expected = model(images)
    for name in ("sliced", "changed"):
        for a, b in zip(read_metrics(tmp_path / "whole"), read_metrics(tmp_path / name), strict=True):
            for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
                assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4, abs=1e-5), (name, key, a, b)
        _, model, state = load_run(tmp_path / name / "last.pt")
        assert state["global_step"] == whole["global_step"]
        with torch.no_grad():
            torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-5, msg=name)


def test_train_and_evaluate_with_a_validation_folder(tmp_path):
    from tests.test_data import make_folder

    train_dir, val_dir = make_folder(tmp_path / "train"), make_folder(tmp_path / "val")
    text = TINY.replace("num_classes: 4", "num_classes: 3").replace(
        "  kind: synthetic\n  num_samples: 320\n  val_split: 0.2\n",
        f"  kind: folder\n  root: {train_dir}\n  val_root: {val_dir}\n  cache_dir: {tmp_path / 'cache'}\n")
    text = text.replace("batch_size: 32", "batch_size: 4")
    spec = write_spec(tmp_path, text)
    result = run_cli("train", spec, "--out", tmp_path / "run", "--epochs", "1")
    assert result.returncode == 0, result.stderr
    assert "data: 12 train / 12 val images" in result.stdout + result.stderr
    report = json.loads(run_cli("evaluate", tmp_path / "run", "--json").stdout)
    assert report["split"] == "val" and report["images"] == 12 and report["classes"] == ["bird", "cat", "dog"]
    # --crop decodes the images' centres: another decoding, cached apart from the whole images'
    cached = set((tmp_path / "cache" / "images").glob("*.pt"))
    cropped = json.loads(run_cli("evaluate", tmp_path / "run", "--json", "--crop", "0.875").stdout)
    assert cropped["images"] == 12 and len(set((tmp_path / "cache" / "images").glob("*.pt")) - cached) == 1

    (val_dir / "dog").rename(val_dir / "wolf")   # same count, another class
    assert_user_error(run_cli("train", spec, "--out", tmp_path / "run2", "--epochs", "1"),
                      "the validation folder's classes differ from the training folder's (only in "
                      f"{train_dir}: dog; only in {val_dir}: wolf); give data.val_root the same class subfolders")
    assert not (tmp_path / "run2").exists()
    assert_user_error(run_cli("evaluate", tmp_path / "run"), f"the classes of {val_dir} (bird, cat, wolf...) differ")


def test_images_kept_in_host_memory_train_the_same(tmp_path, monkeypatch):
    """A dataset too large for the GPU stays on the host and each batch is copied over: the same
    batches, augmentation and result (here on the CPU, where the copy is a no-op)."""
    def run(name, echo):
        spec = load_spec_text(TINY, "tiny.yaml", [f"train.out_dir={tmp_path / name}"])
        return train(spec, echo=echo)

    run("resident", lambda *a, **k: None)
    monkeypatch.setattr(train_module, "keep_data_on_host", lambda data_bytes, device: True)
    said = []
    run("host", lambda line="", *a, **k: said.append(str(line)))
    assert any(line.startswith("data: 256 train / 64 val images of (3, 8, 8) in host memory") for line in said), said
    for a, b in zip(read_metrics(tmp_path / "resident"), read_metrics(tmp_path / "host"), strict=True):
        assert all(a[k] == b[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc")), (a, b)
    first, second = (torch.load(tmp_path / n / "last.pt", weights_only=False)["model"] for n in ("resident", "host"))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_predict_classifies_image_files_as_the_model_does(tmp_path):
    """`composer predict RUN IMAGES...`: each image decoded as the folder dataset decodes it, its
    top classes by name with the model's softmax probabilities."""
    from composer.data import load_split, normalize
    from composer.evaluate import predict
    from tests.test_data import make_folder

    folder = make_folder(tmp_path)
    text = TINY.replace("num_classes: 4", "num_classes: 3").replace(
        "  kind: synthetic\n  num_samples: 320\n  val_split: 0.2\n",
        f"  kind: folder\n  root: {folder}\n  val_split: 0.25\n  cache_dir: {tmp_path / 'cache'}\n")
    spec = load_spec_text(text.replace("batch_size: 32", "batch_size: 4"), "tiny.yaml",
                          [f"train.out_dir={tmp_path / 'run'}", "train.epochs=1"])
    train(spec, echo=lambda *a, **k: None)

    result = predict(str(tmp_path / "run"), [str(folder / "dog"), str(folder / "bird" / "1.png")], top=2)
    # decoded and classified a batch at a time: the same answers (up to float rounding of other batch sizes)
    batched = predict(str(tmp_path / "run"), [str(folder / "dog"), str(folder / "bird" / "1.png")], top=2,
                      batch_size=2)["predictions"]
    for a, b in zip(batched, result["predictions"], strict=True):
        assert a["image"] == b["image"] and [g["class"] for g in a["top"]] == [g["class"] for g in b["top"]]
        assert [g["probability"] for g in a["top"]] == pytest.approx([g["probability"] for g in b["top"]], abs=1e-6)
    files = [str(folder / "dog" / f"{n}.jpg") for n in range(4)] + [str(folder / "bird" / "1.png")]
    assert [row["image"] for row in result["predictions"]] == files
    _, model, state = load_run(tmp_path / "run")
    every = load_split(spec.data.model_copy(update={"val_split": 0.0}), spec.model, "train")   # bird, cat, dog
    images = torch.cat([every.images[8:12], every.images[1:2]])
    with torch.no_grad():
        probs = model(normalize(images, *state["normalization"].values())).softmax(-1)
    for row, p in zip(result["predictions"], probs, strict=True):
        assert [g["class"] for g in row["top"]] == [every.classes[i] for i in p.topk(2).indices.tolist()]
        assert [g["probability"] for g in row["top"]] == pytest.approx(p.topk(2).values.tolist(), abs=1e-6)

    shown = run_cli("predict", tmp_path / "run", folder / "cat" / "0.png", "--top", "1")
    assert shown.returncode == 0, shown.stderr
    assert re.search(rf"{re.escape(str(folder / 'cat' / '0.png'))}: (bird|cat|dog) [01]\.\d{{3}}$", shown.stdout, re.M)
    # --csv: each image's top class, as a file a spreadsheet or a competition takes
    written = run_cli("predict", tmp_path / "run", folder / "dog", folder / "bird" / "1.png", "--csv",
                      tmp_path / "out.csv")
    assert written.returncode == 0 and f"wrote {tmp_path / 'out.csv'}: 5 rows" in written.stdout, written.stderr
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "class", "probability"]
    assert [(r[0], r[1]) for r in rows[1:]] == [(p["image"], p["top"][0]["class"]) for p in result["predictions"]]
    assert [float(r[2]) for r in rows[1:]] == pytest.approx([p["top"][0]["probability"] for p in result["predictions"]],
                                                            abs=1e-6)
    assert_user_error(run_cli("predict", tmp_path / "run", tmp_path / "nothing.png"), "nothing.png does not exist")
    (tmp_path / "notes.png").write_text("not an image")
    assert_user_error(run_cli("predict", tmp_path / "run", tmp_path / "notes.png"), "cannot read image")


VIT = """\
model:
  image_size: 8
  num_classes: 4
  stem: {patch_size: 2, dim: 16}
  pos_embed: learned
  blocks: [{kind: vit, heads: 2, repeat: 2}]
  head: {pool: cls}
data: {kind: synthetic, num_samples: 128, val_split: 0.25}
train: {epochs: 1, batch_size: 32, device: cpu, ema: 0.9}
"""


def test_fine_tuning_starts_from_a_run_with_a_new_head_and_image_size(tmp_path):
    from composer.build import build_model
    from composer.checkpoint import init_from_run

    pre = load_spec_text(VIT, "vit.yaml", [f"train.out_dir={tmp_path / 'pre'}"])
    train(pre, echo=lambda *a, **k: None)
    source = torch.load(tmp_path / "pre" / "best.pt", weights_only=False)["ema"]   # the EMA weights are taken
    # the position embedding made a known function of the patch row: resizing must keep it one
    rows = torch.arange(4.0).repeat_interleave(4)   # (16,) row index of each patch, row-major
    source["stages.3.pos"][0, 1:, 0] = rows
    pretrained_stats = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}   # not the fine-tuning data's
    torch.save({**torch.load(tmp_path / "pre" / "best.pt", weights_only=False), "ema": source,
                "normalization": pretrained_stats}, tmp_path / "pre" / "best.pt")

    spec = load_spec_text(VIT, "vit.yaml", ["model.num_classes=3", "model.image_size=16"])
    model = build_model(spec)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        said = init_from_run(model, spec, tmp_path / "pre")
    assert said == (f"weights from {tmp_path / 'pre' / 'best.pt'} (epoch 1): 29 tensors, new classifier (4 -> 3 "
                    "classes), resized stages.3.pos (4x4 -> 8x8 patches)")
    now = model.state_dict()
    for key, value in now.items():
        if ".classify." in key:
            assert torch.equal(value, fresh[key]), key
        elif key != "stages.3.pos":
            assert torch.equal(value, source[key]), key
    pos = now["stages.3.pos"][0]
    assert torch.equal(pos[0], source["stages.3.pos"][0, 0])                  # the class token's row
    by_row = pos[1:, 0].reshape(8, 8)
    assert torch.allclose(by_row, by_row[:, :1].expand(8, 8), atol=1e-5)      # the same along each row
    assert (by_row[1:, 0] >= by_row[:-1, 0]).all() and by_row[-1, 0] > by_row[0, 0] + 2

    # through train: logged, and a resume keeps its own checkpoint's weights
    overrides = [f"train.out_dir={tmp_path / 'ft'}", f"train.init_from={tmp_path / 'pre'}", "model.num_classes=3",
                 "model.image_size=16"]
    said = []
    train(load_spec_text(VIT, "vit.yaml", overrides), echo=lambda line="", *a, **k: said.append(str(line)))
    assert any(line.startswith("weights from") and "new classifier" in line for line in said), said
    # the inputs normalized as the pretrained weights saw theirs, not by the new data's statistics
    assert "input normalization: the pretrained run's (mean (0.1, 0.2, 0.3), std (0.4, 0.5, 0.6)), not this " \
           "data's own" in said
    assert torch.load(tmp_path / "ft" / "last.pt", weights_only=True)["normalization"] == pretrained_stats
    said = []
    train(load_spec_text(VIT, "vit.yaml", overrides + ["train.epochs=2"]), resume="auto",
          echo=lambda line="", *a, **k: said.append(str(line)))
    assert any(line.startswith("resumed from epoch 1") for line in said), said
    assert not any(line.startswith("weights from") for line in said), said


def test_evaluate_and_predict_at_another_image_size(tmp_path):
    """--image-size: the run's model at another input size, its position table resized as
    fine-tuning resizes it (synthetic data comes decoded: the model resizes its input); the same
    size changes nothing; sizes the patch does not divide, and token-mixing MLPs, are refused."""
    from PIL import Image

    from composer.evaluate import load_at_size

    train(load_spec_text(VIT, "vit.yaml", [f"train.out_dir={tmp_path / 'run'}"]), echo=lambda *a, **k: None)
    result = run_cli("evaluate", tmp_path / "run", "--image-size", 12, "--json")
    assert result.returncode == 0, result.stderr
    evaluated = json.loads(result.stdout)
    assert evaluated["image_size"] == 12 and evaluated["resized"] == "resized stages.3.pos (4x4 -> 6x6 patches)"
    spec, model, _, said = load_at_size(str(tmp_path / "run"), torch.device("cpu"), 12)
    assert spec.model.resize == 12 and model.layers[3].module.pos.shape == (1, 1 + 36, 16)
    plain, same = (json.loads(run_cli("evaluate", tmp_path / "run", *extra, "--json").stdout)
                   for extra in ((), ("--image-size", 8)))
    assert plain["accuracy"] == same["accuracy"] and plain["loss"] == same["loss"] and "resized" not in same
    Image.new("RGB", (20, 20), 90).save(tmp_path / "x.png")
    predicted = run_cli("predict", tmp_path / "run", tmp_path / "x.png", "--image-size", 12)
    assert predicted.returncode == 0, predicted.stderr
    assert_user_error(run_cli("evaluate", tmp_path / "run", "--image-size", 11),
                      "--image-size 11: ", "does not divide")
    mixer = VIT.replace("{kind: vit, heads: 2, repeat: 2}", "{kind: mixer, token_hidden: 8}").replace("pool: cls",
                                                                                                   "pool: mean")
    train(load_spec_text(mixer, "m.yaml", [f"train.out_dir={tmp_path / 'mixer'}"]), echo=lambda *a, **k: None)
    assert_user_error(run_cli("evaluate", tmp_path / "mixer", "--image-size", 12),
                      "--image-size 12: ", "token-mixing MLPs are tied to their token count")


def test_freeze_trains_the_head_alone_on_the_features_of_a_run(tmp_path):
    from composer.errors import UserError

    train(load_spec_text(VIT, "vit.yaml", [f"train.out_dir={tmp_path / 'pre'}"]), echo=lambda *a, **k: None)
    source = torch.load(tmp_path / "pre" / "best.pt", weights_only=False)["ema"]
    overrides = [f"train.out_dir={tmp_path / 'probe'}", f"train.init_from={tmp_path / 'pre'}", "model.num_classes=3",
                 "train.freeze=backbone", "train.optimizer.layer_decay=0.5"]
    said = []
    train(load_spec_text(VIT, "vit.yaml", overrides), echo=lambda line="", *a, **k: said.append(str(line)))
    assert any(line.startswith("freeze: stem to blocks[0].channel_mlp #2 keep their weights") for line in said), said
    assert any(line.startswith("layer decay 0.5: peak learning rates from 0.001 (the first layer that trains) to "
                               "0.001 (head)") for line in said), said   # the head alone trains
    trained = torch.load(tmp_path / "probe" / "last.pt", weights_only=False)["model"]
    head = f"stages.{max(int(key.split('.')[1]) for key in trained)}."   # the last stage
    for key, value in trained.items():
        if not key.startswith(head):
            assert torch.equal(value, source[key]), key   # every layer before the head as the run left it
    assert not torch.equal(trained[head + "norm.weight"], source[head + "norm.weight"])   # the head trained
    assert trained[head + "classify.weight"].shape == (3, 16)
    # the optimizer's state holds the parameters that train: a resume keeps the frozen layers
    with pytest.raises(UserError, match="train.freeze: checkpoint has 'backbone', spec has 1"):
        train(load_spec_text(VIT, "vit.yaml", overrides + ["train.freeze=1"]), resume="auto",
              echo=lambda *a, **k: None)


class _RunsCode:
    """Pickled, it asks the loader to call os.system: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_load_as_data_and_older_ones_still_load(tmp_path):
    from composer.checkpoint import load_checkpoint

    marker = tmp_path / "the-code-ran"
    torch.save({"model": {}, "spec_yaml": "name: x", "payload": _RunsCode(marker)}, tmp_path / "evil.pt")
    assert_user_error(run_cli("evaluate", tmp_path / "evil.pt"), "holds Python objects composer does not load "
                      "(posix.system)", "read without running code from the file")
    assert not marker.exists()

    train(load_spec_text(VIT, "vit.yaml", [f"train.out_dir={tmp_path / 'run'}"]), echo=lambda *a, **k: None)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)   # tensors and plain values only
    # as earlier versions wrote it: NumPy's random state as an array, torch's version as its own class
    kind, keys, *rest = state["rng"]["numpy"]
    state["rng"]["numpy"] = (kind, keys.numpy().astype("uint32"), *rest)
    state["versions"]["torch"] = torch.__version__
    torch.save(state, tmp_path / "run" / "last.pt")
    assert type(load_checkpoint(tmp_path / "run" / "last.pt")["rng"]["numpy"][1]).__name__ == "ndarray"
    said = []
    train(load_spec_text(VIT, "vit.yaml", [f"train.out_dir={tmp_path / 'run'}", "train.epochs=2"]), resume="auto",
          echo=lambda line="", *a, **k: said.append(str(line)))
    assert any(line.startswith("resumed from epoch 1") for line in said), said


def test_fine_tuning_refuses_weights_that_do_not_fit(tmp_path):
    spec = write_spec(tmp_path, TINY)   # a token-mixing MLP: tied to 16 tokens
    assert run_cli("train", spec, "--out", tmp_path / "pre", "--epochs", "1").returncode == 0
    result = run_cli("train", spec, "--out", tmp_path / "ft", "--set", "model.image_size=16",
                     "--set", f"train.init_from={tmp_path / 'pre'}")
    assert_user_error(result, "its weights do not fit this model",
                      "stages.2.mix_in.weight: checkpoint (8, 16), model (8, 64)", "token-mixing MLPs are tied")
    assert not (tmp_path / "ft" / "last.pt").exists()
    assert_user_error(run_cli("train", spec, "--out", tmp_path / "ft", "--set", "train.init_from=/nowhere"),
                      "/nowhere does not exist")
    # registers shift every later stage: named as the difference, not as a list of every tensor after them
    result = run_cli("train", spec, "--out", tmp_path / "ft", "--set", "model.registers=2",
                     "--set", f"train.init_from={tmp_path / 'pre'}")
    assert_user_error(result, "its model has 0 register tokens and this one 2; set model.registers: 0")
    result = run_cli("train", spec, "--out", tmp_path / "ft", "--set", "model.pos_embed=learned",
                     "--set", f"train.init_from={tmp_path / 'pre'}")
    assert_user_error(result, "its model is built otherwise: stage 2 is blocks[0].token_mlp (token_mlp) there and "
                              "pos_embed (pos_embed (learned)) here")
    assert not (tmp_path / "ft" / "last.pt").exists()


def test_export_gives_a_program_that_classifies_as_the_run_does(tmp_path):
    """`composer export RUN OUT.pt2`: a torch.export program of the model on its PyTorch path
    with the run's normalization, uint8 images of any batch size in, the model's logits out."""
    from composer.data import normalize

    spec = write_spec(tmp_path, TINY)
    assert run_cli("train", spec, "--out", tmp_path / "run", "--epochs", "1").returncode == 0
    result = run_cli("export", tmp_path / "run", tmp_path / "out" / "tiny.pt2")
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'out' / 'tiny.pt2'}: uint8 images ('batch', 3, 8, 8) -> logits over 4 classes" \
        in result.stdout
    extra = {"composer.json": ""}
    program = torch.export.load(tmp_path / "out" / "tiny.pt2", extra_files=extra)
    metadata = json.loads(extra["composer.json"])
    assert metadata["classes"] == ["class_0", "class_1", "class_2", "class_3"] and metadata["epoch"] == 1
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("kernels" in t for t in targets), targets   # no Triton op: runs without composer
    _, model, state = load_run(tmp_path / "run")
    for batch in (1, 5):
        images = torch.randint(0, 256, (batch, 3, 8, 8), dtype=torch.uint8)
        with torch.no_grad():
            expected = model(normalize(images, state["normalization"]["mean"], state["normalization"]["std"]))
        torch.testing.assert_close(program.module()(images), expected, rtol=1e-5, atol=1e-5)
    assert_user_error(run_cli("export", tmp_path / "run", tmp_path / "tiny.tflite"), "the file's suffix chooses "
                      "the format: .pt2 (torch.export) or .onnx")


def test_export_to_onnx_runs_in_onnxruntime_as_the_run_does(tmp_path, monkeypatch):
    """`composer export RUN OUT.onnx`: the same program for ONNX Runtime: uint8 `images` with a
    batch dimension named "batch", `logits` out, the metadata as a model property."""
    import importlib.util

    from composer.data import normalize

    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    spec = write_spec(tmp_path, TINY)
    assert run_cli("train", spec, "--out", tmp_path / "run", "--epochs", "1").returncode == 0
    result = run_cli("export", tmp_path / "run", tmp_path / "tiny.onnx")
    assert result.returncode == 0, result.stderr
    assert "onnxruntime.InferenceSession(path)" in result.stdout
    metadata = {p.key: p.value for p in onnx.load(tmp_path / "tiny.onnx").metadata_props}
    assert json.loads(metadata["composer.json"])["classes"] == ["class_0", "class_1", "class_2", "class_3"]
    session = ort.InferenceSession(str(tmp_path / "tiny.onnx"))
    (images_in,), (logits_out,) = session.get_inputs(), session.get_outputs()
    assert (images_in.name, images_in.type, images_in.shape) == ("images", "tensor(uint8)", ["batch", 3, 8, 8])
    assert (logits_out.name, logits_out.shape) == ("logits", ["batch", 4])
    _, model, state = load_run(tmp_path / "run")
    for batch in (1, 6):
        images = torch.randint(0, 256, (batch, 3, 8, 8), dtype=torch.uint8)
        with torch.no_grad():
            expected = model(normalize(images, state["normalization"]["mean"], state["normalization"]["std"]))
        (logits,) = session.run(None, {"images": images.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-5, atol=1e-5)
    # without the exporter's packages: what to install, and nothing written
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript"
                        else real_find_spec(name, *a))
    assert_user_error(run_cli("export", tmp_path / "run", tmp_path / "again.onnx"),
                      "exporting to ONNX needs onnxscript: pip install 'mixer-composer[onnx]'")
    assert not (tmp_path / "again.onnx").exists()


def test_a_second_run_into_a_directory_in_use_is_refused(tmp_path):
    """Two `composer train` into one directory at once (started twice, or resumed while the first
    still runs) would interleave checkpoints: the second is refused while the first holds it."""
    spec = write_spec(tmp_path, TINY.replace("epochs: 2", "epochs: 1"))
    with train_module.hold_run_directory(tmp_path / "run"):   # as a running `composer train` holds it
        result = run_cli("train", spec, "--out", tmp_path / "run")
        assert_user_error(result, f"{tmp_path / 'run'} is in use by another composer train (pid {os.getpid()} on ",
                          "train into another directory with --out")
        assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "metrics.csv").exists()
    result = run_cli("train", spec, "--out", tmp_path / "run")   # released: the run goes ahead
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "last.pt").exists()
    # and again after it: the lock went with the process that held it
    result = run_cli("train", spec, "--out", tmp_path / "run", "--resume", "auto", "--epochs", "2")
    assert result.returncode == 0, result.stderr


def test_recomputed_token_blocks_train_the_same_in_less_memory(tmp_path):
    """train.recompute: the token blocks keep only their inputs for the backward (fewer saved
    tensors, by count and bytes) and the run trains as without it, bit for bit on the CPU
    (drop path on: the recomputation draws the same random numbers)."""
    from composer.build import build_model

    text = TINY.replace("{kind: vit, heads: 2, mlp_ratio: 2}", "{kind: vit, heads: 2, mlp_ratio: 2, drop_path: 0.2}")

    def saved_bytes(recompute: bool) -> int:
        torch.manual_seed(0)
        model = build_model(load_spec_text(text, "tiny.yaml"))
        if recompute:
            assert model.recompute_token_blocks() == 4   # mixer and vit: 2 + 2 token blocks
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randn(32, 3, 8, 8)).sum().backward()
        return sum(total)

    assert saved_bytes(True) < 0.5 * saved_bytes(False)

    for name, flag in (("kept", "false"), ("recomputed", "true")):
        train(load_spec_text(text, "tiny.yaml", [f"train.out_dir={tmp_path / name}", f"train.recompute={flag}"]),
              echo=lambda *a, **k: None)
    assert read_metrics(tmp_path / "kept") != [] and all(
        a[k] == b[k] for a, b in zip(read_metrics(tmp_path / "kept"), read_metrics(tmp_path / "recomputed"), strict=True)
        for k in ("train_loss", "train_acc", "val_loss", "val_acc"))
    kept, recomputed = (torch.load(tmp_path / n / "last.pt", weights_only=False)["model"] for n in ("kept", "recomputed"))
    assert all(torch.equal(kept[k], recomputed[k]) for k in kept)


def test_a_log_hears_from_a_long_epoch_while_it_runs(tmp_path, monkeypatch):
    """Without a terminal (a cluster job's log) a line every Progress.LOG_EVERY_S seconds says where
    the epoch is and when it ends; by default none in a run this short."""
    said = []
    spec = load_spec_text(TINY, "tiny.yaml", [f"train.out_dir={tmp_path / 'quiet'}", "train.epochs=1"])
    train(spec, echo=lambda line="", *a, **k: said.append(str(line)))
    assert not any(" step " in line for line in said), said
    monkeypatch.setattr(train_module.Progress, "LOG_EVERY_S", 0.0)   # a line at every step
    said = []
    spec = load_spec_text(TINY, "tiny.yaml", [f"train.out_dir={tmp_path / 'run'}", "train.epochs=1"])
    train(spec, echo=lambda line="", *a, **k: said.append(str(line)))
    steps = [line for line in said if line.startswith("epoch 1/1  step ")]
    assert [line.split()[3] for line in steps] == [f"{i}/8" for i in range(1, 9)], said
    assert re.fullmatch(r"epoch 1/1  step 8/8  loss \d\.\d{3}  acc [01]\.\d{3}  [\d,]+ img/s  epoch ends in 0s",
                        steps[-1]), steps[-1]


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    spec_text = TINY.replace("ema: 0.9", "ema: null").replace("epochs: 2", "epochs: 1")   # 8 steps each
    spec = write_spec(tmp_path, spec_text)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    single = run_cli("train", spec, "--out", tmp_path / "one", env=env)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                          "-m", "composer", "train", str(spec), "--out", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # and with each process's 16 images in 2 slices (DDP averages the gradients at the last one)
    sliced = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port=29518", "-m", "composer", "train", str(spec), "--out",
                             str(tmp_path / "sliced"), "--set", "train.accumulate=2"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert sliced.returncode == 0, sliced.stderr[-3000:]
    one = read_metrics(tmp_path / "one")
    for other in ("two", "sliced"):
        for a, b in zip(one, read_metrics(tmp_path / other), strict=True):
            # (the gradient norm too: DDP averages the processes' gradients into the whole batch's)
            for key in ("train_loss", "val_loss", "val_acc", "grad_norm", "grad_norm_max"):
                assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-5), (other, key, a, b)


def test_quickstart_reaches_its_accuracy(tmp_path):
    spec = load_spec_text((SPECS / "quickstart.yaml").read_text(), "quickstart.yaml",
                          [f"train.out_dir={tmp_path / 'qs'}"])
    result = train(spec, echo=lambda *a: None)
    assert result["final"]["val_acc"] >= 0.95, result["final"]


def test_stop_signals_flag_the_first_signal_and_let_the_second_act():
    before = {s: signal.getsignal(s) for s in train_module.STOP_SIGNALS}
    with train_module.stop_signals() as state:
        assert state["hit"] is None
        os.kill(os.getpid(), signal.SIGTERM)   # handled: only flagged
        assert state["hit"] == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):   # the second one does what it does by default
            os.kill(os.getpid(), signal.SIGINT)
    assert {s: signal.getsignal(s) for s in train_module.STOP_SIGNALS} == before


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stop_signal_saves_and_exits(tmp_path, signum, exit_code):
    spec = write_spec(tmp_path, TINY.replace("epochs: 2", "epochs: 200"))
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "composer", "train", str(spec), "--out", str(run)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # wait until training has really started
            if line.startswith("epoch 1/"):
                break
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == exit_code, err
    assert f"interrupted by {signum.name}; saved" in err and "--resume auto" in err and "Traceback" not in err
    state = torch.load(run / "last.pt", weights_only=False)
    assert state["epoch"] >= 1 and state["global_step"] > 8


@pytest.mark.parametrize("error, where", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "GPU"),
    # what the CPU allocator raises (a plain RuntimeError)
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                  "you tried to allocate 70368744177664 bytes. Error code 12 (Cannot allocate memory)"), "CPU"),
])
def test_out_of_memory_names_the_batch_size(tmp_path, monkeypatch, error, where):
    def oom(logits, targets, weights=None):
        raise error

    monkeypatch.setattr(train_module, "soft_cross_entropy", oom)
    result = CliRunner().invoke(main, ["train", str(write_spec(tmp_path)), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert f"out of {where} memory at batch size 32" in result.stderr and "train.batch_size=16" in result.stderr
    # the fix that trains the same: the next slicing of the batch (32 images: 2 slices of 16)
    assert "--set train.accumulate=2 (the same training, in slices of 16 images)" in result.stderr
    assert "Traceback" not in result.output


def test_a_full_disk_while_logging_names_the_file(tmp_path, monkeypatch):
    import errno

    real, rows = train_module._append_metrics, []

    def append_until_the_disk_fills(path, row):   # epoch 1's row is written, then ENOSPC
        if rows:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        rows.append(row)
        real(path, row)

    monkeypatch.setattr(train_module, "_append_metrics", append_until_the_disk_fills)
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(write_spec(tmp_path)), "--out", str(run)])
    assert result.exit_code == 2, result.output
    assert f"cannot write {run / 'metrics.csv'}: No space left on device" in result.stderr
    assert "resume with --resume auto" in result.stderr and "Traceback" not in result.output
    assert torch.load(run / "last.pt", weights_only=False)["epoch"] == 1   # epoch 1's checkpoint, whole


def test_a_full_disk_while_saving_names_the_checkpoint_and_keeps_the_last_one(tmp_path, monkeypatch):
    import errno

    from composer import checkpoint as checkpoint_module

    real_save, saves = torch.save, []

    def save_until_the_disk_fills(obj, f, *args, **kwargs):   # epoch 1's files are written, then ENOSPC
        saves.append(f.name)
        if len(saves) > 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_until_the_disk_fills)
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(write_spec(tmp_path)), "--out", str(run)])
    monkeypatch.undo()
    assert result.exit_code == 2, result.output
    assert f"cannot save the checkpoint {run}" in result.stderr and "No space left on device" in result.stderr
    assert "--resume auto" in result.stderr and "Traceback" not in result.output
    state = torch.load(run / "last.pt", weights_only=False)   # epoch 1's, whole
    assert state["epoch"] == 1
    assert not list(run.glob(".*.tmp")), list(run.iterdir())   # no half-written file left behind


def test_other_runtime_errors_are_not_called_out_of_memory(tmp_path, monkeypatch):
    def broken(logits, targets, weights=None):
        raise RuntimeError("some bug")

    monkeypatch.setattr(train_module, "soft_cross_entropy", broken)
    result = CliRunner().invoke(main, ["train", str(write_spec(tmp_path)), "--out", str(tmp_path / "run")])
    assert result.exit_code != 0 and "out of" not in (result.stderr or "")
    assert isinstance(result.exception, RuntimeError) and str(result.exception) == "some bug"


def _image_folder(root, classes, per_class=12, seed=0):
    """A tiny ImageFolder of 8x8 PNGs whose colour depends on the class (so it is learnable)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            base = np.array([60 * c, 255 - 60 * c, 128], dtype=np.float64)
            pixels = np.clip(base + rng.normal(0, 20, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_class_weights_weigh_the_loss_as_cross_entropy_does():
    import torch.nn.functional as F

    from composer.train import class_balance, soft_cross_entropy

    gen = torch.Generator().manual_seed(0)
    logits, y = torch.randn(7, 3, generator=gen), torch.tensor([0, 0, 0, 0, 1, 2, 2])
    weights = torch.tensor([0.5, 3.0, 1.25])
    one_hot = F.one_hot(y, 3).float()
    torch.testing.assert_close(soft_cross_entropy(logits, one_hot, weights), F.cross_entropy(logits, y, weight=weights))
    torch.testing.assert_close(soft_cross_entropy(logits, one_hot), F.cross_entropy(logits, y))
    labels = torch.tensor([0] * 30 + [1] * 6)   # class 2 has no training image
    weights, said = class_balance(labels, ["ant", "bee", "cow"], "balanced")
    assert weights.tolist() == pytest.approx([36 / 60, 36 / 12, 0.0])
    assert said == "class weights (balanced): 0.6 (ant, 30 images) to 3 (bee, 6 images)"
    weights, said = class_balance(labels, ["ant", "bee", "cow"], "none")
    assert weights is None and said.startswith("note: the classes are imbalanced (ant: 30 training images, bee: 6)")
    assert class_balance(torch.tensor([0] * 20 + [1] * 5), ["a", "b"], "none") == (None, None)
    # a class without images before the others: the names still those of the weights' classes
    _, said = class_balance(torch.tensor([1] * 30 + [2] * 6), ["cow", "ant", "bee"], "balanced")
    assert said == "class weights (balanced): 0.6 (ant, 30 images) to 3 (bee, 6 images)"


def test_a_run_on_imbalanced_classes_says_so_or_weighs_them(tmp_path):
    root = _image_folder(tmp_path / "train", ["ant", "bee"], per_class=20)
    for image in sorted((root / "bee").iterdir())[4:]:
        image.unlink()   # 20 ants, 4 bees
    text = TINY.replace("kind: synthetic", f"kind: folder\n  root: {root}\n  cache_dir: {tmp_path / 'cache'}")
    text = text.replace("batch_size: 32", "batch_size: 8").replace("num_classes: 4", "num_classes: 2")
    for scheme, expected in (("none", "note: the classes are imbalanced (ant: "),
                             ("balanced", "class weights (balanced): ")):
        said = []
        train(load_spec_text(text, "tiny.yaml", [f"train.out_dir={tmp_path / scheme}", "train.epochs=1",
                                                 f"train.class_weights={scheme}"]),
              echo=lambda line="", *a, **k: said.append(str(line)))
        assert any(line.startswith(expected) for line in said), said


def test_balanced_accuracy_is_the_mean_of_the_classes_accuracies():
    from composer.evaluate import evaluate_model

    class PixelIsTheAnswer(torch.nn.Module):   # predicts the class written in the first pixel
        def forward(self, x):
            return torch.nn.functional.one_hot((x[:, 0, 0, 0] * 255).round().long(), 2).float()

    labels = torch.tensor([0] * 8 + [1] * 2)
    answers = torch.tensor([0] * 8 + [1, 0])     # class 0 all right, class 1 half
    images = answers.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).to(torch.uint8).contiguous()
    result = evaluate_model(PixelIsTheAnswer(), images, labels, [0.0], [1.0], num_classes=2)
    assert result["accuracy"] == 0.9 and result["balanced_accuracy"] == 0.75


def test_evaluate_labels_need_a_data_root(tmp_path):
    assert_user_error(run_cli("evaluate", tmp_path / "run", "--labels", tmp_path / "labels.csv"),
                      "--labels names the classes of the images in --data-root; give --data-root too")


def test_evaluate_folder_run_on_another_folder(tmp_path):
    classes = ["ant", "bee", "cat", "dog"]
    train_dir = _image_folder(tmp_path / "train", classes)
    other = _image_folder(tmp_path / "holdout", classes, per_class=5, seed=1)
    wrong = _image_folder(tmp_path / "wrong", ["ant", "bee", "cow", "dog"], per_class=2, seed=2)
    text = TINY.replace("kind: synthetic", f"kind: folder\n  root: {train_dir}\n  cache_dir: {tmp_path / 'cache'}")
    text = text.replace("batch_size: 32", "batch_size: 8")
    spec = load_spec_text(text, "tiny.yaml", [f"train.out_dir={tmp_path / 'run'}"])
    train(spec, echo=lambda *a: None)
    result = run_cli("evaluate", tmp_path / "run", "--data-root", other, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 20 and report["split"] == "test" and report["classes"] == classes
    assert 0 <= report["accuracy"] <= 1
    assert_user_error(run_cli("evaluate", tmp_path / "run", "--data-root", wrong), "differ from the run's")


def test_resume_refuses_changed_data_split_and_foreign_run_dirs(tmp_path):
    spec = write_spec(tmp_path)
    assert run_cli("train", spec, "--out", tmp_path / "a", "--epochs", "1").returncode == 0
    assert run_cli("train", spec, "--out", tmp_path / "b", "--epochs", "1").returncode == 0
    result = run_cli("train", spec, "--out", tmp_path / "a", "--resume", "auto", "--set", "data.split_seed=7")
    assert_user_error(result, "data.split_seed: checkpoint has 0, spec has 7")
    result = run_cli("train", spec, "--out", tmp_path / "a", "--resume", "auto", "--set", "data.stratify=true")
    assert_user_error(result, "data.stratify: checkpoint has False, spec has True")
    result = run_cli("train", spec, "--out", tmp_path / "a", "--resume", "auto", "--set", "train.batch_size=16")
    assert_user_error(result, "train.batch_size: checkpoint has 32, spec has 16")
    before = (tmp_path / "a" / "last.pt").read_bytes()
    result = run_cli("train", spec, "--out", tmp_path / "a", "--resume", tmp_path / "b" / "last.pt")
    assert_user_error(result, "already holds another run")
    assert (tmp_path / "a" / "last.pt").read_bytes() == before
    # resuming a run into its own directory by path works, also given as the directory
    assert run_cli("train", spec, "--out", tmp_path / "b", "--resume", tmp_path / "b", "--epochs", "2").returncode == 0


def test_cli_values_are_taken_literally(tmp_path):
    out = tmp_path / "exp #2"
    result = run_cli("train", write_spec(tmp_path), "--out", out, "--epochs", "1")
    assert result.returncode == 0, result.stderr
    assert (out / "last.pt").exists()


def test_kernels_triton_that_cannot_run_is_refused_before_training(tmp_path):
    # dim 288 with 2 heads is head_dim 144, more than the Triton attention kernel takes
    result = run_cli("train", write_spec(tmp_path), "--out", tmp_path / "run", "--kernels", "triton",
                     "--set", "model.stem.dim=288")
    assert_user_error(result, "train.kernels is triton", "blocks[1].attention", "head_dim 144")
    assert not (tmp_path / "run").exists()


def test_sgd_without_momentum_and_evaluate_batch_size(tmp_path):
    spec = load_spec_text(TINY, "tiny.yaml", [f"train.out_dir={tmp_path / 'run'}", "train.epochs=1",
                                              "train.optimizer.kind=sgd", "train.optimizer.momentum=0"])
    train(spec, echo=lambda *a: None)
    assert_user_error(run_cli("evaluate", tmp_path / "run", "--batch-size", "0"), "--batch-size")
    report = json.loads(run_cli("evaluate", tmp_path / "run", "--json", "--split", "val").stdout)
    assert report["checkpoint"] == str(tmp_path / "run" / "best.pt")


def test_ddp_ctrl_c_on_one_rank_saves_and_stops_every_rank(tmp_path):
    spec = write_spec(tmp_path, TINY.replace("epochs: 2", "epochs: 300").replace("ema: 0.9", "ema: null"))
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                              "--master_port=29519", "-m", "composer", "train", str(spec), "--out", str(run)],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in agent.stdout:
            if line.startswith("epoch 1/"):
                break
        workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(workers[-1]), signal.SIGINT)  # only one rank sees Ctrl-C
        _, err = agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert "collective" not in err.lower(), err[-2000:]  # no rank left waiting in a mismatched all-reduce
    assert "interrupted by SIGINT; saved" in err or "interrupted by a signal to another process; saved" in err, \
        err[-2000:]
    state = torch.load(run / "last.pt", weights_only=False)
    assert state["global_step"] > 8 and state["epoch"] < 300


def test_compile_with_auto_kernels_builds_the_pytorch_blocks():
    """--compile with kernels auto keeps the Triton ops out of the compiled training graph;
    an explicit --kernels triton is honoured."""
    from composer.build import model_backend

    assert model_backend("auto", compile_model=True) == "reference"
    assert model_backend("auto", compile_model=False) == "auto"
    assert model_backend("triton", compile_model=True) == "triton"
    assert model_backend("reference", compile_model=False) == "reference"


def test_tensorboard_scalars(tmp_path):
    """train.tensorboard writes every epoch's metrics as TensorBoard scalars, equal to metrics.csv."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = load_spec_text(TINY, "tiny.yaml", [f"train.out_dir={tmp_path / 'run'}", "train.tensorboard=true"])
    train(spec, echo=lambda *a, **k: None)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert set(train_module.TENSORBOARD_TAGS.values()) <= set(events.Tags()["scalars"])
    rows = read_metrics(tmp_path / "run")
    val_acc = events.Scalars("accuracy/val")
    assert [e.step for e in val_acc] == [int(r["epoch"]) for r in rows] == [1, 2]
    assert [e.value for e in val_acc] == pytest.approx([float(r["val_acc"]) for r in rows], rel=1e-6)


def test_tensorboard_missing_package_is_a_user_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    result = run_cli("train", write_spec(tmp_path), "--out", tmp_path / "run", "--set", "train.tensorboard=true")
    assert_user_error(result, "pip install tensorboard")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_memory_format_choice():
    """train.memory_format: auto is channels_last for models with convolution blocks, on CUDA only,
    and NCHW for those with a depthwise kernel of 9 or more, or 7 or more where our kernels run it
    (from where they take their NCHW tensor-core kernels)."""
    from kernels.dwconv import triton as dwconv_triton

    conv = TINY.replace("- {kind: vit, heads: 2, mlp_ratio: 2}", "- {kind: convmixer, kernel_size: 3}")
    wide = TINY.replace("- {kind: vit, heads: 2, mlp_ratio: 2}",
                        "- {kind: convmixer, kernel_size: 3}\n    - {kind: convmixer, kernel_size: 9}")
    k7 = TINY.replace("- {kind: vit, heads: 2, mlp_ratio: 2}", "- {kind: convmixer, kernel_size: 7}")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert train_module.NCHW_MIN_DEPTHWISE_K_OURS == dwconv_triton.TOEPLITZ_MIN_K

    def choice(text, *overrides, device=cuda):
        return train_module.training_memory_format(load_spec_text(text, "tiny.yaml", list(overrides)), device)

    assert choice(conv) is torch.channels_last and choice(TINY) is None
    assert choice(conv, "train.memory_format=contiguous") is None
    assert choice(wide) is None and choice(wide, "train.memory_format=channels_last") is torch.channels_last
    assert choice(TINY, "train.memory_format=channels_last") is torch.channels_last
    assert choice(conv, device=cpu) is None and choice(conv, "train.memory_format=channels_last", device=cpu) is None
    assert choice(k7) is None and choice(k7, "train.kernels=triton") is None   # our NCHW kernels
    assert choice(k7, "train.kernels=reference") is torch.channels_last           # cuDNN's: channels_last
    assert choice(wide, "train.kernels=reference") is None


def test_memory_format_without_triton(monkeypatch):
    """Where Triton cannot be imported, kernels auto runs cuDNN's depthwise convolution: a k7 model
    then keeps channels_last, as with kernels reference."""
    from kernels import dispatch

    k7 = TINY.replace("- {kind: vit, heads: 2, mlp_ratio: 2}", "- {kind: convmixer, kernel_size: 7}")
    spec = load_spec_text(k7, "tiny.yaml", [])
    assert train_module.training_memory_format(spec, torch.device("cuda")) is None
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: "triton is not importable (test)")
    assert train_module.training_memory_format(spec, torch.device("cuda")) is torch.channels_last


def test_most_confused_lists_the_largest_mistakes_first():
    from composer.evaluate import evaluate_model, most_confused, render

    confusion = torch.tensor([[8, 2, 0], [5, 4, 1], [0, 0, 10]])
    cells = most_confused(confusion, ["cat", "dog", "eel"], top=5)
    assert [(c["true"], c["predicted"], c["images"]) for c in cells] == [("dog", "cat", 5), ("cat", "dog", 2),
                                                                        ("dog", "eel", 1)]
    assert cells[0]["fraction_of_true"] == 0.5
    # a model that always answers class 1: every image lands in column 1
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
    labels = torch.tensor([0, 1, 2, 2, 0, 1, 2])
    result = evaluate_model(model, torch.zeros(7, 3, 2, 2, dtype=torch.uint8), labels, [0.0] * 3, [1.0] * 3,
                            batch_size=3, num_classes=3)
    assert result["confusion"].tolist() == [[0, 2, 0], [0, 2, 0], [0, 3, 0]]
    assert result["per_class"] == [0.0, 1.0, 0.0] and result["accuracy"] == 2 / 7
    result.update(spec="m", split="val", epoch=1, classes=["cat", "dog", "eel"],
                  most_confused=most_confused(result["confusion"], ["cat", "dog", "eel"]))
    text = render(result)
    assert "most confused (true -> predicted):" in text
    assert text.index("eel -> dog") < text.index("cat -> dog") and "(100.0% of eel)" in text


def test_runs_lists_runs_best_first_with_their_state(tmp_path):
    """`composer runs`: every run under the folders given, best validation accuracy first; finished,
    stopped before its planned epochs, or running (holding its lock)."""
    spec = write_spec(tmp_path, TINY)
    done = tmp_path / "runs" / "done"
    assert run_cli("train", spec, "--out", done, "--epochs", "1").returncode == 0
    metrics = (done / "metrics.csv").read_text().splitlines()
    # a copy that stopped at epoch 1 of 3, with a worse score; one more in a nested folder, running
    stopped = tmp_path / "runs" / "sweep" / "stopped"
    shutil.copytree(done, stopped)
    (stopped / "spec.yaml").write_text((done / "spec.yaml").read_text().replace("epochs: 1", "epochs: 3"))
    header, row = metrics[0].split(","), metrics[1].split(",")
    row[header.index("val_acc")] = "0.25"
    (stopped / "metrics.csv").write_text("\n".join([metrics[0], ",".join(row)]) + "\n")
    running = tmp_path / "runs" / "sweep" / "deeper" / "running"
    shutil.copytree(done, running)
    (running / "metrics.csv").write_text(metrics[0] + "\n")   # no epoch finished yet
    best = json.loads(done.joinpath("final.json").read_text())["val_acc"]
    with train_module.hold_run_directory(running):
        result = run_cli("runs", tmp_path / "runs", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [(Path(r["run"]).name, r["state"], r["epochs"], r["planned_epochs"]) for r in listed] == [
        ("done", "finished", 1, 1), ("stopped", "stopped", 1, 3), ("running", "running", 0, 1)]
    assert listed[0]["best_val_acc"] == best and listed[1]["best_val_acc"] == 0.25 and listed[2]["best_val_acc"] is None
    _, model, _ = load_run(done)
    assert {r["params"] for r in listed} == {sum(p.numel() for p in model.parameters())}
    text = run_cli("runs", done, stopped).stdout.splitlines()   # run directories given directly
    assert text[0].split()[:4] == ["run", "spec", "params", "epochs"] and len(text) == 3
    assert text[1].startswith(str(done)) and text[1].split()[-1] == "finished" and "1/1" in text[1]
    assert "25.00%" in text[2] and text[2].split()[-1] == "stopped"
    # once the lock is let go, a run that finished no epoch is just that
    assert json.loads(run_cli("runs", running, "--json").stdout)[0]["state"] == "no epoch yet"
    assert_user_error(run_cli("runs", tmp_path / "nothing"), "is not a folder")
    (tmp_path / "empty").mkdir()
    assert_user_error(run_cli("runs", tmp_path / "empty"), "no runs under", "spec.yaml and metrics.csv")


def test_patience_stops_the_run_and_a_resume_respects_it(tmp_path):
    """train.patience: a run whose validation accuracy stops improving ends early (best.pt holds
    the best epoch); resuming it trains nothing, unless the patience is raised."""
    # a learning rate too small to change any prediction: the accuracy of epoch 1 is never beaten
    text = TINY.replace("epochs: 2", "epochs: 6").replace("lr: 3.0e-3", "lr: 1.0e-12")
    text = text.replace("schedule: {kind: cosine, warmup_epochs: 0.5}", "schedule: {kind: constant}")
    spec = write_spec(tmp_path, text + "  patience: 1\n")
    run = tmp_path / "run"
    result = run_cli("train", spec, "--out", run)
    assert result.returncode == 0, result.stderr
    assert "early stop: no better validation accuracy for 1 epoch (the best" in result.stderr + result.stdout
    assert [int(r["epoch"]) for r in read_metrics(run)] == [1, 2]
    final = json.loads((run / "final.json").read_text())
    assert final["stopped_early"] is True and final["epoch"] == 2
    assert torch.load(run / "best.pt", weights_only=False)["epoch"] == 1
    assert json.loads(run_cli("runs", run, "--json").stdout)[0]["state"] == "stopped early"
    again = run_cli("train", spec, "--out", run, "--resume", "auto")
    assert again.returncode == 0 and "the run stopped early at epoch 2" in again.stderr + again.stdout
    assert [int(r["epoch"]) for r in read_metrics(run)] == [1, 2]
    longer = run_cli("train", spec, "--out", run, "--resume", "auto", "--set", "train.patience=3")
    assert longer.returncode == 0, longer.stderr
    assert [int(r["epoch"]) for r in read_metrics(run)] == [1, 2, 3, 4]
    # without a validation split there is nothing to watch: said at the line
    no_val = write_spec(tmp_path, text.replace("val_split: 0.2", "val_split: 0") + "  patience: 1\n", "no_val.yaml")
    assert_user_error(run_cli("validate", no_val), "train.patience: early stopping watches the validation "
                      "accuracy, but there is no validation split")


def test_flip_averages_the_probabilities_of_an_image_and_its_mirror():
    from composer.evaluate import classify

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 5, 6))
    x = torch.randn(7, 3, 4, 5)
    with torch.no_grad():
        both = classify(model, x, flip=True)
        expected = (model(x).softmax(-1) + model(x.flip(-1)).softmax(-1)) / 2
        torch.testing.assert_close(both.exp(), expected)
        torch.testing.assert_close(both.softmax(-1), expected)   # read as logits, it gives the same probabilities
        assert torch.equal(classify(model, x), model(x))


def test_resume_takes_the_specs_new_learning_rate_and_weight_decay(tmp_path):
    """A resume with --set train.optimizer.lr=... (or weight_decay) trains on with the new values
    from the step it resumes at, keeping the optimizer's moments; said in the log."""
    spec = write_spec(tmp_path, TINY.replace("epochs: 2", "epochs: 3").replace("schedule: {kind: cosine, "
                                                                                "warmup_epochs: 0.5}",
                                                                                "schedule: {kind: constant}"))
    run = tmp_path / "run"
    assert run_cli("train", spec, "--out", run, "--epochs", "1").returncode == 0
    result = run_cli("train", spec, "--out", run, "--resume", "auto", "--epochs", "2",
                     "--set", "train.optimizer.lr=1e-3", "--set", "train.optimizer.weight_decay=0.2")
    assert result.returncode == 0, result.stderr
    assert ("resumed with train.optimizer.lr 0.003 -> 0.001, train.optimizer.weight_decay 0.05 -> 0.2: from here on"
            in result.stdout)
    assert [float(r["lr"]) for r in read_metrics(run)] == [0.003, 0.001]
    groups = torch.load(run / "last.pt", weights_only=False)["optimizer"]["param_groups"]
    assert {g["initial_lr"] for g in groups} == {0.001} and {g["weight_decay"] for g in groups} == {0.2, 0.0}


@pytest.mark.parametrize("clip", [0.05, None], ids=["clipped", "unclipped"])   # 0.05 bites
def test_gradient_norm_is_logged_before_clipping(tmp_path, monkeypatch, clip):
    """metrics.csv's grad_norm and grad_norm_max: the mean and the largest, over an epoch's steps, of
    the norm of all trained gradients as one vector, before clipping; a skipped step's left out."""
    measured = []

    def independent_norm(params):
        return float(torch.cat([p.grad.double().flatten() for p in params if p.grad is not None]).norm())

    real_clip, real_total = torch.nn.utils.clip_grad_norm_, torch.nn.utils.get_total_norm
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, limit: measured.append(independent_norm(params)) or real_clip(params, limit))
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", lambda grads: measured.append(
        float(torch.cat([g.double().flatten() for g in grads]).norm())) or real_total(grads))
    real_loss, calls = train_module.soft_cross_entropy, {"n": 0}

    def poisoned(logits, targets, weights=None):   # step 3 of 8 an epoch is skipped
        calls["n"] += 1
        loss = real_loss(logits, targets, weights)
        return loss * float("inf") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_module, "soft_cross_entropy", poisoned)
    text = TINY.replace("grad_clip: 1.0", f"grad_clip: {'null' if clip is None else clip}")
    spec = load_spec_text(text, "tiny.yaml", [f"train.out_dir={tmp_path / 'run'}"])
    train(spec, echo=lambda *a: None)
    rows = read_metrics(tmp_path / "run")
    assert len(measured) == 2 * 8 - 1 and rows[0]["nonfinite_skipped"] == "1"
    for row, norms in zip(rows, (measured[:7], measured[7:])):
        assert float(row["grad_norm"]) == pytest.approx(sum(norms) / len(norms), rel=1e-5)
        assert float(row["grad_norm_max"]) == pytest.approx(max(norms), rel=1e-5)
    if clip:
        assert max(measured) > clip   # clipping bit, and the norm logged is the one before it


def test_metrics_of_an_older_version_resume_and_read(tmp_path):
    """A run whose metrics.csv lacks today's columns (grad_norm): resuming it rewrites the header,
    its old rows read as NaN there, and runs, curves and a resume that trains nothing still work."""
    spec = write_spec(tmp_path)
    assert run_cli("train", spec, "--out", tmp_path / "run", "--epochs", "1").returncode == 0
    path = tmp_path / "run" / "metrics.csv"
    rows = read_metrics(tmp_path / "run")
    old = [k for k in rows[0] if not k.startswith("grad_norm")]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    result = run_cli("train", spec, "--out", tmp_path / "run", "--resume", "auto")
    assert result.returncode == 0, result.stderr
    first, second = read_metrics(tmp_path / "run")
    assert first["grad_norm"] == "" and float(second["grad_norm"]) > 0
    again = run_cli("train", spec, "--out", tmp_path / "run", "--resume", "auto")   # finished: nothing to train
    assert again.returncode == 0, again.stderr
    assert run_cli("runs", tmp_path).returncode == 0
    assert run_cli("visualize", "curves", tmp_path / "run", "--out", tmp_path).returncode == 0


def test_repeated_augmentation_puts_copies_of_each_image_side_by_side(tmp_path, monkeypatch):
    """data.augment.repeats: an epoch's order draws n / r images, each r times in a row, from the
    epoch's seed (r = 1: the plain permutation, as before); training then augments batches whose
    images come in identical pairs; without any augmentation the copies would be identical, and
    the spec says so."""
    from composer.spec import SpecError
    from composer.train import epoch_order

    plain = epoch_order(10, seed=7)
    assert torch.equal(plain, torch.randperm(10, generator=torch.Generator().manual_seed(7)))
    order = epoch_order(10, seed=7, repeats=3)
    assert torch.equal(order, plain[:4].repeat_interleave(3)[:10])   # 4 images, the last twice
    assert torch.equal(order, epoch_order(10, seed=7, repeats=3))

    batches = []
    import composer.data

    real = composer.data.augment   # the training loop imports it when it starts
    monkeypatch.setattr(composer.data, "augment", lambda batch, aug, gen: batches.append(batch.clone()) or
                        real(batch, aug, gen))
    text = TINY.replace("mixup: 0.2}", "mixup: 0.2, repeats: 2}").replace("epochs: 2", "epochs: 1")
    lines = []
    train(load_spec_text(text, "tiny.yaml", [f"train.out_dir={tmp_path / 'run'}"]), echo=lines.append)
    assert any("repeated augmentation: each image drawn 2 times in its batch" in line for line in lines)
    assert batches and all(torch.equal(b[0::2], b[1::2]) for b in batches)
    assert not all(torch.equal(b[0::2][:, :, :1], b[0::2][:, :, 1:2]) for b in batches)   # real images

    plain_aug = "augment: {crop_padding: 0, hflip: false, repeats: 3}"
    with pytest.raises(SpecError) as caught:
        load_spec_text(TINY.replace(TINY[TINY.index("augment:"):TINY.index("\ntrain:")], plain_aug), "t.yaml")
    assert "data.augment.repeats: 3 copies of each image would be identical: no augmentation is on" in \
        str(caught.value)
