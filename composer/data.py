"""Datasets as one uint8 tensor, train/val/test splits, and batched augmentation on the device.

Every dataset kind ends as an `ImageSet`: all images in one uint8 (N, C, H, W) tensor,
already at the model's image size and channel count, so the training loop moves it to
the device once and slices batches there. Image folders (directories or archives) are
decoded once and cached as a tensor; archives are extracted once.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import lzma
import math
import multiprocessing
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F

from composer.errors import SpecFieldError, UserError, first_few
from composer.spec.data import Augment, DataSpec
from composer.spec.model import ModelSpec
from composer.three_augment import color_jitter, three_augment
from composer.trivial_augment import trivial_augment

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
ARCHIVE_EXTENSIONS = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.xz")
# the field a folder's labels CSV comes from, by the field its folder comes from (for messages)
LABELS_FIELD = {"data.root": "data.labels", "data.val_root": "data.val_labels", "--data-root": "--labels"}
CACHE_VERSION = 1         # part of every cache key: bump it when the cached format changes
DECODE_CHUNK = 1024       # images per decode task
SYNTHETIC_CLASS_SEED = 1234  # class prototypes, shared by the synthetic train and test sets
SYNTHETIC_TRAIN_SEED, SYNTHETIC_TEST_SEED = 0, 1


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (M, C, H, W): the set's images, or with `rows` a larger set holding them
    labels: torch.Tensor  # int64 (N,), one a image of the set
    classes: list[str]    # class names, index = label
    # Whether `images` is a folder decoded to a file on disk, mapped into memory (its pages read as
    # they are used: see _load_folder), and whether the set's images are images[rows] (a copy of
    # them would not fit in memory either; None: images is the set).
    on_disk: bool = False
    rows: torch.Tensor | None = None

    def to(self, device) -> "ImageSet":
        """The set on `device`, its images one tensor there (gathered a chunk at a time from `rows`)."""
        if torch.device(device) == self.images.device:   # (a file on disk stays mapped)
            return ImageSet(self.images, self.labels.to(device), self.classes, self.on_disk, self.rows)
        if self.rows is None:
            return ImageSet(self.images.to(device), self.labels.to(device), self.classes)
        out = torch.empty((len(self), *self.images.shape[1:]), dtype=torch.uint8, device=device)
        for start, chunk in self.chunks():
            out[start:start + len(chunk)] = chunk.to(device)
        return ImageSet(out, self.labels.to(device), self.classes)

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """uint8 (len(index), C, H, W): the set's images at positions `index`."""
        return self.images[index if self.rows is None else self.rows[index]]

    def chunks(self, size: int = 4096):
        """(first position, uint8 images) of the set, in order, `size` at a time: bounded memory."""
        for start in range(0, len(self), size):
            stop = min(start + size, len(self))
            yield start, (self.images[start:stop] if self.rows is None else self.images[self.rows[start:stop]])

    @property
    def nbytes(self) -> int:
        return len(self) * self.images[0].nbytes if len(self) else 0

    def __len__(self) -> int:
        return len(self.labels)


# -- splits -------------------------------------------------------------------

def load_split(data: DataSpec, model: ModelSpec, split: str, data_root: str | None = None,
               echo=None, labels: str | None = None) -> ImageSet:
    """One split of the dataset, at the model's image size and channel count.

    Args:
        split: "train" and "val" partition the training data (val = the data.val_split fraction,
            chosen by a permutation seeded with data.split_seed), or, with data.val_root, are the
            folders data.root and data.val_root whole; "test" is the dataset's own test set.
        data_root: replaces data.root (evaluate --data-root), or data.val_root for the "val" split
            where there is one; for a folder dataset it is the only way to get a test split: the
            whole folder is the test set.
        echo: where decoding a folder for the first time reports its progress (None: quietly).
        labels: a labels CSV for the folder at data_root (evaluate --labels).
    """
    if split not in ("train", "val", "test"):
        raise UserError(f"unknown split {split!r}; use train, val or test")
    root = data_root or data.root
    root_labels = labels if data_root else data.labels
    if data.val_root and split != "test":
        if split == "val":
            return _load(data, model, data_root or data.val_root, train=True,
                         field="--data-root" if data_root else "data.val_root", echo=echo,
                         labels=labels if data_root else data.val_labels)
        return _load(data, model, root, train=True, echo=echo, labels=root_labels)
    if split == "test":
        if data.kind == "digits":
            raise UserError("the digits dataset has no test split; evaluate on the validation split (--split val)")
        if data.kind == "folder" and data_root is None:
            raise UserError("a folder dataset has no test split; evaluate on the validation split (--split val) "
                            "or pass --data-root with a held-out folder of the same classes")
        return _load(data, model, root, train=False, echo=echo, labels=root_labels)  # a folder ignores `train`
    held_out = data.held_out
    if split == "val" and held_out == 0:
        raise SpecFieldError("data.val_split", "there is no validation split because data.val_split is 0; set data.val_split (e.g. 0.1)")
    full = _load(data, model, root, train=True, echo=echo, labels=root_labels)
    val_index = _held_out(full.labels, held_out, data.split_seed, data.stratify)
    keep = torch.zeros(len(full), dtype=torch.bool)
    keep[val_index] = True
    index = torch.nonzero(keep if split == "val" else ~keep).flatten()
    if full.on_disk and split == "train":   # a copy of most of it would not fit in memory either
        return ImageSet(full.images, full.labels[index], full.classes, on_disk=True, rows=index)
    if full.on_disk:   # the held-out images, copied into memory
        _check_held_out_fits(len(index), model, Path(_expand(root)))
    return ImageSet(full.images[index], full.labels[index], full.classes)


