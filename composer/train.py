"""The training loop: device-resident data, AMP, EMA, checkpoints that survive a crash, DDP.

Resumption is exact: the shuffling order of an epoch is a pure function of
(seed, epoch), augmentation draws from one generator whose state is checkpointed,
and a checkpoint records the step within the epoch, so a resumed run replays
the same batches in the same order with the same random numbers.
"""
from __future__ import annotations

import csv
import errno
import json
import os
import random
import signal
import socket
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from pydantic import ValidationError

from composer.build import build_model, count_params, model_backend, prepare_for_compile
from composer.checkpoint import (BEST, LAST, find_checkpoint, init_from_run, library_versions, load_checkpoint,
                                 model_differences, save_atomic)
from composer.distill import Teacher, distillation_loss, student_logits
from composer.errors import SpecFieldError, UserError
from composer.evaluate import classifiers_note, evaluate_model
from composer.graphed_step import GraphedStep, use_cuda_graph
from composer.optim import Ema, frozen_stages, lr_factor, make_optimizer
from composer.spec import Spec
from composer.summarize import human
from composer.spec.data import DataSpec

METRIC_FIELDS = ["epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr", "img_per_s",
                 "epoch_s", "nonfinite_skipped", "grad_norm", "grad_norm_max"]


WARMUP_STEPS = 5
RESUME_DATA_FIELDS = ("kind", "root", "val_root", "labels", "val_labels", "val_split", "split_seed", "num_samples")


class NonFiniteLoss(UserError):
    exit_code = 3


class Interrupted(UserError):
    """Stopped by a signal after saving: exits 128 + the signal's number, as a shell reports it."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


# -- setup ----------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SpecFieldError("train.device", "device cuda was requested but CUDA is not available; use --device cpu "
                             "or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


class Distributed:
    """Rank/world from torchrun's environment; a single process otherwise."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            torch.distributed.init_process_group(backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def close(self):
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = torch.cuda.is_available() and not deterministic


def precision(spec: Spec, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a GradScaler)."""
    p = spec.train.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    if p == "fp16" and device.type != "cuda":
        raise SpecFieldError("train.precision", "train.precision fp16 needs CUDA; use fp32 or bf16 on CPU")
    return {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, True), "fp32": (None, False)}[p]


TENSORBOARD_TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train",
                    "val_acc": "accuracy/val", "val_top5": "accuracy/val_top5", "lr": "lr",
                    "img_per_s": "throughput/img_per_s"}


def _tensorboard_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SpecFieldError("train.tensorboard", "train.tensorboard needs the tensorboard package: pip install "
                             "tensorboard (metrics.csv in the run directory has the same numbers)") from None
    return SummaryWriter


@contextmanager
def tensorboard_scalars(run_dir: Path, enabled: bool):
    """Yields log(row): the epoch's metrics as TensorBoard scalars at step = epoch (a no-op when disabled)."""
    if not enabled:
        yield lambda row: None
        return
    writer = _tensorboard_writer_class()(log_dir=str(run_dir / "tensorboard"))

    def log(row: dict) -> None:
        for key, tag in TENSORBOARD_TAGS.items():
            writer.add_scalar(tag, row[key], row["epoch"])
        writer.flush()

    try:
        yield log
    finally:
        writer.close()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def hold_run_directory(run_dir: Path):
    """An exclusive lock on RUN_DIR/.lock while training writes there: a second `composer train`
    into the same directory (started twice, or resumed while the first still runs) is refused
    instead of interleaving checkpoints and metrics with it. The operating system drops the lock
    when the process ends, however it ends, so a killed run leaves none behind."""
    try:
        import fcntl
    except ImportError:   # not a POSIX system: no lock
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserError(f"{run_dir} is in use by another composer train ({holder}); wait for it to finish, "
                            "or train into another directory with --out (nothing was written)") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield


