"""Datasets, splits, the folder/archive cache, augmentation and mixing."""
from __future__ import annotations

import io
import os
import pickle
import shutil
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import composer.data as data_mod
from composer.data import ImageSet, augment, channel_stats, load_split, mix, normalize, random_erasing
from composer.errors import UserError
from composer.spec.data import Augment, DataSpec
from composer.spec.model import ModelSpec

CLASSES = ["bird", "cat", "dog"]
REAL_ARCHIVE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-train-jpeg.tar.xz"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """No test writes to the user's ~/.cache."""
    monkeypatch.setenv("COMPOSER_CACHE", str(tmp_path / "default-cache"))


def model_spec(num_classes=3, image_size=8, in_channels=3) -> ModelSpec:
    return ModelSpec.model_validate({
        "image_size": image_size, "in_channels": in_channels, "num_classes": num_classes,
        "stem": {"patch_size": 4, "dim": 8}, "blocks": [{"kind": "pointwise"}],
    })


def data_spec(kind, root=None, **fields) -> DataSpec:
    return DataSpec(kind=kind, root=None if root is None else str(root), **fields)


def make_folder(parent: Path) -> Path:
    """parent/data/<class>/<n>.(png|jpg): 4 images per class, one colour per class, some not 8x8."""
    top = parent / "data"
    for label, name in enumerate(CLASSES):
        (top / name).mkdir(parents=True)
        for n in range(4):
            colour = (60 * label + 10 * n, 200 - 50 * label, 30 + 5 * n)
            size = (8, 8) if n % 2 == 0 else (12, 10)
            ext = "jpg" if name == "dog" else "png"
            Image.new("RGB", size, colour).save(top / name / f"{n}.{ext}")
    return top


def make_zip(folder: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for f in sorted(folder.rglob("*")):
            zf.write(f, f.relative_to(folder.parent).as_posix())
    return dest


def make_tar(folder: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return dest


def same(a: ImageSet, b: ImageSet) -> bool:
    return torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.classes == b.classes


# -- dataset kinds ------------------------------------------------------------------

def test_synthetic_sets_are_deterministic_and_learnable():
    model, spec = model_spec(num_classes=4), data_spec("synthetic", num_samples=200, val_split=0)
    train = load_split(spec, model, "train")
    assert train.images.shape == (200, 3, 8, 8) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.labels.bincount().tolist() == [50] * 4
    assert same(train, load_split(spec, model, "train"))
    test = load_split(spec, model, "test")
    assert not torch.equal(train.images, test.images)
    # Nearest class mean separates the classes: a tiny model can fit them.
    means = torch.stack([train.images[train.labels == k].float().mean(0) for k in range(4)])
    distances = ((test.images.float()[:, None] - means[None]) ** 2).sum((2, 3, 4))
    assert (distances.argmin(1) == test.labels).float().mean() > 0.95


def test_digits_scaled_resized_and_without_test_split():
    gray = load_split(data_spec("digits", val_split=0), model_spec(10, 8, 1), "train")
    assert gray.images.shape == (1797, 1, 8, 8) and gray.images.max() == 255
    assert gray.classes == [str(i) for i in range(10)]
    rgb = load_split(data_spec("digits"), model_spec(10, 16, 3), "val")
    assert rgb.images.shape == (180, 3, 16, 16) and torch.equal(rgb.images[:, 0], rgb.images[:, 2])
    with pytest.raises(UserError, match="no test split"):
        load_split(data_spec("digits"), model_spec(10, 8, 1), "test")


def write_fake_cifar(root: Path, per_batch=4) -> None:
    """torchvision's on-disk CIFAR-10 layout: pickled batches of row-major (N, 3*32*32) uint8."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, per_batch).tolist()}
        (base / name).write_bytes(pickle.dumps(batch))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


def test_cifar10_from_disk(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    write_fake_cifar(tmp_path / "cifar")
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)  # the fake has other md5s
    spec, model = data_spec("cifar10", tmp_path / "cifar", val_split=0.25), model_spec(10, 32)
    train, val = load_split(spec, model, "train"), load_split(spec, model, "val")
    assert train.images.shape == (15, 3, 32, 32) and val.images.shape == (5, 3, 32, 32)
    assert train.classes == [f"c{i}" for i in range(10)]
    test = load_split(spec, model, "test")
    raw = pickle.loads((tmp_path / "cifar" / "cifar-10-batches-py" / "test_batch").read_bytes())
    assert torch.equal(test.images, torch.from_numpy(raw["data"]).view(4, 3, 32, 32))
    assert test.labels.tolist() == raw["labels"]


def test_cifar10_missing_says_how_to_fix(tmp_path):
    with pytest.raises(UserError, match="data.download: true") as e:
        load_split(data_spec("cifar10", tmp_path / "nothing"), model_spec(10, 32), "train")
    assert str(tmp_path / "nothing") in str(e.value)


def write_fake_cifar100(root: Path, n_train=8, n_test=4) -> None:
    """torchvision's on-disk CIFAR-100 layout: one pickled train and test set, fine and coarse labels."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in (("train", n_train), ("test", n_test)):
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "fine_labels": rng.integers(0, 100, n).tolist(), "coarse_labels": rng.integers(0, 20, n).tolist()}
        (base / name).write_bytes(pickle.dumps(batch))
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"f{i}" for i in range(100)],
                                              "coarse_label_names": [f"k{i}" for i in range(20)]}))


