"""Shared memory, registers and spills of every Triton launch, compiled for a GPU that is not here.

    python -m kernels.compile_report [--op attention|token_mlp|dwconv2d|all] [--dtype bf16|fp16|fp32]
                                     [--arch 90] [--first] [--shape SIZES ...] [--sass]

Runs each op's forward and backward launchers at its benchmark shapes (or at --shape) on meta tensors (no
memory, no GPU) with the launches intercepted, compiles every intercepted kernel with the
installed Triton for sm_<arch>, specialized as a real launch is (alignment marks included),
and reads the binary's registers per thread, stack
(local memory: spilled registers) and shared memory with cuobjdump (shipped with Triton).
Spills and shared memory past the card's limit are worth knowing before a GPU run; only a
GPU says how fast anything is. With --sass, each launch's static instruction mix too (a count
of each kind of instruction in its SASS: tensor-core, shared-memory, global, local, atomic,
shuffle): a dot whose operands reach the tensor cores through scalar shared-memory loads instead
of ldmatrix, or a loop that lost its async copies, shows there before any GPU time is spent.
Needs the compiled kernels, so it refuses to run under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

SMEM_LIMIT = {90: 232_448, 80: 166_912, 89: 101_376, 100: 232_448}   # bytes a block may use
_SHOWN = ("BLOCK", "TILE", "KP", "BB", "IMAGES", "UNITS", "GATHER", "Q_IS_LN", "STORE_H", "BACKWARD", "DQ_ATOMIC", "WHOLE_HEAD",
          "FUSED_DELTA", "num_warps", "num_stages")


@dataclass
class Launch:
    label: str          # op, shape and pass, e.g. "attention B256 H4 N144 D16 backward"
    kernel: object      # the JITFunction
    args: tuple
    kwargs: dict
    grid: tuple = ()    # the programs along each axis


@dataclass
class Report:
    label: str
    kernel: str
    config: dict
    shared: int | None = None       # bytes of shared memory a block needs
    registers: int | None = None    # per thread
    stack: int | None = None        # bytes of local memory a thread needs: spilled registers
    mix: dict | None = None         # with sass: instruction kind -> static count (`instruction_mix`)
    error: str | None = None


class _Recorder:
    """Stands in for `wrap_triton(kernel)`: `[grid](...)` records the launch instead of running it."""

    def __init__(self, sink: list, label: str, kernel):
        self.sink, self.label, self.kernel = sink, label, kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append(Launch(self.label, self.kernel, args, kwargs, tuple(grid)))


def _record(label: str, call, modules) -> list[Launch]:
    launches: list[Launch] = []
    saved = [(m, m.wrap_triton) for m in modules]
    for m in modules:
        m.wrap_triton = lambda kernel, m=m: _Recorder(launches, label, kernel)
    try:
        call()
    finally:
        for m, original in saved:
            m.wrap_triton = original
    return launches


def _attention_launches(dtype, shapes) -> list[Launch]:
    from kernels.attention import triton as kt

    out = []
    for b, h, n, d in shapes:
        q, k, v, do = (torch.empty(b, h, n, d, device="meta", dtype=dtype) for _ in range(4))
        o, lse2 = kt._bhnd_like(q), torch.empty(b, h, kt.stat_rows(n), device="meta")   # what the forward saves
        shape = f"attention B{b} H{h} N{n} D{d}"
        out += _record(f"{shape} forward", lambda: kt.forward(q, k, v, d ** -0.5), [kt])
        out += _record(f"{shape} backward", lambda: kt.backward(do, q, k, v, o, lse2, d ** -0.5), [kt])
        # the candidate with one program a (batch, head) that adds dQ up in its own scratch as it
        # walks the key blocks (no dQ pass, no delta launch, no atomics)
        whole_head = {"BLOCK": 64, "BLOCK_STEP": 64, "num_warps": 8, "num_stages": 2, "WHOLE_HEAD": True,
                      "FUSED_DELTA": True}
        out += _record(f"{shape} backward whole-head",
                       lambda: kt.backward(do, q, k, v, o, lse2, d ** -0.5, whole_head), [kt])
    return out


def _token_mlp_launches(dtype, shapes) -> list[Launch]:
    from kernels.grid import next_pow2
    from kernels.token_mlp import gemms
    from kernels.token_mlp import triton as kt

    out = []
    for B, N, C, Hd in shapes:
        x, dy = (torch.empty(B, N, C, device="meta", dtype=dtype) for _ in range(2))
        p = [torch.empty(*s, device="meta", dtype=dtype) for s in ((C,), (C,), (Hd, N), (Hd,), (N, Hd), (N,))]
        mean, rstd = (torch.empty(B, N, device="meta") for _ in range(2))
        shape = f"token_mlp B{B} N{N} C{C} Hd{Hd}"
        bwd_args = (dy, x, p[0], p[1], p[2], p[3], p[4], mean, rstd)
        # both methods, whichever is the default for this shape and dtype: the fused kernels
        # (`_blocks`, `_weight_blocks`) and the per-image GEMMs with split-K weight gradients
        fused_fwd, fused_bwd = (kt._blocks(N, C, Hd, dtype, backward) for backward in (False, True))
        fused_w = kt._weight_blocks(max(16, next_pow2(N)), C, Hd, dtype)
        split_fwd, split_bwd = (gemms.split_blocks(N, C, Hd, dtype, backward) for backward in (False, True))
        default = "split" if kt.forward_config(x, Hd).get("method") == "split" else "fused"
        for method, fwd, bwd, weights in (("fused", fused_fwd, fused_bwd, fused_w),
                                          ("split", split_fwd, split_bwd, {"method": "splitk"})):
            tag = method + (" (default)" if method == default else "")
            out += _record(f"{shape} forward {tag}", lambda: kt.forward(x, *p, 1e-5, config=fwd), [kt, gemms])
            out += _record(f"{shape} backward {tag}", lambda: kt.backward(
                *bwd_args, config=bwd, weight_config=weights), [kt, gemms])
        # candidates: the GEMMs reading LayerNorm(X) from memory, dX written by the token kernel
        # (row sums from the dW1 kernel), the whole backward an image a program
        out += _record(f"{shape} forward split-Z", lambda: kt.forward(
            x, *p, 1e-5, config={**split_fwd, "Z": True}), [kt, gemms])
        out += _record(f"{shape} backward split-Z", lambda: kt.backward(
            *bwd_args, config={**split_bwd, "Z": True}, weight_config={"method": "splitk"}), [kt, gemms])
        # the token kernel over blocks of 128 tokens, channel blocks twice as wide (`gemms.token_blocks`)
        blocked_fwd = {**split_fwd, "tokens": {**split_fwd["tokens"], "BLOCK_N": 128,
                                               "BLOCK_C": min(2 * split_fwd["tokens"]["BLOCK_C"], 128)}}
        blocked_bwd = {**split_bwd, "tokens": {**split_bwd["tokens"], "BLOCK_N": 128,
                                               "BLOCK_C": min(2 * split_bwd["tokens"]["BLOCK_C"], 128)}}
        out += _record(f"{shape} forward split-token-blocks", lambda: kt.forward(
            x, *p, 1e-5, config=blocked_fwd), [kt, gemms])
        out += _record(f"{shape} backward split-token-blocks", lambda: kt.backward(
            *bwd_args, config=blocked_bwd, weight_config={"method": "splitk"}), [kt, gemms])
        out += _record(f"{shape} backward split-dx-direct", lambda: kt.backward(
            *bwd_args, config={**split_bwd, "dx_direct": True}, weight_config={"method": "splitk"}), [kt, gemms])
        if kt.image_method_fits(N, Hd) and dtype != torch.float32:   # fp32's FMA dots spill it (5 KB)
            out += _record(f"{shape} backward image", lambda: kt.backward(
                *bwd_args, config={"method": "image"}), [kt, gemms])
    return out


def _dwconv_launches(dtype, shapes) -> list[Launch]:
    from kernels.dwconv import toeplitz
    from kernels.dwconv import triton as kt

    out = []
    for B, C, H, W, k in shapes:
        w = torch.empty(C, 1, k, k, device="meta", dtype=dtype)
        bias = torch.empty(C, device="meta", dtype=dtype)
        for layout, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
            x, dy = (torch.empty(B, C, H, W, device="meta", dtype=dtype).contiguous(memory_format=fmt)
                     for _ in range(2))
            y = torch.empty_like(x)
            shape = f"dwconv2d B{B} C{C} {H}x{W} k{k} {layout}"
            out += _record(f"{shape} forward",
                           lambda: kt.conv_forward(x, w, bias, y, y, gelu=True), [kt, toeplitz])
            out += _record(f"{shape} backward", lambda: kt.conv_backward(
                dy, x, w, y, gelu=True, has_bias=True, need_dx=True, need_dw=True), [kt, toeplitz])
        x = torch.empty(B, C, H, W, device="meta", dtype=dtype)
        shape = f"dwconv2d B{B} C{C} {H}x{W} k{k} NCHW"
        # the ConvMixer block op's (kernels.dwconv_batch_norm_residual) launches: no GELU (it
        # moved into the BatchNorm), the residual's gradient added as dx is written, the bias
        # gradient from the BatchNorm backward
        out += _record(f"{shape} block forward", lambda: kt.conv_forward(x, w, bias, y, None, gelu=False),
                       [kt, toeplitz])
        out += _record(f"{shape} block backward", lambda: kt.conv_backward(
            x, x, w, None, gelu=False, has_bias=False, need_dx=True, need_dw=True, add_to_dx=x), [kt, toeplitz])
        # the candidate streaming kernels (forward, then the backward's weight gradient and input
        # gradient)
        stream = {"method": "toeplitz", "stream": True}
        out += _record(f"{shape} forward stream", lambda: kt.conv_forward(x, w, bias, y, y, gelu=True, tile=stream),
                       [kt, toeplitz])
        out += _record(f"{shape} backward stream", lambda: kt.conv_backward(
            x, x, w, x, gelu=True, has_bias=True, need_dx=True, need_dw=True, tile=stream), [kt, toeplitz])
        # the weight gradient re-reading g (as the ConvMixer block op would run it: no GELU, no bias)
        out += _record(f"{shape} block backward reload", lambda: kt.conv_backward(
            x, x, w, None, gelu=False, has_bias=False, need_dx=True, need_dw=True, add_to_dx=x,
            tile={**stream, "reload": True}), [kt, toeplitz])
    return out


def _batch_norm_launches(dtype, shapes) -> list[Launch]:
    from kernels.batch_norm import triton as kt

    out = []
    for B, C, H, W in shapes:
        x, res, dy = (torch.empty(B, C, H, W, device="meta", dtype=dtype) for _ in range(3))
        w, b, mean, rstd = (torch.empty(C, device="meta") for _ in range(4))
        for gelu in (False, True):
            label = f"batch_norm B{B} C{C} {H}x{W}" + (" gelu" if gelu else " +residual")
            out += _record(f"{label} forward", lambda: kt.forward(x, w, b, None if gelu else res, 1e-5, gelu), [kt])
            out += _record(f"{label} backward", lambda: kt.backward(dy, x, w, mean, rstd, gelu), [kt])
        # as the ConvMixer block op runs it: the sum of dx per channel formed too (a bias's gradient)
        out += _record(f"batch_norm B{B} C{C} {H}x{W} gelu backward, dx sum", lambda: kt.backward(
            dy, x, w, mean, rstd, True, dx_sum=torch.empty(C, device="meta")), [kt])
    return out


LAUNCHES = {"attention": _attention_launches, "token_mlp": _token_mlp_launches, "dwconv2d": _dwconv_launches,
            "batch_norm": _batch_norm_launches}
# what --shape takes for each op, in the order of its benchmark shapes (kernels/<op>/bench.py)
SHAPE_FIELDS = {"attention": "B,H,N,D", "token_mlp": "B,N,C,Hd", "dwconv2d": "B,C,H,W,k", "batch_norm": "B,C,H,W"}


def benchmark_shapes(op: str) -> list[tuple]:
    import importlib

    package = {"dwconv2d": "dwconv"}.get(op, op)
    return list(importlib.import_module(f"kernels.{package}.bench").SHAPES)


def _specialized_source(launch: Launch, target):
    """(Triton source, compile options) of one recorded launch, specialized as a real launch is:
    besides constexprs, Triton marks each pointer and integer argument divisible by 16 (and
    integers equal to 1), which decides vector widths, async copies and so shared memory:
    without those marks a kernel can compile to under half the shared memory it takes on
    the GPU. Uses the launcher's own binder, as `JITFunction.run` does (Triton 3.6 to 3.8).
    Meta tensors stand in for CUDA ones: their address (0) is 16-byte aligned, as the
    allocator's always are."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization,
                                                              options)
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__