def _held_out(labels: torch.Tensor, fraction: float, seed: int, stratify: bool) -> torch.Tensor:
    """The indices of the validation images: a fixed permutation's first `fraction` (at least one
    image, never all), so the same spec always holds out the same images; with `stratify`, that
    fraction of each class in turn (rounded, each class keeping a training image)."""
    if fraction == 0:
        return torch.zeros(0, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    if not stratify:
        perm = torch.randperm(len(labels), generator=generator)
        return perm[:min(max(round(len(labels) * fraction), 1), len(labels) - 1)]
    parts = []
    for cls in labels.unique(sorted=True).tolist():
        members = torch.nonzero(labels == cls).flatten()
        take = min(max(round(len(members) * fraction), 1), len(members) - 1)
        parts.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.cat(parts)


def _load(data: DataSpec, model: ModelSpec, root: str | None, train: bool, field: str = "data.root",
          echo=None, labels: str | None = None) -> ImageSet:
    """`field`: where `root` came from, for messages; `labels`: its labels CSV, if any."""
    if data.kind in TORCHVISION_SETS:
        found, where = _load_torchvision(data.kind, root, train, data.download), _expand(root)
    elif data.kind == "folder":
        found, where = (_load_folder(root, model, cache_root(data.cache_dir), field, echo, labels, data.crop),
                        _expand(root))
    elif data.kind == "digits":
        found, where = _load_digits(), "scikit-learn's digits"
    else:
        seed = SYNTHETIC_TRAIN_SEED if train else SYNTHETIC_TEST_SEED
        found, where = _synthetic(data.num_samples, model, seed), "synthetic"
    if len(found.classes) != model.num_classes and field == "data.val_root":
        raise SpecFieldError("data.val_root", f"data.val_root ({where}) has {len(found.classes)} classes but model.num_classes is "
                        f"{model.num_classes}; give it the same class subfolders as data.root")
    if len(found.classes) != model.num_classes:
        raise SpecFieldError("model.num_classes", f"the {data.kind} data ({where}) has {len(found.classes)} classes but model.num_classes "
                        f"is {model.num_classes}; set model.num_classes: {len(found.classes)}")
    found.images = _fit(found.images, model.in_channels, model.image_size)
    return found


def _fit(images: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) at `channels` channels and size x size (bilinear)."""
    if images.shape[1] == 1 and channels == 3:  # grayscale data (digits) for an RGB model
        images = images.repeat(1, 3, 1, 1)
    elif images.shape[1] != channels:
        raise SpecFieldError("model.in_channels", f"the data has {images.shape[1]} channels but model.in_channels is {channels}; "
                        f"set model.in_channels: {images.shape[1]}")
    if images.shape[-2:] != (size, size):
        chunks = [F.interpolate(chunk.float(), size=(size, size), mode="bilinear", align_corners=False,
                                antialias=True).round().clamp(0, 255).to(torch.uint8)
                  for chunk in images.split(4096)]  # bounded float memory for big sets
        images = torch.cat(chunks)
    return images.contiguous()


# -- dataset kinds --------------------------------------------------------------

# torchvision's dataset class, the name people know it by, and the folder it keeps under root
TORCHVISION_SETS = {
    "cifar10": ("CIFAR10", "CIFAR-10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", "CIFAR-100", "cifar-100-python"),
    "mnist": ("MNIST", "MNIST", "MNIST/raw"),
    "fashion_mnist": ("FashionMNIST", "Fashion-MNIST", "FashionMNIST/raw"),
}


def _load_torchvision(kind: str, root: str | None, train: bool, download: bool) -> ImageSet:
    import torchvision.datasets

    cls, name, folder = TORCHVISION_SETS[kind]
    if not root:
        raise SpecFieldError("data.root", f"data.root is not set; the {kind} dataset needs the directory that holds "
                                          "(or will hold) it")
    path = _expand(root)
    try:
        ds = getattr(torchvision.datasets, cls)(path, train=train, download=download)
    except RuntimeError as e:  # torchvision: not found, corrupted, or (MNIST) every mirror failed
        if download:
            raise UserError(f"could not get {name} into {path} ({e}); if a download started, delete {path}/{folder} "
                            f"and retry, or download it elsewhere and point data.root at it") from e
        raise SpecFieldError("data.root", f"{name} not found in {path}; set data.download: true to download it there, "
                                          f"or point data.root at a directory that holds {folder}") from e
    except OSError as e:  # network errors during the download
        raise SpecFieldError("data.root", f"could not download {name} into {path}: {e}; download it elsewhere and "
                                          "point data.root at it") from e
    images = torch.as_tensor(np.asarray(ds.data))
    # CIFAR keeps (N, H, W, C) numpy arrays, MNIST (N, H, W) tensors
    images = images.permute(0, 3, 1, 2) if images.ndim == 4 else images[:, None]
    return ImageSet(images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64), list(ds.classes))


def _load_digits() -> ImageSet:
    from sklearn.datasets import load_digits

    digits = load_digits()  # 8x8 images with values 0..16
    images = torch.from_numpy(np.rint(digits.images * (255 / 16)).astype(np.uint8))[:, None]
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return ImageSet(images, labels, [str(i) for i in range(10)])


def _synthetic(n: int, model: ModelSpec, seed: int) -> ImageSet:
    """Learnable random images: each class has its own colour and coarse 4x4 layout, plus pixel noise."""
    k, c, s = model.num_classes, model.in_channels, model.image_size
    g = torch.Generator().manual_seed(SYNTHETIC_CLASS_SEED)
    colours = torch.rand(k, c, 1, 1, generator=g) * 160 + 48
    layouts = F.interpolate(torch.randn(k, c, 4, 4, generator=g), size=(s, s), mode="bilinear") * 40
    prototypes = colours + layouts  # (K, C, S, S)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randperm(n, generator=g) % k  # balanced classes in random order
    images = torch.cat([(prototypes[chunk] + torch.randn(len(chunk), c, s, s, generator=g) * 24)
                        .round().clamp(0, 255).to(torch.uint8) for chunk in labels.split(4096)])
    return ImageSet(images, labels, [f"class_{i}" for i in range(k)])


# -- image folders and archives -------------------------------------------------

def _field_error(field: str, message: str) -> UserError:
    """A spec field's error, or a plain one for a path given on the command line."""
    return UserError(message) if field.startswith("--") else SpecFieldError(field, message)


def _load_folder(root: str | None, model: ModelSpec, cache: Path, field: str = "data.root", echo=None,
                 labels: str | None = None, crop: float | None = None) -> ImageSet:
    if not root:
        raise SpecFieldError("data.root", "data.root is not set; the folder dataset needs a directory (or archive) of <class>/<image>")
    path = Path(_expand(root))
    if not path.exists():
        where = field if field == "--data-root" else f"{field} (or --data-root)"
        raise _field_error(field, f"{path} does not exist; point {where} at an image folder "
                                  "laid out as <root>/<class>/<image>, or an archive of one")
    if model.in_channels not in (1, 3):
        raise SpecFieldError("model.in_channels", f"folder images load as grayscale (1) or RGB (3), not {model.in_channels} channels; "
                        "set model.in_channels to 1 or 3")
    table = _read_labels(labels, LABELS_FIELD[field]) if labels else None
    if path.is_dir():
        files, classes = _scan_any(path, table, str(path))
        stats = [os.stat(f) for f, _ in files]
        source = ["dir", path] + [f"{f}:{s.st_size}:{s.st_mtime_ns}" for (f, _), s in zip(files, stats)]
    elif path.name.lower().endswith(ARCHIVE_EXTENSIONS):
        files, classes, stat = None, None, path.stat()
        source = ["archive", path, stat.st_size, stat.st_mtime_ns]
    else:
        raise _field_error(field, f"{path} is neither a directory nor an archive ({', '.join(ARCHIVE_EXTENSIONS)}); "
                                  f"point {field} at an image folder (<root>/<class>/<image>) or an archive of one")

    if table:   # the labels decide which images and classes: part of the key
        source += ["labels", table.text]
    key = _digest(source + [model.image_size, model.in_channels, CACHE_VERSION] + ([f"crop {crop}"] if crop else []))
    cached = cache / "images" / f"{_slug(path)}-{key}.pt"
    found = _cached_set(cached)
    if found is not None:
        return found
    # One process decodes a folder; another one that wants it meanwhile (a torchrun rank, a second
    # run) waits for its cache entry instead of decoding it too (for a folder decoded to disk: a
    # second file as large)
    with _locked(cached.with_suffix(".lock")):
        found = _cached_set(cached)
        if found is not None:
            return found
        return _decode_folder(path, files, classes, table, model, cache, cached, echo, crop)


def _cached_set(cached: Path) -> ImageSet | None:
    """The ImageSet a cache entry holds (a folder decoded to disk: its file mapped, not read), or
    None when there is none or it is damaged (e.g. a full disk at write time: it is rebuilt)."""
    if not cached.exists():
        return None
    try:
        saved = torch.load(cached, weights_only=True)
        if "shape" in saved:
            return ImageSet(_map(cached.with_suffix(".npy"), saved.pop("shape")), **saved, on_disk=True)
        return ImageSet(**saved)
    except Exception:
        return None


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on `path` (created) while inside, across processes; none where the
    platform has no flock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
    except OSError as e:
        raise UserError(f"cannot write the cache folder {path.parent}: {e.strerror or e}; set data.cache_dir or "
                        "COMPOSER_CACHE to a writable folder with space") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _decode_folder(path: Path, files, classes, table, model: ModelSpec, cache: Path, cached: Path, echo,
                   crop: float | None) -> ImageSet:
    """Decode a folder's (or archive's: `files` None) images and write its cache entry `cached`."""
    mapped = cached.with_suffix(".npy")   # the images of a set too large for memory, beside its .pt (labels)
    if files is None:  # an archive: extract once, then treat it as a folder
        files, classes = _scan_any(_extract(path, cache), table, f"archive {path}", extracted=True)
    labels_of = torch.tensor([label for _, label in files], dtype=torch.int64)
    report = _DecodeReport(echo, path, cache) if echo else None
    shape = (len(files), model.in_channels, model.image_size, model.image_size)
    try:
        if _fits_in_memory(len(files), model):
            decoded = _decode_images([f for f, _ in files], model.in_channels, model.image_size, report, crop)
            found = ImageSet(torch.from_numpy(decoded).permute(0, 3, 1, 2).contiguous(), labels_of, classes)
            _save_atomic({"images": found.images, "labels": found.labels, "classes": found.classes}, cached)
            return found
        # Too large to hold: decoded straight into a file that training then maps into memory
        # (the operating system reads its pages as batches use them, and keeps what fits cached).
        _check_disk_for(shape, mapped, path)
        # (under _locked: no other process writes it; one a killed process left is overwritten)
        partial = mapped.with_suffix(".npy.partial")
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
        _reserve(partial, mapped.parent)
        _decode_images([f for f, _ in files], model.in_channels, model.image_size, report, crop, out=out)
        out.flush()
        del out
        os.replace(partial, mapped)
    except _BadImage as e:
        raise UserError(f"cannot read image {e.args[0]} ({e.args[1]}); remove or replace it") from None
    _save_atomic({"labels": labels_of, "classes": classes, "shape": list(shape)}, cached)
    if echo:
        echo(f"{path}: {shape[0]:,} images decoded to {mapped} ({np.prod(shape) / 2**30:.1f} GiB, more than half "
             "of this machine's available memory): training reads them from there")
    return ImageSet(_map(mapped, list(shape)), labels_of, classes, on_disk=True)


def scan_folder(root: str, cache_dir: str | None = None, labels: str | None = None
                ) -> tuple[list[tuple[str, int]], list[str]]:
    """(image path, label) pairs and class names of an image folder, or of an archive of one
    (extracted into the cache once, where training will find it); `labels`: its labels CSV."""
    path = Path(_expand(root))
    if not path.exists():
        raise UserError(f"{path} does not exist; give an image folder laid out as <root>/<class>/<image>, "
                        "or an archive of one")
    table = _read_labels(labels, "--labels") if labels else None
    if path.is_dir():
        return _scan_any(path, table, str(path))
    if not path.name.lower().endswith(ARCHIVE_EXTENSIONS):
        raise UserError(f"{path} is neither a directory nor an archive ({', '.join(ARCHIVE_EXTENSIONS)})")
    return _scan_any(_extract(path, cache_root(cache_dir)), table, f"archive {path}", extracted=True)


def image_files(paths: list[str]) -> list[str]:
    """The image files at `paths` (files, or folders searched recursively), in order."""
    files = []
    for given in paths:
        path = Path(_expand(given))
        if path.is_dir():
            found = sorted(str(f) for f in path.rglob("*") if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS)
                           and not any(_ignored(part) for part in f.relative_to(path).parts))
            if not found:
                raise UserError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif path.is_file():
            files.append(str(path))
        else:
            raise UserError(f"{path} does not exist; give image files or folders of them")
    return files


