"""`composer init`: a starting spec sized from the data, valid by construction."""
import zipfile

import pytest
from PIL import Image

from composer.init import choose_size, grid_patch, model_section
from composer.spec import load_spec
from tests.helpers import SPECS, assert_user_error, run_cli


def image_folder(root, classes=("ant", "bee", "cow"), per_class=6, size=(52, 40), mode="RGB"):
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new(mode, size, 40 * label + i).save(root / name / f"{i}.png")
    return root


def test_patch_sizes_keep_each_architectures_grid():
    assert [grid_patch(s, 8) for s in (32, 64)] == [4, 8]
    assert grid_patch(224, 14) == 16 and grid_patch(224, 32) == 7 and grid_patch(32, 32) == 1
    assert grid_patch(28, 8) == 4 and grid_patch(8, 8) == 1
    assert [choose_size(s) for s in (8, 28, 40, 100, 500)] == [8, 28, 32, 96, 224]
    small = model_section("vit", 32, 3, 10, small=True)
    assert small["stem"]["dim"] == 96 and small["blocks"][0]["repeat"] == 3
    # two downsample blocks: a grid side divisible by 4 (224 px: 28, 14, 7)
    assert grid_patch(224, 28, multiple=4) == 8 and grid_patch(96, 16, multiple=4) == 6
    small = model_section("convnext+vit", 224, 3, 10, small=True)
    assert [b.get("repeat", 1) for b in small["blocks"]] == [1, 1, 1, 1, 2] and small["stem"]["dim"] == 32


def test_init_from_a_folder_sizes_the_spec_and_it_trains(tmp_path):
    folder = image_folder(tmp_path / "images")
    out = tmp_path / "mine.yaml"
    result = run_cli("init", out, "--data", folder, "--arch", "mixer")
    assert result.returncode == 0, result.stderr
    assert f"{folder}: 3 classes, 18 images, median shorter side 40 px" in result.stdout
    assert f"next: composer summarize {out}; composer train {out}" in result.stdout
    spec = load_spec(out)
    assert spec.name == "mine" and spec.model.num_classes == 3 and spec.model.in_channels == 3
    assert spec.model.image_size == 32 and spec.model.stem.patch_size == 4   # 40 px images -> 32, 8x8 patches
    assert spec.data.kind == "folder" and spec.data.root == str(folder) and spec.data.held_out == 0.1
    assert spec.train.batch_size == 16 and spec.model.blocks[0].repeat == 4   # little data: a smaller model
    assert out.read_text().startswith(f"# {folder}: 3 classes")
    assert "# data.augment.hflip: set it to false if a mirrored image is another class" in out.read_text()
    trained = run_cli("train", out, "--epochs", "1", "--out", tmp_path / "run", "--set", "train.device=cpu")
    assert trained.returncode == 0, trained.stderr
    # grayscale images make a one-channel model; a validation folder replaces the held-out part
    gray = image_folder(tmp_path / "gray", mode="L", size=(96, 120))
    val = image_folder(tmp_path / "gray_val", mode="L", per_class=2, size=(96, 120))
    assert run_cli("init", tmp_path / "gray.yaml", "--data", gray, "--val", val, "--arch", "convmixer").returncode == 0
    spec = load_spec(tmp_path / "gray.yaml")
    assert spec.model.in_channels == 1 and spec.model.image_size == 96 and spec.data.val_root == str(val)
    assert spec.data.augment.resized_crop == 0.35 and spec.model.stem.patch_size == 3   # a 32x32 grid


def test_init_from_an_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPOSER_CACHE", str(tmp_path / "cache"))
    folder = image_folder(tmp_path / "images", size=(32, 32))
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(folder.rglob("*.png")):
            zf.write(f, f.relative_to(tmp_path))
    result = run_cli("init", tmp_path / "z.yaml", "--data", archive, "--arch", "convmixer+mixer")
    assert result.returncode == 0, result.stderr
    assert load_spec(tmp_path / "z.yaml").model.num_classes == 3


