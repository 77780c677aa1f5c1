"""End to end on CUDA: every fused-op block on the Triton path inside real models (skipped without a GPU)."""
import pytest
import torch

from composer.blocks import set_backend
from composer.build import build_model
from composer.spec import load_spec_text
from composer.train import train
from tests.helpers import run_cli

pytestmark = pytest.mark.gpu

HYBRID = """
model:
  image_size: 32
  num_classes: 10
  stem: {patch_size: 2, dim: 64, activation: gelu, norm: batchnorm}
  blocks:
    - {kind: convmixer, kernel_size: 9, repeat: 2}
    - {kind: mixer, token_hidden: 128, repeat: 2}
    - {kind: vit, heads: 4, repeat: 2}
  head: {pool: cls}
data: {kind: synthetic, num_samples: 2048, val_split: 0.25}
train: {epochs: 2, batch_size: 128, device: cuda, kernels: triton}
"""


VARIANTS = ("  pos_embed: rope\n  registers: 4\n  blocks:\n    - {kind: convmixer, kernel_size: 9, repeat: 2}\n"
            "    - {kind: convnext, kernel_size: 7, layer_scale: 0.5}\n"
            "    - {kind: vit, heads: 4, window: 4, shift: true, repeat: 2}\n    - {kind: downsample, dim: 96}\n"
            "    - {kind: mixer, token_hidden: 128, repeat: 2, layer_scale: 0.5}\n"
            "    - {kind: vit, heads: 4, repeat: 2, qk_norm: true, layer_scale: 0.5}\n")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variants", [False, True], ids=["plain", "convnext_windows_downsample_rope_registers_qk_norm_layer_scale"])
def test_triton_model_matches_reference_model(dtype, variants):
    torch.manual_seed(0)
    text = HYBRID
    if variants:
        start, end = text.index("  blocks:"), text.index("  head:")
        text = text[:start] + VARIANTS + text[end:]
    model = build_model(load_spec_text(text), backend="triton").cuda().eval()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        fast = model(x).float()
        set_backend(model, "reference")
        slow = model(x).float()
    scale = slow.abs().max().item()
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    assert (fast - slow).abs().max().item() <= tol * max(scale, 1.0)


@pytest.mark.parametrize("memory_format", ["channels_last", "contiguous"])   # the dwconv tap and Toeplitz paths
def test_train_on_gpu_with_triton_kernels(tmp_path, memory_format):
    spec = load_spec_text(HYBRID, "hybrid.yaml", [f"train.out_dir={tmp_path / 'run'}",
                                                  f"train.memory_format={memory_format}"])
    result = train(spec, echo=lambda *a: None)
    assert result["final"]["val_acc"] > 0.5  # learnable synthetic classes
    assert result["final"]["train_loss"] == result["final"]["train_loss"]  # not NaN


def test_train_compiled_with_triton_kernels(tmp_path):
    """--compile --kernels triton: the Triton ops run between the compiled regions (inside the
    compiled training graph they hit an illegal memory access on sm_90)."""
    # its own process: an illegal memory access would poison the CUDA context of every later test
    (tmp_path / "hybrid.yaml").write_text(HYBRID)
    result = run_cli("train", tmp_path / "hybrid.yaml", "--compile", "--kernels", "triton",
                     "--out", tmp_path / "run", real_process=True)
    assert result.returncode == 0, result.stderr[-2000:]


def _train_logged(tmp_path, name, *overrides):
    lines = []
    spec = load_spec_text(HYBRID, "hybrid.yaml", [f"train.out_dir={tmp_path / name}", *overrides])
    result = train(spec, echo=lines.append)
    state = torch.load(tmp_path / name / "last.pt", weights_only=False)
    return result["final"], state["model"], "\n".join(lines)


FP32_DETERMINISTIC = ["train.precision=fp32", "train.deterministic=true", "train.epochs=1"]


def _assert_trained_alike(a, a_model, b, b_model, metrics=("train_loss", "val_loss"), rel=1e-4, weights_rel=1e-3):
    """Two runs' final metrics within `rel` of each other, and every float weight within
    `weights_rel` of the largest entry of its tensor."""
    for key in metrics:
        assert abs(b[key] - a[key]) <= rel * max(abs(a[key]), 1.0), (key, a[key], b[key])
    for name, value in a_model.items():
        if value.dtype.is_floating_point:
            assert torch.isfinite(b_model[name]).all(), name
            scale = max(value.abs().max().item(), 1e-6)
            assert (b_model[name] - value).abs().max().item() <= weights_rel * scale, name