def decode_files(files: list[str], model: ModelSpec, crop: float | None = None) -> torch.Tensor:
    """`files` decoded as a folder dataset is: uint8 (N, C, H, W) at the model's image size and channels
    (`crop`: as data.crop)."""
    if model.in_channels not in (1, 3):
        raise UserError(f"images load as grayscale (1) or RGB (3), not the model's {model.in_channels} channels")
    try:
        decoded = _decode_images(files, model.in_channels, model.image_size, crop=crop)
    except _BadImage as e:
        raise UserError(f"cannot read image {e.args[0]} ({e.args[1]}); give image files "
                        f"({', '.join(IMAGE_EXTENSIONS)})") from None
    return torch.from_numpy(decoded).permute(0, 3, 1, 2).contiguous()


def available_memory() -> int | None:
    """Bytes of host memory available to a new allocation (Linux's MemAvailable), None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _fits_in_memory(count: int, model: ModelSpec) -> bool:
    """Whether `count` images decoded at the model's size can be held in memory: decoding holds them
    twice (the decoded array and the tensor in training layout). Otherwise _load_folder decodes
    them to a file on disk."""
    available = available_memory()
    return available is None or 2 * count * model.in_channels * model.image_size ** 2 <= available


def _check_held_out_fits(count: int, model: ModelSpec, path: Path) -> None:
    """Refuse, before copying them, held-out images (data.val_split) of a folder decoded to disk
    that cannot be held in memory."""
    need = count * model.in_channels * model.image_size ** 2
    available = available_memory()
    if available is not None and need > available:
        raise SpecFieldError("data.val_split", f"the {count:,} images data.val_split holds out of {path} take "
                             f"{need / 2**30:.1f} GiB decoded, and this machine has {available / 2**30:.1f} GiB of "
                             "memory available; hold out fewer (a smaller data.val_split) or give a validation "
                             "folder (data.val_root)")


def _check_disk_for(shape: tuple, mapped: Path, path: Path) -> None:
    """Refuse, before hours of decoding, a folder whose decoded images the cache's disk cannot hold."""
    import shutil

    need = int(np.prod(shape))
    mapped.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(mapped.parent).free
    if need > free:
        raise UserError(f"{path} holds {shape[0]:,} images: decoded at {shape[2]}x{shape[3]} they take "
                        f"{need / 2**30:.1f} GiB, more than half of this machine's memory, so they go to a file in "
                        f"the cache ({mapped.parent}), whose disk has {free / 2**30:.1f} GiB free; point "
                        "data.cache_dir (or COMPOSER_CACHE) at a disk with room, or train at a smaller "
                        "model.image_size (model.resize still feeds the network larger images)")