def write_fake_mnist(root: Path, folder="MNIST", n_train=12, n_test=6) -> dict:
    """torchvision's raw MNIST layout (also Fashion-MNIST's): big-endian IDX files; returns the arrays."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(2)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            np.array([2051, n, 28, 28], dtype=">i4").tobytes() + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(np.array([2049, n], dtype=">i4").tobytes() + labels.tobytes())
        arrays[prefix] = (images, labels)
    return arrays


def test_cifar100_from_disk_uses_the_fine_labels(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    write_fake_cifar100(tmp_path / "c100")
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)  # the fake has other md5s
    spec, model = data_spec("cifar100", tmp_path / "c100", val_split=0.25), model_spec(100, 32)
    train, val, test = (load_split(spec, model, split) for split in ("train", "val", "test"))
    assert train.images.shape == (6, 3, 32, 32) and val.images.shape == (2, 3, 32, 32)
    assert train.classes == [f"f{i}" for i in range(100)]
    raw = pickle.loads((tmp_path / "c100" / "cifar-100-python" / "test").read_bytes())
    assert torch.equal(test.images, torch.from_numpy(raw["data"]).view(4, 3, 32, 32))
    assert test.labels.tolist() == raw["fine_labels"]


@pytest.mark.parametrize("kind, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_kinds_from_disk_gray_or_repeated_to_rgb(tmp_path, kind, folder):
    arrays = write_fake_mnist(tmp_path / "m", folder)
    spec = data_spec(kind, tmp_path / "m", val_split=0.25)
    gray = load_split(spec, model_spec(10, 28, in_channels=1), "test")
    images, labels = arrays["t10k"]
    assert torch.equal(gray.images, torch.from_numpy(images)[:, None]) and gray.labels.tolist() == labels.tolist()
    assert len(gray.classes) == 10 and gray.classes[0] == ("0 - zero" if kind == "mnist" else "T-shirt/top")
    rgb = load_split(spec, model_spec(10, 28, in_channels=3), "train")
    assert rgb.images.shape == (9, 3, 28, 28)
    assert torch.equal(rgb.images[:, 0], rgb.images[:, 1]) and torch.equal(rgb.images[:, 0], rgb.images[:, 2])


@pytest.mark.parametrize("kind, name, folder", [("cifar100", "CIFAR-100", "cifar-100-python"),
                                                ("fashion_mnist", "Fashion-MNIST", "FashionMNIST/raw")])
def test_torchvision_set_missing_says_how_to_fix(tmp_path, kind, name, folder):
    with pytest.raises(UserError, match="data.download: true") as e:
        load_split(data_spec(kind, tmp_path / "nothing"), model_spec(100 if kind == "cifar100" else 10, 32), "train")
    assert f"{name} not found in {tmp_path / 'nothing'}" in str(e.value) and folder in str(e.value)


# -- splits -------------------------------------------------------------------------

def test_val_split_is_deterministic_disjoint_and_seeded():
    model = model_spec()
    spec = data_spec("synthetic", num_samples=100, val_split=0.2, split_seed=3)
    train, val = load_split(spec, model, "train"), load_split(spec, model, "val")
    assert len(train) == 80 and len(val) == 20
    rows = {img.numpy().tobytes() for img in torch.cat([train.images, val.images])}
    assert len(rows) == 100  # disjoint and together the whole set
    assert same(val, load_split(spec, model, "val"))
    other = load_split(data_spec("synthetic", num_samples=100, val_split=0.2, split_seed=4), model, "val")
    assert not torch.equal(val.images, other.images)


def test_stratified_split_holds_out_each_class_in_proportion():
    labels = torch.tensor([0] * 90 + [1] * 10 + [2] * 1)
    val = data_mod._held_out(labels, 0.1, 0, stratify=True)
    assert labels[val].bincount(minlength=3).tolist() == [9, 1, 0]   # the single image of class 2 trains
    assert torch.equal(val, data_mod._held_out(labels, 0.1, 0, stratify=True))   # seeded
    assert not torch.equal(val.sort().values, data_mod._held_out(labels, 0.1, 1, stratify=True).sort().values)
    plain = [labels[data_mod._held_out(labels, 0.1, seed, stratify=False)].bincount(minlength=3)[1].item()
             for seed in range(20)]
    assert min(plain) != max(plain)   # without it, the rare class's share varies with the seed
    # through load_split: disjoint, together the whole set
    spec = data_spec("synthetic", num_samples=60, val_split=0.25, stratify=True)
    train, held = load_split(spec, model_spec(), "train"), load_split(spec, model_spec(), "val")
    assert len(train) + len(held) == 60 and held.labels.bincount().tolist() == [5, 5, 5]


def test_val_split_zero():
    spec = data_spec("synthetic", num_samples=50, val_split=0)
    assert len(load_split(spec, model_spec(), "train")) == 50
    with pytest.raises(UserError, match="set data.val_split"):
        load_split(spec, model_spec(), "val")


def test_class_count_mismatch():
    with pytest.raises(UserError, match=r"10 classes but model.num_classes is 3; set model.num_classes: 10"):
        load_split(data_spec("digits"), model_spec(3, 8, 1), "train")


# -- folders, archives and the cache ------------------------------------------------------

def test_folder_directory_zip_and_tar_give_the_same_tensor(tmp_path):
    folder = make_folder(tmp_path)
    sources = [folder, make_zip(folder, tmp_path / "data.zip"), make_tar(folder, tmp_path / "data.tar.gz")]
    model = model_spec()
    loaded = [load_split(data_spec("folder", s, val_split=0, cache_dir=str(tmp_path / "c")), model, "train")
              for s in sources]
    first = loaded[0]
    assert first.classes == CLASSES and first.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert first.images.shape == (12, 3, 8, 8) and first.images.dtype == torch.uint8
    assert first.images[0, :, 0, 0].tolist() == [0, 200, 30]  # png is lossless
    assert all(same(first, other) for other in loaded[1:])


def make_flat_with_labels(parent: Path) -> tuple[Path, Path]:
    """make_folder's images in one flat folder (<class>_<n>.<ext>, one in a subfolder), and a CSV
    naming each one's class: half the rows without the extension, a blank line, spreadsheet's BOM."""
    nested = make_folder(parent / "nested")
    flat = parent / "flat"
    (flat / "more").mkdir(parents=True)
    rows = ["image,class"]
    for label in CLASSES:
        for n, image in enumerate(sorted((nested / label).iterdir())):
            name = f"{label}_{n}{image.suffix}" if (label, n) != ("dog", 3) else f"more/{label}_{n}{image.suffix}"
            shutil.copy(image, flat / name)
            rows.append(f"{name if n % 2 else name.rsplit('.', 1)[0]},{label}")
    Image.new("RGB", (8, 8)).save(flat / "unlisted.png")   # not in the CSV: left out
    labels = parent / "labels.csv"
    labels.write_text("\ufeff" + "\n".join(rows[:5] + [""] + rows[5:]) + "\n")
    return flat, labels


def test_a_flat_folder_with_a_labels_csv_loads_as_class_folders_do(tmp_path):
    flat, labels = make_flat_with_labels(tmp_path)
    nested = load_split(data_spec("folder", tmp_path / "nested" / "data", val_split=0), model_spec(), "train")
    by_csv = load_split(data_spec("folder", flat, labels=str(labels), val_split=0), model_spec(), "train")
    assert same(by_csv, nested) and by_csv.classes == CLASSES
    zipped = make_zip(flat, tmp_path / "flat.zip")   # an archive of the folder: its one top folder
    assert same(load_split(data_spec("folder", zipped, labels=str(labels), val_split=0), model_spec(), "train"), nested)
    # the labels are part of the cache key: an edited file is read again
    labels.write_text(labels.read_text().replace("cat_1.png,cat", "cat_1.png,dog"))
    relabelled = load_split(data_spec("folder", flat, labels=str(labels), val_split=0), model_spec(), "train")
    assert (relabelled.labels != nested.labels).sum() == 1
    # numbers sort as numbers
    labels.write_text("file,label\n" + "".join(f"{c}_{n}.png,{10 if c == 'bird' else 2 if c == 'cat' else 1}\n"
                                                for c in CLASSES[:2] for n in range(0, 4, 2)))
    assert load_split(data_spec("folder", flat, labels=str(labels), val_split=0), model_spec(2), "train").classes \
        == ["2", "10"]


@pytest.mark.parametrize("rows, fragment", [
    ("image,class\nbird_0,bird\nbird_9.png,bird\nnowhere,cat\n", "2 images that {labels} names are not in {flat} "
                                                                   "(line 3: bird_9.png; line 4: nowhere)"),
    ("image,class\nbird_0,bird\nbird_0.png,cat\n", "lines 2 and 3 both name bird_0.png"),
    ("image,class\nbird_0,bird\ncat_1\n", "{labels}:3: 'cat_1' is not an image,class row"),
    ("image,class\n", "has no image,class rows after its header"),
    ("image,class\ntwin,bird\n", "{labels}:2: twin is more than one image in {flat}"),
])
def test_labels_csv_mistakes_name_the_line(tmp_path, rows, fragment):
    flat, labels = make_flat_with_labels(tmp_path)
    Image.new("RGB", (8, 8)).save(flat / "twin.png")
    Image.new("RGB", (8, 8)).save(flat / "twin.jpg")
    labels.write_text(rows)
    with pytest.raises(UserError) as info:
        load_split(data_spec("folder", flat, labels=str(labels)), model_spec(), "train")
    assert fragment.format(labels=labels, flat=flat) in str(info.value)
    assert getattr(info.value, "field", None) == "data.labels"


def test_a_validation_folder_takes_its_own_labels(tmp_path):
    flat, labels = make_flat_with_labels(tmp_path)
    spec = data_spec("folder", tmp_path / "nested" / "data", val_root=str(flat), val_labels=str(labels))
    val = load_split(spec, model_spec(), "val")
    assert len(val) == 12 and val.classes == CLASSES
    with pytest.raises(UserError) as info:
        load_split(data_spec("folder", tmp_path / "nested" / "data", val_root=str(flat),
                             val_labels=str(tmp_path / "no.csv")), model_spec(), "val")
    assert info.value.field == "data.val_labels"


def test_flat_folder_without_labels_and_labels_file_missing(tmp_path):
    flat, labels = make_flat_with_labels(tmp_path)
    with pytest.raises(UserError, match=r"holds 12 images outside its class subfolders \(bird_0.png, bird_1.png, "
                                        r"bird_2.png, ...\); move them into the subfolder of their class, or name"):
        load_split(data_spec("folder", flat), model_spec(), "train")   # "more" would have been the one class
    shutil.rmtree(flat / "more")   # only image files left
    with pytest.raises(UserError, match="or name each image's class in a CSV file"):
        load_split(data_spec("folder", flat), model_spec(), "train")
    with pytest.raises(UserError, match="nowhere.csv does not exist; data.labels is a CSV file"):
        load_split(data_spec("folder", flat, labels=str(tmp_path / "nowhere.csv")), model_spec(), "train")


def test_folder_grayscale_and_resize(tmp_path):
    folder = make_folder(tmp_path)
    gray = load_split(data_spec("folder", folder, val_split=0), model_spec(3, 16, 1), "train")
    assert gray.images.shape == (12, 1, 16, 16)


def test_cache_is_reused_without_decoding_or_extracting(tmp_path, monkeypatch):
    folder = make_folder(tmp_path)
    archive = make_tar(folder, tmp_path / "data.tgz")
    model = model_spec()
    specs = [data_spec("folder", root, val_split=0, cache_dir=str(tmp_path / "c")) for root in (folder, archive)]
    first = [load_split(s, model, "train") for s in specs]

    def fail(*args, **kwargs):
        raise AssertionError("decoded or extracted again")

    monkeypatch.setattr(data_mod, "_decode_images", fail)
    monkeypatch.setattr(data_mod, "_extract", fail)
    assert all(same(a, load_split(s, model, "train")) for a, s in zip(first, specs))


def test_cache_follows_changes_to_the_folder(tmp_path):
    folder = make_folder(tmp_path)
    spec = data_spec("folder", folder, val_split=0, cache_dir=str(tmp_path / "c"))
    assert len(load_split(spec, model_spec(), "train")) == 12
    Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "cat" / "new.png")
    assert len(load_split(spec, model_spec(), "train")) == 13


def test_cache_dir_defaults_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPOSER_CACHE", str(tmp_path / "env"))
    load_split(data_spec("folder", make_folder(tmp_path), val_split=0), model_spec(), "train")
    assert list((tmp_path / "env" / "images").glob("data-*.pt"))


def test_folder_test_split_needs_data_root(tmp_path):
    folder = make_folder(tmp_path)
    with pytest.raises(UserError, match="--data-root"):
        load_split(data_spec("folder", folder), model_spec(), "test")
    test = load_split(data_spec("folder", tmp_path / "elsewhere"), model_spec(), "test", data_root=str(folder))
    assert len(test) == 12


def test_decoding_a_folder_reports_its_progress_once(tmp_path, monkeypatch):
    folder = make_folder(tmp_path)
    spec = data_spec("folder", folder, cache_dir=str(tmp_path / "c"), val_split=0)
    monkeypatch.setattr(data_mod, "DECODE_CHUNK", 5)                  # 12 images: chunks of 5, 5, 2
    monkeypatch.setattr(data_mod._DecodeReport, "EVERY_S", 0.0)      # a line per chunk
    said = []
    assert len(load_split(spec, model_spec(), "train", echo=said.append)) == 12
    assert said[0] == f"decoding 12 images of {folder} (once: the result is cached in {tmp_path / 'c'})"
    assert said[1].startswith("decoding: 5/12 images (42%), about ") and said[2].startswith("decoding: 10/12")
    assert said[3].startswith("decoded 12 images in ") and len(said) == 4
    said.clear()
    load_split(spec, model_spec(), "train", echo=said.append)         # from the cache: nothing to say
    assert said == []


def test_a_validation_folder_of_its_own(tmp_path):
    """data.val_root: the whole of root trains and the whole of val_root validates (ImageNet's
    train/ and val/); --data-root stands in for val_root on the val split."""
    train_dir, val_dir = make_folder(tmp_path / "train"), make_folder(tmp_path / "val")
    for extra in range(2):   # 6 validation images a class against the training folder's 4
        for name in CLASSES:
            Image.new("RGB", (8, 8), (extra * 90, 20, 40)).save(val_dir / name / f"extra{extra}.png")
    spec = data_spec("folder", train_dir, val_root=str(val_dir), cache_dir=str(tmp_path / "c"))
    assert spec.held_out == 0.0 and data_spec("folder", train_dir).held_out == 0.1
    train, val = load_split(spec, model_spec(), "train"), load_split(spec, model_spec(), "val")
    assert len(train) == 12 and len(val) == 18 and train.classes == val.classes == CLASSES
    assert same(train, load_split(data_spec("folder", train_dir, val_split=0), model_spec(), "train"))
    assert len(load_split(spec, model_spec(), "val", data_root=str(train_dir))) == 12
    missing = data_spec("folder", train_dir, val_root=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"nowhere does not exist; point data.val_root \(or --data-root\)"):
        load_split(missing, model_spec(), "val")
    shutil.rmtree(val_dir / "dog")
    with pytest.raises(UserError, match=r"data.val_root \(.*val/data\) has 2 classes but model.num_classes is 3; "
                                        r"give it the same class subfolders as data.root"):
        load_split(spec, model_spec(), "val")


def test_a_folder_too_large_for_memory_is_decoded_to_disk_and_read_from_there(tmp_path, monkeypatch):
    """A folder whose decoded images would take more than half the available memory is decoded a
    chunk at a time into a file in the cache and mapped into memory, not read: the same images,
    labels and split as the in-memory path, the training split as rows of the file (no copy), the
    held-out images copied; later loads map the file without decoding."""
    folder = make_folder(tmp_path)
    plain = {split: load_split(data_spec("folder", folder, cache_dir=str(tmp_path / "ram")), model_spec(), split)
             for split in ("train", "val")}
    # 12 images of 3x8x8 bytes: 2,304 decoded, twice that while decoding
    monkeypatch.setattr(data_mod, "available_memory", lambda: 4000)
    spec = data_spec("folder", folder, cache_dir=str(tmp_path / "disk"))
    said = []
    train = load_split(spec, model_spec(), "train", echo=said.append)
    assert train.on_disk and train.rows is not None and train.images.shape == (12, 3, 8, 8)
    assert any("12 images decoded to" in line and "training reads them from there" in line for line in said), said
    files = sorted(p.name for p in (tmp_path / "disk" / "images").iterdir())
    assert [name.rsplit(".", 1)[1] for name in files] == ["lock", "npy", "pt"], files
    val = load_split(spec, model_spec(), "val")
    for split, got in (("train", train), ("val", val)):
        want = plain[split]
        assert torch.equal(got.take(torch.arange(len(got))), want.images), split
        assert torch.equal(got.labels, want.labels) and got.classes == want.classes and got.nbytes == want.images.nbytes
        assert torch.equal(torch.cat([chunk for _, chunk in got.chunks(5)]), want.images)
        assert channel_stats(got) == channel_stats(want.images)
        backwards = torch.arange(len(got)).flip(0)
        assert torch.equal(got.to("cpu").take(backwards), want.images[backwards])
    assert val.rows is None and not val.on_disk   # held out: copied into memory
    monkeypatch.setattr(data_mod, "_decode_images", lambda *a, **k: pytest.fail("decoded again"))
    again = load_split(spec, model_spec(), "train")
    assert again.on_disk and torch.equal(again.take(torch.arange(len(again))), plain["train"].images)
    assert data_mod.available_memory() is None or data_mod.available_memory() > 0


def test_training_on_a_folder_read_from_disk_is_training_on_it_in_memory(tmp_path, monkeypatch):
    """The same run, image for image and step for step: batches gathered from the file's rows
    instead of a tensor in memory (and lr-find reads them the same way)."""
    from composer.api import lr_find, train
    from composer.spec import load_spec_text

    folder = make_folder(tmp_path)
    text = f"""\
