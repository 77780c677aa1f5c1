"""train.cuda_graph: when a run may record its step, and how the loop treats a recorded step.

CUDA graphs need a GPU (tests/test_gpu_end_to_end.py records real ones); here a stand-in with
their semantics on the CPU (recording leaves no trace, a replay rewrites the recorded outputs
and gradients in place) checks that the loop feeds and reads a recorded step correctly:
training with it must match training without it exactly.
"""
import pytest
import torch

from composer import graphed_step
from composer import train as train_module
from composer.errors import UserError
from composer.graphed_step import GraphedStep, use_cuda_graph
from composer.spec import load_spec_text
from composer.train import soft_cross_entropy, train
from tests.helpers import SPECS, assert_user_error, run_cli
from tests.test_train import TINY, read_metrics, write_spec

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
RUN = dict(compile=False, processes=1, grad_scaler=False)


class CpuGraphedStep(GraphedStep):
    """GraphedStep with CUDA graphs' semantics on the CPU: recording runs the step but undoes what it
    changed (buffers such as BatchNorm's running statistics); a replay runs it again and writes
    the result into the recorded logits, loss and gradient tensors, wherever the parameters'
    .grad point by then (a loop that detached them loses the gradients, as on a GPU)."""

    replays = 0
    recording = False   # True while `_record` runs the step (which a real recording would not)

    def _warm_up(self, x, targets):
        return self.step_fn(x, targets)

    def _record(self, x, targets):
        self.static_x, self.static_targets = x.clone(), targets.clone()
        for p in self.params:
            p.grad = None
        buffers = [b.clone() for b in self.model.buffers()]
        CpuGraphedStep.recording = True
        try:
            self.logits, self.loss = self.step_fn(self.static_x, self.static_targets)
        finally:
            CpuGraphedStep.recording = False
        with torch.no_grad():
            for b, saved in zip(self.model.buffers(), buffers):
                b.copy_(saved)
        self.recorded_grads = [p.grad for p in self.params]
        self.recorded = True

    def _replay(self):
        attached = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        logits, loss = self.step_fn(self.static_x, self.static_targets)
        with torch.no_grad():
            self.logits.copy_(logits)
            self.loss.copy_(loss)
            for recorded, p in zip(self.recorded_grads, self.params):
                recorded.copy_(p.grad)
        for p, grad in zip(self.params, attached):
            p.grad = grad
        CpuGraphedStep.replays += 1


class FailingGraphedStep(CpuGraphedStep):
    def _record(self, x, targets):
        for p in self.params:
            p.grad = torch.zeros_like(p)     # what a half-finished recording may leave behind
        try:   # an op the graph cannot hold, then closing the graph fails as well (as torch.cuda.graph does)
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        finally:
            raise RuntimeError("operation failed due to a previous error during capture")


def _train(tmp_path, name, monkeypatch, step_class=None, text=TINY):
    """Train TINY on the CPU, with `step_class` standing in for GraphedStep (None: no graph)."""
    if step_class is not None:
        monkeypatch.setattr(train_module, "use_cuda_graph", lambda *a, **k: (True, []))
        monkeypatch.setattr(train_module, "GraphedStep", step_class)
    lines = []
    spec = load_spec_text(text, "tiny.yaml", [f"train.out_dir={tmp_path / name}"])
    result = train(spec, echo=lines.append)
    monkeypatch.undo()
    state = torch.load(tmp_path / name / "last.pt", weights_only=False)
    return read_metrics(tmp_path / name), state, lines


# gradient clipping that bites (at TINY's 1.0 it never does), so that a recorded step that
# skipped it would train differently
CLIPPED = TINY.replace("grad_clip: 1.0", "grad_clip: 0.05")


def _assert_same_state(state, eager_state):
    """Two checkpoints hold the same weights, EMA and optimizer state, bit for bit."""
    for section in ("model", "ema"):
        for name, value in eager_state[section].items():
            assert torch.equal(state[section][name], value), (section, name)
    for a, b in zip(state["optimizer"]["state"].values(), eager_state["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("text", [CLIPPED, CLIPPED.replace("stem: {patch_size: 2, dim: 16}",
                                                     "stem: {patch_size: 2, dim: 16, norm: batchnorm}")
                                  .replace("- {kind: vit, heads: 2, mlp_ratio: 2}",
                                           "- {kind: convmixer, kernel_size: 3}")],
                         ids=["mixer_vit", "batchnorm_convmixer"])
