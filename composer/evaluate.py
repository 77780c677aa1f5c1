"""Accuracy and loss of a model on an ImageSet; `composer evaluate` on a trained run."""
from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from composer.errors import UserError
from composer.merging import describe, merge_note, merging


@torch.no_grad()
def evaluate_model(model, images: torch.Tensor, labels: torch.Tensor, mean, std, *, batch_size: int = 512,
                   autocast_dtype: torch.dtype | None = None, num_classes: int | None = None,
                   device: torch.device | None = None, flip: bool = False) -> dict:
    """Top-1 / top-5 accuracy, mean cross-entropy, per-class accuracy and the confusion matrix (a
    (K, K) int64 tensor: row = true class, column = top-1 prediction) over uint8 `images` (N, C, H, W)
    and `labels`, on `device` (default: the images'); images elsewhere are copied over a batch at a time.
    `flip`: test-time augmentation, each image's class probabilities averaged with its mirror image's.
    A model with a distillation token (DeiT) also gets each classifier's accuracy (`classifiers`)."""
    from composer.build import DistilledLogits, each_classifier
    from composer.data import normalize

    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else images.device
    labels = labels.to(device)
    k_all = num_classes or int(labels.max().item()) + 1
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top5 = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(k_all * k_all, dtype=torch.int64, device=device)
    each_hits = {"class token": torch.zeros((), dtype=torch.int64, device=device),
                 "distillation token": torch.zeros((), dtype=torch.int64, device=device)}
    with each_classifier(model) as distilled:
        for start in range(0, images.shape[0], batch_size):
            x = normalize(images[start:start + batch_size].to(device, non_blocking=True), mean, std)
            y = labels[start:start + batch_size]
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                views = [model(x)] + ([model(x.flip(-1))] if flip else [])
            if distilled:   # DistilledLogits: the model's prediction is their mean
                for name, field in (("class token", "cls"), ("distillation token", "dist")):
                    each_hits[name] += (_averaged([getattr(v, field) for v in views]).argmax(1) == y).sum()
            logits = _averaged([v.mean() if isinstance(v, DistilledLogits) else v for v in views])
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            best = logits.topk(min(5, logits.shape[1]), dim=1).indices
            top5 += (best == y[:, None]).any(dim=1).double().sum()
            confusion.index_add_(0, y * k_all + best[:, 0], torch.ones_like(y))
    model.train(was_training)
    confusion = confusion.view(k_all, k_all).cpu()
    count, hits = confusion.sum(1), confusion.diagonal()
    total = max(int(count.sum()), 1)
    classifiers = {"classifiers": {name: int(h) / total for name, h in each_hits.items()}} if distilled else {}
    return {**classifiers,
        "images": int(count.sum()),
        "loss": float(loss_sum) / total,
        "accuracy": int(hits.sum()) / total,
        "top5": float(top5) / total,
        "per_class": [h / c if c else None for h, c in zip(hits.tolist(), count.tolist())],
        # the mean of the per-class accuracies (classes with images): what accuracy hides on imbalanced data
        "balanced_accuracy": float((hits[count > 0] / count[count > 0]).mean()) if int(count.sum()) else 0.0,
        "confusion": confusion,
    }


