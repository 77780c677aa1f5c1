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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_model_matches_reference_model(dtype):
    torch.manual_seed(0)
    model = build_model(load_spec_text(HYBRID), backend="triton").cuda().eval()
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