model:
  image_size: 8
  num_classes: 3
  stem: {{patch_size: 4, dim: 8}}
  blocks: [{{kind: mixer, token_hidden: 8}}]
data: {{kind: folder, root: {folder}, val_split: 0.25, augment: {{crop_padding: 1}}}}
train: {{epochs: 2, batch_size: 3, device: cpu, deterministic: true}}
"""

    def run(name):
        spec = load_spec_text(text, "f.yaml", [f"train.out_dir={tmp_path / name}", f"data.cache_dir={tmp_path / name}c"])
        said = []
        train(spec, echo=lambda line="", *a, **k: said.append(str(line)))
        curve = lr_find(spec, steps=20, out=str(tmp_path / f"{name}-lr"), echo=lambda *a, **k: None)["rows"]
        metrics = (tmp_path / name / "metrics.csv").read_text().splitlines()
        return [row.split(",")[:6] for row in metrics], said, curve

    in_memory, said_memory, curve_memory = run("ram")
    monkeypatch.setattr(data_mod, "available_memory", lambda: 4000)
    on_disk, said_disk, curve_disk = run("disk")
    assert len(in_memory) == 3 and on_disk == in_memory and curve_disk == curve_memory
    assert any("in a file on disk" in line for line in said_disk), said_disk
    assert not any("in a file on disk" in line for line in said_memory)


def test_a_folder_for_disk_is_refused_when_the_disk_or_memory_cannot_hold_it(tmp_path, monkeypatch):
    import shutil as shutil_mod
    from collections import namedtuple

    folder = make_folder(tmp_path)
    monkeypatch.setattr(data_mod, "available_memory", lambda: 4000)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_mod, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    monkeypatch.setattr(data_mod, "_decode_images", lambda *a, **k: pytest.fail("decoded anyway"))
    with pytest.raises(UserError, match=r"holds 12 images: decoded at 8x8 they take 0.0 GiB, more than half of this "
                                        r"machine's memory, .* whose disk has 0.0 GiB free; point data.cache_dir"):
        load_split(data_spec("folder", folder, cache_dir=str(tmp_path / "c")), model_spec(), "train")
    monkeypatch.undo()
    # a disk that fills meanwhile: the file's blocks are reserved before decoding, so it is refused then too
    monkeypatch.setattr(data_mod, "available_memory", lambda: 4000)
    monkeypatch.setattr(data_mod, "_decode_images", lambda *a, **k: pytest.fail("decoded anyway"))
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, offset, size: (_ for _ in ()).throw(
        OSError(28, "No space left on device")), raising=False)
    with pytest.raises(UserError, match=r"cannot reserve 0.0 GiB for the decoded images in .*: No space left on "
                                        r"device; point data.cache_dir"):
        load_split(data_spec("folder", folder, cache_dir=str(tmp_path / "full")), model_spec(), "train")
    assert not list((tmp_path / "full" / "images").glob("*.partial"))
    monkeypatch.undo()
    # the held-out images are copied into memory: refused when they cannot be held there either
    monkeypatch.setattr(data_mod, "available_memory", lambda: 1000)
    spec = data_spec("folder", folder, cache_dir=str(tmp_path / "c"), val_split=0.5)
    assert load_split(spec, model_spec(), "train").on_disk
    with pytest.raises(UserError, match=r"the 6 images data.val_split holds out of .* take 0.0 GiB decoded, .* hold "
                                        r"out fewer .* or give a validation folder \(data.val_root\)"):
        load_split(spec, model_spec(), "val")


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "is empty"),
    (lambda p: (p / "flat").mkdir() or Image.new("RGB", (8, 8)).save(p / "flat" / "a.png") or p / "flat",
     "no class subfolders"),
    (lambda p: (p / "notes.txt").write_text("hi") and p / "notes.txt", "neither a directory nor an archive"),
    (lambda p: (p / "broken.zip").write_bytes(b"not a zip") and p / "broken.zip", "cannot extract"),
])
def test_folder_errors_name_the_path(tmp_path, make, message):
    root = make(tmp_path)
    with pytest.raises(UserError, match=message) as e:
        load_split(data_spec("folder", root, cache_dir=str(tmp_path / "c")), model_spec(), "train")
    assert str(root) in str(e.value)


def test_unreadable_image_is_named(tmp_path):
    folder = make_folder(tmp_path)
    (folder / "cat" / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(UserError, match="bad.png"):
        load_split(data_spec("folder", folder, cache_dir=str(tmp_path / "c")), model_spec(), "train")


def test_unsafe_archive_is_refused_and_leaves_nothing(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        for name in ("data/cat/a.png", "data/dog/b.png", "../escaped.png"):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8)).save(buf, "PNG")
            info = tarfile.TarInfo(name)
            info.size = buf.tell()
            buf.seek(0)
            tf.addfile(info, buf)
    cache = tmp_path / "c"
    with pytest.raises(UserError, match="unsafe path"):
        load_split(data_spec("folder", archive, cache_dir=str(cache)), model_spec(2), "train")
    assert not (tmp_path / "escaped.png").exists() and not (cache / "escaped.png").exists()
    assert os.listdir(cache / "extracted") == []  # no partial extraction left to be mistaken for a complete one


# -- normalization, augmentation, mixing ----------------------------------------------

def test_channel_stats_and_normalize():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    mean, std = channel_stats(images)
    x = normalize(images, mean, std)
    assert x.dtype == torch.float32 and x.shape == images.shape
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)


def batch_on(device, b=16, size=8):
    return torch.randint(1, 256, (b, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).to(device)


def gen(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def test_augment_keeps_shape_and_is_reproducible(device):
    batch, aug = batch_on(device), Augment(crop_padding=2, hflip=True, cutout=3)
    out = augment(batch, aug, gen(device, 0))
    assert out.shape == batch.shape and out.dtype == torch.uint8 and out.device == batch.device
    assert torch.equal(out, augment(batch, aug, gen(device, 0)))
    assert not torch.equal(out, augment(batch, aug, gen(device, 1)))


def test_augment_crop_is_a_padded_shift(device):
    batch = batch_on(device)
    out = augment(batch, Augment(crop_padding=2, hflip=False), gen(device, 0)).cpu()
    padded = torch.nn.functional.pad(batch.cpu(), (2, 2, 2, 2))
    for image, result in zip(padded, out):
        assert any(torch.equal(image[:, dy:dy + 8, dx:dx + 8], result) for dy in range(5) for dx in range(5))


def test_augment_flip(device):
    batch = batch_on(device, b=64)
    out = augment(batch, Augment(crop_padding=0, hflip=True), gen(device, 0))
    flipped = (out == batch.flip(3)).flatten(1).all(1)
    assert ((out == batch).flatten(1).all(1) | flipped).all() and 0 < flipped.sum() < 64


def test_cutout_zeros_a_square(device):
    batch = torch.full((16, 3, 8, 8), 255, dtype=torch.uint8, device=device)
    out = augment(batch, Augment(crop_padding=0, hflip=False, cutout=3), gen(device, 0)).cpu()
    for image in out:
        zeros = (image == 0).all(0)  # (H, W)
        rows, cols = zeros.any(1).nonzero().flatten(), zeros.any(0).nonzero().flatten()
        assert zeros.sum() == 9 and rows.max() - rows.min() == 2 and cols.max() - cols.min() == 2
        assert (image == 0).sum() == 27


def test_random_erasing_fills_one_box_an_image_with_noise_as_timm_draws_it(device):
    """With probability p an image gets one box of standard normal noise; the boxes' areas, aspect
    ratios and positions are distributed as timm's RandomErasing draws them ('pixel' mode, the
    same 12 x 16 images: means within a few percent over 3,000 draws each)."""
    from timm.data.random_erasing import RandomErasing

    b, h, w = 3000, 12, 16
    images = torch.full((b, 3, h, w), 7.0, device=device)   # far from any noise value
    out = random_erasing(images, 0.25, gen(device, 0))
    assert torch.equal(out, random_erasing(images, 0.25, gen(device, 0)))
    changed = (out != 7.0).cpu()
    erased = changed.flatten(1).any(1)
    assert abs(erased.float().mean().item() - 0.25) < 0.035   # binomial sd 0.008
    assert torch.equal(changed, changed[:, :1].expand_as(changed))   # every channel of the box
    noise = out.cpu()[changed]
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1.0) < 0.02
    assert torch.equal(random_erasing(images, 0.0, gen(device, 0)), images)

    def boxes(changed):
        """(height, width, top, left) of each image's box, checking that it is one solid box."""
        mask = changed[:, 0]
        rows, cols = mask.any(2), mask.any(1)
        bh, bw = rows.sum(1), cols.sum(1)
        top, left = rows.float().argmax(1), cols.float().argmax(1)
        assert torch.equal(mask, rows[:, :, None] & cols[:, None, :])   # a rectangle, if without gaps:
        assert torch.equal(h - 1 - rows.flip(1).float().argmax(1) - top + 1, bh)
        assert torch.equal(w - 1 - cols.flip(1).float().argmax(1) - left + 1, bw)
        return torch.stack([bh, bw, top, left], 1).double()

    ours = boxes((random_erasing(images, 1.0, gen(device, 1)) != 7.0).cpu())
    assert len(ours) == b   # every draw of this size has a box that fits within ten tries
    torch.manual_seed(0)
    import random
    random.seed(0)
    reference = RandomErasing(probability=1.0, mode="pixel", device="cpu")
    theirs = boxes(torch.stack([reference(torch.full((3, h, w), 7.0)) != 7.0 for _ in range(b)]))
    area, aspect = (lambda x: x[:, 0] * x[:, 1]), (lambda x: (x[:, 0] / x[:, 1]).log())
    assert abs(area(ours).mean() / area(theirs).mean() - 1) < 0.04
    assert abs(aspect(ours).mean() - aspect(theirs).mean()) < 0.05 and abs(aspect(ours).std() / aspect(theirs).std() - 1) < 0.05
    assert (ours[:, 0] < h).all() and (ours[:, 1] < w).all()
    centre = lambda x: (x[:, 2] + x[:, 0] / 2, x[:, 3] + x[:, 1] / 2)
    for a, t in zip(centre(ours), centre(theirs)):
        assert abs(a.mean() - t.mean()) < 0.15


