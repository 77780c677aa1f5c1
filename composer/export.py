"""A trained run as one self-contained file for inference: `composer export`.

The file is a `torch.export` program (`.pt2`): the model on its PyTorch reference path (no
Triton, no composer needed to run it), with the run's input normalization built in, taking
uint8 images (B, C, H, W) at the model's image size, for any batch size, and returning logits.
Its `composer.json` extra file holds what a caller needs around it: the class names, the image
size and channels, the normalization and where the weights came from.

    extra = {"composer.json": ""}
    program = torch.export.load("model.pt2", extra_files=extra)
    logits = program.module()(images_uint8)
    classes = json.loads(extra["composer.json"])["classes"]

An `.onnx` file is the same program through PyTorch's ONNX exporter (it needs the `onnx` extra:
onnx and onnxscript), for ONNX Runtime, TensorRT and the like: input `images` (uint8, dynamic
batch), output `logits`, the same metadata as the model's `composer.json` metadata property.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from composer.errors import UserError

METADATA = "composer.json"
MAX_BATCH = 65_536   # the exported batch dimension's upper bound


class Classifier(torch.nn.Module):
    """uint8 images (B, C, H, W) -> logits: the run's normalization, then its model."""

    def __init__(self, model: torch.nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("scale", (1 / (255 * torch.tensor(std))).view(1, -1, 1, 1))
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.float() * self.scale - self.shift)   # as composer.data.normalize


def export(target: str, out: str | Path, merge: int | None = None) -> dict:
    """Export the run directory or checkpoint `target` to `out` (.pt2 or .onnx); returns its
    metadata. `merge`: with token merging, that many tokens a merging block (composer.merging)."""
    from composer.evaluate import merged_tokens

    from composer.checkpoint import find_checkpoint, load_run, needs_classifier

    out = Path(out)
    if out.suffix not in (".pt2", ".onnx"):
        raise UserError(f"{out}: the file's suffix chooses the format: .pt2 (torch.export) or .onnx; name it e.g. "
                        f"{out.with_suffix('.pt2').name}")
    if out.suffix == ".onnx":
        _check_onnx_exporter()
    spec, model, state = load_run(target, backend="reference")   # plain PyTorch: runs wherever torch does
    needs_classifier(state, target, "export")
    mean, std = state["normalization"]["mean"], state["normalization"]["std"]
    classifier = Classifier(model, mean, std).eval()
    m = spec.model
    example = torch.randint(0, 256, (2, m.in_channels, m.image_size, m.image_size), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad(), merged_tokens(model, merge) as merged:
        program = torch.export.export(classifier, (example,), dynamic_shapes=({0: batch},))
        if out.suffix == ".onnx":   # from the exported program, so both formats hold the same graph
            program = torch.onnx.export(program, input_names=["images"], output_names=["logits"],
                                        dynamo=True, verbose=False)
    metadata = {
        "spec": spec.name, "checkpoint": str(find_checkpoint(target)), "epoch": state.get("epoch"),
        "classes": state.get("classes") or [str(i) for i in range(m.num_classes)],
        "input": {"dtype": "uint8", "shape": ["batch", m.in_channels, m.image_size, m.image_size]},
        "normalization": {"mean": mean, "std": std},
        "torch": torch.__version__,
        **({"merge": merged} if merged else {}),
    }
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".onnx":
            _name_batch_dim(program.model)
            program.model.metadata_props[METADATA] = json.dumps(metadata)
            program.save(str(out))
        else:
            torch.export.save(program, out, extra_files={METADATA: json.dumps(metadata)})
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    return {**metadata, "path": str(out)}


def _name_batch_dim(model) -> None:
    """The exporter calls the batch dimension by a symbol of its own (e.g. "s34"): call it "batch"
    on every value that has it, as the .pt2 metadata does."""
    import onnx_ir as ir

    symbol = model.graph.inputs[0].shape[0]
    values = list(model.graph.inputs) + list(model.graph.outputs) + [v for node in model.graph for v in node.outputs]
    for value in values:
        if value.shape is not None and any(dim == symbol for dim in value.shape):
            value.shape = ir.Shape(["batch" if dim == symbol else dim for dim in value.shape])


def _check_onnx_exporter() -> None:
    """PyTorch's ONNX exporter needs onnx and onnxscript, which composer does not install by default."""
    import importlib.util

    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"exporting to ONNX needs {' and '.join(missing)}: pip install 'mixer-composer[onnx]' "
                        f"(or pip install {' '.join(missing)}), or export a .pt2 program instead")
