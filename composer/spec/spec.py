"""The whole spec file: name, model, data, train."""
from __future__ import annotations

from typing import Optional

from pydantic import Field, PrivateAttr

from composer.spec.data import DataSpec
from composer.spec.model import ModelSpec, Strict
from composer.spec.train import TrainSpec


class Spec(Strict):
    """A composer spec: one YAML file describes the model, its data and how to train it."""

    base: Optional[str] = Field(
        None, exclude=True, description="A spec file this one starts from (relative to this file): its values "
        "apply except where this file gives its own. Sections merge key by key; a list (model.blocks) or a "
        "single value replaces the base's whole. The name is never inherited.")
    name: Optional[str] = Field(None, description="Name of the architecture (default: the file name).")
    description: Optional[str] = Field(None, description="Free text shown in summaries.")
    model: ModelSpec
    data: DataSpec = Field(default_factory=lambda: DataSpec(kind="synthetic"))
    train: TrainSpec = Field(default_factory=TrainSpec)

    # where each value was given: a path tuple -> "file:line:col" or "--set key=value" (set by the loader)
    _origins: dict = PrivateAttr(default_factory=dict)

    def locate(self, field: str) -> str | None:
        """Where the spec gave `field` ("model.blocks[2].heads"): its own position, else that of the
        nearest enclosing value that was written (a default has no line of its own); None for a
        spec not loaded from text."""
        from composer.spec.loading import parse_override_path

        path = parse_override_path(field)
        for n in range(len(path), -1, -1):
            if path[:n] in self._origins:
                return self._origins[path[:n]]
        return None