def test_mix_off_gives_smoothed_one_hot():
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
    out, targets = mix(images, labels, 3, Augment(), torch.Generator().manual_seed(0), label_smoothing=0.3)
    assert out is images
    assert torch.allclose(targets[0], torch.tensor([0.8, 0.1, 0.1]))
    assert torch.allclose(targets.sum(1), torch.ones(4))


@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_mix_targets_match_the_mixed_pixels(device, mixup, cutmix):
    # Image i is constant i and has label i, so each mixed image's mean is the target-weighted label.
    b = 32
    images = torch.arange(b, dtype=torch.float32, device=device).view(b, 1, 1, 1).expand(b, 3, 8, 8)
    labels = torch.arange(b, device=device)
    aug = Augment(mixup=mixup, cutmix=cutmix)
    for seed in range(4):
        out, targets = mix(images, labels, b, aug, gen(device, seed), label_smoothing=0.0)
        assert out.shape == images.shape and targets.shape == (b, b)
        assert torch.allclose(targets.sum(1), torch.ones(b, device=device)) and (targets >= 0).all()
        expected = targets @ torch.arange(b, dtype=torch.float32, device=device)
        assert torch.allclose(out.mean((1, 2, 3)), expected, atol=1e-4)
    again, _ = mix(images, labels, b, aug, gen(device, 3), label_smoothing=0.0)
    assert torch.equal(out, again)


