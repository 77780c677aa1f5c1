"""The per-block table of `composer summarize`: shapes, params, FLOPs, activation memory, kernel path.

FLOP convention: a multiply-add counts as 2 FLOPs; only matrix products and
convolutions are counted (norms, activations, softmax and adds are not), the
same convention as torch.utils.flop_counter. Activation memory is an estimate
of the elements a layer keeps for backward, times the bytes of the training dtype.
"""
from __future__ import annotations

import math

import torch

import kernels
from composer.blocks.base import Block
from composer.build import ComposedModel, build_model, count_params, model_backend, prepare_for_compile
from composer.optim import frozen_stages
from composer.spec import Spec

FLOP_CONVENTION = "multiply-add = 2 FLOPs; matmuls and convolutions only (as torch.utils.flop_counter)"


def training_device_and_dtype(spec: Spec) -> tuple[str, torch.dtype]:
    """Where `composer train` would run this spec on this machine, and the dtype its fused ops would see."""
    from composer.train import precision

    t = spec.train
    device = "cuda" if t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available()) else "cpu"
    if t.precision == "fp16" and device == "cpu":
        return device, torch.float32  # training would refuse; report the CPU default
    autocast, _ = precision(spec, torch.device(device))
    return device, autocast or torch.float32


def kernel_path(layer, backend: str, device: str, dtype: torch.dtype) -> tuple[str, list[str]]:
    """("attention: triton" | "attention: reference" | "pytorch", reasons Triton is not used)."""
    op = getattr(layer.module, "kernel_op", None)
    if not op:
        return "pytorch", []
    choice, reasons = kernels.backend_for(op, backend, device, dtype, **layer.module.kernel_dims(layer.ctx))
    return f"{op}: {choice}", reasons


def norm_path(layer, backend: str, device: str, dtype: torch.dtype, compiled: bool,
              channels_last: bool) -> str | None:
    """"batch_norm: triton" where training runs the block's BatchNorm as kernels.batch_norm
    (see Block.uses_fused_norm: eager, NCHW), else None (nn.BatchNorm2d)."""
    from composer.blocks import base

    op = getattr(layer.module, "norm_op", None)
    wanted = backend == "triton" or (backend == "auto" and base.FUSED_BATCH_NORM_IN_AUTO and device == "cuda")
    if not op or compiled or channels_last or not wanted:
        return None
    choice, _ = kernels.backend_for(op, backend, device, dtype)
    return f"{op}: {choice}"


def summarize(spec: Spec, batch_size: int = 1, backend: str | None = None,
              model: ComposedModel | None = None, merge: int | None = None) -> dict:
    """The summary of the spec's model (the rows and totals `render` shows); `merge`: with token
    merging (composer.merging) of that many tokens a block (default: model.token_merging), each
    layer's tokens and FLOPs as they then are."""
    requested = backend or spec.train.kernels
    backend = model_backend(requested, spec.train.compile)
    device, dtype = training_device_and_dtype(spec)
    if model is None:
        with torch.device("meta"):  # shapes and counts only: no memory, no init time, even for ViT-B
            model = build_model(spec, backend=backend)
        if spec.train.compile:   # as training sets it up
            prepare_for_compile(model, requested, torch.device(device))
    from composer.train import training_memory_format

    act_bytes = torch.finfo(dtype).bits // 8
    frozen = frozen_stages(model, spec.train.freeze)   # they keep no activations: ComposedModel.freeze
    channels_last = training_memory_format(spec, torch.device(device)) == torch.channels_last
    merged = None
    merge = spec.model.token_merging if merge is None else merge   # the model's own, unless told
    if merge:
        from composer.merging import layer_costs

        merged = layer_costs(model, merge)
    rows = []
    for i, layer in enumerate(model.layers):
        block_backend = getattr(layer.module, "backend", backend)
        path, reasons = kernel_path(layer, block_backend, device, dtype)
        if spec.train.compile and path != "pytorch":
            if getattr(layer.module, "kernel_outside_graph", False):
                path += " (between compiled regions)"
            elif block_backend != requested:
                reasons = ["train.compile is on: the compiled model uses the PyTorch block "
                           "(--kernels triton runs the Triton kernel between the compiled regions)"]
        norm = norm_path(layer, block_backend, device, dtype, spec.train.compile, channels_last)
        if norm:
            path = norm if path == "pytorch" else f"{path}, {norm}"
        rows.append({
            "index": i,
            "name": layer.name,
            "kind": layer.kind,
            "layout": layer.layout,
            "input": [batch_size, *layer.in_shape],
            "output": [batch_size, *layer.out_shape],
            "params": count_params(layer.module),
            "flops_per_image": layer.cost.flops,
            **(_merged_row(layer, merged[i], batch_size) if merged else {}),
            "activation_bytes": 0 if i < frozen else kept_activations(layer, spec.train.recompute) * act_bytes
            * batch_size,
            "frozen": i < frozen,
            "drop_path": getattr(getattr(layer.module, "drop_path", None), "p", 0.0),   # stochastic depth
            "window": _window(layer.module),
            "kernel": path,
            "kernel_reasons": reasons,
        })
    return {
        "spec": spec.name,
        "blocks": ", ".join(f"{b.kind} x{b.repeat}" if b.repeat > 1 else b.kind for b in spec.model.blocks),
        "batch_size": batch_size,
        "device": device,
        "activation_dtype": str(dtype).replace("torch.", ""),
        "params": count_params(model),
        "flops": sum(r["flops_per_image"] for r in rows),
        "activation_bytes": sum(r["activation_bytes"] for r in rows),
        "recompute": spec.train.recompute,
        "drop_path": spec.model.drop_path,
        "pos_embed": spec.model.pos_embed,
        "trainable_params": sum(r["params"] for r in rows if not r["frozen"]),
        "flop_convention": FLOP_CONVENTION,
        **({"merge": merge} if merged else {}),
        "rows": rows,
    }


