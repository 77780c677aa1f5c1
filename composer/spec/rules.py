"""Cross-field rules, checked when a spec loads, before any tensor exists.

Each finding is (path, message, inputs): the path is a tuple into the YAML data,
so the loader can point at the line; the inputs are the paths of every value the
rule read, so that a finding resting on a value the loader had to replace (an
invalid one) can be dropped instead of reported. Messages say what to change.
"""
from __future__ import annotations

from composer.spec.data import DataSpec
from composer.spec.model import ModelSpec
from composer.spec.train import TrainSpec

# The layout each block kind consumes: tokens (B, N, C) or grid (B, C, H, W).
LAYOUTS = {
    "attention": "tokens", "token_mlp": "tokens", "channel_mlp": "tokens", "vit": "tokens", "mixer": "tokens",
    "pool": "tokens", "poolformer": "tokens",
    "dwconv": "grid", "pointwise": "grid", "convmixer": "grid", "convnext": "grid", "downsample": "grid",
}
# What the built-in datasets hold: classes, image side, channels (a grayscale set also feeds
# an RGB model, its channel repeated).
DATASET_CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10, "fashion_mnist": 10, "digits": 10}
DATASET_SIZES = {"cifar10": 32, "cifar100": 32, "mnist": 28, "fashion_mnist": 28}
DATASET_CHANNELS = {"cifar10": 3, "cifar100": 3, "mnist": 1, "fashion_mnist": 1, "digits": 1}
DOWNLOADABLE = ("cifar10", "cifar100", "mnist", "fashion_mnist")  # torchvision sets: data.root needed


def divisors(n: int, limit: int | None = None) -> list[int]:
    found = [d for d in range(1, n + 1) if n % d == 0]
    return [d for d in found if limit is None or d <= limit]


Finding = tuple[tuple, str, tuple[tuple, ...]]


