"""Shared pieces of the kernel benchmarks: a case description and a timer.

Each op folder has a `bench.py` with `cases(dtype, device) -> list[BenchCase]`;
`composer bench kernels` times every candidate of a case in one process.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Candidate:
    name: str
    forward: Callable[[], object]
    forward_backward: Callable[[], object] | None = None


@dataclass
class BenchCase:
    op: str
    shape: str                  # e.g. "B256 H4 N144 D16"
    flops_fwd: int              # a multiply-add counts as 2 FLOPs
    flops_fwd_bwd: int
    bytes_fwd: int              # bytes that must move at least once (the memory floor)
    bytes_fwd_bwd: int
    anchor: str                 # candidate the ratio column is measured against
    # which arithmetic rate bounds the FLOPs: "matmul" (tensor cores, dense bf16)
    # or "fma" (plain fp32 multiply-adds on CUDA cores, e.g. a depthwise conv)
    compute: str = "matmul"
    candidates: list[Candidate] = field(default_factory=list)


@dataclass
class SweepCase:
    """Launch configurations of one of our kernels on one shape (`composer bench kernels --sweep`).

    Each configuration is checked against the default's output and timed alone
    (CUDA-graph replay), so the fastest correct one can become the launcher's default.
    """
    op: str
    shape: str                             # e.g. "B256 H4 N144 D16 forward"
    default: dict                          # what the launcher picks today
    configs: list[dict]                    # candidates to try besides the default
    run: Callable[[dict], object]          # launch with a config; returns a tensor or tuple of tensors
    # where `--save` stores the winner (kernels.tuning): the launcher's role and shape key, e.g.
    # ("forward", "N144 D16"); None: not saved
    tune: tuple[str, str] | None = None


def time_us(fn: Callable[[], object], device: torch.device | str, cuda_graph: bool = False) -> float:
    """Median time of `fn` in µs: CUDA events via triton's do_bench on GPU, wall clock on CPU.

    With `cuda_graph`, fn is captured once and replayed from a CUDA graph
    (triton's do_bench_cudagraph): host-side cost (Python, dispatch, launches)
    drops out and what remains is GPU time. The CPU ignores the flag.
    """
    if torch.device(device).type == "cuda":
        import triton.testing

        if cuda_graph:
            return 1000.0 * triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        return 1000.0 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    # the CPU runs the kernels in the interpreter, which compiles nothing: a smoke number, not
    # a benchmark, so one timed call and no warm-up (sweeps time every configuration this way,
    # each right after the call that checked its output)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6


def hop_launches(fn) -> int | str:
    """How many Triton launches in one call of fn went through torch's higher-order-op
    dispatch (what `torch.library.wrap_triton` does unless launches are direct): each adds
    an entry to torch's kernel side table and costs the host far more than a direct launch."""
    try:
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
        table = kernel_side_table.constant_args   # private: a diagnostic only
    except (ImportError, AttributeError):
        return "n/a"
    before = len(table)
    fn()
    return len(table) - before