def _shown_config(launch: Launch) -> dict:
    """The launch's tile sizes, switches, num_warps and num_stages (the constexprs worth showing)."""
    kernel = launch.kernel
    values = {**dict(zip(kernel.arg_names, launch.args)), **launch.kwargs}
    constexprs = {kernel.arg_names[i] for i in kernel.constexprs} | {"num_warps", "num_stages"}
    return {k: v for k, v in values.items() if k in constexprs and k.startswith(_SHOWN)}


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found at {path} (it ships with Triton's NVIDIA backend)")
    return path


# SASS opcodes (before the first '.') counted by --sass, under the names the report prints
MIX_KINDS = {
    "wgmma": ("HGMMA",), "mma": ("HMMA",),                          # tensor cores: warpgroup / warp MMA
    "ldsm": ("LDSM",), "lds": ("LDS",), "sts": ("STS",),            # shared memory: ldmatrix, scalar/vector
    "ldg": ("LDG",), "cp.async": ("LDGSTS",), "tma": ("UTMALDG", "UBLKCP"), "stg": ("STG",),
    "local": ("LDL", "STL"),                                        # spilled registers
    "atom": ("RED", "REDG", "ATOM", "ATOMG"), "shfl": ("SHFL",), "bar": ("BAR",),
}
_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def instruction_mix(sass: str) -> dict:
    """Static count of each MIX_KINDS kind in a cuobjdump -sass listing (instructions in the code,
    not executed ones: a loop body counts once)."""
    kind_of = {op: kind for kind, ops in MIX_KINDS.items() for op in ops}
    counts = dict.fromkeys(MIX_KINDS, 0)
    for opcode in _OPCODE.findall(sass):
        kind = kind_of.get(opcode)
        if kind:
            counts[kind] += 1
    return counts


def compile_launch(launch: Launch, arch: int, sass: bool = False) -> Report:
    """Compile one recorded launch for sm_<arch> and read the resources of the binary Triton built
    (and, with `sass`, its instruction mix)."""
    import triton
    from triton.backends.compiler import GPUTarget

    report = Report(launch.label, launch.kernel.__name__, _shown_config(launch))
    try:
        target = GPUTarget("cuda", arch, 32)
        source, options = _specialized_source(launch, target)
        compiled = triton.compile(source, target=target, options=options)
        report.shared = int(compiled.metadata.shared)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "kernel.cubin")
            with open(cubin, "wb") as f:
                f.write(compiled.asm["cubin"])
            usage = subprocess.run([_cuobjdump(), "-res-usage", cubin], capture_output=True, text=True).stdout
            if sass:
                listing = subprocess.run([_cuobjdump(), "-sass", cubin], capture_output=True, text=True).stdout
                report.mix = instruction_mix(listing)
        registers = re.search(r"REG:(\d+)", usage)
        stack = re.search(r"STACK:(\d+)", usage)
        report.registers = int(registers.group(1)) if registers else None
        report.stack = int(stack.group(1)) if stack else None
    except Exception as exc:  # one kernel that cannot compile must not hide the others
        report.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ''}"
    return report