def test_recorded_step_trains_exactly_like_eager_steps(tmp_path, monkeypatch, text):
    """Same metrics every epoch, same weights, optimizer state and EMA at the end: the loop copies
    each batch into the recorded input, reads the recorded outputs, and keeps the recorded
    gradients attached (clipping, the optimizer and the EMA see every replay's)."""
    eager_rows, eager_state, _ = _train(tmp_path, "eager", monkeypatch, text=text)
    CpuGraphedStep.replays = 0
    rows, state, lines = _train(tmp_path, "graph", monkeypatch, CpuGraphedStep, text=text)
    steps = int(rows[-1]["step"])
    assert CpuGraphedStep.replays == steps - graphed_step.WARMUP_STEPS   # every step after the warm-up
    assert any("recorded; every later step replays it" in line for line in lines)
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "grad_norm", "grad_norm_max"):
        assert [r[key] for r in rows] == [r[key] for r in eager_rows], key
    _assert_same_state(state, eager_state)


def _poison_steps(monkeypatch, bad):
    """The loss of the steps numbered in `bad` (1-based, counting the steps that run, not a
    stand-in recording) made infinite."""
    real = train_module.soft_cross_entropy
    calls = {"n": 0}

    def poisoned(logits, targets, weights=None):
        loss = real(logits, targets, weights)
        if CpuGraphedStep.recording:
            return loss
        calls["n"] += 1
        return loss * float("inf") if bad(calls["n"]) else loss

    monkeypatch.setattr(train_module, "soft_cross_entropy", poisoned)


def test_recorded_step_skips_non_finite_losses_as_eager_steps_do(tmp_path, monkeypatch):
    """With a recorded step the update of a step whose loss is not finite is skipped on the device
    (fused AdamW's found_inf) and the host counts it a step later: the same metrics, skip counts,
    weights, optimizer state and EMA as the eager loop, which waits for each verdict."""
    bad = {3, 5, 8, 9}.__contains__   # before and after the recording (step 4), the last of epoch 1, in epoch 2
    _poison_steps(monkeypatch, bad)
    eager_rows, eager_state, _ = _train(tmp_path, "eager", monkeypatch, text=CLIPPED)
    _poison_steps(monkeypatch, bad)
    rows, state, _ = _train(tmp_path, "graph", monkeypatch, CpuGraphedStep, text=CLIPPED)
    assert [int(r["nonfinite_skipped"]) for r in eager_rows] == [3, 1]
    for key in ("train_loss", "train_acc", "val_loss", "nonfinite_skipped"):
        assert [r[key] for r in rows] == [r[key] for r in eager_rows], key
    assert state["nonfinite_total"] == eager_state["nonfinite_total"] == 4
    _assert_same_state(state, eager_state)


def test_recorded_step_stops_after_max_nonfinite(tmp_path, monkeypatch):
    """train.max_nonfinite in a row stop a run with a recorded step too (exit 3, a step later
    than the eager loop notices), keeping the last good checkpoint and finite weights."""
    monkeypatch.setattr(train_module, "use_cuda_graph", lambda *a, **k: (True, []))
    monkeypatch.setattr(train_module, "GraphedStep", CpuGraphedStep)
    _poison_steps(monkeypatch, lambda n: n > 10)   # epoch 1 (8 steps) completes
    result = run_cli("train", write_spec(tmp_path, TINY.replace("epochs: 2", "epochs: 3")),
                     "--out", tmp_path / "run", "--set", "train.max_nonfinite=3")
    assert_user_error(result, "not finite for 3 steps in a row (epoch 2, step 5)", code=3)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert state["epoch"] == 1 and state["step_in_epoch"] == 0
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_failed_recording_goes_on_eagerly(tmp_path, monkeypatch):
    eager_rows, eager_state, _ = _train(tmp_path, "eager", monkeypatch)
    rows, state, lines = _train(tmp_path, "graph", monkeypatch, FailingGraphedStep)
    assert any("recording the step failed (operation not permitted when stream is capturing)" in line
               for line in lines)
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in eager_rows]
    assert all(torch.equal(state["model"][k], v) for k, v in eager_state["model"].items())


