"""Pydantic models of the `train:` section."""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, PositiveInt

from composer.spec.model import Probability, Strict

PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegFloat = Annotated[float, Field(ge=0.0)]


class Optimizer(Strict):
    kind: Literal["adamw", "sgd"] = Field("adamw", description="adamw, or sgd with Nesterov momentum.")
    lr: PositiveFloat = Field(1e-3, description="Peak learning rate.")
    weight_decay: NonNegFloat = Field(0.05, description="Decoupled weight decay; never applied to norms, biases, embeddings.")
    betas: tuple[Probability, Probability] = Field((0.9, 0.999), description="adamw: (beta1, beta2).")
    momentum: Probability = Field(0.9, description="sgd: Nesterov momentum.")
    layer_decay: Optional[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(
        None, description="Layer-wise learning-rate decay, for fine-tuning (e.g. 0.75): the head trains at lr, "
        "each block below it at layer_decay times the rate of the block above (a repeat is a block of its own; "
        "a vit, mixer or convmixer block is one, both halves), the stem and embeddings at the bottom rate. "
        "None: one rate for all.")


class Schedule(Strict):
    kind: Literal["cosine", "onecycle", "constant"] = Field(
        "cosine", description="cosine: linear warmup then cosine decay to 0; onecycle: linear up then linear down; constant."
    )
    warmup_epochs: NonNegFloat = Field(1.0, description="cosine: epochs of linear warmup from 0.")
    peak_epoch_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        0.3, description="onecycle: fraction of training at which the learning rate peaks."
    )


class Distill(Strict):
    """Knowledge distillation: a trained run's predictions join the loss (DeiT)."""

    teacher: str = Field(
        description="A trained run directory or checkpoint (composer train, or composer import) with the same "
        "classes; it sees each training batch as the model does.")
    kind: Literal["hard", "soft"] = Field(
        "hard", description="hard: cross-entropy with the teacher's top class (DeiT's choice); soft: KL divergence "
        "between the temperature-softened distributions, times temperature^2 (Hinton et al.).")
    weight: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.5, description="Share of the teacher's term in the loss; the rest is the loss against the labels.")
    temperature: Optional[PositiveFloat] = Field(
        None, description="soft: the temperature T of both distributions (default 1); not used by hard.")


class TrainSpec(Strict):
    """How to train: optimizer, schedule, precision, checkpoints."""

    epochs: PositiveInt = Field(10, description="Passes over the training split.")
    batch_size: PositiveInt = Field(128, description="Global batch size (split across processes under torchrun).")
    recompute: bool = Field(
        False, description="Activation checkpointing: token blocks (attention, token and channel MLPs) keep "
        "only their input in the forward and run again in the backward: less activation memory for about a "
        "third more compute; grid blocks (BatchNorm) are kept as they are. The same training otherwise.")
    accumulate: PositiveInt = Field(
        1, description="Gradient accumulation: run each batch's forward and backward in this many equal "
        "slices (it must divide batch_size per process) and step the optimizer once after them. The "
        "same training as batch_size in one pass (BatchNorm's statistics excepted: they are per slice), "
        "with the activation memory of one slice; may change when resuming.")
    optimizer: Optimizer = Field(default_factory=Optimizer)
    schedule: Schedule = Field(default_factory=Schedule)
    label_smoothing: Probability = Field(0.0, description="Label smoothing of the cross-entropy loss.")
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="balanced: weigh each class's loss by the inverse of its share of the training "
        "images (images / (classes x its images)), for data where some classes are rare.")
    grad_clip: Optional[PositiveFloat] = Field(None, description="Clip the global gradient norm to this value.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU; fp16 uses a GradScaler."
    )
    ema: Optional[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(
        None, description="Decay of an exponential moving average of the weights (evaluated instead of the raw weights)."
    )
    compile: bool = Field(False, description="Wrap the model in torch.compile.")
    cuda_graph: Union[Literal["auto"], bool] = Field(
        "auto", description="Record each step's forward and backward once as a CUDA graph and replay it: "
        "removes the per-kernel host cost that leaves small models waiting on Python. true: on (needs "
        "CUDA, one process, no train.compile, no fp16); auto: off for now; false: off.")
    kernels: Literal["auto", "triton", "reference"] = Field("auto", description="Backend of the fused ops.")
    memory_format: Literal["auto", "channels_last", "contiguous"] = Field(
        "auto", description="Layout of images, activations and convolution weights on CUDA. auto: "
        "channels_last when the model has convolution (grid) blocks, except contiguous (NCHW) when a "
        "depthwise kernel is 9 or wider (7 or wider with kernels auto or triton), where the depthwise "
        "convolutions run faster in NCHW; else contiguous.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available.")
    seed: int = Field(0, description="Seed of weights, shuffling and augmentation.")
    deterministic: bool = Field(False, description="Deterministic algorithms (bitwise-reproducible on CPU).")
    checkpoint_every: Annotated[int, Field(ge=0)] = Field(0, description="Also save last.pt every N steps (0: epoch ends only).")
    keep_every: Annotated[int, Field(ge=0)] = Field(
        0, description="Also keep every N-th epoch's checkpoint as epoch_NNN.pt (0: none), to evaluate, "
        "visualize or resume the run as it was then.")
    tensorboard: bool = Field(
        False, description="Also write the per-epoch metrics as TensorBoard scalars in RUN_DIR/tensorboard "
        "(needs the tensorboard package; metrics.csv is written either way).")
    max_steps_per_epoch: Optional[PositiveInt] = Field(
        None, description="Cap the optimizer steps per epoch (quick runs on a subset, benchmarks); default: all data."
    )
    patience: Optional[PositiveInt] = Field(
        None, description="Early stopping: end the run when the validation accuracy has not improved for this "
        "many epochs (best.pt keeps the best one). Needs a validation split. None: train every epoch.")
    max_nonfinite: PositiveInt = Field(5, description="Stop after this many consecutive non-finite losses.")
    out_dir: Optional[str] = Field(None, description="Run directory (default runs/<spec name>).")
    init_from: Optional[str] = Field(
        None, description="Fine-tuning: a trained run directory or checkpoint whose weights (its EMA weights "
        "if it kept them) start this run. The class count and image size may differ: the classifier then "
        "starts anew and learned position embeddings are resized; anything else must match. Not used when "
        "resuming (the checkpoint holds the weights).")
    distill: Optional[Distill] = Field(
        None, description="Knowledge distillation from a trained run (a teacher), as DeiT trains ViTs from a "
        "ConvNet: its predictions on each training batch join the loss. None: labels only.")
    freeze: Optional[Union[Annotated[int, Field(ge=0)], Literal["backbone"]]] = Field(
        None, description="Fine-tuning: layers that keep their weights. N: the stem, the embeddings and the "
        "first N blocks (each repeat counts; a vit, mixer or convmixer block is one); backbone: everything but "
        "the head's classifier (a linear probe; attention pooling stays fixed too). Frozen layers run without gradients, their BatchNorm statistics and "
        "dropout as in evaluation. None: every layer trains.")
