"""The spec language: pydantic models of the YAML and its loader."""
from composer.spec.loading import Problem, SpecError, load_spec, load_spec_text
from composer.spec.model import BLOCK_KINDS, ModelSpec
from composer.spec.rules import LAYOUTS
from composer.spec.spec import Spec

__all__ = ["Spec", "ModelSpec", "load_spec", "load_spec_text", "SpecError", "Problem", "LAYOUTS", "BLOCK_KINDS"]