def _reserve(path: Path, folder: Path) -> None:
    """Allocate a file's blocks now: a disk that fills while a mapped file is written kills the
    process (SIGBUS) instead of raising; here it is an error with the fix."""
    if not hasattr(os, "posix_fallocate"):
        return
    size = os.path.getsize(path)
    try:
        with open(path, "r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, size)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise UserError(f"cannot reserve {size / 2**30:.1f} GiB for the decoded images in {folder}: "
                        f"{exc.strerror or exc}; point data.cache_dir (or COMPOSER_CACHE) at a disk with room") from None


def _map(path: Path, shape: list) -> torch.Tensor:
    """The uint8 images of a file written by _load_folder, mapped into memory: nothing is read until
    it is used, and writes stay private (copy on write)."""
    array = np.load(path, mmap_mode="c")
    if list(array.shape) != list(shape):
        raise ValueError(f"{path} holds {array.shape}, not {shape}")
    return torch.from_numpy(array)


def _scan_any(folder: Path, table: _Labels | None, shown: str, extracted: bool = False
              ) -> tuple[list[tuple[str, int]], list[str]]:
    """(image path, label) pairs and class names of a folder: by its labels CSV when it has one,
    else by its class subfolders. `extracted`: an archive's extraction, whose one top folder
    (e.g. train/) may be the dataset's."""
    if table:
        return _scan_labelled(_single_top(folder) if extracted else folder, table, shown)
    return _scan(_class_root(folder) if extracted else folder, shown)