def _merged_row(layer, merged: tuple, batch_size: int) -> dict:
    """A row's input, output and FLOPs with token merging (composer.merging.layer_costs)."""
    tokens_in, tokens_out, flops = merged
    row = {"flops_per_image": flops}
    if tokens_in is not None:
        row["input"] = [batch_size, tokens_in, *layer.in_shape[1:]]
    if tokens_out is not None and not layer.kind.startswith("head"):   # the head outputs logits
        row["output"] = [batch_size, tokens_out, *layer.out_shape[1:]]
    return row


def _window(module) -> dict | None:
    """A window-attention layer's window side and shift (cells), else None."""
    windows = getattr(module, "windows", None)
    return {"size": windows[1], "shift": windows[2]} if windows else None


def kept_activations(layer, recompute: bool) -> int:
    """Elements an image a layer keeps for the backward: its estimate, or with train.recompute, a
    token block's input alone (the backward runs it again: ComposedModel.recompute_token_blocks)."""
    if recompute and isinstance(layer.module, Block) and layer.module.layout == "tokens":
        return math.prod(layer.in_shape)
    return layer.cost.activations


def human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def render(summary: dict) -> "rich.table.Table":  # noqa: F821
    from rich.table import Table

    shape = lambda s: "(" + ", ".join(str(x) for x in s) + ")"  # noqa: E731
    table = Table(title=f"{summary['spec']}: batch {summary['batch_size']} on {summary['device']}, "
                        f"activations in {summary['activation_dtype']}")
    for col in ("#", "layer", "layout", "input -> output", "params", "FLOPs/img", "act. mem", "kernel"):
        right = col in ("#", "params", "FLOPs/img", "act. mem")
        table.add_column(col, justify="right" if right else "left", no_wrap=True)
    reasons: dict[str, list[str]] = {}
    for r in summary["rows"]:
        window = r.get("window")
        name = r["name"] + (f" ({window['size']}x{window['size']} windows" + (f", shifted {window['shift']}" if
                                                                              window["shift"] else "") + ")"
                            if window else "") + " (frozen)" * r["frozen"]
        table.add_row(str(r["index"]), name, r["layout"],
                      f"{shape(r['input'])} -> {shape(r['output'])}", f"{r['params']:,}", human(r["flops_per_image"]), human(r["activation_bytes"], "B"), r["kernel"])
        if r["kernel_reasons"]:
            reasons.setdefault(r["kernel"].split(":")[0], r["kernel_reasons"])
    table.add_section()
    table.add_row("", "total", "", "", f"{summary['params']:,}", human(summary["flops"]),
                  human(summary["activation_bytes"], "B"), "")
    notes = [f"FLOPs: {summary['flop_convention']}.", "Activation memory: an estimate of what backward keeps"
             + (" (train.recompute: token blocks keep only their inputs, and the backward holds one "
                "block's on top while it runs it again)." if summary["recompute"] else ".")]
    if summary["pos_embed"] == "rope":
        notes.append("Positions: 2-D rotary embedding (rope) of every attention block's queries and keys; no table "
                     "is added to the tokens.")
    if summary["pos_embed"] == "relative":
        notes.append("Positions: a learned relative position bias in every attention block (Swin's); those blocks "
                     "run PyTorch's attention, as the fused kernel takes no bias.")
    if summary.get("merge"):
        notes.append(f"Token merging ({summary['merge']}): shapes and FLOPs with {summary['merge']} token pairs merged "
                     "in each attention block at the end of the model (model.token_merging, or --merge).")
    if summary["drop_path"]:
        notes.append(f"Stochastic depth (model.drop_path): 0 at the first block, rising linearly to "
                     f"{summary['drop_path']:.3g} at the last (each layer's rate: --json).")
    frozen = [r["index"] for r in summary["rows"] if r["frozen"]]
    if frozen:
        notes.append(f"train.freeze: layers {frozen[0]}-{frozen[-1]} keep their weights and no activations; "
                     f"{summary['trainable_params']:,} of {summary['params']:,} parameters train.")
    notes += [f"{op} not on Triton: {'; '.join(why)}" for op, why in reasons.items()]
    table.caption = "\n".join(notes)
    table.caption_justify = "left"
    return table


def render_comparison(summaries: list[dict]) -> "rich.table.Table":  # noqa: F821
    """Several specs side by side: what each one is and what it costs."""
    from rich.table import Table

    first = summaries[0]
    table = Table(title=f"{len(summaries)} specs: batch {first['batch_size']} on {first['device']}, activations in "
                        f"{first['activation_dtype']}")
    for col in ("spec", "blocks", "input", "stem output", "params", "FLOPs/img", "act. mem", "fused kernels"):
        table.add_column(col, justify="right" if col in ("params", "FLOPs/img", "act. mem") else "left", no_wrap=True)
    for s in summaries:
        stem = s["rows"][0]
        fused = sorted({r["kernel"].split(":")[0] for r in s["rows"] if ": triton" in r["kernel"]})
        table.add_row(s["spec"], s["blocks"], "x".join(str(d) for d in stem["input"][2:]),
                      "(" + ", ".join(str(d) for d in stem["output"][1:]) + ")", f"{s['params']:,}",
                      human(s["flops"]), human(s["activation_bytes"], "B"), ", ".join(fused) or "none here")
    table.caption = f"FLOPs: {first['flop_convention']}. Activation memory: an estimate of what backward keeps."
    table.caption_justify = "left"
    return table
