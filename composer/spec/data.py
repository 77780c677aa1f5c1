"""Pydantic models of the `data:` section."""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, PositiveInt

from composer.spec.model import Probability, Strict


class Augment(Strict):
    """Training-time augmentation, applied to whole batches on the training device."""

    crop_padding: Annotated[int, Field(ge=0)] = Field(4, description="Random crop after zero-padding by this many pixels (0: off).")
    hflip: bool = Field(True, description="Random horizontal flip.")
    trivial: bool = Field(False, description="TrivialAugment (wide): one random operation an image (shear, "
                          "translate, rotate, brightness, colour, contrast, sharpness, posterize, solarize, "
                          "autocontrast, equalize or none) at a random strength, after crop and flip.")
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
    val_root: Optional[str] = Field(
        None, description="folder: a validation folder (or archive) of its own, with the same class subfolders "
        "(e.g. ImageNet's train/ and val/); the whole of root then trains, and val_split is not used.")
    val_split: Optional[Probability] = Field(
        None, description="Fraction of the training data held out for validation; default 0.1, or 0 with "
        "val_root (which the two cannot share).")
    split_seed: int = Field(0, description="Seed of the train/validation split (fixed so runs compare).")
    num_samples: PositiveInt = Field(512, description="synthetic: number of images.")
    augment: Augment = Field(default_factory=Augment)

    @property
    def held_out(self) -> float:
        """The fraction of the training data held out for validation (val_split, or its default)."""
        if self.val_split is not None:
            return self.val_split
        return 0.0 if self.val_root else 0.1