def _scan(folder: Path, shown: str) -> tuple[list[tuple[str, int]], list[str]]:
    """(image path, label) pairs of an ImageFolder layout; classes are the sorted subfolder names."""
    entries = sorted((e for e in os.scandir(folder) if not _ignored(e.name)), key=lambda e: e.name)
    class_dirs = [e for e in entries if e.is_dir()]
    if not entries:
        raise UserError(f"{shown} is empty; it should hold one subfolder per class with that class's images "
                        "(<root>/<class>/<image>)")
    if not class_dirs:
        raise UserError(f"{shown} has no class subfolders, only {len(entries)} files; put the images in one "
                        "subfolder per class (<root>/<class>/<image>), or name each image's class in a CSV file "
                        "(data.labels; composer init --labels)")
    loose = [e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
    if loose:   # beside class folders they would be left out without a word
        raise UserError(f"{shown} holds {len(loose)} images outside its class subfolders ({', '.join(loose[:3])}"
                        f"{', ...' if len(loose) > 3 else ''}); move them into the subfolder of their class, or "
                        "name every image's class in a CSV file (data.labels; composer init --labels)")
    files = []
    for label, class_dir in enumerate(class_dirs):
        found = sorted(os.path.join(top, name) for top, dirs, names in os.walk(class_dir.path)
                       for name in names if name.lower().endswith(IMAGE_EXTENSIONS) and not _ignored(name))
        if not found:
            raise UserError(f"class folder {class_dir.name!r} in {shown} holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
        files += [(f, label) for f in found]
    return files, [e.name for e in class_dirs]


@dataclass
class _Labels:
    """A labels CSV: its rows (line number, image, class) and its text (for the cache key)."""
    path: Path
    field: str
    rows: list[tuple[int, str, str]]
    text: str


def _read_labels(labels: str, field: str) -> _Labels:
    path = Path(_expand(labels))
    try:
        text = path.read_text(encoding="utf-8-sig")   # a byte-order mark, as spreadsheets write, is not a name
    except FileNotFoundError:
        raise _field_error(field, f"{path} does not exist; {field} is a CSV file of image,class rows") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _field_error(field, f"cannot read {path} ({exc}); {field} is a CSV file of image,class rows") from None
    rows = []
    for line, cells in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not cells or not any(c.strip() for c in cells):
            continue
        if len(cells) < 2 or not cells[0].strip() or not cells[1].strip():
            raise _field_error(field, f"{path}:{line}: {','.join(cells)!r} is not an image,class row")
        rows.append((line, cells[0].strip(), cells[1].strip()))
    if len(rows) < 2:
        raise _field_error(field, f"{path} has no image,class rows after its header")
    return _Labels(path, field, rows[1:], text)   # the first row is the header


def _scan_labelled(folder: Path, table: _Labels, shown: str) -> tuple[list[tuple[str, int]], list[str]]:
    """(image path, label) pairs of the images a labels CSV names, found under `folder` by their
    path with or without its extension; classes are the CSV's sorted class names (numerically
    when all are numbers)."""
    by_path: dict[str, str] = {}
    by_stem: dict[str, str | None] = {}   # None: two images share the name without extension
    for top, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not _ignored(d)]
        for name in names:
            if name.lower().endswith(IMAGE_EXTENSIONS) and not _ignored(name):
                file = os.path.join(top, name)
                relative = os.path.relpath(file, folder).replace(os.sep, "/")
                by_path[relative] = file
                stem = os.path.splitext(relative)[0]
                by_stem[stem] = None if stem in by_stem else file
    names = sorted({cls for _, _, cls in table.rows},
                   key=lambda c: (0, int(c), c) if c.lstrip("-").isdigit() else (1, 0, c))
    label = {name: i for i, name in enumerate(names)}
    files, missing, seen = [], [], {}
    for line, image, cls in table.rows:
        key = image.replace("\\", "/").removeprefix("./")
        file = by_path.get(key) or by_stem.get(key)
        if file is None and key in by_stem:
            raise _field_error(table.field, f"{table.path}:{line}: {image} is more than one image in {shown} (other "
                                            "extensions); name it with its extension")
        if file is None:
            missing.append(f"line {line}: {image}")
        elif file in seen:
            raise _field_error(table.field, f"{table.path}: lines {seen[file]} and {line} both name {image}; give each "
                                            "image one row")
        else:
            seen[file] = line
            files.append((file, label[cls]))
    if missing:
        raise _field_error(table.field, f"{len(missing)} images that {table.path} names are not in {shown} "
                                        f"({first_few(missing, 5, '; ')}); image paths are relative to it, their "
                                        "extension optional")
    return sorted(files), names


def _single_top(extracted: Path) -> Path:
    """An archive of one top folder (e.g. images/...) means that folder."""
    top = [e for e in os.scandir(extracted) if not _ignored(e.name)]
    return Path(top[0].path) if len(top) == 1 and top[0].is_dir() else extracted


def _class_root(extracted: Path) -> Path:
    """An archive with a single top folder holding the class folders (e.g. train/<class>/...) means that folder."""
    top = _single_top(extracted)
    if top != extracted and any(e.is_dir() and not _ignored(e.name) for e in os.scandir(top)):
        return top
    return extracted


def _ignored(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"  # hidden files and macOS archive metadata


def _extract(archive: Path, cache: Path) -> Path:
    """Extracts once per archive version; the rename makes a complete folder appear at once."""
    stat = archive.stat()
    target = cache / "extracted" / f"{_slug(archive)}-{_digest([archive, stat.st_size, stat.st_mtime_ns])}"
    if target.is_dir():
        return target
    _make_dir(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _unpack(archive, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # else another process finished the same extraction first
                raise
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, lzma.LZMAError, zlib.error) as e:
        raise UserError(f"cannot extract {archive}: {e}; check that the archive is complete and that "
                        f"{target.parent} is writable") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _unpack(archive: Path, dest: Path) -> None:
    """Writes only regular files, each under `dest`: links, devices and escaping paths are never created."""
    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    with zf.open(info) as src:
                        _write_member(src, dest, info.filename, archive)
    else:
        with tarfile.open(archive) as tf:  # compression detected from the content
            for member in tf:
                if member.isfile():
                    with tf.extractfile(member) as src:
                        _write_member(src, dest, member.name, archive)


def _write_member(src, dest: Path, name: str, archive: Path) -> None:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or parts[0] == "/" or ".." in parts or ":" in parts[0]:
        raise UserError(f"{archive} holds an unsafe path {name!r} (absolute or with '..'); refusing to extract it")
    out = dest.joinpath(*parts)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        shutil.copyfileobj(src, f)


class _BadImage(Exception):
    """(path, reason) of an image that could not be decoded."""


class _DecodeReport:
    """Decoding's progress for a log: a line as it starts, then one every EVERY_S seconds and at the end."""

    EVERY_S = 30.0

    def __init__(self, echo, path: Path, cache: Path):
        self.echo, self.path, self.cache = echo, path, cache

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done == 0:
            self.started, self.next = now, now + self.EVERY_S
            self.echo(f"decoding {total:,} images of {self.path} (once: the result is cached in {self.cache})")
        elif now >= self.next or done == total:
            self.next = now + self.EVERY_S
            left = (now - self.started) / done * (total - done)
            self.echo(f"decoding: {done:,}/{total:,} images ({done / total:.0%}), about {left / 60:.0f} min left"
                      if done < total else f"decoded {total:,} images in {now - self.started:.0f}s")


def _decode_images(paths: list[str], channels: int, size: int, report=None, crop: float | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
    """Decodes and resizes images into one uint8 (N, size, size, C) array, in parallel when there are
    many; `report(done, total)` hears of each chunk done (and of the start, with 0); `crop`: the
    centre crop of data.crop. With `out` (N, C, size, size), e.g. a file mapped into memory, each
    chunk is written there in training layout as it comes instead (memory: a few chunks)."""
    jobs = [(paths[i:i + DECODE_CHUNK], channels, size, crop) for i in range(0, len(paths), DECODE_CHUNK)]
    report = report or (lambda done, total: None)
    report(0, len(paths))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(cpus, len(jobs), 16)
    parallel = workers > 1 and sys.platform.startswith("linux")
    pool = contextlib.nullcontext()
    if parallel:
        # fork (safe on Linux; not on macOS): the workers run only PIL and numpy and need no torch re-import.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # Python >= 3.12 warns on fork with threads
            pool = multiprocessing.get_context("fork").Pool(workers)
    with pool:
        # in order, each chunk as it is done
        chunks = pool.imap(_decode_chunk, jobs) if parallel else map(_decode_chunk, jobs)
        parts, done = [], 0
        for part in chunks:
            if isinstance(part, tuple):
                raise _BadImage(*part)
            if out is not None:
                out[done:done + len(part)] = part.transpose(0, 3, 1, 2)
            else:
                parts.append(part)
            done += len(part)
            report(done, len(paths))
    return out if out is not None else np.concatenate(parts)


def _decode_chunk(job: tuple[list[str], int, int, float | None]) -> np.ndarray | tuple[str, str]:
    from PIL import Image

    paths, channels, size, crop = job
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(paths), size, size, channels), np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                image = image.convert(mode)
                if crop:
                    image = centre_crop(image, size, crop)
                elif image.size != (size, size):
                    image = image.resize((size, size), Image.BILINEAR)
                out[i] = np.asarray(image).reshape(size, size, channels)
        except Exception as e:  # reported with its path; exceptions from PIL plugins vary
            return path, f"{type(e).__name__}: {e}"
    return out


def centre_crop(image, size: int, crop: float):
    """A PIL image's centre as timm evaluates (torchvision's Resize then CenterCrop): the shorter side
    resized to floor(size / crop), the longer in proportion (rounded down), bilinear; then the
    central size x size square."""
    from PIL import Image

    scaled = math.floor(size / crop)
    w, h = image.size
    new = (scaled, int(scaled * h / w)) if w <= h else (int(scaled * w / h), scaled)
    if new != image.size:
        image = image.resize(new, Image.BILINEAR)
    left, top = round((new[0] - size) / 2), round((new[1] - size) / 2)
    return image.crop((left, top, left + size, top + size))


# -- cache helpers -----------------------------------------------------------------

def cache_root(cache_dir: str | None = None) -> Path:
    """Where decoded datasets and extracted archives are cached: `cache_dir` (data.cache_dir),
    else $COMPOSER_CACHE, else ~/.cache/composer."""
    return Path(_expand(cache_dir or os.environ.get("COMPOSER_CACHE") or "~/.cache/composer"))


def _expand(path: str | None) -> str:
    return os.path.abspath(os.path.expanduser(path)) if path else ""


def _digest(parts: list) -> str:
    return hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()[:16]


def _slug(path: Path) -> str:
    """A readable prefix for cache entries (the digest makes them unique)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", path.name)[:40] or "root"


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the cache folder {path}: {e}; set data.cache_dir or COMPOSER_CACHE "
                        "to a writable folder") from e


def _save_atomic(obj, path: Path) -> None:
    """Write a cache entry atomically (readers never see half of one); a full or read-only disk is a user error."""
    from composer.checkpoint import save_atomic

    try:
        save_atomic(obj, path)
    except OSError as e:
        raise UserError(f"cannot write the cache file {path}: {e}; set data.cache_dir or COMPOSER_CACHE "
                        "to a writable folder with space") from e


# -- normalization -----------------------------------------------------------------

def channel_stats(images: torch.Tensor | ImageSet) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images (or an ImageSet's), in [0, 1] units."""
    chunks = ((chunk for _, chunk in images.chunks()) if isinstance(images, ImageSet) else images.split(4096))
    c = images.images.shape[1] if isinstance(images, ImageSet) else images.shape[1]
    total = torch.zeros(c, dtype=torch.int64)
    squares = torch.zeros(c, dtype=torch.int64)
    count = 0
    for chunk in chunks:  # integer sums: exact, and no float copy of the whole set
        x = chunk.to(torch.int64)
        total += x.sum((0, 2, 3)).cpu()
        squares += (x * x).sum((0, 2, 3)).cpu()
        count += x.numel() // c
    mean = total.double() / count
    std = (squares.double() / count - mean**2).clamp_min(0).sqrt()
    std = torch.where(std > 0, std, 255.0)  # a constant channel: std 1 rather than a division by zero
    return (mean / 255).tolist(), (std / 255).tolist()


def normalize(batch_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (x / 255 - mean) / std, on the batch's device."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=batch_uint8.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=batch_uint8.device).view(1, -1, 1, 1)
    return batch_uint8.float().mul_(1 / (255 * std)).sub_(mean / std)


# -- augmentation -------------------------------------------------------------------

def augment(batch_uint8: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop or random crop after zero padding, horizontal flip, TrivialAugment,
    3-Augment, colour jitter and cutout, batched on the batch's device.

    All randomness comes from `generator`, which must live on the batch's device.
    """
    out = batch_uint8
    b, _, h, w = out.shape
    dev = out.device
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    if aug.resized_crop:
        out = resized_crop(out, aug.resized_crop, generator)
    if aug.padding > 0:
        p = aug.padding
        padded = F.pad(out, (p, p, p, p))  # (B, C, H + 2p, W + 2p)
        top = torch.randint(0, 2 * p + 1, (b, 1), generator=generator, device=dev)
        left = torch.randint(0, 2 * p + 1, (b, 1), generator=generator, device=dev)
        image = torch.arange(b, device=dev)[:, None, None]
        # advanced indices around a slice put the indexed dims first: (B, H, W, C)
        out = padded[image, :, (top + rows)[:, :, None], (left + cols)[:, None, :]].permute(0, 3, 1, 2)
    if aug.hflip:
        flip = torch.rand(b, generator=generator, device=dev) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    if aug.trivial:
        out = trivial_augment(out, generator)
    if aug.three_augment:
        out = three_augment(out, generator)
    if aug.color_jitter:
        out = color_jitter(out, aug.color_jitter, generator)
    if aug.cutout > 0:
        s = min(aug.cutout, h, w)  # the square lies inside the image, so every image loses the same area
        top = torch.randint(0, h - s + 1, (b, 1), generator=generator, device=dev)
        left = torch.randint(0, w - s + 1, (b, 1), generator=generator, device=dev)
        in_rows = (rows >= top) & (rows < top + s)  # (B, H)
        in_cols = (cols >= left) & (cols < left + s)  # (B, W)
        out = out.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0)
    return out.contiguous()


RESIZED_CROP_TRIES = 10          # boxes drawn an image before falling back to a central one
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)


def resized_crop(images: torch.Tensor, min_scale: float, generator: torch.Generator) -> torch.Tensor:
    """uint8 (B, C, H, W): from each image a random box, resized to H x W (bilinear, coordinates
    as F.interpolate's, the box's own edge pixels repeated past it). The box is torchvision's
    RandomResizedCrop's: an area fraction uniform in [min_scale, 1] and a log-uniform aspect
    ratio in 3/4..4/3, the first of RESIZED_CROP_TRIES draws that fits the image, else the
    largest central box of an allowed ratio; every image draws all its tries at once (no host
    sync)."""
    b, _, h, w = images.shape
    dev = images.device
    shape = (b, RESIZED_CROP_TRIES)
    area = h * w * (min_scale + (1 - min_scale) * torch.rand(shape, generator=generator, device=dev))
    low, high = math.log(RESIZED_CROP_RATIO[0]), math.log(RESIZED_CROP_RATIO[1])
    ratio = torch.exp(low + (high - low) * torch.rand(shape, generator=generator, device=dev))
    box_w, box_h = (area * ratio).sqrt().round(), (area / ratio).sqrt().round()
    fits = (box_w >= 1) & (box_w <= w) & (box_h >= 1) & (box_h <= h)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)                     # (B, 1): the first that fits
    box_w, box_h = box_w.gather(1, first)[:, 0], box_h.gather(1, first)[:, 0]
    top = (torch.rand(b, generator=generator, device=dev) * (h - box_h + 1)).floor()
    left = (torch.rand(b, generator=generator, device=dev) * (w - box_w + 1)).floor()
    # none fits: the whole image, cut to the nearest allowed aspect ratio, centred
    central_w = float(min(w, round(h * RESIZED_CROP_RATIO[1])))
    central_h = float(min(h, round(w / RESIZED_CROP_RATIO[0])))
    none = ~fits.any(1)
    box_w, box_h = torch.where(none, central_w, box_w), torch.where(none, central_h, box_h)
    top = torch.where(none, ((h - box_h) / 2).floor(), top)
    left = torch.where(none, ((w - box_w) / 2).floor(), left)
    # output pixel (u, v) reads the box at ((u + 0.5) * box_h / h - 0.5, (v + 0.5) * box_w / w - 0.5),
    # clamped to the box: F.interpolate(box, size=(h, w), mode="bilinear") of the cropped box
    v = torch.arange(w, device=dev, dtype=torch.float32)
    u = torch.arange(h, device=dev, dtype=torch.float32)
    x = left[:, None] + ((v + 0.5) * (box_w[:, None] / w) - 0.5).clamp(min=0).minimum(box_w[:, None] - 1)
    y = top[:, None] + ((u + 0.5) * (box_h[:, None] / h) - 0.5).clamp(min=0).minimum(box_h[:, None] - 1)
    grid = torch.stack(torch.broadcast_tensors((2 * x[:, None, :] + 1) / w - 1, (2 * y[:, :, None] + 1) / h - 1), -1)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


ERASING_AREA = (0.02, 1 / 3)     # random erasing's box: a fraction of the image's area,
ERASING_RATIO = (0.3, 1 / 0.3)   # its aspect ratio (log-uniform), and
ERASING_TRIES = 10               # boxes drawn an image (the first that fits the image is erased)


def random_erasing(images: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Random erasing (Zhong et al., 2020), as timm's RandomErasing in its 'pixel' mode: with
    `probability`, an image of the normalized float batch (B, C, H, W) gets one box filled with
    standard normal noise. The box is drawn as timm draws it: an area fraction uniform in
    ERASING_AREA, a log-uniform aspect ratio in ERASING_RATIO, the first of ERASING_TRIES draws
    smaller than the image (none: the image is left as it is), at a uniform position. Every
    image draws all its tries at once: no host synchronization."""
    b, _, h, w = images.shape
    dev = images.device
    shape = (b, ERASING_TRIES)
    area = h * w * (ERASING_AREA[0] + (ERASING_AREA[1] - ERASING_AREA[0])
                    * torch.rand(shape, generator=generator, device=dev))
    low, high = math.log(ERASING_RATIO[0]), math.log(ERASING_RATIO[1])
    ratio = torch.exp(low + (high - low) * torch.rand(shape, generator=generator, device=dev))
    box_h, box_w = (area * ratio).sqrt().round(), (area / ratio).sqrt().round()
    fits = (box_h < h) & (box_w < w)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)
    box_h, box_w = box_h.gather(1, first), box_w.gather(1, first)                  # (B, 1)
    top = (torch.rand((b, 1), generator=generator, device=dev) * (h - box_h + 1)).floor()
    left = (torch.rand((b, 1), generator=generator, device=dev) * (w - box_w + 1)).floor()
    erased = (torch.rand(b, generator=generator, device=dev) < probability) & fits.any(1)
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    in_rows = (rows >= top) & (rows < top + box_h)                                  # (B, H)
    in_cols = (cols >= left) & (cols < left + box_w)                                # (B, W)
    box = erased[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :]        # (B, H, W)
    noise = torch.randn(images.shape, generator=generator, device=dev, dtype=images.dtype)
    return torch.where(box[:, None], noise, images)


def training_batch(batch_uint8: torch.Tensor, labels: torch.Tensor, aug: Augment, num_classes: int, mean, std,
                   generator: torch.Generator, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A training step's input and soft targets from its uint8 images: augmented (crop, flip,
    TrivialAugment, 3-Augment, colour jitter, cutout), normalized, randomly erased (noise in
    normalized units) and mixed."""
    images = normalize(augment(batch_uint8, aug, generator), mean, std)
    if aug.erasing:
        images = random_erasing(images, aug.erasing, generator)
    return mix(images, labels, num_classes, aug, generator, label_smoothing)


def mix(images: torch.Tensor, labels: torch.Tensor, num_classes: int, aug: Augment,
        generator: torch.Generator, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix (one per batch, each with probability 0.5 when both are on) with soft targets.

    Returns float images and float32 (B, num_classes) targets that sum to 1, label smoothing
    included. Everything stays on the device: no host synchronization per batch.
    """
    if not images.is_floating_point():
        images = images.float()
    targets = F.one_hot(labels, num_classes).float() * (1 - label_smoothing) + label_smoothing / num_classes
    if aug.mixup == 0 and aug.cutmix == 0:
        return images, targets
    b, _, h, w = images.shape
    dev = images.device
    partner = torch.randperm(b, generator=generator, device=dev)
    if aug.mixup > 0 and aug.cutmix > 0:
        use_cutmix = torch.rand((), generator=generator, device=dev) < 0.5
    else:
        use_cutmix = torch.tensor(aug.cutmix > 0, device=dev)
    lam = _sample_beta(torch.where(use_cutmix, aug.cutmix, aug.mixup), generator)
    # CutMix: one box of area about (1 - lam) for the batch; lam becomes the exact area kept.
    cut_h, cut_w = (h * (1 - lam).sqrt()).long(), (w * (1 - lam).sqrt()).long()
    cy = torch.randint(0, h, (), generator=generator, device=dev)
    cx = torch.randint(0, w, (), generator=generator, device=dev)
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    box = (((rows >= cy - cut_h // 2) & (rows < cy + cut_h // 2))[:, None]
           & ((cols >= cx - cut_w // 2) & (cols < cx + cut_w // 2))[None, :])  # (H, W)
    keep = torch.where(use_cutmix, (~box).float(), lam)  # weight of the image itself, (H, W)
    lam = torch.where(use_cutmix, keep.mean(), lam)
    other = images[partner]
    mixed = other + (images - other) * keep.to(images.dtype)
    return mixed, lam * targets + (1 - lam) * targets[partner]


def _sample_beta(alpha: torch.Tensor, generator: torch.Generator, tries: int = 16) -> torch.Tensor:
    """Beta(alpha, alpha) as a 0-d tensor, from two Gamma(alpha) draws (Marsaglia & Tsang, 2000).

    torch.distributions cannot draw from a given generator. Each Gamma draw takes the first
    accepted of `tries` candidates (acceptance is above 95% each); shapes below 1 use
    Gamma(a) = Gamma(a + 1) * U^(1/a). Logs and a sigmoid keep tiny alphas free of 0/0.
    """
    dev = alpha.device
    small = alpha < 1
    a = torch.where(small, alpha + 1, alpha)
    d = a - 1 / 3
    c = 1 / (9 * d).sqrt()
    x = torch.randn(2, tries, generator=generator, device=dev)
    u = torch.rand(2, tries, generator=generator, device=dev)
    v = ((1 + c * x) ** 3).clamp_min(1e-12)
    accepted = ((1 + c * x) > 0) & (u.log() < 0.5 * x * x + d - d * v + d * v.log())
    first = accepted.to(torch.uint8).argmax(1, keepdim=True)  # (2, 1)
    log_gamma = (d * v.gather(1, first)).squeeze(1).log()  # (2,)
    boost = torch.rand(2, generator=generator, device=dev).clamp_min(1e-12).log() / alpha
    log_gamma = log_gamma + torch.where(small, boost, torch.zeros_like(boost))
    return torch.sigmoid(log_gamma[0] - log_gamma[1])