def test_mix_smoothing_keeps_rows_summing_to_one():
    images, labels = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    _, targets = mix(images, labels, 5, Augment(mixup=0.2, cutmix=1.0), torch.Generator().manual_seed(1), 0.1)
    assert torch.allclose(targets.sum(1), torch.ones(8)) and targets.min() >= 0.1 / 5 - 1e-6


# -- the real CIFAR-10 JPEG archive, when this checkout has it ---------------------------

@pytest.mark.slow
@pytest.mark.skipif(not REAL_ARCHIVE.exists(), reason="the CIFAR-10 JPEG archive is not in ../shared/data")
def test_real_cifar10_jpeg_archive(tmp_path):
    # Extracting 50,000 files dominates (seconds to a minute, depending on the disk); decoding takes seconds.
    spec = data_spec("folder", REAL_ARCHIVE, val_split=0.1, cache_dir=str(tmp_path / "c"))
    try:
        start = time.perf_counter()
        val = load_split(spec, model_spec(10, 32), "val")
        first = time.perf_counter() - start
        assert val.classes == ["airplane", "automobile", "bird", "cat", "deer",
                               "dog", "frog", "horse", "ship", "truck"]
        assert val.images.shape == (5000, 3, 32, 32) and val.labels.bincount().min() > 400
        start = time.perf_counter()
        assert len(load_split(spec, model_spec(10, 32), "train")) == 45000
        assert time.perf_counter() - start < first / 2  # the decoded tensor comes from the cache
    finally:
        shutil.rmtree(tmp_path / "c", ignore_errors=True)  # 50,000 extracted files


