"""Pydantic models of the `data:` section."""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, PositiveInt

from composer.spec.model import Probability, Strict


class Augment(Strict):
    """Training-time augmentation, applied to whole batches on the training device."""

    crop_padding: Annotated[int, Field(ge=0)] = Field(4, description="Random crop after zero-padding by this many pixels (0: off).")
    hflip: bool = Field(True, description="Random horizontal flip.")
    cutout: Annotated[int, Field(ge=0)] = Field(0, description="Side of a random square erased per image (0: off).")
    mixup: Annotated[float, Field(ge=0.0)] = Field(0.0, description="Mixup Beta(alpha, alpha) parameter (0: off).")
    cutmix: Annotated[float, Field(ge=0.0)] = Field(0.0, description="CutMix Beta(alpha, alpha) parameter (0: off).")


class DataSpec(Strict):
    """Where images come from and how they are split and augmented."""

    kind: Literal["cifar10", "folder", "digits", "synthetic"] = Field(
        description="cifar10: torchvision CIFAR-10; folder: an ImageFolder directory or archive; "
        "digits: scikit-learn's bundled 8x8 digits (offline); synthetic: random images."
    )
    root: Optional[str] = Field(
        None, description="cifar10: dataset directory; folder: directory or archive (.zip, .tar, .tar.gz, .tar.xz)."
    )
    download: bool = Field(False, description="cifar10: download into root when missing.")
    cache_dir: Optional[str] = Field(
        None, description="Where decoded datasets and extracted archives are cached (default ~/.cache/composer)."
    )
    val_split: Probability = Field(0.1, description="Fraction of the training data held out for validation.")
    split_seed: int = Field(0, description="Seed of the train/validation split (fixed so runs compare).")
    num_samples: PositiveInt = Field(512, description="synthetic: number of images.")
    augment: Augment = Field(default_factory=Augment)
