"""`composer lr-find`: the learning-rate range test (Smith, 2017, "Cyclical Learning Rates for
Training Neural Networks"; made popular by fastai). The spec's model trains from its start for a
few hundred steps while the learning rate grows geometrically from tiny to huge; the loss first
barely moves, then falls, then blows up. Where it falls fastest, and a tenth of where it is lowest,
are the usual starting points for `train.optimizer.lr` of a new architecture.

Everything else is the spec's: the data, its order (repeated augmentation), augmentation and
mixing, the optimizer (kind, weight decay, betas, layer decay: each group keeps its share of the
rate), precision, gradient clipping, accumulation, `init_from` and `freeze`. The schedule is not
(the test is its own), nor is a distillation teacher (the labels alone, weighed by
train.class_weights as in training); the model runs eagerly (no torch.compile or CUDA graph: a
few hundred steps would not repay compiling). Nothing is written into a run: a CSV and a figure.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from composer.errors import SpecFieldError, UserError

SMOOTHING = 0.9        # the loss curve's exponential moving average (bias-corrected): about ten steps
DIVERGED = 4.0         # the test stops once the smoothed loss is this many times its lowest
WARM_STEPS = 10        # ... but not in the first steps, while the average settles


def lr_find(spec, start: float = 1e-6, end: float = 10.0, steps: int = 200, out: str | None = None,
            echo=print) -> dict:
    """Run the range test on `spec`; returns {"rows": [(lr, loss, smoothed)], "steepest", "minimum",
    "suggested", "stopped", "csv", "figure"} (learning rates as the optimizer's peak, `lr`). A
    mistake that a field of the spec can fix names the line the field is on."""
    try:
        return _range_test(spec, start, end, steps, out, echo)
    except SpecFieldError as exc:
        raise exc.located(spec.locate(exc.field)) from None


def _range_test(spec, start: float, end: float, steps: int, out: str | None, echo) -> dict:
    from composer.build import build_model
    from composer.data import channel_stats, load_split, training_batch
    from composer.optim import frozen_stages, make_optimizer
    from composer.train import (_check_triton, class_balance, epoch_order, in_slices, keep_data_on_host, precision,
                                resolve_device, seed_everything, soft_cross_entropy, start_from_pretrained,
                                training_memory_format)

    if not 0 < start < end:
        raise UserError(f"--start {start:g} must be below --end {end:g} (both above 0)")
    if steps < 2 * WARM_STEPS:
        raise UserError(f"--steps {steps}: the test needs at least {2 * WARM_STEPS} steps to show a curve")
    t = spec.train
    device = resolve_device(t.device)
    seed_everything(t.seed, t.deterministic)
    train_set = load_split(spec.data, spec.model, "train", echo=echo)
    mean, std = channel_stats(train_set)
    images = train_set if keep_data_on_host(train_set.nbytes, device) else train_set.to(device)
    labels = train_set.labels.to(device)
    n = len(images)
    class_weights, _ = class_balance(train_set.labels, list(train_set.classes or range(spec.model.num_classes)),
                                     t.class_weights)
    class_weights = class_weights.to(device) if class_weights is not None else None
    if t.batch_size > n:
        raise SpecFieldError("train.batch_size", f"train.batch_size {t.batch_size} is larger than the {n} training "
                                                 "images; lower it")

    model = build_model(spec, backend=t.kernels).to(device)
    if t.init_from:
        pretrained = start_from_pretrained(model, spec, echo)   # as train: its weights, its input statistics
        if pretrained:
            mean, std = pretrained["mean"], pretrained["std"]
    if t.freeze is not None:
        model.freeze(frozen_stages(model, t.freeze))
    memory_format = training_memory_format(spec, device)
    if memory_format is not None:
        model = model.to(memory_format=memory_format)
    if t.recompute:
        model.recompute_token_blocks()
    model.train()
    optimizer = make_optimizer(spec, model)
    shares = [group["lr"] / t.optimizer.lr for group in optimizer.param_groups]   # layer decay's scales
    autocast_dtype, use_scaler = precision(spec, device)
    if t.kernels == "triton":
        _check_triton(model, device, autocast_dtype or torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    trained = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator(device=device).manual_seed(t.seed + 1)
    if t.distill is not None:
        echo("note: the range test trains on the labels alone (no teacher)")

    def forward_backward(x, targets, share):
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            output = model(x)   # a distillation token's model: the mean of both classifiers
        loss = soft_cross_entropy(output, targets, class_weights)
        scaler.scale(loss * share).backward()
        return output, loss

    echo(f"learning-rate range test: {steps} steps of {t.batch_size} images, lr {start:.1e} -> {end:.1e} "
         f"({t.optimizer.kind}, weight decay {t.optimizer.weight_decay})")
    rows, average, lowest, stopped = [], 0.0, math.inf, f"ran all {steps} steps"
    epoch, position = 0, 0
    order = epoch_order(n, t.seed * 100_003, spec.data.augment.repeats)   # as train orders its epochs
    for step in range(steps):
        lr = start * (end / start) ** (step / (steps - 1))
        for group, share in zip(optimizer.param_groups, shares):
            group["lr"] = lr * share
        if position + t.batch_size > n:   # the next epoch's order
            epoch, position = epoch + 1, 0
            order = epoch_order(n, t.seed * 100_003 + epoch, spec.data.augment.repeats)
        idx = order[position:position + t.batch_size]
        position += t.batch_size
        batch = images.take(idx).to(device, non_blocking=True)
        x, targets = training_batch(batch, labels[idx.to(labels.device)], spec.data.augment, spec.model.num_classes,
                                    mean, std, generator, t.label_smoothing)
        if memory_format is not None:
            x = x.contiguous(memory_format=memory_format)
        _, loss = in_slices(forward_backward, x, targets, t.accumulate)
        value = float(loss.detach())   # a sync each step: this is a diagnostic, not a training run
        if not math.isfinite(value):
            rows.append((lr, value, math.nan))
            stopped = f"the loss became {value} at lr {lr:.2e}"
            break
        if t.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trained, t.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        average = SMOOTHING * average + (1 - SMOOTHING) * value
        smoothed = average / (1 - SMOOTHING ** (step + 1))
        rows.append((lr, value, smoothed))
        lowest = min(lowest, smoothed)
        if step >= WARM_STEPS and smoothed > DIVERGED * lowest:
            stopped = f"the smoothed loss passed {DIVERGED:g}x its lowest at lr {lr:.2e}"
            break

    result = {"rows": rows, "stopped": stopped, **suggest(rows)}
    folder = Path(out) if out else Path("runs") / f"{spec.name}-lr-find"
    folder.mkdir(parents=True, exist_ok=True)
    result["csv"] = str(folder / "lr_find.csv")
    Path(result["csv"]).write_text("lr,loss,smoothed_loss\n" + "".join(f"{lr:.6g},{loss:.6g},{smooth:.6g}\n"
                                                                      for lr, loss, smooth in rows))
    result["figure"] = str(folder / "lr_find.png")
    _figure(result, spec.name).savefig(result["figure"], dpi=120)
    return result


def suggest(rows: list[tuple[float, float, float]]) -> dict:
    """From the smoothed curve: `minimum`, the learning rate where it is lowest; `steepest`, where
    it falls fastest against log(lr), before that minimum (past the warm steps, whose average is
    still settling); `suggested`, a tenth of the minimum (fastai's rule of thumb: the lowest point
    is already close to where training becomes unstable). None where the curve is too short."""
    curve = [(lr, smooth) for lr, _, smooth in rows[WARM_STEPS:] if math.isfinite(smooth)]
    if len(curve) < 3:
        return {"minimum": None, "steepest": None, "suggested": None}
    low = min(range(len(curve)), key=lambda i: curve[i][1])
    slopes = [(curve[i + 1][1] - curve[i][1]) / (math.log(curve[i + 1][0]) - math.log(curve[i][0]))
              for i in range(max(low, 1))]
    fastest = min(range(len(slopes)), key=lambda i: slopes[i])
    steepest = math.sqrt(curve[fastest][0] * curve[fastest + 1][0])   # between the two points
    return {"minimum": curve[low][0], "steepest": steepest, "suggested": curve[low][0] / 10}


def render(result: dict) -> str:
    lines = [f"stopped: {result['stopped']} ({len(result['rows'])} steps)"]
    if result["minimum"] is None:
        lines.append("too few steps before the loss diverged to read the curve: lower --start or add --steps")
    else:
        lines += [f"steepest descent at lr {result['steepest']:.2e}; lowest loss at lr {result['minimum']:.2e}",
                  f"suggested peak learning rate: {result['suggested']:.2e} (a tenth of the lowest point's; try it and "
                  f"the steepest descent's: --set train.optimizer.lr={result['suggested']:.2g})"]
    lines.append(f"wrote {result['csv']} and {result['figure']}")
    return "\n".join(lines)


def _figure(result: dict, name: str):
    from matplotlib.figure import Figure

    lrs = [row[0] for row in result["rows"]]
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    ax.plot(lrs, [row[1] for row in result["rows"]], color="0.75", linewidth=0.8, label="loss per step")
    ax.plot(lrs, [row[2] for row in result["rows"]], color="C0", linewidth=1.6, label="smoothed")
    for key, colour in (("steepest", "C2"), ("suggested", "C3")):
        if result[key] is not None:
            ax.axvline(result[key], color=colour, linestyle="--", linewidth=1, label=f"{key} {result[key]:.1e}")
    finite = [row[2] for row in result["rows"] if math.isfinite(row[2])]
    if finite:   # the blow-up at the end would flatten the interesting part
        ax.set_ylim(min(finite) * 0.95, min(max(finite), DIVERGED * min(finite)) * 1.05)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (the optimizer's peak; layer decay scales the lower layers' down)")
    ax.set_ylabel("training loss")
    ax.set_title(f"{name} · learning-rate range test", fontsize=10)
    ax.legend(fontsize=8)
    return fig