def classify(model, x: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """The model's float logits for normalized images `x`; with `flip`, the log of the class
    probabilities averaged over each image and its horizontal mirror (a log-probability is a
    logit: softmax and cross-entropy read it as they read logits)."""
    return _averaged([model(x)] + ([model(x.flip(-1))] if flip else []))


def _averaged(views: list[torch.Tensor]) -> torch.Tensor:
    """Float logits of one view, or of the class probabilities averaged over two (an image and its mirror)."""
    if len(views) == 1:
        return views[0].float()
    first, mirrored = (v.float().log_softmax(-1) for v in views)
    return torch.logaddexp(first, mirrored) - math.log(2.0)


def classifiers_note(result: dict) -> str:
    """ "class token 0.7100, distillation token 0.7300": a distilled model's classifiers alone
    (evaluate_model's `classifiers`), or "" for other models."""
    each = result.get("classifiers")
    return ", ".join(f"{name} {accuracy:.4f}" for name, accuracy in each.items()) if each else ""


def load_at_size(target: str, device: torch.device, image_size: int | None):
    """(spec, model in eval mode, checkpoint, what was resized or None) of a run at the input size
    `image_size` (None: its own): the spec's input size changed (`model.resize` where the model
    resizes its input or the data comes decoded; else `model.image_size`, the size image files
    are decoded at), the weights carried over as fine-tuning carries them (a learned position
    table resized over the new grid)."""
    from composer.build import build_model
    from composer.checkpoint import init_from_run, load_run
    from composer.spec import SpecError, load_spec_text

    spec, model, state = load_run(target, device=device)
    if image_size is None or image_size == spec.model.input_size:
        return spec, model, state, None
    field = "model.resize" if spec.model.resize or spec.data.kind != "folder" else "model.image_size"
    try:
        sized = load_spec_text(state["spec_yaml"], f"{target} (its spec)", [f"{field}={image_size}"])
        model = build_model(sized)
        with torch.no_grad():
            said = init_from_run(model, sized, target)
    except (SpecError, UserError) as exc:
        raise UserError(f"--image-size {image_size}: {exc}") from None
    resized = [part for part in said.split(", ") if part.startswith("resized ")]
    return sized, model.to(device).eval(), state, "; ".join(resized) or "nothing to resize"


@contextmanager
def merged_tokens(model, merge: int | None):
    """Within it, `model` merges `merge` tokens in each merging block (composer.merging; None: as it
    was built, model.token_merging); yields what it does (composer.merging.describe), or None when
    it merges nothing."""
    own = model.token_merging.r if model.token_merging is not None else 0
    merge = own if merge is None else merge
    if not merge and not own:
        yield None
        return
    with merging(model, merge):
        yield describe(model, merge) if merge else None   # (0: --merge 0 on a model trained merging)


def most_confused(confusion: torch.Tensor, classes: list[str], top: int = 5) -> list[dict]:
    """The `top` largest off-diagonal cells: which true class is most often taken for which other."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    count = confusion.sum(1)
    values, cells = off.flatten().topk(min(top, off.numel()))
    k = confusion.shape[0]
    return [{"true": classes[c // k], "predicted": classes[c % k], "images": v,
             "fraction_of_true": v / int(count[c // k])}
            for v, c in zip(values.tolist(), cells.tolist()) if v > 0]


def evaluate(target: str, *, data_root: str | None = None, split: str | None = None, batch_size: int = 256,
             device: str = "auto", flip: bool = False, labels: str | None = None, crop: float | None = None,
             image_size: int | None = None, merge: int | None = None) -> dict:
    """Evaluate the run directory or checkpoint `target` on its data (or on `data_root`, whose
    images `labels`, a CSV of image,class rows, may name the classes of); `crop`: decode image files'
    centres so (data.crop; the run's own by default); `image_size`: at that input size
    (`load_at_size`); `merge`: with that many tokens merged in each merging attention block
    (composer.merging). The result's `img_per_s` is the throughput of the whole evaluation."""
    if labels and not data_root:
        raise UserError("--labels names the classes of the images in --data-root; give --data-root too (the run's "
                        "own data takes its labels from the spec)")
    from composer.checkpoint import find_checkpoint, needs_classifier
    from composer.data import load_split
    from composer.train import precision, resolve_device

    dev = resolve_device(device)
    spec, model, state, resized = load_at_size(target, dev, image_size)
    needs_classifier(state, target, "evaluate")
    autocast, _ = precision(spec, dev) if not (dev.type == "cpu" and spec.train.precision == "fp16") else (None, False)
    if split is None:
        split = "val" if (spec.data.kind in ("folder", "digits") and not data_root) else "test"
    data_spec = spec.data
    if crop is not None:
        if spec.data.kind != "folder":
            raise UserError(f"--crop is how image files are decoded; the run's {spec.data.kind} images come decoded")
        data_spec = spec.data.model_copy(update={"crop": crop})
    data = load_split(data_spec, spec.model, split, data_root=data_root, labels=labels)
    classes = state.get("classes")
    if classes and data.classes and list(data.classes) != list(classes):
        folder = (data_root or (spec.data.val_root if split == "val" and spec.data.val_root else spec.data.root)
                  or f"the {spec.data.kind} data")
        raise UserError(f"the classes of {folder} ({', '.join(data.classes[:5])}...) differ "
                        f"from the run's ({', '.join(classes[:5])}...); evaluate on data with the same class folders")
    mean, std = state["normalization"]["mean"], state["normalization"]["std"]
    with merged_tokens(model, merge) as merged:
        start = time.perf_counter()
        # the images stay in host memory, each batch copied over: a test set need not fit on the GPU
        result = evaluate_model(model, data.images, data.labels, mean, std, batch_size=batch_size,
                                autocast_dtype=autocast, num_classes=spec.model.num_classes, device=dev, flip=flip)
        result["img_per_s"] = result["images"] / max(time.perf_counter() - start, 1e-9)   # (read back: synced)
    if merged:
        result["merge"] = merged
    if flip and not spec.data.augment.hflip:
        result["note"] = ("the run trained without mirrored images (data.augment.hflip: false), so --flip shows it "
                          "images unlike its training data")
    names = list(data.classes or classes or [str(i) for i in range(spec.model.num_classes)])
    if resized:
        result["resized"] = resized
    result.update({"spec": spec.name, "split": split, "flip": flip, "checkpoint": str(find_checkpoint(target)),
                   "image_size": spec.model.input_size,
                   "epoch": state.get("epoch"), "classes": names,
                   "most_confused": most_confused(result["confusion"], names),
                   "confusion": result["confusion"].tolist()})
    return result


def render(result: dict) -> str:
    lines = [f"{result['spec']} on {result['split']} ({result['images']} images, epoch {result['epoch']}"
             + (f", at {result['image_size']} px: {result['resized']}" if result.get("resized") else "")
             + (", each averaged with its mirror image" if result.get("flip") else "") + "):",
             f"  accuracy {result['accuracy']:.4f}   balanced {result['balanced_accuracy']:.4f}   "
             f"top-5 {result['top5']:.4f}   loss {result['loss']:.4f}"
             + (f"   {result['img_per_s']:,.0f} img/s" if "img_per_s" in result else "")]
    if result.get("merge"):
        lines.append(f"  {merge_note(result['merge'])}")
    if result.get("classifiers"):   # DeiT's two: the accuracy above is their mean's
        lines.append(f"  each classifier alone: {classifiers_note(result)} (the model predicts with their mean)")
    for name, acc in zip(result["classes"], result["per_class"]):
        lines.append(f"  {name:>16s}  {'-' if acc is None else f'{acc:.4f}'}")
    if result.get("note"):
        lines.append(f"  note: {result['note']}")
    if result["most_confused"]:
        lines.append("  most confused (true -> predicted):")
        for cell in result["most_confused"]:
            lines.append(f"  {cell['true']:>16s} -> {cell['predicted']:<16s} {cell['images']:>6d} image{'s' * (cell['images'] != 1)} "
                         f"({cell['fraction_of_true']:.1%} of {cell['true']})")
    return "\n".join(lines)


@torch.no_grad()
def predict(target: str, paths: list[str], *, top: int = 5, batch_size: int = 256, device: str = "auto",
            flip: bool = False, crop: float | None = None, image_size: int | None = None,
            merge: int | None = None) -> dict:
    """The classes a trained run (directory or checkpoint) gives the images at `paths` (files or
    folders of them): for each image, its `top` classes with their softmax probabilities. Images
    are decoded as the run's data was (its data.crop, or `crop`); `merge`: as evaluate's."""
    from composer.checkpoint import find_checkpoint, needs_classifier
    from composer.data import decode_files, image_files, normalize
    from composer.train import precision, resolve_device

    dev = resolve_device(device)
    spec, model, state, _ = load_at_size(target, dev, image_size)
    needs_classifier(state, target, "predict")
    files = image_files(paths)
    classes = state.get("classes") or [str(i) for i in range(spec.model.num_classes)]
    mean, std = state["normalization"]["mean"], state["normalization"]["std"]
    autocast, _ = precision(spec, dev) if not (dev.type == "cpu" and spec.train.precision == "fp16") else (None, False)
    k = min(top, spec.model.num_classes)
    rows = []
    with merged_tokens(model, merge) as merged:
        for start in range(0, len(files), batch_size):   # decoded a batch at a time: any number of images
            decoded = decode_files(files[start:start + batch_size], spec.model,
                                   crop if crop is not None else spec.data.crop)
            x = normalize(decoded.to(dev), mean, std)
            with torch.autocast(dev.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                probs = classify(model, x, flip).softmax(-1)
            best = probs.topk(k, dim=-1)
            for i, (p, c) in enumerate(zip(best.values.tolist(), best.indices.tolist())):
                rows.append({"image": files[start + i],
                             "top": [{"class": classes[j], "probability": q} for q, j in zip(p, c)]})
    return {"spec": spec.name, "checkpoint": str(find_checkpoint(target)), "epoch": state.get("epoch"),
            "predictions": rows, **({"merge": merged} if merged else {})}


def write_predictions_csv(result: dict, path: str) -> None:
    """Each image's top class as image,class,probability rows (the images as predict found them)."""
    import csv

    try:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "class", "probability"])
            for row in result["predictions"]:
                writer.writerow([row["image"], row["top"][0]["class"], f"{row['top'][0]['probability']:.6f}"])
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def render_predictions(result: dict) -> str:
    lines = [f"{result['spec']} (epoch {result['epoch']}), {len(result['predictions'])} images:"]
    if result.get("merge"):
        lines.append(f"  {merge_note(result['merge'])}")
    for row in result["predictions"]:
        guesses = "  ".join(f"{g['class']} {g['probability']:.3f}" for g in row["top"])
        lines.append(f"  {row['image']}: {guesses}")
    return "\n".join(lines)
