"""Benchmark cases for dwconv2d: ours vs nn.Conv2d(groups=C) (cuDNN) and torch.compile.

The comparison is the plain layer (depthwise conv + bias, no activation), the
same layer as the anchors in GPU.md, in both memory formats.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kernels import dispatch
from kernels.benchmarking import BenchCase, Candidate
from kernels.dwconv.op import dwconv2d

OP = "dwconv2d"

# (B, C, H, W, k): ConvMixer-256/8 k9 at CIFAR size, a ConvMixer-768 k7 and a ConvMixer-1536 k9 layer
SHAPES = [
    (256, 256, 32, 32, 9),
    (128, 768, 32, 32, 7),
    (64, 1536, 28, 28, 9),
]


def _counts(B, C, H, W, k, elem):
    """FLOPs (multiply-add = 2) and the minimal bytes moved, forward and forward+backward."""
    n = B * C * H * W
    params = (C * k * k + C) * elem
    flops_fwd = 2 * n * k * k
    bytes_fwd = 2 * n * elem + params                         # read x, write y
    bytes_fwd_bwd = bytes_fwd + 3 * n * elem + params         # read dy and x, write dx and the grads
    return flops_fwd, 3 * flops_fwd, bytes_fwd, bytes_fwd_bwd  # dx and dw each cost a forward


def _timed_pair(fn, x, dy):
    """(forward, forward+backward) zero-argument callables of fn on x."""
    x_grad = x.detach().clone().requires_grad_()

    def forward():
        with torch.no_grad():
            return fn(x)

    def forward_backward():
        y = fn(x_grad)
        y.backward(dy)
        return y

    return forward, forward_backward


def _allow_recompiles(n: int) -> None:
    """Every shape x layout x grad mode recompiles nn.Conv2d.forward (one code object);
    past dynamo's default limit of 8 it would silently fall back to eager."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), n))


def cases(dtype: torch.dtype, device, shapes=None) -> list[BenchCase]:
    device = torch.device(device)
    _allow_recompiles(64)
    # inductor on CPU needs a C++ toolchain and minutes; there only the plumbing is checked
    compile_backend = "inductor" if device.type == "cuda" else "aot_eager"
    triton_ok = not dispatch.device_reasons(device) and dispatch.triton_import_error() is None
    out = []
    for B, C, H, W, k in shapes or SHAPES:
        gen = torch.Generator(device="cpu").manual_seed(0)
        conv = nn.Conv2d(C, C, k, padding=k // 2, groups=C).to(device=device, dtype=dtype)
        x = torch.randn(B, C, H, W, generator=gen).to(device=device, dtype=dtype)
        dy = torch.randn(B, C, H, W, generator=gen).to(device=device, dtype=dtype)
        layouts = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}
        cands = []
        for layout, fmt in layouts.items():
            xl, dyl = x.to(memory_format=fmt), dy.to(memory_format=fmt)
            cands.append(Candidate(f"cuDNN {layout}", *_timed_pair(conv, xl, dyl)))
            compiled = torch.compile(conv, backend=compile_backend)
            cands.append(Candidate(f"torch.compile {layout}", *_timed_pair(compiled, xl, dyl)))
            if triton_ok:
                # conv=conv binds this shape's layer (a bare closure would see the last shape's)
                ours = (lambda t, conv=conv: dwconv2d(t, conv.weight, conv.bias, backend="triton"))
                cands.append(Candidate(f"triton {layout}", *_timed_pair(ours, xl, dyl)))
        flops_fwd, flops_fwd_bwd, bytes_fwd, bytes_fwd_bwd = _counts(B, C, H, W, k, x.element_size())
        out.append(BenchCase(
            op=OP, shape=f"B{B} C{C} {H}x{W} k{k}",
            flops_fwd=flops_fwd, flops_fwd_bwd=flops_fwd_bwd,
            bytes_fwd=bytes_fwd, bytes_fwd_bwd=bytes_fwd_bwd,
            anchor="cuDNN NCHW", compute="fma", candidates=cands,
        ))
    return out


