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


def export(target: str, out: str | Path) -> dict:
    """Export the run directory or checkpoint `target` to `out` (.pt2); returns its metadata."""
    from composer.checkpoint import find_checkpoint, load_run

    out = Path(out)
    if out.suffix != ".pt2":
        raise UserError(f"{out}: an exported program is a .pt2 file; name it e.g. {out.with_suffix('.pt2').name}")
    spec, model, state = load_run(target, backend="reference")   # plain PyTorch: runs wherever torch does
    mean, std = state["normalization"]["mean"], state["normalization"]["std"]
    classifier = Classifier(model, mean, std).eval()
    m = spec.model
    example = torch.randint(0, 256, (2, m.in_channels, m.image_size, m.image_size), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        program = torch.export.export(classifier, (example,), dynamic_shapes=({0: batch},))
    metadata = {
        "spec": spec.name, "checkpoint": str(find_checkpoint(target)), "epoch": state.get("epoch"),
        "classes": state.get("classes") or [str(i) for i in range(m.num_classes)],
        "input": {"dtype": "uint8", "shape": ["batch", m.in_channels, m.image_size, m.image_size]},
        "normalization": {"mean": mean, "std": std},
        "torch": torch.__version__,
    }
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, out, extra_files={METADATA: json.dumps(metadata)})
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    return {**metadata, "path": str(out)}
