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
    """Each launch with its resources and (--sass) its instruction mix on the next line: the
    attention kernels' dots on the tensor cores, their loads from global memory, no spills."""
    result = _report("--op", "attention", "--first", "--sass")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    rows = [(line, lines[i + 1]) for i, line in enumerate(lines) if "B256 H4 N144 D16" in line]
    kernels = [re.search(r"(_attn_\w+)", line).group(1) for line, _ in rows]
    # the default launches, then the WHOLE_HEAD candidate's backward (delta fused: one kernel)
    assert kernels == ["_attn_fwd", "_attn_bwd_delta", "_attn_bwd_tiled", "_attn_bwd_tiled"], result.stdout
    assert "WHOLE_HEAD': True" in rows[-1][0], rows[-1][0]
    for line, mix in rows:   # each with a positive register count, a stack size and its launch configuration
        regs = int(re.search(r"regs\s+(\d+)", line).group(1))
        assert 0 < regs <= 255 and re.search(r"stack\s+\d+", line) and "BLOCK_D" in line, line
        counts = {k: int(v) for k, v in re.findall(r"([a-z.]+) (\d+)", mix)}
        assert counts.get("ldg", 0) + counts.get("cp.async", 0) > 0 and "local" not in counts, mix
        if "_attn_bwd_delta" not in line:
            assert counts.get("mma", 0) + counts.get("wgmma", 0) > 0, mix


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


def test_token_mlp_launches_past_256_tokens_keep_shared_memory_headroom():
    """257 to 512 tokens make the fused kernels' token tile 512 wide. With (64, 512) weight
    tiles the forward took 224 KiB of shared memory (near sm_90's 227) and hit an illegal
    memory access on an H100; every default launch there must now stay well below the limit,
    as the benchmark shapes do (at most 154 KiB under Triton 3.6 and 3.8). Both methods: the
    fused kernels stay reachable through saved configurations and sweeps."""
    result = _report("--op", "token_mlp", "--shape", "8,257,64,128", "--shape", "2,512,768,384")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if " smem " in line]
    # both methods are reported, the default marked (per-image GEMMs in 16 bits past 128 tokens)
    assert {re.search(r"(_\w+_kernel)", line).group(1) for line in rows} >= {
        "_fwd_kernel", "_bwd_data_kernel", "_bwd_weight_kernel", "_hidden_kernel", "_tokens_kernel"}
    assert all(("split (default)" in line) == (" split " in line) for line in rows), result.stdout
    for line in rows:
        assert int(re.search(r"smem\s+(\d+)", line).group(1)) <= 160 * 1024, line


def test_bad_shape_is_refused_with_the_fields_it_takes():
    result = _report("--op", "dwconv2d", "--shape", "2,8,16")
    assert result.returncode == 2 and "B,C,H,W,k for --op dwconv2d" in result.stderr
    assert "Traceback" not in result.stderr


def test_launches_compile_with_the_alignment_marks_of_a_real_launch():
    """Triton marks aligned pointers and integers divisible by 16 at launch, which changes the
    code (vector widths, async copies) and its shared memory: the report must compile what the
    GPU runs, not the unmarked kernel (under half the shared memory in one case)."""
    code = """
import torch
from triton.backends.compiler import GPUTarget
from kernels import compile_report as cr
from kernels.token_mlp import gemms, triton as kt
x = torch.empty(2, 64, 40, device="meta", dtype=torch.bfloat16)
p = [torch.empty(*s, device="meta") for s in ((40,), (40,), (32, 64), (32,), (64, 32), (64,))]
launch = [l for l in cr._record("fwd", lambda: kt.forward(x, *p, 1e-5), [kt, gemms])
          if l.kernel.__name__ == "_fwd_kernel"][0]
source, options = cr._specialized_source(launch, GPUTarget("cuda", 90, 32))
names = launch.kernel.arg_names
marked = {names[path[0]] for path, marks in source.attrs.items() if ["tt.divisibility", 16] in marks}
print(sorted(marked))
assert {"X", "Y", "W1", "W2", "N", "HD"} <= marked, marked   # aligned pointers, N 64, Hd 32
assert not {"C", "stride_xn"} & marked, marked                 # 40 channels, 40 elements a row
assert options["num_warps"] == launch.kwargs["num_warps"]
"""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_instruction_mix_counts_opcodes_by_kind():
    """Predicated instructions count, modifiers do not split a kind, other opcodes are left out."""
    sass = """
        /*0100*/                   LDSM.16.M88.4 R8, [R2] ;
        /*0110*/              @!P0 HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0120*/                   HMMA.16816.F32.BF16 R16, R8, R14, R16 ;
        /*0130*/               @P1 LDGSTS.E.BYPASS.128 [R3], desc[UR4][R6.64] ;
        /*0140*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0150*/                   STL [R1+0x4], R9 ;
        /*0160*/                   FFMA R1, R2, R3, R4 ;
    """
    from kernels.compile_report import instruction_mix

    mix = instruction_mix(sass)
    assert {k: v for k, v in mix.items() if v} == {"mma": 2, "ldsm": 1, "cp.async": 1, "bar": 1, "local": 1}



# CUDA runs at most 2**31 - 1 programs along a grid's first axis and 65,535 along the others
# (the interpreter has no such limit, so only this test sees a launch past it)
LARGE_BATCH = {"attention": (16384, 8, 17, 16), "token_mlp": (70000, 16, 32, 16),
               "dwconv2d": (70000, 8, 8, 8, 3), "batch_norm": (70000, 4, 4, 4)}


@pytest.mark.parametrize("op", sorted(LARGE_BATCH))
def test_large_batches_launch_within_the_grid_limits(op):
    from kernels.compile_report import LAUNCHES

    import torch

    launches = LAUNCHES[op](torch.float16, [LARGE_BATCH[op]])
    assert launches
    for launch in launches:
        first, *others = launch.grid
        assert 0 < first < 2 ** 31 and all(0 < n <= 65535 for n in others), \
            (launch.label, launch.kernel.__name__, launch.grid)
