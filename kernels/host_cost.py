"""Host cost of each op's forward+backward, with every Triton launch stubbed out (no GPU needed).

    python -m kernels.host_cost [--op attention|token_mlp|dwconv2d|all] [--reps N]

Runs each public op on small CPU tensors with backend="triton", its launchers' kernel launches
replaced by a stub that only counts them, and reports the microseconds of Python, autograd and
PyTorch work a forward+backward costs the host, the Triton launches it makes and the PyTorch
ops it calls (each one a kernel launch or more on a GPU). The kernels' own launch cost (a few
microseconds each on the GPU machine) and their GPU time are not in it. On a GPU, a layer
whose kernels take less time than this is host-bound: its eager timings trail its CUDA-graph
ones (`composer bench kernels --cuda-graph`).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import time

import torch


class _StubLaunch:
    """Stands in for `wrap_triton(kernel)`: `[grid](...)` counts the launch and returns."""

    def __init__(self, counts: collections.Counter, kernel):
        self.counts, self.kernel = counts, kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counts[self.kernel.__name__] += 1
        return launch


def _modules():
    from kernels.attention import triton as attention_triton
    from kernels.batch_norm import triton as batch_norm_triton
    from kernels.dwconv import toeplitz
    from kernels.dwconv import triton as dwconv_triton
    from kernels.token_mlp import gemms
    from kernels.token_mlp import triton as token_mlp_triton

    return (attention_triton, token_mlp_triton, gemms, dwconv_triton, toeplitz, batch_norm_triton)


def _cases() -> dict:
    """op -> [(label, make inputs, call)]: small shapes, so that PyTorch's own CPU work on them is
    negligible next to the per-call cost being measured."""
    import kernels

    def attention_inputs():   # the block's packed qkv projection, (B, N, 3 * H * D)
        return [torch.randn(2, 16, 3 * 2 * 16, requires_grad=True)]

    # weights as a model holds them: nn.Parameter (activations are plain tensors)
    def token_mlp_inputs(b=2, n=16, c=32, hd=16, dtype=torch.float32):
        weights = ((c,), (c,), (hd, n), (hd,), (n, hd), (n,))
        return ([torch.randn(b, n, c, dtype=dtype, requires_grad=True)]
                + [torch.nn.Parameter(torch.randn(*s)) for s in weights])

    def dwconv_inputs(k):
        return lambda: [torch.randn(2, 8, 16, 16, requires_grad=True), torch.nn.Parameter(torch.randn(8, 1, k, k)),
                        torch.nn.Parameter(torch.randn(8))]

    def batch_norm_inputs():   # the ConvMixer block's: its BatchNorm's Parameters, the residual stream
        return [torch.randn(2, 8, 16, 16, requires_grad=True), torch.nn.Parameter(torch.ones(8)),
                torch.nn.Parameter(torch.zeros(8)), torch.randn(2, 8, 16, 16, requires_grad=True)]

    batch_norm_buffers = (torch.zeros(8), torch.ones(8))   # running mean and variance

    def dwconv(x, w, b):
        return kernels.dwconv2d(x, w, b, activation="gelu", backend="triton")

    return {
        "attention": [("attention_packed B2 H2 N16 D16", attention_inputs,
                       lambda qkv: kernels.attention_packed(qkv, 2, backend="triton"))],
        "token_mlp": [("token_mlp B2 N16 C32 Hd16", token_mlp_inputs,
                       lambda *a: kernels.token_mlp(*a, backend="triton")),
                      # past 128 tokens, 16-bit inputs take the per-image GEMMs (more launches)
                      ("token_mlp B2 N144 C32 Hd16 fp16 (GEMMs)",
                       lambda: token_mlp_inputs(n=144, dtype=torch.float16),
                       lambda *a: kernels.token_mlp(*a, backend="triton"))],
        "dwconv2d": [(f"dwconv2d B2 C8 16x16 k{k} NCHW, bias, GELU", dwconv_inputs(k), dwconv) for k in (7, 9)],
        "batch_norm": [("batch_norm B2 C8 16x16 +residual", batch_norm_inputs,
                        lambda x, w, b, r: kernels.batch_norm(x, w, b, *batch_norm_buffers, residual=r,
                                                              backend="triton")),
                       # the ConvMixer depthwise block as one op (dwconv2d, then this BatchNorm)
                       ("dwconv_batch_norm_residual B2 C8 16x16 k9",
                        lambda: dwconv_inputs(9)() + batch_norm_inputs()[1:3],
                        lambda x, w, b, g, beta: kernels.dwconv_batch_norm_residual(
                            x, w, b, g, beta, *batch_norm_buffers, backend="triton"))],
    }


@contextlib.contextmanager
def stubbed_launches():
    """Within it every op's kernel launches are counted instead of run; yields the Counter
    (kernel name -> launches). Tests use it too, to see what a call launches without a GPU."""
    counts: collections.Counter = collections.Counter()
    saved = [(m, m.wrap_triton) for m in _modules()]
    try:
        for m, _ in saved:
            m.wrap_triton = lambda kernel: _StubLaunch(counts, kernel)
        yield counts
    finally:
        for m, original in saved:
            m.wrap_triton = original


def measure(op: str = "all", reps: int = 200, echo=print) -> list[dict]:
    """One row per case: host µs per forward+backward, Triton launches and PyTorch ops per call."""
    # backend="triton" on CPU tensors needs the interpreter's permission; nothing is interpreted
    interpret = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    rows = []
    try:
        with stubbed_launches() as counts:
            for name, cases in _cases().items():
                if op not in ("all", name):
                    continue
                for label, make, call in cases:
                    rows.append(_measure_case(label, make(), call, counts, reps, echo))
    finally:
        if interpret is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = interpret
    return rows


def _measure_case(label: str, inputs, call, counts: collections.Counter, reps: int, echo) -> dict:
    def step():
        out = call(*inputs)
        out.backward(torch.ones_like(out))

    for _ in range(10):
        step()
    counts.clear()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    launches = sum(counts.values())
    # PyTorch ops called from Python or autograd (not the ones inside other ops)
    ops = collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::")
                              and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::")))
    start = time.perf_counter()
    for _ in range(reps):
        step()
    us = (time.perf_counter() - start) / reps * 1e6
    most = ", ".join(f"{aten.removeprefix('aten::')} {n}" for aten, n in ops.most_common(4))
    echo(f"  {label:<40} {us:7.1f} us  Triton launches {launches}  PyTorch ops "
         f"{sum(ops.values())}  (most: {most})")
    return {"case": label, "host_us": us, "launches": launches, "torch_ops": sum(ops.values()),
            "top_ops": dict(ops.most_common(6))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", choices=["all", "attention", "token_mlp", "dwconv2d", "batch_norm"], default="all")
    parser.add_argument("--reps", type=int, default=200, help="forward+backward calls timed per case")
    args = parser.parse_args(argv)
    print(f"host cost of forward+backward, launches stubbed ({torch.get_num_threads()} threads, torch "
          f"{torch.__version__}):")
    measure(args.op, args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
