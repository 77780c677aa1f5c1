"""`composer info`: versions, devices, the kernels' backend on this machine and why."""
import json

import pytest
import torch

from tests.helpers import run_cli


def test_info_reports_versions_and_the_kernel_backend(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPOSER_TUNED", str(tmp_path / "tuned.json"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    result = run_cli("info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["torch"] == torch.__version__ and info["composer"]
    assert len(info["cuda_devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert info["tuned"] == {"user": str(tmp_path / "tuned.json"), "user_exists": False,
                             "shipped": info["tuned"]["shipped"]}
    if info["triton"]:   # interpreter mode runs the kernels on any device
        assert info["kernels"] == {"backend": "triton", "interpreter": True, "reasons": []}
    text = run_cli("info").stdout
    assert f"torch {torch.__version__}" in text and "none yet: composer bench kernels --sweep --save" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the kernels can run")
def test_info_says_why_the_kernels_cannot_run_on_a_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    info = json.loads(run_cli("info", "--json").stdout)
    assert info["kernels"]["backend"] == "reference" and info["cuda_devices"] == []
    assert any("need CUDA" in r for r in info["kernels"]["reasons"]), info["kernels"]
    assert "fused kernels: PyTorch reference path (" in run_cli("info").stdout