def test_cuda_graph_step_trains_like_eager_steps(tmp_path):
    """train.cuda_graph: the hybrid model (every Triton op, the fused BatchNorm) recorded once and
    replayed trains as eager steps do: fp32 and deterministic, so the two runs launch the same
    kernels on the same numbers; only the streams differ."""
    eager, eager_model, _ = _train_logged(tmp_path, "eager", "train.cuda_graph=false", *FP32_DETERMINISTIC)
    graph, graph_model, log = _train_logged(tmp_path, "graph", "train.cuda_graph=true", *FP32_DETERMINISTIC)
    assert "step 4 recorded; every later step replays it" in log and "failed" not in log, log
    _assert_trained_alike(eager, eager_model, graph, graph_model)


def test_cuda_graph_step_trains_in_bf16(tmp_path):
    final, _, log = _train_logged(tmp_path, "run", "train.cuda_graph=true")
    assert "recorded; every later step replays it" in log and "failed" not in log, log
    assert final["val_acc"] > 0.5 and final["train_loss"] == final["train_loss"]


def _poison_on_device(monkeypatch, bad_steps):
    """The loss of the steps numbered in `bad_steps` (1-based) made infinite by a counter on the
    device, so that a recorded step replays the same rule (a Python-side count would be frozen
    into the graph when it is recorded)."""
    from composer import train as train_module

    real = train_module.soft_cross_entropy
    counter = {}

    def poisoned(logits, targets, weights=None):
        loss = real(logits, targets, weights)
        n = counter.setdefault("n", torch.zeros((), dtype=torch.int64, device=loss.device))
        n += 1
        bad = torch.zeros((), dtype=torch.bool, device=loss.device)
        for s in bad_steps:
            bad = bad | (n == s)
        # added, not multiplied under a where: the gradient of an unselected loss * inf is 0 * inf
        return loss + torch.where(bad, float("inf"), 0.0)

    monkeypatch.setattr(train_module, "soft_cross_entropy", poisoned)


def test_cuda_graph_step_skips_non_finite_losses_like_eager_steps(tmp_path, monkeypatch):
    """With a recorded step, fused AdamW skips a non-finite loss's update on the GPU (found_inf)
    and the host counts it a step later: the same skip counts, losses and weights as the eager
    loop, which waits for every verdict (fp32, deterministic)."""
    bad = (2, 6, 7)   # before the recording (step 4) and after it, two in a row
    _poison_on_device(monkeypatch, bad)
    eager, eager_model, _ = _train_logged(tmp_path, "eager", "train.cuda_graph=false", *FP32_DETERMINISTIC)
    _poison_on_device(monkeypatch, bad)
    graph, graph_model, log = _train_logged(tmp_path, "graph", "train.cuda_graph=true", *FP32_DETERMINISTIC)
    assert "recorded; every later step replays it" in log and "failed" not in log, log
    assert graph["nonfinite_skipped"] == eager["nonfinite_skipped"] == len(bad)
    _assert_trained_alike(eager, eager_model, graph, graph_model, ("train_loss",))


def test_images_too_large_for_the_gpu_stay_on_the_host(tmp_path, monkeypatch):
    """A dataset past train.GPU_DATA_SHARE of the free GPU memory stays in host memory, each batch
    gathered there and copied over from pinned memory: it trains as the resident one does (fp32,
    deterministic: the same batches and augmentation, the same kernels)."""
    from composer import train as train_module

    resident, resident_model, log = _train_logged(tmp_path, "resident", *FP32_DETERMINISTIC)
    assert "images of (3, 32, 32) on cuda" in log, log
    monkeypatch.setattr(train_module, "GPU_DATA_SHARE", 0.0)   # nothing fits: the host path
    host, host_model, log = _train_logged(tmp_path, "host", *FP32_DETERMINISTIC)
    assert "images of (3, 32, 32) in host memory" in log, log
    _assert_trained_alike(resident, resident_model, host, host_model, ("train_loss", "val_loss", "val_acc"),
                          rel=1e-5, weights_rel=1e-4)


def test_recomputed_token_blocks_train_as_kept_ones_on_the_gpu(tmp_path):
    """train.recompute with the Triton kernels: the token blocks' forward runs again in the
    backward (attention_packed and token_mlp included) and the run trains as without it."""
    kept, kept_model, _ = _train_logged(tmp_path, "kept", *FP32_DETERMINISTIC)
    again, again_model, log = _train_logged(tmp_path, "recomputed", "train.recompute=true", *FP32_DETERMINISTIC)
    assert "recompute: 8 token blocks" in log, log   # two mixer and two vit blocks, two token stages each
    _assert_trained_alike(kept, kept_model, again, again_model)