def test_init_from_a_flat_folder_and_its_labels_csv(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPOSER_CACHE", str(tmp_path / "cache"))
    flat = tmp_path / "flat"
    flat.mkdir()
    rows = ["file,species"]
    for i in range(12):
        Image.new("RGB", (40, 40), 20 * i).save(flat / f"{i}.png")
        rows.append(f"{i},{('ant', 'bee')[i % 2]}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    assert_user_error(run_cli("init", tmp_path / "f.yaml", "--data", flat), "has no class subfolders",
                      "name each image's class in a CSV file (data.labels; composer init --labels)")
    result = run_cli("init", tmp_path / "f.yaml", "--data", flat, "--labels", tmp_path / "labels.csv")
    assert result.returncode == 0, result.stderr
    assert f"{flat}: 2 classes, 12 images" in result.stdout
    spec = load_spec(tmp_path / "f.yaml")
    assert spec.data.labels == str(tmp_path / "labels.csv") and spec.model.num_classes == 2
    assert spec.train.class_weights == "none"
    # a class five times the size of another: weighed
    (tmp_path / "labels.csv").write_text("\n".join(rows[:1] + [f"{i},{'ant' if i < 10 else 'bee'}" for i in range(12)]))
    result = run_cli("init", tmp_path / "f.yaml", "--data", flat, "--labels", tmp_path / "labels.csv", "--force")
    assert "the largest class 5x the smallest (class_weights: balanced, stratify: true)" in result.stdout, result.stdout
    spec = load_spec(tmp_path / "f.yaml")
    assert spec.train.class_weights == "balanced" and spec.data.stratify
    assert_user_error(run_cli("init", tmp_path / "g.yaml", "--data", "cifar10", "--labels", tmp_path / "labels.csv"),
                      "--labels is for image folders; cifar10 has its own labels")


@pytest.mark.parametrize("arch", ["vit", "mixer", "convmixer", "mixer+vit", "convmixer+mixer", "convnext+vit"])
def test_init_for_builtin_data_matches_the_cifar_recipes(tmp_path, arch):
    assert run_cli("init", tmp_path / "c.yaml", "--data", "cifar100", "--arch", arch).returncode == 0
    spec = load_spec(tmp_path / "c.yaml")
    name = {"vit": "vit_cifar", "mixer": "mixer_cifar", "convmixer": "convmixer_cifar",
            "mixer+vit": "hybrid_mixer_vit_cifar", "convmixer+mixer": "hybrid_convmixer_mixer_cifar",
            "convnext+vit": "hybrid_convnext_vit_cifar"}[arch]
    recipe = load_spec(SPECS / f"{name}.yaml")
    assert spec.model.stem == recipe.model.stem and spec.model.num_classes == 100
    assert (spec.model.pos_embed, spec.model.drop_path) == (recipe.model.pos_embed, recipe.model.drop_path)
    assert [b.model_dump() for b in spec.model.blocks] == [b.model_dump() for b in recipe.model.blocks]
    assert spec.data.kind == "cifar100" and spec.data.download and spec.data.root == "data/cifar100"
    assert spec.train.optimizer.lr == recipe.train.optimizer.lr and spec.train.batch_size == 512


def test_init_mistakes(tmp_path):
    out = tmp_path / "a.yaml"
    assert run_cli("init", out, "--data", "mnist", "--image-size", "56").returncode == 0
    spec = load_spec(out)
    assert (spec.model.image_size, spec.model.resize, spec.model.in_channels) == (28, 56, 1)
    assert spec.data.augment.hflip is False   # digits are not mirrored
    before = out.read_text()
    assert_user_error(run_cli("init", out, "--data", "mnist", "--arch", "mixer"), "already exists", "--force")
    assert out.read_text() == before
    assert run_cli("init", out, "--data", "mnist", "--arch", "mixer", "--force").returncode == 0
    assert_user_error(run_cli("init", tmp_path / "b.yaml", "--data", tmp_path / "nowhere"), "does not exist")
    assert_user_error(run_cli("init", tmp_path / "b.yaml", "--data", "cifar10", "--val", tmp_path), "--val is for "
                      "image folders")
    assert_user_error(run_cli("init", tmp_path / "b.txt", "--data", "cifar10"), "a spec is a .yaml file")
    assert not (tmp_path / "b.yaml").exists()


def test_init_from_a_run_writes_a_fine_tuning_spec_that_trains(tmp_path):
    """--from: the run's model (its blocks and head as they were) for the data's classes at the run's
    input size, its weights through train.init_from, the fine-tuning recipe; it trains from them.
    For a built-in dataset, whose images come at their own size, the model resizes them to the run's."""
    from composer.init import FINE_TUNE

    pre = tmp_path / "pre.yaml"
    pre.write_text("name: pre\nmodel:\n  image_size: 16\n  num_classes: 5\n  stem: {patch_size: 4, dim: 16}\n"
                   "  pos_embed: learned\n  blocks: [{kind: vit, heads: 2, mlp_ratio: 2, repeat: 2}]\n"
                   "  head: {pool: attention, heads: 4}\n"
                   "data: {kind: synthetic, num_samples: 64, val_split: 0.0}\n"
                   "train: {epochs: 1, batch_size: 32, device: cpu}\n")
    assert run_cli("train", pre, "--out", tmp_path / "run").returncode == 0
    folder = image_folder(tmp_path / "images")
    out = tmp_path / "ft.yaml"
    result = run_cli("init", out, "--data", folder, "--from", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}: fine-tuning {tmp_path / 'run'}" in result.stdout
    spec, run_spec = load_spec(out), load_spec(tmp_path / "run" / "spec.yaml")
    assert spec.model.num_classes == 3 and spec.model.image_size == 16
    assert spec.model.model_dump(exclude={"num_classes"}) == run_spec.model.model_dump(exclude={"num_classes"})
    t = spec.train
    assert t.init_from == str(tmp_path / "run") and t.optimizer.layer_decay == FINE_TUNE["layer_decay"]
    assert t.optimizer.lr < 1e-4 and t.batch_size == 8   # 16 training images: a batch they fill
    assert "composer lr-find measures one" in out.read_text()
    trained = run_cli("train", out, "--epochs", "1", "--out", tmp_path / "ft", "--set", "train.device=cpu")
    assert trained.returncode == 0, trained.stderr
    assert "new classifier (5 -> 3 classes)" in trained.stdout + trained.stderr

    assert run_cli("init", tmp_path / "c.yaml", "--data", "cifar10", "--from", tmp_path / "run").returncode == 0
    spec = load_spec(tmp_path / "c.yaml")
    assert (spec.model.image_size, spec.model.resize, spec.model.num_classes) == (32, 16, 10)
    assert_user_error(run_cli("init", tmp_path / "x.yaml", "--data", folder, "--from", tmp_path / "run", "--arch",
                              "vit"), "--from fine-tunes a run's model and --arch picks a new one")
    assert_user_error(run_cli("init", tmp_path / "x.yaml", "--data", folder, "--from", tmp_path / "nowhere"),
                      "--from: ", "nowhere")