def check(m: ModelSpec | None, d: DataSpec | None, t: TrainSpec | None = None) -> list[Finding]:
    """Problems of the model section alone, of model and data together when both are valid, and
    of the train section."""
    problems: list[Finding] = (_check_train(t) if t is not None else []) + (_check_data(d) if d is not None else [])
    if t is not None and d is not None and t.patience and d.held_out == 0 and not d.val_root:
        patience = ("train", "patience")
        problems.append((patience, "early stopping watches the validation accuracy, but there is no validation "
                                   "split; set data.val_split (e.g. 0.1) or remove train.patience",
                         (patience, ("data", "val_split"), ("data", "val_root"))))
    if m is None:
        return problems
    size, patch = m.input_size, m.stem.patch_size
    size_field = "resize" if m.resize else "image_size"
    patch_path, dim_path = ("model", "stem", "patch_size"), ("model", "stem", "dim")
    size_paths = (("model", "image_size"), ("model", "resize"))  # either decides the size

    if size % patch:
        problems.append((patch_path, f"{patch} does not divide the {size_field} {size} "
                                     f"(try {_list(divisors(size, 32))})", (patch_path,) + size_paths))
    elif m.stem.kind == "convs" and (patch < 2 or patch & (patch - 1)):
        powers = [p for p in divisors(size, 32) if p >= 2 and p & (p - 1) == 0]
        problems.append((patch_path, f"{patch} is not a power of two: the convs stem halves the image with each "
                                     "of its stride-2 convolutions " + (f"(try {_list(powers)})" if powers else
                                     f"(no power of two divides the {size_field} {size}; use kind: conv)"),
                         (patch_path, ("model", "stem", "kind")) + size_paths))

    stages, grid_exact = m.stages(), True
    for i, block in enumerate(m.blocks):
        where = ("model", "blocks", i)
        dim, side = stages[i]
        # What a block gets comes from the stem and every downsample before it; an earlier block
        # swapped for a stand-in (its kind among the replaced values) might have been one.
        before = [("model", "blocks", j) for j in range(i)]
        earlier = tuple(p + ("kind",) for p in before) + tuple(
            p + (field,) for p in before if m.blocks[p[2]].kind == "downsample" for field in ("dim", "factor", "repeat"))
        dim_paths = (dim_path,) + earlier                       # what its width rests on
        shape_paths = dim_paths + (patch_path,) + size_paths    # and its grid
        width = f"dim {dim}" if dim == m.stem.dim else f"the {dim} channels it gets"
        heads = getattr(block, "heads", None)
        if heads is not None and dim % heads:
            problems.append((where + ("heads",), f"{heads} does not divide {width} "
                                                 f"(try {_list(divisors(dim, 32))})", (where + ("heads",),) + dim_paths))
        elif heads is not None and m.pos_embed == "rope" and (dim // heads) % 4:
            fitting = [h for h in divisors(dim, 32) if (dim // h) % 4 == 0]
            problems.append((where + ("heads",), f"{heads} heads of dim {dim} have {dim // heads} channels each; "
                                                 "rope turns them in pairs along two axes, so it needs a multiple of "
                                                 "4 " + (f"(try heads: {_list(fitting)})" if fitting else
                                                         f"(no head count fits dim {dim}: make it a multiple of 4)"),
                             (where + ("heads",), ("model", "pos_embed")) + dim_paths))
        problems += _window_problems(m, i, side, shape_paths, exact=grid_exact and size % patch == 0)
        if block.kind == "downsample" and side % block.factor ** block.repeat and size % patch == 0 and grid_exact:
            grid_exact = False   # the grids after this one are not what the user meant: no findings on them
            factor = where + ("factor",)
            times = f", {block.repeat} times over ({block.factor ** block.repeat}x)," if block.repeat > 1 else ""
            fitting = [f for f in divisors(side) if f > 1 and side % f ** block.repeat == 0]
            most = max((r for r in range(1, block.repeat) if side % block.factor ** r == 0), default=0)
            problems.append((factor, f"{block.factor}{times} does not divide the {side}x{side} grid it gets "
                                     + (f"(try factor: {_list(fitting)})" if fitting else
                                        f"(try repeat: {most})" if most else
                                        "(no factor does: change model.stem.patch_size or an earlier downsample, or "
                                        "remove this one)"),
                             (factor, where + ("repeat",)) + shape_paths))
        if block.kind == "downsample" and block.style == "merge" and block.norm == "batchnorm":
            problems.append((where + ("norm",), "patch merging normalizes each merged patch's values: layernorm or "
                                                "none (batchnorm goes with style: conv)",
                             (where + ("norm",), where + ("style",))))
        for field in ("kernel_size", "pool_size"):
            k = getattr(block, field, None)
            if k is not None and k % 2 == 0:
                problems.append((where + (field,), f"{k} is even; 'same' padding needs an odd {field.replace('_', ' ')} "
                                                   f"(try {k - 1} or {k + 1})", (where + (field,),)))

    depth = sum(block.repeat for block in m.blocks)
    if t is not None and isinstance(t.freeze, int) and t.freeze > depth:
        freeze = ("train", "freeze")
        problems.append((freeze, f"{t.freeze} blocks to freeze, but the model has {depth} (each repeat counts, a "
                                 f"vit, mixer or convmixer block is one); give at most {depth}, or 'backbone' to "
                                 "train the head alone", (freeze, ("model", "blocks"))))

    last_layout = LAYOUTS[m.blocks[-1].kind]
    pool_path, last_block = ("model", "head", "pool"), ("model", "blocks", len(m.blocks) - 1)
    if m.head.pool == "cls" and last_layout != "tokens":
        problems.append((pool_path, f"cls pooling needs token layout at the end, but the last block "
                                    f"({m.blocks[-1].kind}) works on the grid; use pool: mean or end with a token block",
                         (pool_path, last_block)))
    if m.norm_pre and LAYOUTS[m.blocks[0].kind] != "tokens":
        problems.append((("model", "norm_pre"), f"norm_pre normalizes the tokens before the first block, but "
                                                f"blocks[0] ({m.blocks[0].kind}) works on the grid; start with a token "
                                                "block or remove norm_pre", (("model", "norm_pre"),
                                                                              ("model", "blocks", 0, "kind"))))
    if m.head.pool == "attention" and last_layout != "tokens":
        problems.append((pool_path, f"attention pooling attends over tokens, but the last block "
                                    f"({m.blocks[-1].kind}) works on the grid; use pool: mean or end with a token block",
                         (pool_path, last_block)))
    final_dim = stages[-1][0]
    if m.head.pool == "attention" and final_dim % m.pool_heads():
        heads_path = ("model", "head", "heads")
        given = m.head.heads is not None
        whose = "" if given else " (the last attention block's)"
        problems.append((heads_path if given else pool_path,
                         f"attention pooling's {m.pool_heads()} heads{whose} do not divide the final {final_dim} "
                         f"channels; set head.heads (try {_list(divisors(final_dim, 32))})", (heads_path, pool_path)))
    for field in ("heads", "mlp_ratio", "mlp_activation"):
        if getattr(m.head, field) is not None and m.head.pool != "attention":
            where = ("model", "head", field)
            problems.append((where, f"{field} belongs to attention pooling, and this head pools by {m.head.pool}; "
                                    f"set head.pool: attention, or remove {field}", (where, pool_path)))
    if m.head.distill_token and m.head.pool != "cls":
        token_path = ("model", "head", "distill_token")
        problems.append((token_path, "the distillation token sits beside the class token (DeiT), and mean pooling "
                                     "has none; set head.pool: cls, or remove distill_token", (token_path, pool_path)))
    if m.drop_path:
        for i, block in enumerate(m.blocks):
            if getattr(block, "drop_path", 0.0):
                where = ("model", "blocks", i, "drop_path")
                problems.append((where, f"{block.drop_path} here and model.drop_path {m.drop_path}: give one (the "
                                        "model's rises linearly over the blocks; a block's holds for its repeats)",
                                 (where, ("model", "drop_path"))))
    if m.pos_embed in ("rope", "relative") and not any(hasattr(block, "heads") for block in m.blocks):
        pos = ("model", "pos_embed")
        what = ("rope turns the queries and keys of attention" if m.pos_embed == "rope"
                else "relative biases attention's logits")
        problems.append((pos, f"{what}, but the model has no attention block; use learned or sincos",
                         (pos, ("model", "blocks"))))
    if m.token_merging:
        problems += _merging_problems(m, t)
    if m.registers and last_layout != "tokens":
        registers = ("model", "registers")
        problems.append((registers, f"register tokens need token layout at the end, but the last block "
                                    f"({m.blocks[-1].kind}) works on the grid; set registers: 0 or end with a token "
                                    "block", (registers, last_block)))

    if d is None:
        return problems
    kind_path = ("data", "kind")
    if (d.kind in DOWNLOADABLE or d.kind == "folder") and not d.root:
        problems.append((("data", "root"), f"the {d.kind} dataset needs a root (a directory"
                         + (" or archive" if d.kind == "folder" else "") + ")", (kind_path, ("data", "root"))))
    expected = DATASET_CLASSES.get(d.kind)
    if expected is not None and m.num_classes != expected:
        problems.append((("model", "num_classes"), f"{m.num_classes} does not match {d.kind}, "
                                                   f"which has {expected} classes", (kind_path, ("model", "num_classes"))))
    native = DATASET_SIZES.get(d.kind)
    if native is not None and m.image_size != native:
        problems.append((("model", "image_size"),
                         f"{d.kind} images are {native}x{native}; set image_size: {native} "
                         f"(and resize: {m.image_size} to feed the network larger images)",
                         (kind_path, ("model", "image_size"))))
    channels = DATASET_CHANNELS.get(d.kind)
    if channels == 3 and m.in_channels != 3:
        problems.append((("model", "in_channels"), f"{d.kind} images have 3 channels; set in_channels: 3",
                         (kind_path, ("model", "in_channels"))))
    elif channels == 1 and m.in_channels not in (1, 3):
        problems.append((("model", "in_channels"), f"{d.kind} images are grayscale; set in_channels: 1 "
                                                   "(or 3: the channel is repeated)", (kind_path, ("model", "in_channels"))))
    return problems


def _window_problems(m: ModelSpec, i: int, side: int, shape_paths: tuple, exact: bool) -> list[Finding]:
    """Window attention's rules for block i, which gets a side x side grid (`exact`: as meant)."""
    block, where = m.blocks[i], ("model", "blocks", i)
    window, shift = getattr(block, "window", None), getattr(block, "shift", False)
    window_path, shift_path, repeat_path = where + ("window",), where + ("shift",), where + ("repeat",)
    if shift and not window:
        return [(shift_path, "shift moves the windows of window attention; set window (e.g. 4) or remove shift",
                 (shift_path, window_path))]
    if not window:
        return []
    problems: list[Finding] = []
    if exact and side % window:
        fitting = [d for d in divisors(side) if d > 1]
        problems.append((window_path, f"{window} does not divide the {side}x{side} grid it gets"
                                      + (f" (try {_list(fitting)})" if fitting else ""), (window_path,) + shape_paths))
    elif exact and shift and window == side:
        problems.append((shift_path, f"one {window}x{window} window covers the whole grid here: there is nothing to "
                                     "shift; remove shift (or use a smaller window)", (shift_path, window_path)
                         + shape_paths))
    if shift and block.repeat < 2:
        problems.append((shift_path, "shifted windows alternate over the block's repeats (the 2nd, 4th, ... shift), "
                                     "so with repeat 1 none would; set repeat: 2 or more", (shift_path, repeat_path)))
    in_last_run = all(LAYOUTS[b.kind] == "tokens" for b in m.blocks[i:])
    joining = [name for name, there in (("a class token", m.head.pool == "cls"), ("registers", m.registers)) if there]
    if in_last_run and joining:
        verb = "joins" if joining == ["a class token"] else "join"
        problems.append((window_path, f"window attention works on the patch grid alone, but {' and '.join(joining)} "
                                      f"{verb} the tokens it gets (where the last run of token blocks starts); use "
                                      "head.pool: mean and registers: 0, or put a grid block (e.g. downsample) after it",
                         (window_path, ("model", "head", "pool"), ("model", "registers"))
                         + tuple(("model", "blocks", j, "kind") for j in range(i, len(m.blocks)))))
    return problems


def _merging_problems(m: ModelSpec, t: TrainSpec | None) -> list[Finding]:
    """model.token_merging: it merges in the attention blocks of the model's last run of attention and
    channel-MLP blocks (composer.merging), where no position on the grid is needed."""
    merge = ("model", "token_merging")
    tail = []
    for i in range(len(m.blocks) - 1, -1, -1):
        if m.blocks[i].kind not in ("vit", "attention", "channel_mlp"):
            break
        tail.append(i)
    attention = [i for i in tail if m.blocks[i].kind != "channel_mlp"]
    if not attention:
        last = len(m.blocks) - 1
        return [(merge, f"token merging runs in attention blocks at the end of the model, and blocks[{last}] "
                        f"({m.blocks[last].kind}) ends this one; end with vit blocks or set token_merging: 0",
                 (merge, ("model", "blocks", last, "kind")))]
    if m.pos_embed in ("rope", "relative"):
        return [(merge, f"pos_embed {m.pos_embed} needs each token's place on the grid, which merging loses; use "
                        "learned or sincos, or set token_merging: 0", (merge, ("model", "pos_embed")))]
    windowed = [i for i in attention if getattr(m.blocks[i], "window", None)]
    if windowed:
        window = ("model", "blocks", windowed[0], "window")
        return [(merge, f"blocks[{windowed[0]}] attends within windows of the grid, which merging loses; set "
                        "token_merging: 0 or remove the window", (merge, window))]
    if t is not None and t.recompute:
        return [(("train", "recompute"), "recompute runs each block again in the backward, and with "
                                         "model.token_merging the tokens it merged are gone by then; set "
                                         "recompute: false or token_merging: 0", (merge, ("train", "recompute")))]
    return []


def _list(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


def _check_train(t: TrainSpec) -> list[Finding]:
    problems: list[Finding] = []
    accumulate, batch = ("train", "accumulate"), ("train", "batch_size")
    if t.batch_size % t.accumulate:
        problems.append((accumulate, f"{t.accumulate} slices do not divide train.batch_size {t.batch_size} "
                                     f"(try {_list(divisors(t.batch_size, 64))})", (accumulate, batch)))
    if t.distill is not None and t.distill.kind == "hard" and t.distill.temperature is not None:
        temperature, kind = ("train", "distill", "temperature"), ("train", "distill", "kind")
        problems.append((temperature, "hard distillation takes the teacher's top class, which no temperature "
                                      "changes; remove it, or set kind: soft", (temperature, kind)))
    return problems


def _check_data(d: DataSpec) -> list[Finding]:
    problems: list[Finding] = []
    padding, resized = ("data", "augment", "crop_padding"), ("data", "augment", "resized_crop")
    if d.augment.crop_padding and d.augment.resized_crop:
        problems.append((padding, f"crop_padding {d.augment.crop_padding} and resized_crop {d.augment.resized_crop} "
                                  "are two crops; keep one of them", (padding, resized)))
    crop = ("data", "crop")
    if d.crop is not None and d.kind != "folder":
        problems.append((crop, f"crop is how image files are decoded; {d.kind} images come decoded: remove it",
                         (crop, ("data", "kind"))))
    repeats = ("data", "augment", "repeats")
    if d.augment.repeats > 1 and not d.augment.is_random():
        problems.append((repeats, f"{d.augment.repeats} copies of each image would be identical: no augmentation "
                                  "is on; turn some on (crop_padding, hflip, trivial, ...) or set repeats: 1",
                         (repeats, ("data", "augment"))))
    val_root, split, kind = ("data", "val_root"), ("data", "val_split"), ("data", "kind")
    labels, val_labels = ("data", "labels"), ("data", "val_labels")
    if d.labels is not None and d.kind != "folder":
        problems.append((labels, f"a labels file names the classes of a folder's images; {d.kind} has its own "
                                 "labels: remove data.labels", (labels, kind)))
    if d.val_labels is not None and d.val_root is None:
        problems.append((val_labels, "val_labels names the classes of val_root's images, but there is no val_root; "
                                     "set data.val_root or remove val_labels", (val_labels, val_root)))
    if d.val_root is not None and d.kind != "folder":
        problems.append((val_root, f"a separate validation folder is for folder datasets, not {d.kind}; remove "
                                   "val_root (data.val_split holds out part of the training data)", (val_root, kind)))
    elif d.val_root is not None and d.val_split:
        problems.append((split, f"val_split {d.val_split} would hold out training images, but val_root already "
                                "gives the validation set; remove one of them", (split, val_root)))
    return problems