@contextmanager
def stop_signals():
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler preempting the job, `docker stop`, `timeout`) sets a
    flag that the loop checks between steps, so that it saves last.pt at a step boundary (never
    half-updated) and exits; a second signal aborts at once. Yields {"hit": the signal or None}."""
    state = {"hit": None}
    if not threading_main():
        yield state
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

    def restore():
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def handler(signum, frame):
        if state["hit"] is not None:  # the second signal: what it does without the handler
            restore()
            signal.raise_signal(signum)
            return
        state["hit"] = signal.Signals(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)
    try:
        yield state
    finally:
        restore()


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# -- progress ---------------------------------------------------------------------------

class Progress:
    """A rich bar per epoch on a terminal; in a log (a cluster job, a pipe), a line every
    LOG_EVERY_S seconds within an epoch (long epochs otherwise say nothing for hours) and one at
    its end."""

    LOG_EVERY_S = 60.0

    def __init__(self, enabled: bool, echo):
        self.echo = echo
        self.enabled = enabled
        self.live = enabled and sys.stdout.isatty()
        self.bar = None
        self.next_line = float("inf")

    def start_epoch(self, epoch: int, epochs: int, total: int, done: int):
        self.epoch, self.total, self.first_step = f"epoch {epoch + 1}/{epochs}", total, done
        self.started = time.perf_counter()
        self.next_line = self.started + self.LOG_EVERY_S
        if not self.live:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

        self.bar = Bar(TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=True)
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, completed=done, info="")

    def due(self) -> bool:
        """Whether this step shows its numbers (each costs the host a wait for the device)."""
        return self.live or (self.enabled and time.perf_counter() >= self.next_line)

    def update(self, info: str, step: int):
        """`info` on the bar, or in a line with where the epoch is and when it ends; `step`: done."""
        if self.bar:
            self.bar.update(self.task, advance=1, info=info)
            return
        now = time.perf_counter()
        self.next_line = now + self.LOG_EVERY_S
        per_step = (now - self.started) / max(step - self.first_step, 1)
        self.echo(f"{self.epoch}  step {step}/{self.total}  {info}  epoch ends in "
                  f"{_duration(per_step * (self.total - step))}")


    def end_epoch(self, line: str):
        if self.bar:
            self.bar.stop()
            self.bar = None
        self.echo(line)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds < 3600 else f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# -- the loop -----------------------------------------------------------------------------

def in_slices(forward_backward, x: torch.Tensor, targets: torch.Tensor, slices: int, no_sync=None):
    """Gradient accumulation: `forward_backward(x, targets, share)` (forward, loss, and the backward
    of the loss times `share`) on `slices` equal slices of the batch, each weighted 1/slices, so
    that the gradients add up to the whole batch's mean loss. Returns the whole batch's (logits,
    loss). `no_sync`: DDP's context that holds its gradient all-reduce back, for every slice but
    the last (which then averages the summed gradients across processes once)."""
    if slices == 1:
        return forward_backward(x, targets, 1.0)
    outs = []
    for i, (xs, ts) in enumerate(zip(x.chunk(slices), targets.chunk(slices))):
        with no_sync() if no_sync is not None and i < slices - 1 else nullcontext():
            logits, loss = forward_backward(xs, ts, 1.0 / slices)
        outs.append((logits.detach(), loss.detach()))
    return torch.cat([o[0] for o in outs]), torch.stack([o[1] for o in outs]).mean()


def epoch_order(n: int, seed: int, repeats: int = 1) -> torch.Tensor:
    """The training images' order for one epoch, from its seed: a permutation of the n images, or with
    repeated augmentation the first n / repeats of one, each index `repeats` times in a row (copies
    share a batch and are augmented apart), cut to n."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if repeats == 1:
        return order
    return order[:-(-n // repeats)].repeat_interleave(repeats)[:n]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy against soft targets (label smoothing, mixup). With class `weights`, each
    class's term is weighed and the sum divided by the batch's total weight: for one-hot targets,
    F.cross_entropy(weight=...) exactly. (A batch in slices or over processes normalizes each part
    by its own weight: its mean, not the whole batch's.)"""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    if weights is None:
        return -(targets * log_probs).sum(dim=-1).mean()
    weighted = targets * weights
    return -(weighted * log_probs).sum() / weighted.sum()


def class_balance(labels: torch.Tensor, classes: list[str], scheme: str) -> tuple[torch.Tensor | None, str | None]:
    """The loss's class weights under train.class_weights, and what to log: the weights' range, or a
    note where the classes are imbalanced (the largest five times the smallest or more) and unweighed."""
    counts = torch.bincount(labels.cpu(), minlength=len(classes)).double()
    present = counts[counts > 0]
    if scheme == "balanced":
        weights = torch.where(counts > 0, counts.sum() / (len(present) * counts.clamp_min(1)), 0.0).float()
        low, high = int(torch.where(counts > 0, weights, float("inf")).argmin()), int(weights.argmax())
        return weights, (f"class weights (balanced): {float(weights[low]):.3g} ({classes[low]}, {int(counts[low]):,} "
                         f"images) to {float(weights[high]):.3g} ({classes[high]}, {int(counts[high]):,} images)")
    if len(present) > 1 and present.max() >= 5 * present.min():
        big, small = int(counts.argmax()), int(torch.where(counts > 0, counts, float("inf")).argmin())
        return None, (f"note: the classes are imbalanced ({classes[big]}: {int(counts[big]):,} training images, "
                      f"{classes[small]}: {int(counts[small]):,}); train.class_weights: balanced weighs the loss "
                      "against it")
    return None, None


def start_from_pretrained(model, spec: Spec, log) -> dict | None:
    """train.init_from: the pretrained run's weights into `model` (what was done, logged). Returns
    its input normalization ({"mean", "std"}), which the run then takes instead of its data's own
    statistics: the pretrained features were learned on inputs in those (logged too)."""
    found = {}
    with torch.no_grad():
        try:
            log(init_from_run(model, spec, spec.train.init_from, found=found))
        except UserError as exc:
            raise SpecFieldError("train.init_from", str(exc)) from None
    normalization = found["normalization"]
    if normalization:
        log(f"input normalization: the pretrained run's (mean {_rounded(normalization['mean'])}, std "
            f"{_rounded(normalization['std'])}), not this data's own")
    return normalization


def _rounded(values) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


def each_classifier(val: dict) -> str:
    """ " (class token 0.7100, distillation token 0.7300)" after a distilled model's val_acc; else ""."""
    note = classifiers_note(val)
    return f" ({note})" if note else ""


def spec_yaml(spec: Spec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def train(spec: Spec, resume: str | None = None, echo=print) -> dict:
    """Train `spec`; returns {"run_dir", "final": final metrics}. Raises UserError subclasses for
    user mistakes; one that a field of the spec can fix names the line the field is on."""
    try:
        return _train_on_device(spec, resume, echo)
    except SpecFieldError as exc:
        raise exc.located(spec.locate(exc.field)) from None
    except OSError as exc:
        # the run directory's other files (metrics.csv, spec.yaml, TensorBoard's) on a full, over-quota
        # or read-only disk; checkpoints have their own message (`checkpoint` in _train)
        if exc.errno not in DISK_ERRORS or not exc.filename:
            raise
        raise UserError(f"cannot write {exc.filename}: {exc.strerror}; the checkpoints already in the run directory "
                        "are intact. Free space there (or train into another --out) and resume with --resume auto") \
            from None


def snapshot_name(epoch: int) -> str:
    """The file train.keep_every keeps an epoch's checkpoint in."""
    return f"epoch_{epoch:03d}.pt"


# what a full or read-only disk raises: a user's to fix, not a crash
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def _train_on_device(spec: Spec, resume: str | None, echo) -> dict:
    t = spec.train
    device = resolve_device(t.device)
    dist = Distributed(device)
    try:
        with ExitStack() as cleanup:
            return _train(spec, resume, echo, device, dist, cleanup)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        # CUDA raises OutOfMemoryError; the CPU allocator a RuntimeError with this phrase
        if not isinstance(exc, torch.cuda.OutOfMemoryError) and "can't allocate memory" not in str(exc):
            raise
        where = "GPU" if isinstance(exc, torch.cuda.OutOfMemoryError) else "CPU"
        per_process = t.batch_size // dist.world
        finer = [s for s in range(t.accumulate + 1, per_process + 1) if per_process % s == 0]
        slices = (f"--set train.accumulate={finer[0]} (the same training, in slices of "
                  f"{per_process // finer[0]} images), " if finer else "")
        raise UserError(
            f"out of {where} memory at batch size {t.batch_size} (per process {per_process}, "
            f"{per_process // t.accumulate} a slice); try {slices}--set train.batch_size={max(1, t.batch_size // 2)}, "
            "precision bf16, or a smaller model") from None
    finally:
        dist.close()


def _train(spec, resume, echo, device, dist, cleanup: ExitStack):
    from composer.data import channel_stats, load_split, training_batch

    t = spec.train
    run_dir = Path(t.out_dir or Path("runs") / spec.name)
    if t.batch_size % dist.world:
        raise SpecFieldError("train.batch_size", f"train.batch_size {t.batch_size} must be divisible by the "
                                                 f"{dist.world} processes")
    if t.batch_size // dist.world % t.accumulate:
        raise SpecFieldError("train.accumulate", f"train.accumulate {t.accumulate} does not divide the "
                                                 f"{t.batch_size // dist.world} images a "
                        f"process takes of each batch ({dist.world} processes); pick a divisor of it")
    log = echo if dist.main else (lambda *a, **k: None)

    # -- resume target, checked before any work ---------------------------------------
    state = None
    if resume and resume != "auto":
        path = Path(resume)
        path = path / LAST if path.is_dir() else path
        if (run_dir / LAST).exists() and path.resolve().parent != run_dir.resolve():
            raise UserError(f"{run_dir} already holds another run; resume {path} into its own directory "
                            f"(--out {path.parent}) or into a new one (nothing was overwritten)")
        state = load_checkpoint(path)
    elif resume == "auto" and (run_dir / LAST).exists():
        earlier = (f"resume from the best epoch's checkpoint instead (--resume {run_dir / BEST}; the epochs "
                   "after it train again), or start a fresh run" if (run_dir / BEST).exists()
                   else "start a fresh run in another directory (--out)")
        state = load_checkpoint(run_dir / LAST, fix=earlier)
    elif resume is None and (run_dir / LAST).exists():
        raise UserError(f"{run_dir} already holds a run ({run_dir / LAST}); continue it with --resume auto, "
                        f"or train into another directory with --out (nothing was overwritten)")
    if state is not None:
        saved = yaml.safe_load(state["spec_yaml"])
        now = spec.model_dump(mode="json")
        diffs = model_differences(saved["model"], now["model"])
        # The data split and the batch size fix which images are validation and the schedule's length:
        # changing them mid-run would leak validation images into training or jump the learning rate.
        diffs += model_differences(_split_fields(saved["data"]), _split_fields(now["data"]), "data")
        # the optimizer's saved state holds the parameters that train: the frozen layers decide which
        diffs += model_differences({k: saved["train"].get(k) for k in ("batch_size", "freeze")},
                                   {k: now["train"].get(k) for k in ("batch_size", "freeze")}, "train")
        # the optimizer's saved state has the parameter groups and moments of its kind and layer decay
        diffs += model_differences(_optimizer_fields(saved["train"]), _optimizer_fields(now["train"]),
                                   "train.optimizer")
        if diffs:
            raise UserError("the checkpoint does not match the spec:\n  " + "\n  ".join(diffs)
                            + "\nresume with the spec the run was trained with, or start a new run directory")

    if t.init_from and state is None:
        try:
            find_checkpoint(t.init_from)   # a wrong path fails here, before any data is decoded
        except UserError as exc:
            raise SpecFieldError("train.init_from", f"train.init_from: {exc}") from None
    if t.distill is not None:
        try:
            find_checkpoint(t.distill.teacher)   # as init_from: before any data is decoded
        except UserError as exc:
            raise SpecFieldError("train.distill.teacher", f"train.distill.teacher: {exc}") from None
    if t.tensorboard and dist.main:
        _tensorboard_writer_class()  # a missing package fails here, before any data is decoded
    autocast_dtype, use_scaler = precision(spec, device)
    graphed, graph_reasons = use_cuda_graph(t.cuda_graph, device, compile=t.compile, processes=dist.world,
                                            grad_scaler=use_scaler, accumulate=t.accumulate,
                                            distill=t.distill is not None)
    seed_everything(t.seed, t.deterministic)

    # -- data: one uint8 tensor per split, on the training device ------------------------
    started = time.perf_counter()
    train_set = load_split(spec.data, spec.model, "train", echo=log)
    val_set = (load_split(spec.data, spec.model, "val", echo=log) if spec.data.held_out > 0 or spec.data.val_root
               else None)
    if val_set is not None and val_set.classes != train_set.classes:
        raise SpecFieldError("data.val_root", _class_mismatch(spec.data, train_set.classes, val_set.classes))
    if state is not None:
        mean, std = state["normalization"]["mean"], state["normalization"]["std"]
    else:
        mean, std = channel_stats(train_set)
    data_bytes = train_set.nbytes + (val_set.nbytes if val_set is not None else 0)
    on_host = keep_data_on_host(data_bytes, device)
    # On the host, the loop gathers each batch there and copies it over, from pinned memory so
    # that the copy does not hold the host up (a pinned copy of the whole set would need twice
    # its memory at once). Labels and the shuffled order are small: they go to the device.
    pinned = (lambda images: images.pin_memory()) if device.type == "cuda" else (lambda images: images)
    train_images = train_set if on_host else train_set.to(device)   # batches: train_images.take(positions)
    train_labels = train_set.labels.to(device)
    if val_set is not None and not on_host:
        val_set = val_set.to(device)
    n = len(train_images)
    steps_per_epoch = min(n // t.batch_size, t.max_steps_per_epoch or n)
    if steps_per_epoch == 0:
        raise SpecFieldError("train.batch_size", f"train.batch_size {t.batch_size} is larger than the {n} training "
                                                 "images; lower it")
    where = (f"in host memory ({data_bytes / 2**30:.1f} GiB: more than the GPU's free memory leaves the model; "
             "each batch is copied over)" if on_host else f"on {device}")
    if train_images.on_disk:
        where = f"in a file on disk, {data_bytes / 2**30:.1f} GiB read as batches use them"
    log(f"data: {n} train / {0 if val_set is None else len(val_set.labels)} val images of "
        f"{tuple(train_images.images.shape[1:])} {where} ({time.perf_counter() - started:.1f}s)")
    if spec.data.augment.repeats > 1:
        r = spec.data.augment.repeats
        log(f"repeated augmentation: each image drawn {r} times in its batch, augmented apart; "
            f"{-(-n // r):,} distinct images an epoch")
    class_weights, said = class_balance(train_set.labels, list(train_set.classes or range(spec.model.num_classes)),
                                        t.class_weights)
    class_weights = class_weights.to(device) if class_weights is not None else None
    if said:
        log(said)

    # -- model, optimizer, schedule ------------------------------------------------------
    model = build_model(spec, backend=model_backend(t.kernels, t.compile)).to(device)
    if t.recompute:
        log(f"recompute: {model.recompute_token_blocks()} token blocks recompute their activations in the backward")
    flops = sum(layer.cost.flops for layer in model.layers)
    if spec.model.token_merging:
        from composer.merging import describe, merge_note

        merged = describe(model, spec.model.token_merging)
        log(merge_note(merged, flops=False))   # (the next line says the FLOPs)
        flops = merged["flops"][1]
    log(f"model: {count_params(model):,} parameters, {human(flops)} FLOPs an image forward "
        f"({t.batch_size} images a step" + (f" in {t.accumulate} slices)" if t.accumulate > 1 else ")"))
    if t.init_from and state is None:   # a resume takes its own checkpoint's weights
        pretrained = start_from_pretrained(model, spec, log)
        if pretrained:
            mean, std = pretrained["mean"], pretrained["std"]
    if t.freeze is not None:
        stages = frozen_stages(model, t.freeze)
        frozen = model.freeze(stages)
        in_head = frozen > sum(count_params(stage) for stage in model.stages[:stages])   # attention pooling
        pooling = " and the head's attention pooling" if in_head else ""
        log(f"freeze: {model.layers[0].name} to {model.layers[stages - 1].name}{pooling} keep their weights "
            f"({frozen:,} parameters, run without gradients, BatchNorm and dropout as in evaluation); "
            f"{count_params(model) - frozen:,} parameters train")
        if not t.init_from:
            log("note: train.freeze without train.init_from keeps layers at their random initial weights")
    if t.compile:
        outside = prepare_for_compile(model, t.kernels, device)
        if outside:
            log(f"kernels: under torch.compile, {', '.join(outside)} run as Triton kernels between the compiled "
                "regions" + ("" if t.kernels == "triton" else "; other blocks are PyTorch, fused by inductor "
                             "(--kernels triton runs their Triton kernels too)"))
        elif device.type == "cuda" and t.kernels == "auto":
            log("kernels: under torch.compile the blocks are PyTorch, fused by inductor (--kernels triton runs "
                "the Triton kernels between the compiled regions)")
    memory_format = training_memory_format(spec, device)
    if memory_format is not None:
        model = model.to(memory_format=memory_format)
    optimizer = make_optimizer(spec, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(spec, s, steps_per_epoch))
    if t.optimizer.layer_decay:
        rates = sorted({group["initial_lr"] for group in optimizer.param_groups})   # the schedule's peaks
        lowest = "stem, embeddings" if t.freeze is None else "the first layer that trains"
        log(f"layer decay {t.optimizer.layer_decay}: peak learning rates from {rates[0]:.3g} ({lowest}) "
            f"to {rates[-1]:.3g} (head)")
    if t.kernels == "triton":
        _check_triton(model, device, autocast_dtype or torch.float32)
    teacher = None
    if t.distill is not None:
        try:
            teacher = Teacher(t.distill.teacher, spec, mean, std, device, backend=t.kernels)
            teacher.check_classes(train_set.classes)
        except UserError as exc:
            raise SpecFieldError("train.distill.teacher", str(exc)) from None
        log(teacher.describe(t.distill.kind, t.distill.weight, t.distill.temperature or 1.0))
    if model.distilled_training(teacher is not None):   # a distillation token: its classifier learns the teacher
        log("distillation token: " + ("its classifier learns the teacher's predictions, the class token's the labels"
                                      if teacher is not None else "no train.distill teacher, so both classifiers "
                                      "learn the labels (through their mean, the model's prediction)"))
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    ema = Ema(model, t.ema) if t.ema else None
    ema_model = build_model(spec, backend=t.kernels).to(device) if ema else None  # evaluated at epoch ends
    aug_gen = torch.Generator(device=device)
    aug_gen.manual_seed(t.seed + 1)
    # Where the run is, including the running sums of the current epoch, so a mid-epoch resume logs the same.
    position = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_acc": -1.0, "best_epoch": 0,
                "nonfinite_total": 0, "consecutive_nonfinite": 0,
                "epoch_loss_sum": 0.0, "epoch_correct": 0, "epoch_seen": 0, "epoch_skipped": 0,
                "epoch_norm_sum": 0.0, "epoch_norm_steps": 0, "epoch_norm_max": 0.0}

    def stopped_early(at: dict) -> bool:
        """train.patience epochs have ended since the best validation accuracy (at an epoch's end)."""
        return bool(t.patience) and val_set is not None and at["epoch"] - at["best_epoch"] >= t.patience

    if dist.main:   # from here on the run directory is written
        cleanup.enter_context(hold_run_directory(run_dir))
    if state is not None:
        model.load_state_dict(state["model"])
        # the spec's hyperparameters as this run states them (the loaded state would bring back the saved ones)
        stated = [{k: group[k] for k in OPTIMIZER_HYPERPARAMETERS if k in group} for group in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        changed = _apply_stated_hyperparameters(optimizer, scheduler, stated, saved, spec)
        if changed:
            log(f"resumed with {', '.join(changed)}: from here on")
        if state["scaler"]:  # empty when the run did not use a GradScaler
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema"):
            ema.state = {k: v.to(device) for k, v in state["ema"].items()}
        if state.get("device_type", device.type) == device.type:
            _set_rng(state["rng"], aug_gen)
        else:  # generator states do not transfer between devices: continue with a fresh, seeded stream
            torch.manual_seed(t.seed + state["global_step"])
            aug_gen.manual_seed(t.seed + 1 + state["global_step"])
            log(f"note: the run moves from {state['device_type']} to {device.type}; augmentation continues with "
                "a new random stream, so the result will differ from an uninterrupted run")
        position.update({k: state.get(k, v) for k, v in position.items()})
        if "best_epoch" not in state:   # written before early stopping: patience counts from here
            position["best_epoch"] = position["epoch"]
        log(f"resumed from epoch {position['epoch']} step {position['step_in_epoch']} (global step "
            f"{position['global_step']})")
        if stopped_early(position):
            log(f"the run stopped early at epoch {position['epoch']}: no better validation accuracy since epoch "
                f"{position['best_epoch']} ({t.patience} epoch{'s' * (t.patience != 1)} of patience); nothing to "
                "train (to go on, raise train.patience)")
        elif position["epoch"] >= t.epochs:
            log(f"the run has finished its {t.epochs} epoch{'s' * (t.epochs != 1)}: nothing to train (to train it longer, pass a larger "
                "--epochs: the learning-rate schedule then continues as if planned for the new length)")
        if dist.main:
            _truncate_metrics(run_dir / "metrics.csv", position["epoch"])

    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "spec.yaml").write_text(spec_yaml(spec))
    forward_model = torch.compile(model) if t.compile else model
    if dist.enabled:
        forward_model = torch.nn.parallel.DistributedDataParallel(
            forward_model, device_ids=[device.index] if device.type == "cuda" else None)

    # walked once: model.parameters() each step costs the host a module-tree traversal
    trained_params = [p for p in model.parameters() if p.requires_grad]
    # A recorded step clips its gradients itself (no GradScaler to unscale first there): a few
    # launches fewer a step for the host. Clipping a non-finite gradient is harmless, the loop
    # then skips the update; eager steps clip only finite ones, after the scaler's unscale_.
    clip_in_step = bool(t.grad_clip) and graphed
    clipped = {}   # "norm": the gradient norm the recorded step's clipping measured (updated by each replay)

    def forward_backward(x, targets, share=1.0):
        # autocast's cache of cast weights would outlive a recorded graph: off when recording
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None,
                            cache_enabled=not graphed):
            output = forward_model(x)
            taught = teacher.logits(x) if teacher is not None else None   # the same batch, no gradients
        logits, for_targets, for_teacher = student_logits(output)
        loss = soft_cross_entropy(for_targets, targets, class_weights)
        if taught is not None:
            d = t.distill
            loss = distillation_loss(for_teacher, taught, loss, d.kind, d.weight, d.temperature or 1.0)
        scaler.scale(loss if share == 1.0 else loss * share).backward()
        if clip_in_step:
            clipped["norm"] = torch.nn.utils.clip_grad_norm_(trained_params, t.grad_clip)
        return logits, loss

    def gradient_norm() -> torch.Tensor:
        """The step's gradient norm before clipping (all trained parameters as one vector), on the
        device: clipping measures it anyway; without clipping it is one more reduction a step."""
        if clip_in_step:
            return clipped["norm"]
        scaler.unscale_(optimizer)   # fp16: the true gradients (the optimizer step then does not unscale again)
        if t.grad_clip:
            return torch.nn.utils.clip_grad_norm_(trained_params, t.grad_clip)
        return torch.nn.utils.get_total_norm([p.grad for p in trained_params if p.grad is not None])

    graph_step = GraphedStep(forward_backward, model, log) if graphed else None   # (never with train.accumulate)
    no_sync = forward_model.no_sync if dist.enabled else None
    if device.type == "cuda":
        log("cuda graph: " + ("the step is recorded after the first few and replayed" if graphed
                              else "off: " + "; ".join(graph_reasons)))

    def clear_grads():
        if not (graph_step and graph_step.owns_grads):   # replays overwrite the recorded gradients in place
            optimizer.zero_grad(set_to_none=True)

    # With a recorded step, waiting every step for the loss's finiteness would leave the GPU idle
    # while the host runs the optimizer and prepares the next batch. Fused AdamW skips its
    # update on the device instead (`found_inf`: parameters, moments and step count unchanged),
    # and the host reads each step's verdict one step later (`LateVerdicts`). (Fused SGD's
    # momentum buffer is left uninitialised when its first step is skipped so: SGD waits.)
    skip_on_device = (graph_step is not None and isinstance(optimizer, torch.optim.AdamW)
                      and bool(optimizer.defaults.get("fused")))
    verdicts = LateVerdicts(device) if skip_on_device else None

    def checkpoint(path_names):
        if not dist.main:
            return
        blob = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "ema": ema.state if ema else None, "rng": _get_rng(aug_gen),
            **position, "batch_size": t.batch_size, "device_type": device.type, "spec_yaml": spec_yaml(spec),
            "normalization": {"mean": list(mean), "std": list(std)}, "classes": train_set.classes,
            "versions": library_versions(),
        }
        for name in path_names:
            try:
                save_atomic(blob, run_dir / name)
            except OSError as exc:   # disk full, quota, read-only: the old file was left as it was
                raise UserError(f"cannot save the checkpoint {run_dir / name}: {exc.strerror or exc}; any "
                                f"earlier {name} there is intact. Free space in {run_dir} (or train into "
                                "another --out) and resume with --resume auto") from None

    progress = Progress(dist.main, log)
    per_rank = t.batch_size // dist.world
    final = {}
    first_epoch = t.epochs if stopped_early(position) else position["epoch"]
    with stop_signals() as interrupt, tensorboard_scalars(run_dir, t.tensorboard and dist.main) as tensorboard:
        for epoch in range(first_epoch, t.epochs):
            host_order = epoch_order(n, t.seed * 100_003 + epoch, spec.data.augment.repeats)
            order = host_order.to(device)
            start_step = position["step_in_epoch"]
            model.train()
            progress.start_epoch(epoch, t.epochs, steps_per_epoch, start_step)
            # This process's (loss sum, correct, images) since the last sync; `sync` folds the sums of all
            # processes into `position` (a collective: every rank calls it at the same step).
            # (loss sum, correct, images, gradient-norm sum, steps it counts) and the largest norm
            local = torch.zeros(5, dtype=torch.float64, device=device)
            local_max = torch.zeros(1, dtype=torch.float64, device=device)
            skipped = position["epoch_skipped"]

            def tally(finite: bool, at_epoch: int, at_step: int) -> int:
                """The host's count of one step's verdict: 1 if it was skipped (loss not finite), else
                0; stops the run at train.max_nonfinite in a row."""
                if finite:
                    position["consecutive_nonfinite"] = 0
                    return 0
                position["consecutive_nonfinite"] += 1
                position["nonfinite_total"] += 1
                if position["consecutive_nonfinite"] >= t.max_nonfinite:
                    kept = (f"The last good checkpoint is {run_dir / LAST}" if (run_dir / LAST).exists()
                            else "No checkpoint was saved before it")
                    raise NonFiniteLoss(
                        f"the loss was not finite for {position['consecutive_nonfinite']} steps in a row "
                        f"(epoch {at_epoch + 1}, step {at_step + 1}); stopped. {kept}. Try a lower "
                        "train.optimizer.lr, train.grad_clip, or precision fp32.")
                return 1

            def update_on_device(logits, loss, y, at_epoch: int, at_step: int) -> int:
                """The optimizer step, EMA and sums of a step whose skip, if its loss is not finite,
                is decided on the device (`skip_on_device`); counts the previous step's verdict."""
                finite = torch.isfinite(loss.detach())
                count_norm(gradient_norm(), finite)
                optimizer.found_inf = (~finite).float()   # fused AdamW: no update where set
                optimizer.step()   # (the recorded step has clipped the gradients: `clip_in_step`)
                clear_grads()
                if ema:
                    ema.update(finite)
                local[0] += torch.where(finite, loss.detach().double() * y.shape[0], 0.0)
                local[1] += torch.where(finite, (logits.detach().argmax(-1) == y).sum(), 0)
                local[2] += finite * y.shape[0]
                verdict = verdicts.push(finite, at_epoch, at_step)
                return tally(*verdict) if verdict else 0

            def count_norm(norm: torch.Tensor, finite_loss: torch.Tensor | None = None) -> None:
                """Add a step's gradient norm to the epoch's mean and maximum, on the device. Left out:
                a skipped step's, and an overflowed one's (fp16: the GradScaler skips that step)."""
                norm = norm.detach().double()
                counts = torch.isfinite(norm) if finite_loss is None else torch.isfinite(norm) & finite_loss
                norm = torch.where(counts, norm, 0.0)
                local[3] += norm
                local[4] += counts
                torch.maximum(local_max, norm, out=local_max)

            def settle() -> int:
                """Count the verdict still in flight (before anything reads or saves the counts)."""
                verdict = verdicts.flush() if verdicts else None
                return tally(*verdict) if verdict else 0

            def sync():
                if dist.enabled:
                    torch.distributed.all_reduce(local)
                    torch.distributed.all_reduce(local_max, op=torch.distributed.ReduceOp.MAX)
                loss_sum, correct, seen, norm_sum, norm_steps = local.tolist()
                position.update({"epoch_loss_sum": position["epoch_loss_sum"] + loss_sum,
                                 "epoch_correct": position["epoch_correct"] + int(correct),
                                 "epoch_seen": position["epoch_seen"] + int(seen), "epoch_skipped": skipped,
                                 "epoch_norm_sum": position["epoch_norm_sum"] + norm_sum,
                                 "epoch_norm_steps": position["epoch_norm_steps"] + int(norm_steps),
                                 "epoch_norm_max": max(position["epoch_norm_max"], local_max.item())})
                local.zero_()
                local_max.zero_()
            tic, timed_from = time.perf_counter(), start_step
            for step in range(start_step, steps_per_epoch):
                if step == start_step + WARMUP_STEPS and steps_per_epoch - step >= WARMUP_STEPS:
                    # img/s counts steady-state steps only: not the first ones (allocation, autotuning, compile)
                    _synchronize(device)
                    tic, timed_from = time.perf_counter(), step
                idx = order[step * t.batch_size:(step + 1) * t.batch_size]
                if on_host:
                    batch = train_images.take(host_order[step * t.batch_size:(step + 1) * t.batch_size])
                    batch = pinned(batch).to(device, non_blocking=True)
                else:
                    batch = train_images.take(idx)
                # Every rank augments the whole global batch (cheap, on device) and keeps its shard, so the
                # random numbers match any number of processes; so does the gradient, for models without
                # BatchNorm (statistics are per process) or dropout/drop-path (drawn per process).
                x, targets = training_batch(batch, train_labels[idx], spec.data.augment, spec.model.num_classes,
                                            mean, std, aug_gen, t.label_smoothing)
                shard = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)
                x, targets, y = x[shard], targets[shard], train_labels[idx][shard]
                if memory_format is not None:
                    x = x.contiguous(memory_format=memory_format)
                if graph_step:
                    logits, loss = graph_step(x, targets)
                else:
                    logits, loss = in_slices(forward_backward, x, targets, t.accumulate, no_sync)
                if skip_on_device:
                    stop = interrupt["hit"] is not None   # one process: nothing to agree on
                    skipped += update_on_device(logits, loss, y, epoch, step)
                else:
                    # The finiteness check syncs with the device; after backward is queued, it costs
                    # little. One collective per step carries both the finiteness of the loss and a
                    # stop signal seen by any process, so every rank takes the same branch.
                    finite, stop = _step_flags(loss, interrupt["hit"] is not None, dist)
                    skipped += tally(finite, epoch, step)
                    if not finite:
                        clear_grads()
                    else:
                        count_norm(gradient_norm())
                        scaler.step(optimizer)
                        scaler.update()
                        clear_grads()
                        if ema:
                            ema.update()
                        local[0] += loss.detach().double() * y.shape[0]
                        local[1] += (logits.detach().argmax(-1) == y).sum()
                        local[2] += y.shape[0]
                scheduler.step()
                position["global_step"] += 1
                position["step_in_epoch"] = step + 1
                if progress.due():   # the .item() syncs: every step on a terminal, once a minute in a log
                    done = local[2].item() or 1
                    rate = (step + 1 - timed_from) * t.batch_size / max(time.perf_counter() - tic, 1e-9)
                    progress.update(f"loss {loss.item():.3f}  acc {local[1].item() / done:.3f}  {rate:,.0f} img/s",
                                    step + 1)
                if t.checkpoint_every and position["global_step"] % t.checkpoint_every == 0:
                    skipped += settle()
                    sync()
                    checkpoint([LAST])
                if stop:
                    skipped += settle()
                    sync()
                    checkpoint([LAST])
                    by = interrupt["hit"]   # None where another process got the signal
                    raise Interrupted(f"interrupted by {by.name if by else 'a signal to another process'}; "
                                      f"saved {run_dir / LAST} at epoch {epoch + 1} step {step + 1}. "
                                      f"Resume with: composer train SPEC --resume auto --out {run_dir}",
                                      by or signal.SIGINT)
            _synchronize(device)
            elapsed = time.perf_counter() - tic
            images_done = (steps_per_epoch - timed_from) * t.batch_size
            skipped += settle()
            sync()
            seen = position["epoch_seen"]

            # -- end of epoch: validate, log, checkpoint -------------------------------
            eval_model = model
            if ema:
                ema_model.load_state_dict(ema.state)
                eval_model = ema_model
            val = evaluate_model(eval_model, val_set.images, val_set.labels, mean, std, device=device,
                                 autocast_dtype=autocast_dtype, num_classes=spec.model.num_classes) \
                if val_set is not None else {"loss": float("nan"), "accuracy": float("nan"), "top5": float("nan")}
            position.update({"epoch": epoch + 1, "step_in_epoch": 0})
            row = {
                "epoch": epoch + 1, "step": position["global_step"],
                "train_loss": position["epoch_loss_sum"] / seen if seen else float("nan"),
                "train_acc": position["epoch_correct"] / seen if seen else float("nan"),
                "val_loss": val["loss"], "val_acc": val["accuracy"], "val_top5": val["top5"],
                "lr": max(scheduler.get_last_lr()), "img_per_s": images_done / max(elapsed, 1e-9),
                "epoch_s": elapsed, "nonfinite_skipped": skipped,
                "grad_norm": position["epoch_norm_sum"] / position["epoch_norm_steps"]
                if position["epoch_norm_steps"] else float("nan"),
                "grad_norm_max": position["epoch_norm_max"] if position["epoch_norm_steps"] else float("nan"),
            }
            position.update({"epoch_loss_sum": 0.0, "epoch_correct": 0, "epoch_seen": 0, "epoch_skipped": 0,
                             "epoch_norm_sum": 0.0, "epoch_norm_steps": 0, "epoch_norm_max": 0.0})
            if dist.main:
                _append_metrics(run_dir / "metrics.csv", row)
                tensorboard(row)
            improved = val_set is not None and val["accuracy"] > position["best_acc"]
            if improved:
                position["best_acc"], position["best_epoch"] = val["accuracy"], epoch + 1
            # best.pt first: a crash between the two writes must not leave last.pt claiming a better best
            checkpoint([BEST, LAST] if improved or val_set is None else [LAST])
            if t.keep_every and (epoch + 1) % t.keep_every == 0:
                checkpoint([snapshot_name(epoch + 1)])
            progress.end_epoch(
                f"epoch {epoch + 1}/{t.epochs}  loss {row['train_loss']:.4f}  acc {row['train_acc']:.4f}  "
                f"val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.4f}{each_classifier(val)}  "
                f"lr {row['lr']:.2e}  "
                f"grad_norm {row['grad_norm']:.3g} (max {row['grad_norm_max']:.3g})  {row['img_per_s']:.0f} img/s")
            final = row
            dist.barrier()
            if stopped_early(position) and epoch + 1 < t.epochs:   # every process saw the same accuracy
                log(f"early stop: no better validation accuracy for {t.patience} epoch{'s' * (t.patience != 1)} "
                    f"(the best, {position['best_acc']:.4f} at epoch {position['best_epoch']}, is in best.pt)")
                break

    if not final:  # resumed a finished run
        final = _last_metrics(run_dir / "metrics.csv")
    best = position["best_acc"] if val_set is not None else None
    final = {**final, "best_val_acc": best, "stopped_early": stopped_early(position) and position["epoch"] < t.epochs,
             "run_dir": str(run_dir)}
    if dist.main:
        (run_dir / "final.json").write_text(json.dumps(final, indent=2))
    return {"run_dir": str(run_dir), "final": final}


# -- helpers --------------------------------------------------------------------------------

# The share of the GPU's free memory the dataset may take on it; the rest is the model's (weights,
# optimizer state, activations). Past it, the images stay in host memory.
GPU_DATA_SHARE = 0.5


def keep_data_on_host(data_bytes: int, device: torch.device) -> bool:
    """Whether the decoded images (`data_bytes` of them) stay in host memory rather than move to
    the training device: on a GPU whose free memory they would take more than GPU_DATA_SHARE of."""
    if device.type != "cuda":
        return False
    free, _total = torch.cuda.mem_get_info(device)
    return data_bytes > GPU_DATA_SHARE * free


def _check_triton(model, device: torch.device, dtype: torch.dtype) -> None:
    """--kernels triton must hold for every block before training starts, not fail at the first step."""
    import kernels

    problems = []
    for layer in model.layers:
        op = getattr(layer.module, "kernel_op", None)
        if op:
            choice, reasons = kernels.backend_for(op, "triton", device, dtype, **layer.module.kernel_dims(layer.ctx))
            if choice != "triton":
                problems.append(f"{layer.name}: {'; '.join(reasons)}")
        norm_op = getattr(layer.module, "norm_op", None)
        if norm_op and not op:   # a block with both reports its kernel op's reasons (the same device and dtype)
            choice, reasons = kernels.backend_for(norm_op, "triton", device, dtype)
            if choice != "triton":
                problems.append(f"{layer.name}: {'; '.join(reasons)}")
    if problems:
        raise SpecFieldError("train.kernels", "train.kernels is triton, but the Triton kernels cannot run:\n  " + "\n  ".join(problems)
                        + "\nuse --kernels auto (Triton where it can run) or --kernels reference")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _grid_model(spec: Spec) -> bool:
    from composer.spec import LAYOUTS

    return any(LAYOUTS[b.kind] == "grid" for b in spec.model.blocks)


def training_memory_format(spec: Spec, device: torch.device) -> torch.memory_format | None:
    """The layout training converts the model and each batch to (None: leave them as built).

    Only on CUDA. `auto` picks channels_last for models with grid blocks (cuDNN's convolutions
    prefer it), except where a depthwise kernel is wide enough that NCHW is faster (see
    NCHW_MIN_DEPTHWISE_K). Measured on an H100, convmixer_cifar (k9, batch 512, bf16) trained at
    5,777 img/s in NCHW against 4,489 in channels_last (BENCHMARKS.md)."""
    choice = spec.train.memory_format
    if device.type != "cuda" or choice == "contiguous":
        return None
    if choice == "auto" and (not _grid_model(spec) or _wide_depthwise(spec)):
        return None
    return torch.channels_last


# From this depthwise kernel size on NCHW trains faster whichever kernels run the convolution:
# at 9, cuDNN's channels_last depthwise convolution is 10x slower than its NCHW one (H100, B256
# C256 32x32 forward+backward: 160 against 16 ms) and ours are faster in NCHW too.
NCHW_MIN_DEPTHWISE_K = 9
# From this size on where our kernels run it (kernels auto or triton): their NCHW tensor-core
# kernels start here (kernels.dwconv.triton.TOEPLITZ_MIN_K) and beat the channels_last tap
# kernel, forward+backward at B128 C768 32x32 k7 on an H100: 3,782 against 4,725 us (second
# run), 2,893 against 4,720 (third run, with a slow input gradient fixed since); and the fused
# BatchNorm runs on NCHW only. cuDNN's NCHW depthwise convolution is 4x slower than its
# channels_last one at k7, so kernels reference keeps channels_last there. Not yet measured end
# to end (a k7 model trained both ways).
NCHW_MIN_DEPTHWISE_K_OURS = 7


def _wide_depthwise(spec: Spec) -> bool:
    from kernels.dispatch import triton_import_error

    widest = max((getattr(b, "kernel_size", 0) or 0 for b in spec.model.blocks), default=0)
    # where Triton cannot be imported, kernels auto runs cuDNN's convolution
    ours = spec.train.kernels != "reference" and triton_import_error() is None
    return widest >= (NCHW_MIN_DEPTHWISE_K_OURS if ours else NCHW_MIN_DEPTHWISE_K)


class LateVerdicts:
    """Each step's loss finiteness (a bool on the device), copied to the host without waiting for
    it and read when the next step's work is queued: `push` returns the previous step's
    (finite, epoch, step), `flush` the last one's."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending = None

    def push(self, finite: torch.Tensor, epoch: int, step: int):
        if self.cuda:
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(finite, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = finite.clone(), None
        previous, self.pending = self.pending, (host, done, epoch, step)
        return self._read(previous)

    def flush(self):
        previous, self.pending = self.pending, None
        return self._read(previous)

    @staticmethod
    def _read(item):
        if item is None:
            return None
        host, done, epoch, step = item
        if done is not None:
            done.synchronize()
        return bool(host), epoch, step


def _step_flags(loss: torch.Tensor, interrupted: bool, dist: Distributed) -> tuple[bool, bool]:
    """(loss finite on every process, a stop signal seen by any process), agreed by all ranks in one all-reduce."""
    # MIN of (finite, not interrupted) over ranks: finite everywhere, and 0 in slot 1 if anyone was interrupted.
    flags = torch.stack([torch.isfinite(loss.detach()).float(), torch.tensor(float(not interrupted),
                                                                              device=loss.device)])
    if dist.enabled:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
    finite, go_on = flags.tolist()
    return finite == 1.0, go_on == 0.0


# what the optimizer's parameter groups take from the spec ("initial_lr": the schedule's peak)
OPTIMIZER_HYPERPARAMETERS = ("initial_lr", "weight_decay", "betas", "momentum")


def _apply_stated_hyperparameters(optimizer, scheduler, stated: list[dict], saved_spec: dict, spec: Spec) -> list[str]:
    """After loading a checkpoint's optimizer: its moments stay, but the learning rate, weight decay,
    betas and momentum are the spec's now, so a resume with --set train.optimizer.lr=... does what it
    says. The schedule goes on from the same step at the new peak. Returns the changes, as said."""
    for group, values in zip(optimizer.param_groups, stated, strict=True):
        group.update(values)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)   # as the scheduler's own step sets it
    before = saved_spec.get("train", {}).get("optimizer", {})
    now = spec.train.optimizer.model_dump(mode="json")
    return [f"train.optimizer.{k} {before[k]} -> {now[k]}" for k in ("lr", "weight_decay", "betas", "momentum")
            if k in before and before[k] != now[k]]


def _optimizer_fields(train: dict) -> dict:
    optimizer = train.get("optimizer", {})
    return {"kind": optimizer.get("kind", "adamw"), "layer_decay": optimizer.get("layer_decay")}


def _split_fields(data: dict) -> dict:
    """The data fields that decide which images train and which validate, as a resume compares
    them: val_split by the fraction it stands for (unset, as saved by later versions, is 0.1)."""
    fields = {k: data.get(k) for k in RESUME_DATA_FIELDS}
    fields["stratify"] = bool(data.get("stratify"))   # absent from runs saved before it existed: False
    try:
        fields["val_split"] = DataSpec.model_validate(data).held_out
    except ValidationError:   # compared as written
        pass
    return fields


def _class_mismatch(data, train_classes: list[str], val_classes: list[str]) -> str:
    only_train = [c for c in train_classes if c not in val_classes]
    only_val = [c for c in val_classes if c not in train_classes]
    said = "; ".join(part for part in (
        f"only in {data.root}: {', '.join(only_train[:8])}" if only_train else "",
        f"only in {data.val_root}: {', '.join(only_val[:8])}" if only_val else "") if part)
    return (f"the validation folder's classes differ from the training folder's ({said}); "
            "give data.val_root the same class subfolders as data.root")


def _get_rng(aug_gen: torch.Generator) -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        # NumPy's key array as a tensor: a checkpoint holds tensors and plain values only (load_checkpoint)
        "python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "augment": aug_gen.get_state(),
    }


def _set_rng(rng: dict, aug_gen: torch.Generator) -> None:
    random.setstate(rng["python"])
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    aug_gen.set_state(rng["augment"])


def _append_metrics(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop rows written after the checkpoint we resume from (a crash between log and save)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= epochs_done]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def _last_metrics(path: Path) -> dict:
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    whole = ("epoch", "step", "nonfinite_skipped")   # as the row was before it was written
    # (a column that rows of an older version lack reads as NaN)
    return {k: int(float(v)) if k in whole else float(v or "nan") for k, v in rows[-1].items()} if rows else {}
