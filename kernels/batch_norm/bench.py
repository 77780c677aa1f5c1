"""Benchmark cases for batch_norm: ours vs PyTorch's BatchNorm (+ the add or the GELU around it)
and torch.compile of the same, training mode, NCHW.

The two BatchNorms of a ConvMixer block: after the depthwise convolution, with the residual
add (`+residual`), and after the 1x1 convolution's GELU (`gelu`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import dispatch
from kernels.batch_norm.op import batch_norm
from kernels.benchmarking import BenchCase, Candidate

OP = "batch_norm"

# (B, C, H, W): convmixer_cifar's layers at batch 512, a ConvMixer-768/32 and -1536/20 layer
SHAPES = [
    (512, 256, 32, 32),
    (128, 768, 32, 32),
    (64, 1536, 28, 28),
]


def _pytorch(x, weight, bias, rm, rv, gelu, residual):
    a = F.gelu(x) if gelu else x
    y = F.batch_norm(a, rm, rv, weight, bias, True, 0.1, 1e-5)
    return y if residual is None else residual + y


def _candidate(name, fn, x, weight, bias, residual, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    if residual is not None:
        leaves.append(residual.detach().clone().requires_grad_())

    def forward():
        with torch.no_grad():
            return fn(x, weight, bias, residual)

    def forward_backward():
        y = fn(*leaves[:3], leaves[3] if residual is not None else None)
        return torch.autograd.grad(y, leaves, dy)

    return Candidate(name, forward, forward_backward)


def cases(dtype: torch.dtype, device, shapes=None) -> list[BenchCase]:
    device = torch.device(device)
    compile_backend = "inductor" if device.type == "cuda" else "aot_eager"
    triton_ok = not dispatch.device_reasons(device) and dispatch.triton_import_error() is None
    elem = torch.finfo(dtype).bits // 8
    out = []
    for i, (B, C, H, W) in enumerate(shapes or SHAPES):
        variants = ("+residual", "gelu") if i == 0 else ("+residual",)
        for variant in variants:
            gelu, with_res = variant == "gelu", variant == "+residual"
            gen = torch.Generator(device="cpu").manual_seed(0)

            def rnd(*shape):
                return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

            x, dy = rnd(B, C, H, W), rnd(B, C, H, W)
            residual = rnd(B, C, H, W) if with_res else None
            weight = (1 + 0.1 * torch.randn(C, generator=gen)).to(device)
            bias = (0.1 * torch.randn(C, generator=gen)).to(device)
            rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)

            def pytorch(x, w, b, r, rm=rm, rv=rv, gelu=gelu):
                return _pytorch(x, w, b, rm, rv, gelu, r)

            def ours(x, w, b, r, rm=rm, rv=rv, gelu=gelu):
                return batch_norm(x, w, b, rm, rv, activation="gelu" if gelu else None, residual=r,
                                  backend="triton" if triton_ok else "reference")

            cands = [_candidate("ours" if triton_ok else "ours (reference path)", ours, x, weight, bias, residual, dy),
                     _candidate("pytorch", pytorch, x, weight, bias, residual, dy),
                     _candidate("torch.compile", torch.compile(pytorch, backend=compile_backend),
                                x, weight, bias, residual, dy)]
            n = B * C * H * W
            tensors_fwd = 3 if with_res else 2          # x (and residual) read, y written
            out.append(BenchCase(
                op=OP, shape=f"B{B} C{C} {H}x{W} {variant}",
                flops_fwd=8 * n, flops_fwd_bwd=20 * n,   # a few FMAs an element: never the bound
                bytes_fwd=tensors_fwd * n * elem,
                bytes_fwd_bwd=(tensors_fwd + 3) * n * elem,   # + dy and x read, dx written
                anchor="pytorch", compute="fma", candidates=cands))
    return out


def sweep_cases(dtype: torch.dtype, device, shapes=None) -> list:
    """No launch options to sweep yet: one configuration per kernel."""
    return []
