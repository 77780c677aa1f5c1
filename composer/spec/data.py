"""Pydantic models of the `data:` section."""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, PositiveInt

from composer.spec.model import Probability, Strict


class Augment(Strict):
    """Training-time augmentation, applied to whole batches on the training device."""

    crop_padding: Optional[Annotated[int, Field(ge=0)]] = Field(
        None, description="Random crop after zero-padding by this many pixels (0: off); default 4, or 0 with "
        "resized_crop (which the two cannot share).")
    resized_crop: Optional[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(
        None, description="Random resized crop (as ImageNet training does): a box of this fraction of the "
        "image's area up to all of it (e.g. 0.08), aspect ratio 3/4 to 4/3, resized back to the image size "
        "(bilinear). Instead of crop_padding's shifted crop.")
    hflip: bool = Field(True, description="Random horizontal flip.")
    trivial: bool = Field(False, description="TrivialAugment (wide): one random operation an image (shear, "
                          "translate, rotate, brightness, colour, contrast, sharpness, posterize, solarize, "
                          "autocontrast, equalize or none) at a random strength, after crop and flip.")
    three_augment: bool = Field(
        False, description="3-Augment (DeiT III, Touvron et al., 2022): one of grayscale, solarization (pixels "
        "from 128 up inverted) or a Gaussian blur (standard deviation 0.1-2 pixels) an image, drawn uniformly; "
        "after crop, flip and TrivialAugment.")
    color_jitter: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.0, description="Colour jitter (DeiT III uses 0.3): brightness, contrast and saturation each scaled by a "
        "factor uniform in 1 - s .. 1 + s, in a random order an image (torchvision's ColorJitter); after "
        "3-Augment. 0: off.")
    cutout: Annotated[int, Field(ge=0)] = Field(0, description="Side of a random square erased per image (0: off).")
    erasing: Probability = Field(
        0.0, description="Random erasing (Zhong et al., 2020; timm's re_prob, 0.25 in the DeiT and ConvNeXt "
        "recipes): the chance that an image gets one random box of 2%-33% of its area, aspect 0.3-3.3, filled "
        "with normal noise in normalized units (timm's 'pixel' mode). After crop, flip and TrivialAugment, "
        "before mixup / cutmix. 0: off.")
    mixup: Annotated[float, Field(ge=0.0)] = Field(0.0, description="Mixup Beta(alpha, alpha) parameter (0: off).")
    cutmix: Annotated[float, Field(ge=0.0)] = Field(0.0, description="CutMix Beta(alpha, alpha) parameter (0: off).")
    repeats: PositiveInt = Field(
        1, description="Repeated augmentation (Hoffer et al., 2020; DeiT uses 3): each image drawn for an epoch "
        "comes this many times, side by side in its batch, each copy augmented on its own; an epoch then draws "
        "1/repeats of the images and keeps its number of steps. 1: off.")

    def is_random(self) -> bool:
        """Whether two copies of an image can come out differently."""
        return bool(self.padding or self.resized_crop or self.hflip or self.trivial or self.three_augment
                    or self.color_jitter or self.cutout or self.erasing
                    or self.mixup or self.cutmix)

    @property
    def padding(self) -> int:
        """The padded crop's padding (crop_padding, or its default)."""
        if self.crop_padding is not None:
            return self.crop_padding
        return 0 if self.resized_crop else 4


class DataSpec(Strict):
    """Where images come from and how they are split and augmented."""

    kind: Literal["cifar10", "cifar100", "mnist", "fashion_mnist", "folder", "digits", "synthetic"] = Field(
        description="cifar10, cifar100 (fine labels), mnist, fashion_mnist: torchvision's copies (32x32 RGB, "
        "28x28 grayscale); folder: an ImageFolder directory or archive; digits: scikit-learn's bundled 8x8 "
        "digits (offline); synthetic: random images."
    )
    root: Optional[str] = Field(
        None, description="cifar10, cifar100, mnist, fashion_mnist: the directory that holds (or will hold) "
        "torchvision's copy; folder: directory or archive (.zip, .tar, .tar.gz, .tar.xz)."
    )
    download: bool = Field(False, description="cifar10, cifar100, mnist, fashion_mnist: download into root "
                           "when missing.")
    cache_dir: Optional[str] = Field(
        None, description="Where decoded datasets and extracted archives are cached (default ~/.cache/composer)."
    )
    val_root: Optional[str] = Field(
        None, description="folder: a validation folder (or archive) of its own, with the same class subfolders "
        "(e.g. ImageNet's train/ and val/); the whole of root then trains, and val_split is not used.")
    labels: Optional[str] = Field(
        None, description="folder: a CSV file that names each image's class, for images not sorted into class "
        "subfolders: a header row, then one `image,class` row an image (its path under root, the extension "
        "optional). Images it does not name are left out.")
    val_labels: Optional[str] = Field(None, description="folder: the same for val_root.")
    val_split: Optional[Probability] = Field(
        None, description="Fraction of the training data held out for validation; default 0.1, or 0 with "
        "val_root (which the two cannot share).")
    split_seed: int = Field(0, description="Seed of the train/validation split (fixed so runs compare).")
    stratify: bool = Field(False, description="Hold out val_split of each class rather than of the whole set, so "
                           "that rare classes are validated too (every class keeps at least one training image).")
    num_samples: PositiveInt = Field(512, description="synthetic: number of images.")
    crop: Optional[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(
        None, description="folder: decode each image's centre instead of the whole image: its shorter side resized to "
        "image_size / crop, then the central image_size square (timm's evaluation crop, e.g. 0.875). None: the "
        "whole image resized to image_size x image_size.")
    augment: Augment = Field(default_factory=Augment)

    @property
    def held_out(self) -> float:
        """The fraction of the training data held out for validation (val_split, or its default)."""
        if self.val_split is not None:
            return self.val_split
        return 0.0 if self.val_root else 0.1
