"""Figures of what each mixer learned: attention maps, token-MLP units, depthwise kernels, curves.

Every figure is computed from a trained run directory (or checkpoint) on the CPU by
default and written as PNG; each public function returns the paths it wrote.
Attention probabilities are recomputed exactly by `attention_maps`, the single code
path behind every attention figure, with the fused kernels switched to the reference
path, so the maps never depend on the backend a run was trained with.

Figures use matplotlib's object API on an Agg canvas: no pyplot global state, safe to
call repeatedly from one process (tests, notebooks).
"""
from __future__ import annotations

import csv
import io
import math
import re
import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from PIL import Image

from composer.blocks.base import using_backend
from composer.checkpoint import load_run
from composer.errors import UserError
from composer.merging import attach

COMMAND_OF_KIND = {"attention": "attention", "token_mlp": "token-mlp", "dwconv": "dwconv", "convnext": "dwconv"}
MAX_TILES = 256        # units / channels drawn per figure; the title says when there are more
MAX_HEAD_COLUMNS = 8   # heads drawn side by side; --head picks any one of them
DPI = 100
MAP_CMAP, WEIGHT_CMAP = "inferno", "RdBu_r"


# -- the numbers behind the figures ------------------------------------------------------

@torch.no_grad()
def attention_maps(model, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(layer name, probabilities (H, N, N) float32, on the CPU) for every attention layer, in order.

    Args:
        model: a built `ComposedModel`.
        x: one normalized image, (C, H, W) or (1, C, H, W), at the data's image size
            (the stem resizes it like in training).

    Each layer's softmax(Q K^T / sqrt(d)) is recomputed from the input that layer sees
    in an eval-mode forward pass; rows sum to 1. Tokens beyond the patch count come first: the
    class token, then register tokens (`prefix_tokens`).
    """
    if x.dim() == 3:
        x = x[None]
    if x.shape[0] != 1:
        raise ValueError(f"attention_maps takes one image, got a batch of {x.shape[0]}")
    attention = [i for i, layer in enumerate(model.layers) if layer.kind == "attention"]
    maps = []
    was_training = model.training
    model.eval()
    try:
        with using_backend(model, "reference"):
            for layer in model.layers[:attention[-1] + 1] if attention else []:
                if layer.kind == "attention":
                    maps.append((layer.name, layer.module.attention_probs(x)[0].float().cpu()))
                x = layer.module(x)
    finally:
        model.train(was_training)
    return maps


def _load_unmerged(run_dir, device):
    """load_run, the model with every token on its grid cell: a run trained with token merging
    (model.token_merging) is drawn without it, so that each layer's maps cover the whole grid."""
    spec, model, state = load_run(run_dir, device)
    attach(model, 0)
    return spec, model, state

def class_token_count(spec) -> int:
    """How many tokens join before the patches for the head: the class token, and DeiT's
    distillation token beside it (the registers come after them)."""
    return (spec.model.head.pool == "cls") + spec.model.head.distill_token


def prefix_tokens(tokens: int, grid: tuple[int, int], class_tokens: int) -> list[str]:
    """The names of the tokens before the patches in a sequence of `tokens` (the class token, the
    distillation token and the registers join together, in that order)."""
    extra = tokens - grid[0] * grid[1]
    named = ["class token", "distillation token"][:class_tokens] if extra > 0 else []
    return named + [f"register {i}" for i in range(extra - len(named))]


def _is_register(name: str) -> bool:
    return name.startswith("register")


def _prefix_kinds(prefix: list[str]) -> str:
    """ "class token", "registers", "class token and registers", ...: what the prefix tokens are."""
    kinds = [name for name in prefix if not _is_register(name)] + (["registers"] if any(map(_is_register, prefix)) else [])
    return kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + " and " + kinds[-1]


def _prefix_note(prefix: list[str]) -> str:
    """ "token 0 = class token, 1-4 = registers" """
    parts = [f"{i} = {name}" for i, name in enumerate(prefix) if not _is_register(name)]
    first, registers = len(parts), sum(map(_is_register, prefix))
    if registers:
        parts.append(f"{first} = register" if registers == 1 else f"{first}-{len(prefix) - 1} = registers")
    return ("tokens " if len(prefix) > 1 else "token ") + ", ".join(parts) if parts else ""


def attention_rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) through the given (H, N, N) maps: (N_last, N_last).

    Heads are averaged, the identity added for the residual, rows renormalized, and the
    layers multiplied in order. When a class token or registers join between two layers they carry
    no image information yet, so they enter the product as identity rows and columns (the first
    indices).
    """
    result = None
    for probs in maps:
        n = probs.shape[-1]
        a = probs.double().mean(0) + torch.eye(n, dtype=torch.float64)
        a = a / a.sum(-1, keepdim=True)
        if result is not None and result.shape[0] < n:
            result = torch.block_diag(torch.eye(n - result.shape[0], dtype=torch.float64), result)
        result = a if result is None else a @ result
    return result.float()


# -- loading -------------------------------------------------------------------------------

def _out_dir(run_dir, out) -> Path:
    if out:
        path = Path(out)
    else:
        run = Path(run_dir)
        path = (run if run.is_dir() else run.parent) / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path


# the layer kinds a figure of one kind also draws: a ConvNeXt block's depthwise convolution is one too
ALSO_DRAWN = {"dwconv": ("dwconv", "convnext")}


def _layers_of(model, kind: str):
    return [layer for layer in model.layers if layer.kind in ALSO_DRAWN.get(kind, (kind,))]


def _select(model, spec, kind: str, index: int | None, option: str):
    """The layers of `kind` to draw (all, or the one at `index`), with user-facing errors."""
    found = _layers_of(model, kind)
    if not found:
        blocks = model.blocks()
        kinds = list(dict.fromkeys(layer.kind for layer in blocks))
        hints = [f"composer visualize {COMMAND_OF_KIND[k]}" for k in kinds if k in COMMAND_OF_KIND]
        if len(blocks) <= 8:
            have = ", ".join(f"{layer.name} ({layer.kind})" for layer in blocks)
        else:  # a deep model: counts per kind say more than a long list
            have = ", ".join(f"{sum(layer.kind == k for layer in blocks)} x {k}" for k in kinds)
        raise UserError(f"run {spec.name!r} has no {kind} layers; its blocks are: {have}"
                        + (f". Try: {'; '.join(hints)}" if hints else ""))
    if index is None:
        return list(enumerate(found))
    if not 0 <= index < len(found):
        raise UserError(f"{option} {index} is out of range: run {spec.name!r} has {len(found)} {kind} "
                        f"layer{'s' if len(found) != 1 else ''} ({option} 0..{len(found) - 1}): "
                        + ", ".join(layer.name for layer in found))
    return [(index, found[index])]


def _display_image(image_uint8: torch.Tensor, size: int) -> np.ndarray:
    """uint8 (C, H, W) -> float (size, size, C) in [0, 1], resized exactly as the stem does (bilinear)."""
    x = image_uint8[None].float()
    if x.shape[-1] != size:
        # Normalization is per-channel affine, so resizing before it equals the stem's resize after it.
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x[0] / 255).clamp(0, 1).permute(1, 2, 0).numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_")


def _save(fig: Figure, path: Path) -> str:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.08)
    # Figures are opaque: without the alpha channel, and with an optimized deflate, files shrink by ~10%.
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").save(path, optimize=True)
    return str(path)


def _show_image(ax, image: np.ndarray, title: str | None = None):
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def _suptitle(fig: Figure, text: str, fontsize: float = 10) -> None:
    """A figure title wrapped to the figure's width, so a narrow figure is not stretched by its own title."""
    chars = max(30, int(fig.get_figwidth() * 130 / fontsize))  # ~0.077 in per character at 10 pt
    lines = [textwrap.fill(line, chars) for line in text.split("\n")]
    fig.suptitle("\n".join(lines), fontsize=fontsize)