def sweep_cases(dtype: torch.dtype, device, shapes=None) -> list:
    """Tile budgets of the forward, input-gradient and weight-gradient launches, both memory
    formats, each shape."""
    from kernels.benchmarking import SweepCase
    from kernels.dwconv import toeplitz as toeplitz_kernels
    from kernels.dwconv import triton as kt

    device = torch.device(device)
    out = []
    for B, C, H, W, k in shapes or SHAPES:
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(B, C, H, W, generator=gen).to(device=device, dtype=dtype)
        dy = torch.randn(B, C, H, W, generator=gen).to(device=device, dtype=dtype)
        w = (torch.randn(C, 1, k, k, generator=gen) / k).to(device=device, dtype=dtype)
        bias = torch.randn(C, generator=gen).to(device=device, dtype=dtype)
        for layout, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
            xl, dyl = x.to(memory_format=fmt), dy.to(memory_format=fmt)
            # What is still open, not every combination: an H100 sweep (bf16, 2026-11-27, B256
            # C256 32x32 k9) found the tap kernel's tile budgets within 10-20% of each other and
            # the Toeplitz kernels 3.0x (forward) and 2.3x (weight gradient) faster on NCHW but
            # 2x slower on channels_last; a full sweep of one shape took about three minutes.
            toeplitz = [{"method": "toeplitz", "BLOCK_C": bc, "TILE_H": th, "num_warps": nw}
                        for bc, th, nw in ((2, 16, 4), (4, 16, 4), (4, 32, 4), (8, 32, 4), (8, 32, 8))]
            # the banded matrices' entries gathered from the weights instead of read from memory
            gathered = [{**kt.TOEPLITZ_FORWARD, "gather": True}, {**toeplitz[4], "gather": True}]
            # 16-wide output windows: the halo of a k9 row then pads 24 columns to 32 instead of
            # 40 to 64, half the tensor-core work per output and a quarter of each banded matrix
            narrow = [{"method": "toeplitz", "BLOCK_C": bc, "TILE_H": th, "TILE_W": 16, "num_warps": 4}
                      for bc, th in ((2, 16), (4, 32), (8, 32))]
            # never timed yet, so first: the forward stacking the window's rows of several images
            # into each matmul (its banded matrices then serve IMAGES times the outputs: with one
            # image a program, at B256 C256 k9 they are ~2.4 GB of L2 reads against 0.4 GB of x,
            # y and z), and the weight gradient on a few windows a program (by default each
            # program's K passes over ~250 windows re-read g and x from memory: ~9x the bytes,
            # about what its 917 us on the H100 moves). Stacked tiles that build without spills
            # for sm_90 under Triton 3.6 and 3.8 (python -m kernels.compile_report); 16-wide
            # windows halve the tensor-core work per output (a k9 row's 24 inputs pad to 32
            # columns, not 40 to 64)
            images = [{"method": "toeplitz", "BLOCK_C": bc, "TILE_H": 32, "num_warps": w, "IMAGES": 2}
                      for bc, w in ((4, 8), (2, 4))] + [
                {"method": "toeplitz", "BLOCK_C": bc, "TILE_H": 32, "TILE_W": 16, "num_warps": w, "IMAGES": n}
                for bc, w, n in ((4, 4, 2), (2, 4, 4), (8, 8, 2), (4, 8, 4))]
            units = [{**kt.TOEPLITZ_WEIGHT_GRAD, "UNITS": n} for n in (2, 8)] + [
                {"method": "toeplitz", "BLOCK_C": 4, "TILE_H": 32, "num_warps": 4, "UNITS": 4},
                {"method": "toeplitz", "BLOCK_C": 4, "TILE_H": 32, "TILE_W": 16, "num_warps": 4, "UNITS": 4}]
            # never timed yet, so first: the streaming kernels (each input row loaded and
            # converted for the tensor cores once, not K times; the K rows in flight in registers)
            # (Triton 3.3 and newer: none before)
            stream = {"method": "toeplitz", "stream": True}
            stream_fwd = [stream, {**stream, "BLOCK_C": 2}, {**stream, "BLOCK_C": 8}, {**stream, "ROWS": 16}]
            # never timed yet, so first: the weight gradient re-reading each g row for each of its
            # K products, its loads pipelined into asynchronous copies, instead of converting the
            # rows it holds once a product (sm_90 SASS, Triton 3.6, k9: 2 barriers an input row
            # instead of 18, see toeplitz._dwconv_bwd_w_reload_kernel); with 32 images a unit,
            # each product twice as deep for 212 instructions a row instead of 182
            reload = {**stream, "reload": True}
            stream_wgt = [reload, {**reload, "IMAGES": 32},
                          stream, {**stream, "num_warps": 2}, {**stream, "UNITS": 4}, {**stream, "UNITS": 16}]
            stream_copy = [{**stream, "copy_to_nchw": True}]   # channels_last, on NCHW copies
            if not toeplitz_kernels.stream_supported():
                stream_fwd = stream_wgt = stream_copy = []
            if layout == "NCHW":
                # the tap kernel's budgets only where it is still the default (K < TOEPLITZ_MIN_K on NCHW)
                taps = k < kt.TOEPLITZ_MIN_K
                fwd = stream_fwd + (images + ([{"elems": 1024, "c_bytes": 64}, {"elems": 2048, "c_bytes": 64}] if taps else [])
                       + toeplitz + gathered + narrow[1:] + [{**narrow[2], "gather": True}])
                wgt = stream_wgt + (units + ([{"elems": 8192, "c_bytes": 32}] if taps else [])
                       + toeplitz[:1] + toeplitz[2:4] + narrow[:2])
            else:
                # Toeplitz tiles 16 channels wide: a load then fills a whole 32-byte sector of a
                # channels_last row in bf16 (the 2-8 channel tiles above lost 2x to the tap kernel
                # there, their loads using 4-16 bytes of each sector); 16-wide windows, which build
                # without spills for sm_90 under Triton 3.6 and 3.8 (32-wide ones spill on 3.6)
                wide = {"method": "toeplitz", "BLOCK_C": 16, "TILE_H": 16, "TILE_W": 16, "num_warps": 8}
                # (first, never timed: the streaming kernels on NCHW copies)
                fwd = stream_copy + [wide, {**wide, "gather": True}, {**wide, "IMAGES": 2}, {**wide, "TILE_H": 32}]
                wgt = stream_copy + [{"method": "toeplitz", "BLOCK_C": 16, "TILE_H": 16, "num_warps": 4, "UNITS": 4}]
                fwd += [{"elems": e, "c_bytes": cb} for e, cb in ((8192, 128), (4096, 128), (8192, 64))]
                fwd += [toeplitz[3]]
                wgt += [{"elems": e, "c_bytes": cb} for e, cb in ((16384, 64), (16384, 32), (8192, 64))]
                # the NCHW winners on a contiguous copy of the inputs, the output kept channels_last
                fwd += [{**kt.TOEPLITZ_FORWARD, "copy_to_nchw": True}, {**gathered[0], "copy_to_nchw": True},
                        {**images[0], "copy_to_nchw": True}]
                wgt += [{**kt.TOEPLITZ_WEIGHT_GRAD, "copy_to_nchw": True}, {**units[0], "copy_to_nchw": True}]

            def forward(cfg, xl=xl, w=w, bias=bias):
                y = torch.empty_like(xl)
                kt.conv_forward(xl, w, bias, y, None, gelu=False, tile=cfg)
                return y

            shape = f"B{B} C{C} {H}x{W} k{k} {layout}"
            key = kt._shape_key(xl, k)
            out.append(SweepCase("dwconv2d", f"{shape} forward", kt.forward_tile(xl, k), fwd, forward,
                                 tune=("forward", key)))
            # the input gradient as the ConvMixer block runs it: the flipped convolution of the
            # output gradient plus the residual's gradient; the forward's candidates, timed apart
            def input_grad(cfg, dyl=dyl, w=w, xl=xl):
                dx = torch.empty_like(dyl)
                kt.conv_forward(dyl, w, None, dx, None, gelu=False, flip=True, add=xl, tile=cfg)
                return dx

            out.append(SweepCase("dwconv2d", f"{shape} input grad", kt.forward_tile(dyl, k, role="input grad"),
                                 fwd, input_grad, tune=("input grad", key)))
            # as the benchmark's layer and the ConvMixer block run it: no GELU (the block applies
            # it in its BatchNorm), the bias gradient part of the work (the streaming kernels form
            # it themselves; the block gets it from its BatchNorm backward)
            out.append(SweepCase("dwconv2d", f"{shape} weight grad", kt.weight_grad_tile(xl, k), wgt,
                                 lambda cfg, a=(dyl, xl, w, None): kt.conv_backward(
                                     *a, gelu=False, has_bias=True, need_dx=False, need_dw=True, tile=cfg)[1:],
                                 tune=("weight grad", key)))
    return out