# -- random resized crop ------------------------------------------------------------

def _boxes_of(images, min_scale, seed):
    """The boxes resized_crop draws, recovered by running it on images that encode their pixel
    coordinates (row in channel 0, column in channel 1): the box spans what the output shows."""
    b, h, w = images.shape[0], images.shape[2], images.shape[3]
    rows = torch.arange(h).view(1, h, 1).expand(b, h, w)
    cols = torch.arange(w).view(1, 1, w).expand(b, h, w)
    coords = torch.stack([rows, cols, torch.zeros_like(rows)], 1).to(torch.uint8)
    out = data_mod.resized_crop(coords, min_scale, torch.Generator().manual_seed(seed)).int()
    top, bottom = out[:, 0, 0, 0], out[:, 0, -1, 0]
    left, right = out[:, 1, 0, 0], out[:, 1, 0, -1]
    return top, left, bottom - top + 1, right - left + 1


def test_resized_crop_matches_torchvision_on_its_boxes():
    """Each image's box resized to the full size as torchvision's resized_crop resizes it."""
    from torchvision.transforms.v2 import functional as TF

    images = torch.randint(0, 256, (64, 3, 24, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = data_mod.resized_crop(images, 0.08, torch.Generator().manual_seed(5))
    top, left, height, width = _boxes_of(images, 0.08, 5)
    assert out.shape == images.shape and out.dtype == torch.uint8
    for i in range(64):
        want = TF.resized_crop(images[i], int(top[i]), int(left[i]), int(height[i]), int(width[i]), [24, 20],
                               antialias=False)
        assert (out[i].int() - want.int()).abs().max() <= 1, i   # float rounding of a .5


def test_resized_crop_boxes_follow_the_scale_and_ratio():
    images = torch.zeros(4096, 3, 32, 32, dtype=torch.uint8)
    top, left, height, width = _boxes_of(images, 0.25, 1)
    area = (height * width).float() / (32 * 32)
    ratio = width.float() / height.float()
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= 32).all() and (left + width <= 32).all()
    assert area.min() >= 0.2 and area.max() <= 1.0                    # 0.25 up to all of it (rounded sides)
    assert ratio.min() >= 0.65 and ratio.max() <= 1.5 and ratio.std() > 0.05
    assert 0.55 < area.mean() < 0.7                                    # uniform in area: about (0.25 + 1) / 2
    assert len({(int(t), int(l)) for t, l in zip(top, left)}) > 100   # positions vary
    # a min_scale of 1 with square images: the whole image, unchanged
    same = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(data_mod.resized_crop(same, 1.0, torch.Generator().manual_seed(0)), same)


def test_resized_crop_replaces_the_padded_crop():
    assert Augment(resized_crop=0.35).padding == 0 and Augment().padding == 4 and Augment(crop_padding=2).padding == 2
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    a = augment(images, Augment(resized_crop=0.35, hflip=False), torch.Generator().manual_seed(0))
    assert torch.equal(a, data_mod.resized_crop(images, 0.35, torch.Generator().manual_seed(0)))


def test_centre_crop_decodes_as_timms_evaluation_transform(tmp_path):
    """data.crop: each image file's centre, as torchvision's Resize(floor(size / crop)) and
    CenterCrop(size) make it (timm's evaluation), for wide, tall and square images; the whole image
    without it; refused where images come decoded."""
    from PIL import Image
    from torchvision import transforms

    from composer.data import decode_files
    from composer.spec import SpecError, load_spec_text

    rng = np.random.default_rng(0)
    files = []
    for i, (w, h) in enumerate(((40, 30), (23, 57), (32, 32))):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(files[-1])
    spec = load_spec_text("model: {image_size: 16, num_classes: 2, stem: {patch_size: 4, dim: 8}, "
                          "blocks: [{kind: mixer}]}\ndata: {kind: folder, root: x, crop: 0.875}")
    decoded = decode_files(files, spec.model, spec.data.crop)
    timm_eval = transforms.Compose([transforms.Resize(int(16 / 0.875)), transforms.CenterCrop(16)])
    for image, path in zip(decoded, files):
        expected = np.asarray(timm_eval(Image.open(path).convert("RGB")))
        assert np.array_equal(image.permute(1, 2, 0).numpy(), expected), path
    whole = decode_files(files[:1], spec.model)
    assert np.array_equal(whole[0].permute(1, 2, 0).numpy(),
                          np.asarray(Image.open(files[0]).convert("RGB").resize((16, 16), Image.BILINEAR)))
    with pytest.raises(SpecError) as caught:
        load_spec_text("model: {image_size: 32, num_classes: 10, stem: {patch_size: 4, dim: 8}, "
                       "blocks: [{kind: mixer}]}\ndata: {kind: cifar10, root: x, crop: 0.9}", "c.yaml")
    assert "data.crop: crop is how image files are decoded; cifar10 images come decoded: remove it" in \
        str(caught.value)


def test_a_folder_being_decoded_by_another_process_is_waited_for_not_decoded_again(tmp_path, monkeypatch):
    """torchrun's ranks (or two runs) wanting one folder: the first decodes it under a lock on its
    cache entry; the others wait, then read the entry it wrote."""
    import threading

    folder = make_folder(tmp_path)
    spec = data_spec("folder", folder, cache_dir=str(tmp_path / "c"))
    calls = []
    real = data_mod._decode_images
    monkeypatch.setattr(data_mod, "_decode_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = load_split(spec, model_spec(), "train")
    (entry,) = (tmp_path / "c" / "images").glob("*.pt")
    written = entry.read_bytes()
    entry.unlink()
    results = []
    with data_mod._locked(entry.with_suffix(".lock")):   # another process is decoding the folder
        waiting = threading.Thread(target=lambda: results.append(load_split(spec, model_spec(), "train")))
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive() and not results   # it waits for the lock
        entry.write_bytes(written)   # the other process's entry, written before it lets go
    waiting.join(30)
    assert len(results) == 1 and same(results[0], first) and len(calls) == 1   # read, not decoded again


def test_a_cache_folder_that_cannot_be_written_is_named_with_the_fix(tmp_path):
    folder = make_folder(tmp_path)
    (tmp_path / "a_file").write_text("not a folder")   # (a read-only folder would not stop root)
    with pytest.raises(UserError, match=r"cannot write the cache folder .*a_file/images: .*; set data.cache_dir or "
                                        r"COMPOSER_CACHE to a writable folder"):
        load_split(data_spec("folder", folder, cache_dir=str(tmp_path / "a_file")), model_spec(), "train")
