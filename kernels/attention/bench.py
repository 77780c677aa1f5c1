"""Benchmark cases for `composer bench kernels --op attention`.

Candidates, all on the same random (B, H, N, D) inputs:
  ours            kernels.attention (the Triton kernel where it can run)
  ours-packed     the same on q, k, v viewed out of a packed (B, N, 3, H, D) qkv,
                  the layout the attention block really passes (no copies)
  ours-library-op the same kernels through the torch.library op, the path torch.compile
                  takes (eager calls skip it): shows what that layer costs on the host
  sdpa            torch.nn.functional.scaled_dot_product_attention, default backend (the anchor)
  eager           matmul -> softmax -> matmul in the input dtype
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import dispatch
from kernels.attention.op import attention, attention_packed, triton_reasons
from kernels.benchmarking import BenchCase, Candidate

# (B, H, N, D): the shapes (anchors in GPU.md) and the shipped seed_vit spec's; SDPA is timed
# in the same run for every row
SHAPES: list[tuple[int, int, int, int]] = [
    (256, 4, 144, 16),   # the seed ViT, 144 patches
    (256, 32, 145, 2),   # specs/seed_vit.yaml as shipped: 144 patches + class token, 32 heads of 2
    (512, 3, 65, 64),    # CIFAR ViT, patch 4
    (256, 6, 197, 64),   # ViT-S/16
    (128, 12, 197, 64),  # ViT-B/16
    (32, 16, 1024, 64),  # a long sequence, for the tiled path
]
# the sweep's order: the shapes first (seed ViT, ViT-S, CIFAR ViT, long sequence), the
# seed spec's 2-wide heads (no target of their own) last. ViT-B/16 is left out: saved
# configurations are keyed by N and D, so its sweep would redo ViT-S/16's (N 197, D 64).
SWEEP_ORDER = [SHAPES[0], SHAPES[3], SHAPES[2], SHAPES[5], SHAPES[1]]


def _eager(q, k, v):
    scale = q.shape[-1] ** -0.5
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


def _candidate(name, fn, inputs, grad):
    def forward():
        with torch.no_grad():
            return fn(*inputs)

    def forward_backward():
        out = fn(*inputs)
        # autograd.grad instead of .backward(): no .grad accumulation kernels in the timing
        return torch.autograd.grad(out, inputs, grad)

    return Candidate(name, forward, forward_backward)


def _library_op(q, k, v):
    from kernels.attention.op import _attention_fwd

    return _attention_fwd(q, k, v, q.shape[-1] ** -0.5)[0]


def _ours_backend(dtype, device, d) -> str:
    # "triton" wherever the kernel can run (CUDA, or the CPU interpreter in
    # tests), else the reference path, so that the case still builds anywhere
    reasons = triton_reasons(dtype=dtype, head_dim=d) + dispatch.device_reasons(device)
    if dispatch.triton_import_error():
        reasons.append("triton missing")
    return "reference" if reasons else "triton"


def cases(dtype: torch.dtype, device, shapes=None) -> list[BenchCase]:
    device = torch.device(device)
    out = []
    for b, h, n, d in shapes or SHAPES:
        gen = torch.Generator(device=device).manual_seed(0)

        def rand(*shape):
            return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

        qkv = [rand(b, h, n, d).requires_grad_() for _ in range(3)]
        packed = rand(b, n, 3 * h * d).requires_grad_()   # the block's qkv projection
        grad = rand(b, h, n, d)
        backend = _ours_backend(dtype, device, d)
        suffix = "" if backend == "triton" else " (reference path)"

        def ours(q, k, v, backend=backend):
            return attention(q, k, v, backend=backend)

        def ours_packed(packed, backend=backend, heads=h):
            # the block's path: q, k, v read in place from the projection, the (B, N, H * D)
            # output and the packed gradient in the projections' layouts
            return attention_packed(packed, heads, backend=backend)

        elem = torch.finfo(dtype).bits // 8
        tensor_bytes = b * h * n * d * elem
        matmul_flops = 2 * b * h * n * n * d   # one (N x D) @ (D x N) product
        out.append(BenchCase(
            op="attention",
            shape=f"B{b} H{h} N{n} D{d}",
            # forward: QK^T and PV; backward: recompute QK^T, then dV, dP, dQ, dK
            flops_fwd=2 * matmul_flops,
            flops_fwd_bwd=7 * matmul_flops,
            # forward reads q, k, v and writes out; backward reads q, k, v, out,
            # dout and writes dq, dk, dv
            bytes_fwd=4 * tensor_bytes,
            bytes_fwd_bwd=(4 + 8) * tensor_bytes,
            anchor="sdpa",
            candidates=[
                _candidate(f"ours{suffix}", ours, tuple(qkv), grad),
                _candidate(f"ours-packed{suffix}", ours_packed, (packed,),
                           grad.transpose(1, 2).reshape(b, n, h * d)),
                *([_candidate("ours-library-op", _library_op, tuple(qkv), grad)] if backend == "triton" else []),
                _candidate("sdpa", F.scaled_dot_product_attention, tuple(qkv), grad),
                _candidate("eager", _eager, tuple(qkv), grad),
            ],
        ))
    return out


def sweep_cases(dtype: torch.dtype, device, shapes=None) -> list:
    """Forward and backward launch configurations of the Triton kernels on each shape."""
    from kernels.attention import triton as kt
    from kernels.benchmarking import SweepCase

    device = torch.device(device)
    out = []
    for b, h, n, d in shapes or SWEEP_ORDER:
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v, do = (torch.randn(b, h, n, d, generator=gen, device=device, dtype=dtype) for _ in range(4))
        scale = d ** -0.5
        o, lse2 = kt.forward(q, k, v, scale)
        # never timed yet, so first: whole tiles without a mask, then a tail of 16-wide steps
        # (N = 144 with 64-key tiles: 144 keys of work per query instead of 192)
        tail_fwd = [{"BLOCK_M": bm, "BLOCK_N": bn, "TAIL": 16, "num_warps": w, "num_stages": st}
                    for bm, bn, w, st in ((64, 64, 4, 2), (128, 32, 4, 3), (128, 64, 8, 3))]
        tail_bwd = [{"BLOCK": bl, "BLOCK_STEP": st, "TAIL": 16, "num_warps": w, "num_stages": sg}
                    for bl, st, w, sg in ((64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 2))]
        # and rowsum(dO * O) formed in the main kernel: one launch and one pass over O, dO fewer
        tail_bwd += [{**kt.backward_config(q), "FUSED_DELTA": True}, {**tail_bwd[0], "FUSED_DELTA": True}]
        # the programs' own rows past the last whole block in 16-row programs (a second launch):
        # N = 197 with 64-row blocks then does 208 rows of work, not 256
        tail_fwd = [{**cfg, "ROW_TAIL": 16} for cfg in tail_fwd[:2]] + tail_fwd
        tail_bwd = [{**tail_bwd[0], "ROW_TAIL": 16}, {**tail_bwd[-1], "ROW_TAIL": 16}] + tail_bwd
        # dQ added up by the dK, dV pass with atomics: scores and exponentials formed once, not
        # twice (sm_90 SASS at N = 144: 17 instead of 33 MUFU ops in the kernel). 64-query steps
        # put dQ's product dS^T K on wgmma too (32-row steps leave it on mma.sync); 128-key
        # blocks halve the atomic traffic. All build without spills for sm_90 (Triton 3.6).
        # Timed on an H100 (2026-11-27): slower than the default at N 144, 197 and 1024 (59.1
        # against 49.3 us at the seed shape), faster only at D 2; so after the others.
        tail_bwd = tail_bwd + [{**kt.backward_config(q), "DQ_ATOMIC": True},
                    {"BLOCK": 64, "BLOCK_STEP": 64, "num_warps": 8, "num_stages": 2, "DQ_ATOMIC": True},
                    {"BLOCK": 128, "BLOCK_STEP": 64, "num_warps": 8, "num_stages": 2, "DQ_ATOMIC": True},
                    {**tail_bwd[0], "DQ_ATOMIC": True},
                    {"BLOCK": 128, "BLOCK_STEP": 32, "num_warps": 8, "num_stages": 2, "DQ_ATOMIC": True},
                    {**tail_bwd[-1], "DQ_ATOMIC": True}]
        # One program a (batch, head) walking its key blocks, dQ summed in an fp32 scratch of its
        # own: 5 products a (key block, query step) as with DQ_ATOMIC, but plain loads and
        # stores (mostly from L2) instead of its atomics, and no second pass over the keys for
        # dQ (the default's 3 more products). Fewer, longer programs: B * H of them. Never timed,
        # so first; 64-query steps put all 5 products on wgmma (sm_90, Triton 3.6, N 197 D 64:
        # 217 registers, no spills).
        whole_head = [{"BLOCK": 64, "BLOCK_STEP": 64, "num_warps": 8, "num_stages": 2, "WHOLE_HEAD": True},
                      {**kt.backward_config(q), "WHOLE_HEAD": True},
                      # small heads: 64 x 16 tiles need no 8 warps; larger ones: fewer key blocks
                      {"BLOCK": 64, "BLOCK_STEP": 64, "num_warps": 4, "num_stages": 2, "WHOLE_HEAD": True} if d <= 32
                      else {"BLOCK": 128, "BLOCK_STEP": 64, "num_warps": 8, "num_stages": 2, "WHOLE_HEAD": True},
                      {"BLOCK": 64, "BLOCK_STEP": 64, "num_warps": 8, "num_stages": 2, "WHOLE_HEAD": True,
                       "FUSED_DELTA": True}]
        if d <= 32:
            # small heads: a 64-row tile's scores on 2 warps (more programs an SM, less to sync)
            tail_fwd.append({**tail_fwd[0], "num_warps": 2})
            tail_bwd.append({**tail_bwd[1], "num_warps": 2})
        fwd = tail_fwd + [{"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
                          for bm, bn, w, st in ((64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (128, 32, 4, 3),
                                                (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2))]
        bwd = whole_head + tail_bwd + [{"BLOCK": bl, "BLOCK_STEP": st, "num_warps": w, "num_stages": sg}
                          for bl, st, w, sg in ((32, 32, 4, 2), (64, 32, 4, 2), (64, 32, 4, 3), (64, 64, 4, 3),
                                                (64, 16, 4, 3), (128, 32, 8, 2), (128, 32, 8, 3), (128, 64, 8, 2))]
        shape = f"B{b} H{h} N{n} D{d}"
        out.append(SweepCase("attention", f"{shape} forward", kt.forward_config(q), fwd,
                             lambda cfg, q=q, k=k, v=v, scale=scale: kt.forward(q, k, v, scale, cfg)[0],
                             tune=("forward", f"N{n} D{d}")))
        out.append(SweepCase("attention", f"{shape} backward", kt.backward_config(q), bwd,
                             lambda cfg, a=(do, q, k, v, o, lse2, scale): kt.backward(*a, cfg),
                             tune=("backward", f"N{n} D{d}")))
    return out


def main() -> None:
    """Standalone table (`python -m kernels.attention.bench [bf16|fp16|fp32]`) for a quick GPU check."""
    import sys

    from kernels.benchmarking import time_us

    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dname in sys.argv[1:] or ["bf16", "fp32"]:
        for case in cases(names[dname], device):
            times = {}
            for cand in case.candidates:
                times[cand.name] = (time_us(cand.forward, device), time_us(cand.forward_backward, device))
            anchor = times[case.anchor]
            for name, (fwd, fb) in times.items():
                print(f"{dname} {case.shape:<20} {name:<28} fwd {fwd:9.1f} us {case.flops_fwd / fwd / 1e6:6.1f} TF/s "
                      f"{case.bytes_fwd / fwd / 1e3:7.1f} GB/s x{anchor[0] / fwd:5.2f} | fwd+bwd {fb:9.1f} us "
                      f"{case.flops_fwd_bwd / fb / 1e6:6.1f} TF/s {case.bytes_fwd_bwd / fb / 1e3:7.1f} GB/s "
                      f"x{anchor[1] / fb:5.2f}", flush=True)


if __name__ == "__main__":
    main()