def test_when_a_run_may_record_its_step(monkeypatch):
    assert use_cuda_graph(True, CUDA, **RUN) == (True, [])
    assert use_cuda_graph(False, CUDA, **RUN)[0] is False
    on, reasons = use_cuda_graph("auto", CUDA, **RUN)
    assert on is graphed_step.CUDA_GRAPH_IN_AUTO and (on or "train.cuda_graph=true" in reasons[0])
    monkeypatch.setattr(graphed_step, "CUDA_GRAPH_IN_AUTO", True)
    assert use_cuda_graph("auto", CUDA, **RUN) == (True, [])
    for changed, phrase in [(dict(compile=True), "train.compile"), (dict(processes=2), "2 processes"),
                            (dict(grad_scaler=True), "fp16"), (dict(accumulate=2), "train.accumulate is 2")]:
        on, reasons = use_cuda_graph("auto", CUDA, **{**RUN, **changed})
        assert not on and phrase in reasons[0]
        with pytest.raises(UserError, match=phrase):
            use_cuda_graph(True, CUDA, **{**RUN, **changed})
    assert use_cuda_graph("auto", CPU, **RUN) == (False, ["the device is cpu (CUDA graphs need CUDA)"])


@pytest.mark.parametrize("option", [["--set", "train.cuda_graph=true"], ["--cuda-graph"]], ids=["set", "flag"])
def test_cuda_graph_true_without_cuda_is_refused_before_training(tmp_path, option):
    result = run_cli("train", write_spec(tmp_path), "--out", tmp_path / "run", *option)
    assert_user_error(result, "train.cuda_graph is true, but the device is cpu", "auto or false")
    assert not (tmp_path / "run").exists()


def test_no_cuda_graph_flag_trains(tmp_path):
    result = run_cli("train", write_spec(tmp_path, TINY.replace("epochs: 2", "epochs: 1")), "--out", tmp_path / "run",
                     "--no-cuda-graph")
    assert result.returncode == 0, result.stderr
    assert yaml_value(tmp_path / "run" / "spec.yaml", "train", "cuda_graph") is False


def yaml_value(path, *keys):
    import yaml

    value = yaml.safe_load(path.read_text())
    for key in keys:
        value = value[key]
    return value


def test_cuda_graph_setting_is_validated(tmp_path):
    result = run_cli("validate", write_spec(tmp_path, TINY.replace("device: cpu", "device: cpu\n  cuda_graph: yes please")))
    assert_user_error(result, "train.cuda_graph")


# ops that make the host wait for the device: a recorded step must not contain any
_SYNCING = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero")


@pytest.mark.parametrize("spec_name", ["seed_vit", "seed_mixer", "seed_convmixer_mixer", "convmixer_cifar"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_training_step_never_waits_on_the_device(spec_name, backend):
    """Forward, loss and backward of the specs' models (on the Triton path: its launchers, launches
    stubbed) call nothing that synchronizes with the device, which recording would reject."""
    from composer.build import build_model
    from kernels.host_cost import stubbed_launches

    spec = load_spec_text((SPECS / f"{spec_name}.yaml").read_text(), spec_name, ["data.kind=synthetic"])
    model = build_model(spec, backend=backend)
    model.train()
    m = spec.model
    x = torch.randn(2, m.in_channels, m.image_size, m.image_size)
    targets = torch.nn.functional.one_hot(torch.tensor([0, 1]), m.num_classes).float()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")    # backend triton on CPU tensors; with launches stubbed nothing runs
        with stubbed_launches() as launches, torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            soft_cross_entropy(model(x), targets).backward()
    assert backend == "reference" or sum(launches.values()) > 0
    syncing = sorted({e.name for e in prof.events() if e.name in _SYNCING})
    assert not syncing, f"{spec_name} ({backend}): {syncing}"


def test_bench_train_says_whether_the_step_was_recorded(monkeypatch):
    """`composer bench train` keeps the training log quiet but for the CUDA-graph lines, so that a
    timing with train.cuda_graph=true shows whether it timed replays."""
    from composer.bench import bench_train

    monkeypatch.setattr(train_module, "use_cuda_graph", lambda *a, **k: (True, []))
    monkeypatch.setattr(train_module, "GraphedStep", CpuGraphedStep)
    lines = []
    bench_train(load_spec_text(TINY, "tiny.yaml"), steps=11, source="synthetic", echo=lines.append)
    assert lines[0] == "cuda graph: step 4 recorded; every later step replays it"
    assert len(lines) == 2 and "synthetic data" in lines[1] and "img/s (batch 32, 11 steps)" in lines[1]
