"""`python -m kernels.compile_report`: every launch of an op compiled for sm_90 without a GPU."""
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def _report(*args, interpret="0"):
    env = {**os.environ, "TRITON_INTERPRET": interpret}
    return subprocess.run([sys.executable, "-m", "kernels.compile_report", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_attention_launches_compile_for_sm90_with_their_resources():
    result = _report("--op", "attention", "--first")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if "B256 H4 N144 D16" in line]
    kernels = [re.search(r"(_attn_\w+)", line).group(1) for line in rows]
    # the default launches, then the DQ_ATOMIC candidate's backward (delta fused: one kernel)
    assert kernels == ["_attn_fwd", "_attn_bwd_delta", "_attn_bwd_tiled", "_attn_bwd_tiled"], result.stdout
    assert "DQ_ATOMIC': True" in rows[-1], rows[-1]
    for line in rows:   # each with a positive register count, a stack size and its launch configuration
        regs = int(re.search(r"regs\s+(\d+)", line).group(1))
        assert 0 < regs <= 255 and re.search(r"stack\s+\d+", line) and "BLOCK_D" in line, line


def test_refuses_the_interpreter():
    result = _report("--op", "attention", "--first", interpret="1")
    assert result.returncode == 2 and "unset TRITON_INTERPRET" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [("--first", "--dtype", "bf16"), ("--op", "token_mlp", "--dtype", "fp32")],
                         ids=["bf16-first-shapes", "fp32-token_mlp"])
def test_no_default_launch_keeps_its_registers_in_local_memory(args):
    """Default launches on the installed Triton (bf16: every op's first benchmark shape; fp32:
    token_mlp's three): some spill a few hundred bytes, but none may land in the regime where
    ptxas keeps most of a thread's values on the stack (one channels_last dwconv tile under
    Triton 3.8, token_mlp's fused fp32 weight kernel at N = 196: 32 registers, 2-6 KB)."""
    result = _report(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if " regs " in line]
    assert len(rows) >= 10, result.stdout
    for line in rows:
        stack = int(re.search(r"stack\s+(\d+)", line).group(1))
        assert stack < 2048, line