def _colorbar(fig: Figure, im, ax, label: str | None, ticks: int | None = None, **kwargs):
    """A colour bar with small ticks that stay distinct when the range is narrow (no '+1.5e-2' offsets)."""
    bar = fig.colorbar(im, ax=ax, **kwargs)
    if ticks:
        bar.ax.yaxis.set_major_locator(MaxNLocator(ticks))
    bar.formatter.set_useOffset(False)
    bar.ax.tick_params(labelsize=7)
    if label:
        bar.set_label(label, fontsize=8)
    return bar


def _tiles_grid(count: int) -> tuple[int, int]:
    cols = max(1, math.ceil(math.sqrt(count * 1.3)))  # a little wider than tall, like a page
    return math.ceil(count / cols), cols


# -- attention -----------------------------------------------------------------------------

def _query_patches(grid: tuple[int, int]) -> list[tuple[int, int]]:
    """A few query patches spread over the image: the centre and one per quadrant."""
    h, w = grid
    spots = [(h // 2, w // 2), (h // 4, w // 4), (h // 4, (3 * w) // 4), ((3 * h) // 4, w // 4),
             ((3 * h) // 4, (3 * w) // 4)]
    return list(dict.fromkeys((min(r, h - 1), min(c, w - 1)) for r, c in spots))


def attention(run_dir, image_index: int | None = None, split: str = "val", layer: int | None = None,
              head: int | None = None, out=None, device: str = "cpu", file: str | None = None) -> list[str]:
    """Attention matrices, per-query overlays and (all layers) rollout for one image of the run's
    data (`image_index` in `split`) or an image `file`; returns PNG paths."""
    from composer.data import decode_files, load_split, normalize

    if file is not None and image_index is not None:
        raise UserError("--image picks an image of the run's data and --file gives one of your own; give one of them")
    spec, model, state = _load_unmerged(run_dir, device)
    chosen = _select(model, spec, "attention", layer, "--layer")
    heads = min(info.module.heads for _, info in chosen)  # blocks of one spec may differ in heads
    if head is not None and not 0 <= head < heads:
        raise UserError(f"--head {head} is out of range: the attention layers have {heads} heads (0..{heads - 1})")
    if file is not None:   # no label: the caption says what the model sees
        images = decode_files([file], spec.model, spec.data.crop)
        classes = state.get("classes") or [str(i) for i in range(spec.model.num_classes)]
        shown, truth, tag = Path(file).name, None, f"attention_{Path(file).stem}"
    else:
        image_index = image_index or 0
        data = load_split(spec.data, spec.model, split)
        if not 0 <= image_index < len(data):
            raise UserError(f"--image {image_index} is out of range: the {split} split has {len(data)} images "
                            f"(0..{len(data) - 1})")
        images, classes = data.images[image_index:image_index + 1], data.classes
        shown, truth = f"{split} image #{image_index}", int(data.labels[image_index])
        tag = f"attention_{split}{image_index}"

    norm = state["normalization"]
    x = normalize(images, norm["mean"], norm["std"]).to(device)
    maps = attention_maps(model, x)
    with torch.no_grad():
        probs = torch.softmax(model(x).float(), -1)[0].cpu()
    pred = int(probs.argmax())
    caption = (f"{shown}" + (f": {classes[truth]}" if truth is not None else "")
               + ("\n(a backbone: no classes)" if state.get("backbone_only")
                  else f"\npredicted {classes[pred]} ({probs[pred]:.0%})"))
    image = _display_image(images[0], spec.model.input_size)
    out_dir = _out_dir(run_dir, out)

    paths = []
    for index, info in chosen:
        name, p = maps[index]
        assert name == info.name  # attention_maps walks the same layers in the same order
        grid = info.ctx.grid   # the stem's patch grid, or a smaller one after a downsample block
        prefix = prefix_tokens(p.shape[-1], grid, class_token_count(spec))
        suffix = f"layer{index}" + (f"_head{head}" if head is not None else "")
        windows = info.module.windows   # window attention: zero between windows
        within = (f", within {windows[1]}x{windows[1]} windows" + (f" shifted {windows[2]}" if windows[2] else "")
                  if windows else "")
        title = f"{spec.name} · {name} (attention layer {index} of {len(maps)}{within})"
        paths.append(_save(_matrix_figure(p, head, image, caption, title, prefix),
                           out_dir / f"{tag}_{suffix}_matrix.png"))
        paths.append(_save(_overlay_figure(p, head, image, caption, title, grid, prefix),
                           out_dir / f"{tag}_{suffix}_overlay.png"))
    if layer is None:
        # rollout multiplies maps of one token count: the attention layers on the last grid (after
        # any downsample block)
        grid = _layers_of(model, "attention")[-1].ctx.grid
        last = [m for m, info in zip(maps, _layers_of(model, "attention")) if info.ctx.grid == grid]
        paths.append(_save(_rollout_figure(last, image, caption, spec.name, grid, class_token_count(spec),
                                           earlier=len(maps) - len(last)),
                           out_dir / f"{tag}_rollout.png"))
        pooling = pooling_map(model, x)
        if pooling is not None:
            paths.append(_save(_pooling_figure(pooling, image, caption, spec.name, model.layers[-1].ctx.grid),
                               out_dir / f"{tag}_pooling.png"))
    return paths


@torch.no_grad()
def pooling_map(model, x: torch.Tensor) -> torch.Tensor | None:
    """Where attention pooling (head.pool: attention) looks for one normalized image `x`: its
    query's attention over the patches, (heads, N); None for a head that pools otherwise."""
    head = model.stages[-1]
    if getattr(head, "attend", None) is None:
        return None
    was_training = model.training
    model.eval()
    try:
        with using_backend(model, "reference"):
            for stage in model.stages[:-1]:
                x = stage(x)
            return head.pooling_probs(x)[0].float().cpu()
    finally:
        model.train(was_training)


def _pooling_figure(p, image, caption, spec_name, grid) -> Figure:
    """The image, then where the pooling query looks: the mean over its heads and each head."""
    columns = ([("mean over heads", p.mean(0))] if p.shape[0] > 1 else []) + \
        [(f"head {h}", p[h]) for h in range(min(p.shape[0], MAX_HEAD_COLUMNS))]
    fig = Figure(figsize=(1.9 * (len(columns) + 1) + 0.6, 2.6), layout="constrained")
    axes = fig.subplots(1, len(columns) + 1, squeeze=False)[0]
    _show_image(axes[0], image, caption)
    values = [v.reshape(grid).numpy() for _, v in columns]
    vmin, vmax = min(float(v.min()) for v in values), max(float(v.max()) for v in values)
    for ax, (label, _), v in zip(axes[1:], columns, values):
        im = _overlay(ax, image, v, vmin, vmax)
        ax.set_title(label, fontsize=9)
    _colorbar(fig, im, axes[-1], "attention weight", shrink=0.85)
    _suptitle(fig, f"{spec_name} · attention pooling: where the head's learned query looks (softmax over the "
                   f"{grid[0]}x{grid[1]} patches)")
    return fig


def _matrix_figure(p, head, image, caption, title, prefix) -> Figure:
    """The image, then each head's N x N matrix (query rows, key columns), each with its colour bar."""
    heads = p.shape[0]
    panels = [(f"head {h}", p[h]) for h in ([head] if head is not None else range(min(heads, MAX_HEAD_COLUMNS)))]
    if head is None and heads > 1:
        panels.append(("mean over heads", p.mean(0)))
    total = len(panels) + 1
    rows = 1 if total <= 3 else 2 if total <= 10 else math.ceil(total / 5)  # a compact block, not a long strip
    cols = math.ceil(total / rows)
    fig = Figure(figsize=(3.3 * cols, 3.2 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    _show_image(axes[0], image, caption)
    n = p.shape[-1]
    for ax, (label, matrix) in zip(axes[1:], panels):
        m = matrix.numpy()
        # A few entries (often the class token's row) would take the whole colour range: clip the scale to
        # the 0.5..99.5 percentiles, marked by the bar's arrows, so the structure of the rest shows.
        lo, hi = np.percentile(m, [0.5, 99.5])
        im = ax.imshow(m, cmap=MAP_CMAP, vmin=lo, vmax=max(hi, lo + 1e-9), interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("key token", fontsize=8)
        ax.set_ylabel("query token", fontsize=8)
        ax.tick_params(labelsize=7)
        _colorbar(fig, im, ax, "probability", shrink=0.8, extend="both")
    for ax in axes[len(panels) + 1:]:
        ax.set_axis_off()
    cls_note = f" ({_prefix_note(prefix)})" if prefix else ""
    more = f"; heads 0..{MAX_HEAD_COLUMNS - 1} of {heads} shown (use --head)" \
        if head is None and heads > MAX_HEAD_COLUMNS else ""
    _suptitle(fig, f"{title}\nsoftmax(QKᵀ/√d), {n} tokens{cls_note}, rows sum to 1{more}")
    return fig


def _overlay(ax, image, values: np.ndarray, vmin: float, vmax: float):
    """A (h, w) map on top of the image in grey (so its colours do not mix with the map's), patches kept sharp.

    Opacity grows from vmin to vmax: where least attention goes the image shows through,
    so a map that is nearly uniform does not paint over the whole picture.
    """
    grey = image if image.ndim == 2 else image @ np.array([0.299, 0.587, 0.114])
    _show_image(ax, grey)
    size = image.shape[0]
    alpha = 0.9 * np.clip((values - vmin) / max(vmax - vmin, 1e-12), 0, 1) ** 1.5
    return ax.imshow(values, cmap=MAP_CMAP, vmin=vmin, vmax=vmax, alpha=alpha, interpolation="nearest",
                     extent=(-0.5, size - 0.5, size - 0.5, -0.5))


def _mark_patch(ax, rc, grid, size):
    step = size / grid[0]
    ax.add_patch(Rectangle((rc[1] * step - 0.5, rc[0] * step - 0.5), step, step, fill=False, edgecolor="cyan",
                           linewidth=1.5))


def _overlay_figure(p, head, image, caption, title, grid, prefix) -> Figure:
    """Rows: query patches (and the class and distillation tokens, the first register); columns: the
    image, the head mean, each head."""
    heads = p.shape[0]
    offset = len(prefix)
    queries = [(label, i, None) for i, label in enumerate(prefix)
               if label in ("class token", "distillation token", "register 0")]
    queries += [(f"query: row {r}, col {c}", offset + r * grid[1] + c, (r, c)) for r, c in _query_patches(grid)]
    shown = [head] if head is not None else list(range(min(heads, MAX_HEAD_COLUMNS)))
    columns = ([] if head is not None or heads == 1 else [("mean over heads", None)]) + \
        [(f"head {h}", h) for h in shown]
    size = image.shape[0]
    fig = Figure(figsize=(1.5 * (len(columns) + 1) + 0.9, 1.5 * len(queries) + 1.1), layout="constrained")
    axes = fig.subplots(len(queries), len(columns) + 1, squeeze=False)
    for r, (label, q, rc) in enumerate(queries):
        _show_image(axes[r, 0], image)
        axes[r, 0].set_ylabel(label, fontsize=8)
        if rc is not None:
            _mark_patch(axes[r, 0], rc, grid, size)
        rows = [(p.mean(0) if h is None else p[h])[q, offset:].reshape(grid).numpy() for _, h in columns]
        # One scale per query row, so its heads compare directly; min..max because a row is often
        # close to uniform (1/N) and what matters is where it departs from that.
        vmin, vmax = min(float(v.min()) for v in rows), max(float(v.max()) for v in rows)
        for c, ((col_label, _), values) in enumerate(zip(columns, rows), start=1):
            im = _overlay(axes[r, c], image, values, vmin, vmax)
            if rc is not None:
                _mark_patch(axes[r, c], rc, grid, size)
            if r == 0:
                axes[r, c].set_title(col_label, fontsize=9)
        _colorbar(fig, im, axes[r, -1], None, shrink=0.9, ticks=4)
    axes[0, 0].set_title(caption, fontsize=8)
    cls_note = f" (the {_prefix_kinds(prefix)} left out)" if prefix else ""
    _suptitle(fig, f"{title}\nwhere each query looks: its attention row over the patches{cls_note}")
    return fig


def _rollout_figure(maps, image, caption, spec_name, grid, class_tokens: int, earlier: int = 0) -> Figure:
    """The image, the rollout matrix, and what the classifier's pooled token draws from (with a
    distillation token, the mean of both tokens' rows: the model predicts with both). `earlier`:
    attention layers on larger grids (before a downsample block), left out."""
    probs = [p for _, p in maps]
    r = attention_rollout(probs)
    n = r.shape[0]
    prefix = prefix_tokens(n, grid, class_tokens)
    counts = [p.shape[-1] for p in probs]
    if prefix and prefix[:2] == ["class token", "distillation token"]:
        pooled, pooled_label = r[:2, len(prefix):].mean(0), "class and distillation tokens' rollout (mean)"
    elif prefix and prefix[0] == "class token":
        pooled, pooled_label = r[0, len(prefix):], "class token's rollout over patches"
    else:   # mean pooling leaves registers out
        pooled = r[len(prefix):, len(prefix):].mean(0)
        pooled_label = "mean over patch queries (what mean pooling gathers)"
    fig = Figure(figsize=(11, 3.9), layout="constrained")
    axes = fig.subplots(1, 3)
    _show_image(axes[0], image, caption)
    # The residual identity dominates the diagonal: scale by the off-diagonal entries (0.5..99.5 percentiles)
    # so the mixing between tokens stays visible.
    off_diagonal = r[~torch.eye(n, dtype=torch.bool)].numpy() if n > 1 else r.numpy().ravel()
    lo, hi = np.percentile(off_diagonal, [0.5, 99.5])
    im = axes[1].imshow(r.numpy(), cmap=MAP_CMAP, vmin=lo, vmax=max(hi, lo + 1e-9), interpolation="nearest")
    axes[1].set_title("rollout matrix (diagonal clipped)", fontsize=9)
    axes[1].set_xlabel("input token", fontsize=8)
    axes[1].set_ylabel("output token", fontsize=8)
    axes[1].tick_params(labelsize=7)
    _colorbar(fig, im, axes[1], "rollout weight", shrink=0.85, extend="both")
    values = pooled.reshape(grid).numpy()
    im = _overlay(axes[2], image, values, float(values.min()), float(values.max()))
    axes[2].set_title(pooled_label, fontsize=9)
    _colorbar(fig, im, axes[2], "rollout weight", shrink=0.85)
    layers = f"{len(maps)} attention layer{'s' if len(maps) != 1 else ''}"
    notes = ["heads averaged, identity added for the residual"]
    if earlier:
        notes.append(f"on the final {grid[0]}x{grid[1]} grid; {earlier} attention layer{'s' if earlier != 1 else ''} "
                     "before a downsample not counted")
    if len(set(counts)) > 1:
        joined = next(i for i, c in enumerate(counts) if c == counts[-1])
        who = _prefix_kinds(prefix)
        notes.append(f"{who} join{'s' if who == 'class token' else ''} at attention layer {joined} "
                     f"({counts[0]} -> {counts[-1]} tokens)")
    _suptitle(fig, f"{spec_name} · attention rollout through {layers} (other mixers not counted)\n"
              + "; ".join(notes))
    return fig


# -- token-mixing MLPs and depthwise kernels -------------------------------------------------

def _weight_tiles(tiles: torch.Tensor, title: str, bar_label: str) -> Figure:
    """One small image per row of `tiles` (T, h, w), each scaled to its own max |w|, on one shared bar."""
    count = tiles.shape[0]
    rows, cols = _tiles_grid(count)
    tile = 0.62 if tiles.shape[-1] > 3 else 0.45
    fig = Figure(figsize=(max(6.5, tile * cols + 1.2), tile * rows + 1.0), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    scale = tiles.flatten(1).abs().amax(1).clamp_min(1e-12)
    scaled = (tiles / scale[:, None, None]).numpy()
    im = None
    for i, ax in enumerate(axes.ravel()):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= count:
            ax.set_axis_off()
            continue
        im = ax.imshow(scaled[i], cmap=WEIGHT_CMAP, vmin=-1, vmax=1, interpolation="nearest")
        for spine in ax.spines.values():
            spine.set_linewidth(0.3)
    fig.colorbar(im, ax=axes, shrink=min(0.9, 3.0 / rows + 0.3), aspect=30, label=bar_label)
    _suptitle(fig, title)
    fig.get_layout_engine().set(w_pad=0.01, h_pad=0.01, wspace=0.02, hspace=0.02)
    return fig


def token_mlp(run_dir, block: int | None = None, out=None, device: str = "cpu") -> list[str]:
    """First-layer weights of each token-mixing MLP, one patch-grid image per hidden unit."""
    spec, model, _ = _load_unmerged(run_dir, device)
    chosen = _select(model, spec, "token_mlp", block, "--block")
    out_dir, paths = _out_dir(run_dir, out), []
    for index, layer in chosen:
        grid = layer.ctx.grid   # the stem's patch grid, or a smaller one after a downsample block
        w = layer.module.mix_in.weight.detach().float().cpu()  # (Hd, N)
        hidden, n = w.shape
        # A class token or registers that joined before this block come first: no place on the grid.
        prefix = prefix_tokens(n, grid, class_token_count(spec))
        cls_note = f", the {_prefix_kinds(prefix)} not drawn" if prefix else ""
        tiles = w[:MAX_TILES, n - grid[0] * grid[1]:].reshape(-1, *grid)
        more = f" (first {MAX_TILES} of {hidden})" if hidden > MAX_TILES else ""
        title = (f"{spec.name} · {layer.name} (token-MLP block {index} of {len(_layers_of(model, 'token_mlp'))})\n"
                 f"first-layer weights: {hidden} hidden units{more} on the {grid[0]}x{grid[1]} patch grid{cls_note}"
                 f"\n(each unit scaled to its own max |w|)")
        fig = _weight_tiles(tiles, title, "relative weight")
        paths.append(_save(fig, out_dir / f"token_mlp_block{index}.png"))
    return paths


def dwconv(run_dir, block: int | None = None, out=None, device: str = "cpu") -> list[str]:
    """The learned depthwise kernels of each dwconv block, one tile per channel."""
    spec, model, _ = _load_unmerged(run_dir, device)
    chosen = _select(model, spec, "dwconv", block, "--block")
    out_dir, paths = _out_dir(run_dir, out), []
    for index, layer in chosen:
        w = layer.module.conv.weight.detach().float().cpu()[:, 0]  # (C, k, k)
        channels, k = w.shape[0], w.shape[-1]
        more = f" (first {MAX_TILES} of {channels})" if channels > MAX_TILES else ""
        title = (f"{spec.name} · {layer.name} (depthwise convolution {index} of {len(_layers_of(model, 'dwconv'))})\n"
                 f"{k}x{k} depthwise kernels, one per channel: {channels} channels{more}"
                 f"\n(each kernel scaled to its own max |w|)")
        fig = _weight_tiles(w[:MAX_TILES], title, "relative weight")
        paths.append(_save(fig, out_dir / f"dwconv_block{index}.png"))
    return paths


def position_similarity(pos: torch.Tensor, h: int, w: int) -> np.ndarray:
    """(h, w, h, w): [r, c] is the cosine similarity of patch (r, c)'s embedding with every patch's,
    from a position table (1, N, C) whose last h * w rows are the patches (a class token's row first)."""
    table = F.normalize(pos.detach().float().cpu()[0, -h * w:], dim=-1)
    return (table @ table.T).reshape(h, w, h, w).numpy()


def pos_embed(run_dir, out=None, device: str = "cpu") -> list[str]:
    """How alike the position embeddings of the patches are: for each patch, the cosine
    similarity of its embedding with every other patch's, drawn on the patch grid at its place.
    With rope, the rotations' (cos, sin) stand for the embedding: their cosine similarity is the
    mean over channel pairs of cos(angle difference), what q·k of equal contents is made of."""
    from composer.build import PositionEmbedding

    spec, model, _ = _load_unmerged(run_dir, device)
    h = w = spec.model.grid
    if spec.model.pos_embed == "rope":   # the first attention layer's rotations, on its grid
        first = next(layer for layer in model.layers if layer.kind == "attention")
        rotary, (h, w) = first.module, first.ctx.grid
        table = torch.cat([rotary.rotary_cos, rotary.rotary_sin], dim=-1)[None]
        what = "rope: the rotations' cos and sin"
        if h != spec.model.grid:
            what += f" of {first.name}, after a downsample"
    else:
        found = [layer for layer in model.layers if isinstance(layer.module, PositionEmbedding)]
        if not found:
            raise UserError(f"run {spec.name!r} has no position embedding (model.pos_embed: none)")
        table, what = found[0].module.pos, f"{spec.model.pos_embed} position embeddings"
    similarity = position_similarity(table, h, w)
    tile = min(0.6, 9.0 / max(h, w))
    fig = Figure(figsize=(tile * w + 1.4, tile * h + 1.0), layout="constrained")
    axes = fig.subplots(h, w, squeeze=False)
    im = None
    for (r, c), ax in np.ndenumerate(axes):
        im = ax.imshow(similarity[r, c], cmap=WEIGHT_CMAP, vmin=-1, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_linewidth(0.3)
    for r in range(h):
        axes[r, 0].set_ylabel(str(r + 1), fontsize=6, rotation=0, labelpad=6)
    for c in range(w):
        axes[-1, c].set_xlabel(str(c + 1), fontsize=6)
    fig.colorbar(im, ax=axes, shrink=0.8, aspect=30, label="cosine similarity")
    _suptitle(fig, f"{spec.name} · {what} on the {h}x{w} patch grid\n"
                   "each tile: one patch's similarity with every patch (row, column of the tile = its place)")
    fig.get_layout_engine().set(w_pad=0.01, h_pad=0.01, wspace=0.02, hspace=0.02)
    return [_save(fig, _out_dir(run_dir, out) / "pos_embed.png")]


# -- training curves -------------------------------------------------------------------------

def _read_metrics(run_dir: Path) -> dict[str, list]:
    path = run_dir / "metrics.csv"
    if not path.exists():
        raise UserError(f"{run_dir} has no metrics.csv; give run directories written by `composer train`")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise UserError(f"{path} has no finished epoch yet")

    def column(key):
        return [float(r[key]) if r.get(key) not in (None, "") else float("nan") for r in rows]

    return {key: column(key) for key in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "grad_norm",
                                         "grad_norm_max")}


def _run_name(run_dir: Path) -> str:
    import yaml

    try:
        return str(yaml.safe_load((run_dir / "spec.yaml").read_text())["name"])
    except Exception:  # a run without its spec copy is still worth plotting: name it after its folder
        return run_dir.name


def curves(run_dirs: list, out=None) -> list[str]:
    """Loss, accuracy and (where the runs logged it) the gradient norm per epoch of one or more
    runs, overlaid, labelled by spec name."""
    dirs = [Path(d) for d in run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise UserError(f"{d} is not a run directory")
    names = [_run_name(d) for d in dirs]
    labels = [f"{n} ({d.name})" if names.count(n) > 1 else n for n, d in zip(names, dirs)]
    runs = [_read_metrics(d) for d in dirs]

    norms = any(np.isfinite(m["grad_norm"]).any() for m in runs)   # runs of older versions have none
    fig = Figure(figsize=(16 if norms else 11, 4.2), layout="constrained")
    ax_loss, ax_acc, *ax_norm = fig.subplots(1, 3 if norms else 2)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for label, metrics, colour in zip(labels, runs, colours):
        for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
            scale = 100.0 if key == "acc" else 1.0
            for part, style, marker in (("train", "-", "o"), ("val", "--", "s")):
                values = np.array(metrics[f"{part}_{key}"]) * scale
                if np.isfinite(values).any():
                    ax.plot(metrics["epoch"], values, style, color=colour, marker=marker, markersize=3.5,
                            label=f"{label} {part}")
    panels = [(ax_loss, "loss"), (ax_acc, "accuracy (%)")]
    if norms:
        for metrics, colour in zip(runs, colours):
            for key, style, width in (("grad_norm", "-", 1.5), ("grad_norm_max", ":", 1.0)):
                ax_norm[0].plot(metrics["epoch"], metrics[key], style, color=colour, linewidth=width)
        ax_norm[0].set_yscale("log")   # a spike or a slow drift both show
        ax_norm[0].set_title("gradient norm before clipping (mean: solid, max: dotted)", fontsize=10)
        panels.append((ax_norm[0], "gradient norm"))
    for ax, what in panels:
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0.5, max(max(m["epoch"]) for m in runs) + 0.5)  # one epoch still gets a sensible axis
    ax_loss.set_title("loss (train: solid, val: dashed)", fontsize=10)
    ax_acc.set_title("accuracy (train: solid, val: dashed)", fontsize=10)
    ax_acc.legend(fontsize=8, loc="lower right")
    _suptitle(fig, "training curves: " + ", ".join(labels), fontsize=11)
    out_dir = _out_dir(dirs[0], out)
    name = "curves.png" if len(dirs) == 1 else f"curves_{_slug('+'.join(labels))[:120]}.png"
    return [_save(fig, out_dir / name)]


CONFUSION_LABELLED = 40   # classes up to which every row and column is named


def confusion(target, split: str | None = None, data_root: str | None = None, out=None,
              device: str = "auto") -> list[str]:
    """The confusion matrix of a run on a split (as `composer evaluate` computes it), each row
    normalized over its true class's images, the count written in each cell when the matrix is small."""
    from composer.evaluate import evaluate

    result = evaluate(str(target), data_root=data_root, split=split, device=device)
    counts = np.array(result["confusion"], dtype=np.int64)
    k = counts.shape[0]
    rows = counts.sum(1, keepdims=True)
    fractions = counts / np.maximum(rows, 1)
    side = min(16.0, max(4.5, 0.32 * k + 2.5))
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    if k <= CONFUSION_LABELLED:
        names = [textwrap.shorten(name, 18, placeholder="…") for name in result["classes"]]
        ax.set_xticks(range(k), names, rotation=90, fontsize=7)
        ax.set_yticks(range(k), names, fontsize=7)
    if k <= 20:   # cells big enough to read a count
        for (r, c), n in np.ndenumerate(counts):
            if n:
                ax.text(c, r, str(n), ha="center", va="center", fontsize=7,
                        color="white" if fractions[r, c] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    _colorbar(fig, im, ax, "fraction of the true class's images", ticks=6)
    _suptitle(fig, f"{result['spec']} on {result['split']} ({result['images']} images, epoch {result['epoch']}): "
                   f"accuracy {result['accuracy']:.1%}")
    path = _out_dir(target, out) / f"confusion_{result['split']}.png"
    return [_save(fig, path)]
