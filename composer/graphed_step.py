"""A training step's forward, loss and backward recorded once as a CUDA graph and replayed.

Small models train host-bound: the GPU finishes each kernel before Python, autograd and the
launchers have queued the next (the seed ViT's attention costs ~520 µs of host time per
forward+backward against ~70 µs on the GPU). A CUDA graph replays every kernel of the step with
one call. What that asks of the loop, and what this class does about it:

- Fixed shapes: every batch has train.batch_size images (the loop drops the remainder).
- Fixed memory: the graph reads its input from, and writes logits and loss to, the tensors it
  was recorded with. Each step copies the batch in and returns those same output tensors.
- Gradients: recorded with every .grad None, so the backward writes fresh tensors in the
  graph's memory rather than adding to old ones; each replay overwrites them. The loop must keep
  them attached (no `zero_grad(set_to_none=True)` once recorded: see `owns_grads`).
- Warm-up first: the first steps run eagerly on the stream the graph is recorded on, so that
  cuDNN's algorithm search, Triton's compilation and cuBLAS's workspace happen before recording.
- Autocast without its weight cache (casts cached while recording would outlive the graph).
- Recording can fail (an op that synchronizes with the host, or one CUDA graphs cannot hold):
  the step then runs eagerly, and so does the rest of the run, with the reason logged.

Gradient clipping is part of the recorded step (composer/train.py: `clip_in_step`); the optimizer,
EMA and metrics run eagerly after each replay, a few launches that do not wait for the loss's
verdict (`skip_on_device` there: fused AdamW skips a non-finite step's update on the device).
"""
from __future__ import annotations

import torch

from composer.errors import SpecFieldError

WARMUP_STEPS = 3   # eager steps before recording (PyTorch's whole-network capture recipe uses 3)

# `train.cuda_graph: auto` leaves graphs off until their speed and equivalence are measured on a
# GPU (`true` opts in); set True once `tests/test_gpu_end_to_end.py` passes with them and
# `composer bench train` shows the gain.
CUDA_GRAPH_IN_AUTO = False


def reasons_against(device: torch.device, *, compile: bool, processes: int, grad_scaler: bool,
                    accumulate: int = 1, distill: bool = False) -> list[str]:
    """Why a run cannot replay its steps from a CUDA graph (empty when it can)."""
    reasons = []
    if device.type != "cuda":
        reasons.append(f"the device is {device.type} (CUDA graphs need CUDA)")
    if compile:
        reasons.append("train.compile is on (torch.compile has its own CUDA graphs)")
    if processes > 1:
        reasons.append(f"{processes} processes train together (DDP's gradient hooks are not recorded)")
    if grad_scaler:
        reasons.append("precision fp16 uses a GradScaler (use bf16)")
    if accumulate > 1:
        reasons.append(f"train.accumulate is {accumulate} (a recorded step is one forward and backward)")
    if distill:
        reasons.append("train.distill is set (a step with the teacher's forward is not yet recorded)")
    return reasons


def use_cuda_graph(setting, device: torch.device, **run) -> tuple[bool, list[str]]:
    """(record the step, why not) for `train.cuda_graph` = auto | true | false and this run
    (keywords of `reasons_against`). `true` that cannot hold is a user error."""
    if setting is False:
        return False, ["train.cuda_graph is false"]
    reasons = reasons_against(device, **run)
    if setting is True and reasons:
        raise SpecFieldError("train.cuda_graph", "train.cuda_graph is true, but " + "; ".join(reasons)
                        + ". Set train.cuda_graph to auto or false")
    if setting == "auto" and not reasons and not CUDA_GRAPH_IN_AUTO:
        reasons = ["auto leaves it off for now (train.cuda_graph=true turns it on)"]
    return not reasons, reasons


class GraphedStep:
    """Calls `step_fn(x, targets) -> (logits, loss)`, which runs forward and backward: eagerly for
    the first WARMUP_STEPS calls, then records it and replays it on every later call."""

    def __init__(self, step_fn, model: torch.nn.Module, log=print):
        self.step_fn, self.model, self.log = step_fn, model, log
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.calls = 0
        self.failed = None          # why recording failed: the run goes on eagerly
        self.recorded = False
        self.stream = None

    @property
    def owns_grads(self) -> bool:
        """True once replays write the gradients: they must stay attached to the parameters."""
        return self.recorded

    def __call__(self, x: torch.Tensor, targets: torch.Tensor):
        self.calls += 1
        if self.failed:
            return self.step_fn(x, targets)
        if self.recorded:
            self.static_x.copy_(x)
            self.static_targets.copy_(targets)
            self._replay()
            return self.logits, self.loss
        if self.calls <= WARMUP_STEPS:
            return self._warm_up(x, targets)
        try:
            self._record(x, targets)
        except RuntimeError as exc:
            self.failed = _first_cause(exc)
            for p in self.params:       # what recording allocated is not this step's gradient
                p.grad = None
            self.log(f"cuda graph: recording the step failed ({self.failed}); training goes on without it")
            return self.step_fn(x, targets)
        self.log(f"cuda graph: step {self.calls} recorded; every later step replays it")
        self._replay()                  # recording runs nothing: this step's work happens here
        return self.logits, self.loss

    # -- the CUDA parts (tests replace these three to run the class on the CPU) ----------------

    def _warm_up(self, x, targets):
        if self.stream is None:
            self.stream = torch.cuda.Stream(x.device)
        current = torch.cuda.current_stream(x.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = self.step_fn(x, targets)
        current.wait_stream(self.stream)
        return out

    def _record(self, x, targets):
        self.static_x, self.static_targets = x.clone(), targets.clone()
        for p in self.params:
            p.grad = None
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=self.stream):
            self.logits, self.loss = self.step_fn(self.static_x, self.static_targets)
        self.recorded = True

    def _replay(self):
        self.graph.replay()


def _first_cause(exc: BaseException) -> str:
    """The first line of the error that started it: a failed recording raises again on closing
    the graph ("...previous error during capture"), chained to the one that says what failed."""
    while exc.__context__ is not None:
        exc = exc.__context__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
