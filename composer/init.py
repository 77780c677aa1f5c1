"""`composer init`: a starting spec for a dataset and an architecture.

    composer init my_vit.yaml --data ~/images/train --arch vit
    composer init c100.yaml --data cifar100 --arch convmixer
    composer init ft.yaml --data ~/images/train --from runs/siglip    # fine-tune a run or an import

For an image folder it counts the classes and images and samples the images' sizes; the spec
then takes the image size from them, a patch size that gives the architecture its usual grid,
a batch size the data can fill, and the augmentation recipe of the project's CIFAR specs
(crop and flip for small images, random resized crops for larger ones, TrivialAugment). The
recipes are those of specs/*_cifar.yaml; the file is validated before it is written. With
--from, the model is a trained run's (or `composer import`'s), for the data's classes, and the
recipe fine-tunes it (FINE_TUNE).
"""
from __future__ import annotations

import collections
import math
import statistics
from pathlib import Path

import yaml

from composer.errors import UserError

ARCHS = ("vit", "mixer", "convmixer", "mixer+vit", "convmixer+mixer", "convnext+vit")
BUILTIN = {   # kind -> (image size, channels, classes, train images, mirror images)
    "cifar10": (32, 3, 10, 45_000, True), "cifar100": (32, 3, 100, 45_000, True),
    "mnist": (28, 1, 10, 54_000, False), "fashion_mnist": (28, 1, 10, 54_000, True),
    "digits": (8, 1, 10, 1_617, False), "synthetic": (32, 3, 10, 461, True),
}
IMAGE_SIZES = (32, 48, 64, 96, 128, 160, 192, 224)   # chosen from, for images of 32 pixels and more
SIZE_SAMPLE = 256   # images whose size is read (headers only)


