"""The whole spec file: name, model, data, train."""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from composer.spec.data import DataSpec
from composer.spec.model import ModelSpec, Strict
from composer.spec.train import TrainSpec


class Spec(Strict):
    """A composer spec: one YAML file describes the model, its data and how to train it."""

    name: Optional[str] = Field(None, description="Name of the architecture (default: the file name).")
    description: Optional[str] = Field(None, description="Free text shown in summaries.")
    model: ModelSpec
    data: DataSpec = Field(default_factory=lambda: DataSpec(kind="synthetic"))
    train: TrainSpec = Field(default_factory=TrainSpec)