def run(op: str = "all", dtype: torch.dtype = torch.bfloat16, arch: int = 90, first: bool = False,
        shapes: list[tuple] | None = None, sass: bool = False, echo=print) -> list[Report]:
    """Compile and report each launch of `op` (or every op) at its benchmark shapes (`first`: the
    first one only), or at `shapes` (one op only); `sass`: with each one's instruction mix."""
    from kernels import dispatch

    if dispatch.interpreter_mode():
        raise RuntimeError("the compile report needs compiled kernels: unset TRITON_INTERPRET")
    limit = SMEM_LIMIT.get(arch)
    reports = []
    for name in (LAUNCHES if op == "all" else (op,)):
        echo(f"\n== {name} ({str(dtype).removeprefix('torch.')}, sm_{arch}: shared memory limit "
             f"{limit or 'unknown'} bytes) ==")
        op_shapes = shapes or benchmark_shapes(name)[:1 if first else None]
        with dispatch.direct_launch():   # as eager calls and the benchmarks launch (launch options)
            launches = LAUNCHES[name](dtype, op_shapes)
        for launch in launches:
            r = compile_launch(launch, arch, sass)
            reports.append(r)
            if r.error:
                echo(f"  {r.label:<52} {r.kernel:<30} FAILED {r.error}")
                continue
            flags = ("  SPILLS" if r.stack else "") + ("  OVER SHARED MEMORY" if limit and r.shared > limit else "")
            echo(f"  {r.label:<52} {r.kernel:<30} smem {r.shared:>7}  regs {r.registers!s:>3}  "
                 f"stack {r.stack!s:>5}  {r.config}{flags}")
            if r.mix:
                echo("      " + "  ".join(f"{kind} {n}" for kind, n in r.mix.items() if n))
    return reports


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", choices=["all", *LAUNCHES], default="all", help="which op's launches (default: all)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                        help="dtype of the activations (default: bf16)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--first", action="store_true", help="only the first benchmark shape of each op")
    parser.add_argument("--shape", action="append", default=[], metavar="SIZES",
                        help="a shape instead of the benchmark ones, with --op: "
                             + "; ".join(f"{op} {fields}" for op, fields in SHAPE_FIELDS.items())
                             + " (e.g. --op token_mlp --shape 8,257,64,128); repeatable")
    parser.add_argument("--sass", action="store_true",
                        help="also count each launch's instructions by kind (tensor-core, shared, global, ...)")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    shapes = None
    if args.shape:
        fields = SHAPE_FIELDS.get(args.op)
        try:
            shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape]
        except ValueError:
            shapes = []
        if fields is None or not shapes or any(len(s) != fields.count(",") + 1 or min(s) < 1 for s in shapes):
            need = f"{fields} for --op {args.op}" if fields else "one --op (not all)"
            print(f"error: --shape takes positive integers {need}; got {' '.join(args.shape)}", file=sys.stderr)
            return 2
    try:
        reports = run(args.op, dtype, args.arch, args.first, shapes, args.sass)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if any(r.error for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