def grid_patch(size: int, target: int, multiple: int = 1) -> int:
    """The patch size that divides `size` and gives a grid side closest to `target` (the larger
    patch on a tie: fewer tokens), the side a multiple of `multiple` (what later downsampling needs)."""
    fitting = [p for p in range(1, size + 1) if size % p == 0 and (size // p) % multiple == 0]
    if not fitting:
        raise UserError(f"no patch size cuts {size}-pixel images into a grid whose side is a multiple of {multiple}, "
                        "as this architecture's two downsample blocks need; give --image-size (e.g. 32)")
    return min(fitting, key=lambda p: (abs(size // p - target), -p))


SMALL_DATA = 5_000   # training images below which the model is halved in width and depth


def model_section(arch: str, size: int, channels: int, classes: int, small: bool = False) -> dict:
    """The model of `arch` at `size`: the shipped CIFAR recipes, with the patch size that keeps
    their grid (ViT and Mixer about 8 patches a side at 32-64 pixels, 12-14 beyond; ConvMixer 32);
    `small` (little data): half their width and depth."""
    model = _recipe(arch, size, channels, classes)
    if small:
        model["stem"]["dim"] //= 2
        for block in model["blocks"]:
            if "repeat" in block:   # not a downsample's (its factor would apply twice)
                block["repeat"] = max(1, block["repeat"] // 2)
            if "token_hidden" in block:
                block["token_hidden"] //= 2
    return model


def _recipe(arch: str, size: int, channels: int, classes: int) -> dict:
    tokens_side = 8 if size <= 64 else (12 if size < 160 else 14)
    model = {"image_size": size, "in_channels": channels, "num_classes": classes}
    if arch == "vit":
        model |= {"stem": {"patch_size": grid_patch(size, tokens_side), "dim": 192}, "pos_embed": "learned",
                  "blocks": [{"kind": "vit", "heads": 3, "mlp_ratio": 2, "drop_path": 0.05, "repeat": 6}],
                  "head": {"pool": "cls"}}
    elif arch == "mixer":
        model |= {"stem": {"patch_size": grid_patch(size, tokens_side), "dim": 256},
                  "blocks": [{"kind": "mixer", "token_hidden": 128, "mlp_ratio": 4, "drop_path": 0.1, "repeat": 8}],
                  "head": {"pool": "mean"}}
    elif arch == "mixer+vit":
        model |= {"stem": {"patch_size": grid_patch(size, tokens_side), "dim": 256}, "pos_embed": "learned",
                  "blocks": [{"kind": "mixer", "token_hidden": 128, "mlp_ratio": 4, "drop_path": 0.1, "repeat": 4},
                             {"kind": "vit", "heads": 4, "mlp_ratio": 2, "drop_path": 0.1, "repeat": 2}],
                  "head": {"pool": "mean"}}
    elif arch == "convmixer":
        patch = grid_patch(size, 32)
        model |= {"stem": {"patch_size": patch, "dim": 256, "activation": "gelu", "norm": "batchnorm"},
                  "blocks": [{"kind": "convmixer", "kernel_size": 9 if size // patch >= 16 else 5, "repeat": 8}],
                  "head": {"pool": "mean"}}
    elif arch == "convmixer+mixer":
        model |= {"stem": {"patch_size": grid_patch(size, 16), "dim": 256, "activation": "gelu", "norm": "batchnorm"},
                  "blocks": [{"kind": "convmixer", "kernel_size": 5, "repeat": 4},
                             {"kind": "mixer", "token_hidden": 256, "mlp_ratio": 4, "drop_path": 0.1, "repeat": 4}],
                  "head": {"pool": "mean"}}
    elif arch == "convnext+vit":   # hierarchical: the grid shrinks 4x over two downsample blocks
        model |= {"stem": {"patch_size": grid_patch(size, 16 if size <= 64 else 28, multiple=4), "dim": 64,
                           "norm": "layernorm"},
                  "pos_embed": "rope", "drop_path": 0.1,
                  "blocks": [{"kind": "convnext", "kernel_size": 7, "repeat": 2}, {"kind": "downsample"},
                             {"kind": "convnext", "kernel_size": 7, "repeat": 2}, {"kind": "downsample"},
                             {"kind": "vit", "heads": 4, "mlp_ratio": 4, "repeat": 4}],
                  "head": {"pool": "mean"}}
    else:
        raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return model


def train_section(arch: str, train_images: int) -> dict:
    """The CIFAR recipes' optimization at a batch size the data fills (at least ten steps an
    epoch; the learning rate scaled by the square root of the batch, as Adam's noise goes)."""
    batch = 2 ** max(4, min(9, int(math.log2(max(16, train_images // 10)))))
    batch = min(batch, 2 ** int(math.log2(max(1, train_images))))   # never more than the data holds
    scale = math.sqrt(batch / 512)
    if arch == "convmixer":
        return {"epochs": 50, "batch_size": batch,
                "optimizer": {"kind": "adamw", "lr": _round(1e-2 * scale), "weight_decay": 0.01},
                "schedule": {"kind": "onecycle"}, "label_smoothing": 0.1, "grad_clip": 1.0}
    return {"epochs": 100, "batch_size": batch,
            "optimizer": {"kind": "adamw", "lr": _round(2e-3 * scale), "weight_decay": 0.05},
            "schedule": {"kind": "cosine", "warmup_epochs": 5}, "label_smoothing": 0.1, "grad_clip": 1.0}


def augment_section(size: int, mirror: bool) -> dict:
    """Crop and flip for small images (the CIFAR recipe), random resized crops past 64 pixels
    (the ImageNet recipe, gentler); TrivialAugment for colour images of 32 pixels and more."""
    out = {"crop_padding": max(1, size // 8)} if size <= 64 else {"resized_crop": 0.35}
    out["hflip"] = mirror
    out["trivial"] = mirror and size >= 32
    return out


def inspect_folder(root: str, cache_dir: str | None = None, labels: str | None = None) -> dict:
    """Classes, image count, typical size and colour of an image folder (or archive), its classes
    named by subfolders or by the CSV file `labels`."""
    from PIL import Image

    from composer.data import scan_folder

    files, classes = scan_folder(root, cache_dir, labels)
    if not files:
        raise UserError(f"{root} holds no images in its class subfolders")
    step = max(1, len(files) // SIZE_SAMPLE)
    sides, modes = [], set()
    for path, _ in files[::step][:SIZE_SAMPLE]:
        try:
            with Image.open(path) as image:   # reads the header only
                sides.append(min(image.size))
                modes.add(image.mode)
        except OSError:
            continue   # training names an unreadable image; the sample just skips it
    if not sides:
        raise UserError(f"none of the sampled images in {root} can be read; check that they are images")
    per_class = collections.Counter(label for _, label in files)
    return {"classes": len(classes), "images": len(files), "side": int(statistics.median(sides)),
            "gray": modes <= {"L", "1", "I", "I;16", "LA"},
            "imbalance": max(per_class.values()) / min(per_class.values())}


def choose_size(side: int) -> int:
    """Images of 32 pixels and more: the largest of IMAGE_SIZES within their (median) shorter side;
    smaller ones keep their size."""
    if side < 32:
        return max(side, 4)
    return max(s for s in IMAGE_SIZES if s <= side)


def write_init(out: str, data: str, arch: str | None = None, val: str | None = None, image_size: int | None = None,
               root: str | None = None, force: bool = False, labels: str | None = None,
               source: str | None = None) -> dict:
    """Write a spec for `data` (a built-in dataset's name, or an image folder / archive) and `arch`
    (default vit), or for fine-tuning the model of the run or checkpoint `source` on it."""
    from composer.build import build_model, count_params
    from composer.spec import load_spec_text

    if source and arch:
        raise UserError("--from fine-tunes a run's model and --arch picks a new one; give one of them")
    pretrained = _pretrained_model(source) if source else None
    arch = arch or "vit"
    path = Path(out)
    if path.suffix not in (".yaml", ".yml"):
        raise UserError(f"{out}: a spec is a .yaml file; name it e.g. {path.with_suffix('.yaml').name}")
    if path.exists() and not force:
        raise UserError(f"{out} already exists; choose another name, or pass --force to replace it")
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if data in BUILTIN:
        if val or labels:
            raise UserError(f"--{'val' if val else 'labels'} is for image folders; {data} has its own "
                            + ("split" if val else "labels"))
        native, channels, classes, train_images, mirror = BUILTIN[data]
        data_section = {"kind": data}
        if data not in ("digits", "synthetic"):
            data_section |= {"root": root or f"data/{data}", "download": True}
        found = f"{data}: {classes} classes, {train_images:,} training images of {native}x{native}"
        size = native
    else:
        facts = inspect_folder(data, labels=labels)
        classes, channels, mirror = facts["classes"], 1 if facts["gray"] else 3, True
        held_out = 0.0 if val else 0.1
        train_images = int(facts["images"] * (1 - held_out))
        data_section = {"kind": "folder", "root": str(Path(data).expanduser().resolve())}
        if labels:
            data_section["labels"] = str(Path(labels).expanduser().resolve())
        data_section |= {"val_root": str(Path(val).expanduser().resolve())} if val else {"val_split": 0.1}
        size = choose_size(facts["side"])
        found = (f"{data}: {classes} classes, {facts['images']:,} images, median shorter side {facts['side']} px"
                 + (", grayscale" if facts["gray"] else ""))
    resize = None
    if pretrained is not None and not image_size:   # the run's own input size
        image_size = pretrained["model"].get("resize") or pretrained["model"]["image_size"]
    if image_size and data in BUILTIN and image_size != size:
        resize = image_size   # the dataset's images come at their size; the model enlarges them
    elif image_size:
        size = image_size
    if pretrained is not None:
        model = {**pretrained["model"], "image_size": resize or size, "num_classes": classes}
        model.pop("resize", None)
    else:
        model = model_section(arch, resize or size, channels, classes, small=train_images < SMALL_DATA)
    if resize:
        model = {"image_size": size, "resize": resize, **{k: v for k, v in model.items() if k != "image_size"}}
    data_section["augment"] = augment_section(size, mirror)
    name = path.stem
    train = train_section(arch, train_images) if pretrained is None else fine_tune_section(train_images, pretrained)
    if data not in BUILTIN and facts["imbalance"] >= 5:   # as the training log would say
        train["class_weights"] = "balanced"
        if not val:   # every class validated in proportion
            data_section["stratify"] = True
        found += (f", the largest class {facts['imbalance']:.0f}x the smallest (class_weights: balanced"
                  + (", stratify: true)" if not val else ")"))
    what = f"{pretrained['name']}'s model fine-tuned" if pretrained is not None else arch
    spec = {"name": name, "description": f"{what} for {found.split(':')[0]}, written by composer init",
            "model": model, "data": data_section, "train": train}
    notes = [found, "written by composer init; every key: composer schema, or the README's spec section"]
    if pretrained is not None:
        notes += [f"starts from {train['init_from']} (train.init_from; inputs normalized as its weights were "
                  "trained); the learning rate is a cautious start: composer lr-find measures one",
                  "train.freeze: backbone trains the classifier alone (a linear probe: little data, or a quick look)"]
    if data not in BUILTIN:
        notes.append("data.augment.hflip: set it to false if a mirrored image is another class (text, digits)")
    text = ("".join(f"# {note}\n" for note in notes)
            + yaml.safe_dump(spec, sort_keys=False, default_flow_style=None, width=110))
    parsed = load_spec_text(text, str(path))   # never write a spec that does not load
    params = count_params(build_model(parsed))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    return {"path": str(path), "found": found, "params": params, "spec": parsed}


FINE_TUNE = {"lr": 1e-4, "layer_decay": 0.75, "batch": 128}   # AdamW at batch 128; scaled by sqrt(batch)


def _pretrained_model(source: str) -> dict:
    """The run or checkpoint `source`: its model section ("model"), name, and where it is ("path")."""
    from composer.checkpoint import find_checkpoint, load_checkpoint, spec_from_checkpoint

    try:
        path = find_checkpoint(source)
        state = load_checkpoint(path, fix="give --from a run directory or a checkpoint written by composer train "
                                          "or composer import")
    except UserError as exc:
        raise UserError(f"--from: {exc}") from None
    spec = spec_from_checkpoint(state, str(path))
    model = spec.model.model_dump(mode="json", exclude_defaults=True)
    model["blocks"] = [{"kind": block.pop("kind"), **block} for block in model["blocks"]]   # the kind first, to read
    return {"model": model, "name": spec.name, "path": str(Path(source).expanduser().resolve())}


def fine_tune_section(train_images: int, pretrained: dict) -> dict:
    """Fine-tuning a pretrained model: AdamW at a low rate (FINE_TUNE, scaled by the square root
    of the batch), layer-wise decay, a short warmup and cosine, fewer epochs than from scratch;
    the batch the data fills, at most 128 (a large model's activations)."""
    batch = 2 ** max(3, min(7, int(math.log2(max(8, train_images // 10)))))
    batch = min(batch, 2 ** int(math.log2(max(1, train_images))))
    lr = _round(FINE_TUNE["lr"] * math.sqrt(batch / FINE_TUNE["batch"]))
    return {"epochs": 30 if train_images < 20_000 else 10, "batch_size": batch,
            "optimizer": {"kind": "adamw", "lr": lr, "weight_decay": 0.05, "layer_decay": FINE_TUNE["layer_decay"]},
            "schedule": {"kind": "cosine", "warmup_epochs": 1}, "label_smoothing": 0.1, "grad_clip": 1.0,
            "init_from": pretrained["path"]}


def _round(lr: float) -> float:
    """Two significant digits: a learning rate a person would write."""
    return float(f"{lr:.2g}")
