"""kernels.attention: the Triton kernel (interpreter on CPU) against an fp64 reference.

Accuracy rule: for the output and every gradient, the kernel's max error against
fp64 must be at most 3x the error of PyTorch's own path (kernels' reference run
on the same low-precision inputs) plus a small floor, FLOOR_ULPS ulps of the
tensor's largest value (at least 1; for dq and dk, at least the largest sum of the
absolute terms they add up, see `_sum_of_terms`). NaN or inf never passes.
"""
from __future__ import annotations

import math

import pytest
import torch

from kernels import BackendUnavailable, dispatch
from kernels.attention import bench, reference
from kernels.attention.op import attention, attention_packed, triton_reasons
from tests.helpers import record_launches

# Floor, in ulps of the dtype at the tensor's largest magnitude. Low precision:
# the kernel rounds P and dS to the input dtype before the tensor-core matmuls
# (as every flash kernel must, P never leaves the chip in fp32), which the
# fp32-math reference does not do; a couple of ulps covers that. fp32: only the
# summation order differs.
FLOOR_ULPS = {torch.float32: 4.0, torch.float16: 2.0, torch.bfloat16: 2.0}
FACTOR = 3.0

N_ALL = [1, 7, 16, 65, 144, 145, 197, 257]


# ------------------------------------------------------------------ helpers --

def _randn(*shape, dtype, device, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float32, device="cpu").to(device=device, dtype=dtype)


def _fp64_truth(q, k, v, dout, scale):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    p = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
    out = p @ v
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), dout.double())]


def _run(fn, q, k, v, dout):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), dout)]


def _sum_of_terms(q, k, v, dout, scale):
    """For dq and dk, the largest sum of |terms| they add up: scale * (P * (|dP| + |rowsum|))
    @ |k| (and its transpose with |q|), dP = dout @ v^T. A sum's rounding error scales with
    that, not with its result: where one key takes all the weight (N = 1), dq and dk are 0
    exactly while their terms are not, and a floor relative to the result would demand
    exactness."""
    q, k, v, dout = (t.double() for t in (q, k, v, dout))
    p = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
    dp = dout @ v.transpose(-1, -2)
    rowsum = (p * dp).sum(-1, keepdim=True)
    weights = p * (dp.abs() + rowsum.abs())
    return {"dq": scale * (weights @ k.abs()).max().item(),
            "dk": scale * (weights.transpose(-1, -2) @ q.abs()).max().item()}


def _assert_close(name, got, ours_pytorch, truth, dtype, magnitude=0.0):
    finite = torch.isfinite(got)
    assert finite.all(), f"{name}: {int((~finite).sum())} non-finite values"
    err = (got.double() - truth).abs()
    torch_err = (ours_pytorch.double() - truth).abs().max().item()
    scale = max(1.0, truth.abs().max().item(), magnitude)
    allowed = FACTOR * torch_err + FLOOR_ULPS[dtype] * torch.finfo(dtype).eps * scale
    worst = err.max().item()
    if worst > allowed:
        where = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{name} ({dtype}): max abs err {worst:.3e} at {where} "
            f"(got {got[where].item():.6g}, fp64 {truth[where].item():.6g}); allowed {allowed:.3e} "
            f"= {FACTOR} x PyTorch's own err {torch_err:.3e} + floor"
        )


def check_attention(q, k, v, *, scale=None, dout=None, fn=None, gen=None):
    """Kernel output and dq, dk, dv vs fp64, bounded by the reference path's error in q.dtype."""
    d = q.shape[-1]
    s = d ** -0.5 if scale is None else scale
    if dout is None:
        dout = _randn(*q.shape, dtype=q.dtype, device=q.device, gen=gen)
    fn = fn or (lambda q, k, v: attention(q, k, v, scale=scale, backend="triton"))
    got = _run(fn, q, k, v, dout)
    pytorch = _run(lambda q, k, v: reference.attention(q, k, v, s), q, k, v, dout)
    truth = _fp64_truth(q, k, v, dout, s)
    terms = _sum_of_terms(q, k, v, dout, s)
    for name, g, p, t in zip(("out", "dq", "dk", "dv"), got, pytorch, truth):
        _assert_close(name, g, p, t, q.dtype, terms.get(name, 0.0))
    return got


def packed_qkv(b, h, n, d, *, dtype, device, gen):
    """q, k, v exactly as the attention block makes them: views of (B, N, 3, H, D)."""
    qkv = _randn(b, n, 3, h, d, dtype=dtype, device=device, gen=gen)
    return [t.transpose(1, 2) for t in qkv.unbind(2)]


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# --------------------------------------------------------------- accuracy --

# every N at the head dims of vision models; head dims the tiles pad (below 16, 48) at one
# block, a ragged tail and two key blocks
SIZES = [(n, d) for d in (16, 32, 64) for n in N_ALL] + [(n, d) for d in (2, 4, 8, 48) for n in (7, 145, 257)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,d", SIZES)
def test_matches_fp64(n, d, dtype, device, gen):
    # B * H = 3 (odd); test_block_layout_in_place exercises B > 1 with H > 1
    q, k, v = packed_qkv(1, 3, n, d, dtype=dtype, device=device, gen=gen)
    check_attention(q, k, v, gen=gen)


def test_contiguous_inputs(device, gen):
    q, k, v = (_randn(1, 3, 145, 32, dtype=torch.float16, device=device, gen=gen) for _ in range(3))
    check_attention(q, k, v, gen=gen)


@pytest.mark.parametrize("n,d", [(65, 64), (197, 16)])
def test_block_layout_in_place(n, d, device, gen):
    """The block's packed qkv views, and its out-projection reading a view of the output."""
    b, h = 3, 3
    q, k, v = packed_qkv(b, h, n, d, dtype=torch.float16, device=device, gen=gen)
    out = attention(q, k, v, backend="triton")
    flat = out.transpose(1, 2).reshape(b, n, h * d)
    assert flat.data_ptr() == out.data_ptr() and flat._base is not None, "out-projection input is a copy"
    # dout arrives as the transposed view of a (B, N, H*D) gradient, as it does in the block
    dout = _randn(b, n, h * d, dtype=torch.float16, device=device, gen=gen).view(b, n, h, d).transpose(1, 2)
    check_attention(q, k, v, dout=dout)


def test_strided_inputs(device, gen):
    """Odd strides everywhere: sliced head dim, permuted storage, and an expanded (stride 0) dout."""
    b, h, n, d = 1, 3, 33, 16
    q = _randn(b, h, n, 2 * d, dtype=torch.float32, device=device, gen=gen)[..., ::2]     # stride_d = 2
    k = _randn(n, d, b, h, dtype=torch.float32, device=device, gen=gen).permute(2, 3, 0, 1)
    v = _randn(b, h, d, n, dtype=torch.float32, device=device, gen=gen).transpose(-1, -2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    dout = _randn(1, 1, 1, d, dtype=torch.float32, device=device, gen=gen).expand(b, h, n, d)
    check_attention(q, k, v, dout=dout)


SMALL_TILES = ({"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2},   # 5 key tiles, last one partial
               {"BLOCK": 32, "BLOCK_STEP": 16, "num_warps": 4, "num_stages": 2})
# whole 32-key (query) steps without a mask, then the rest in 16-wide steps
TAIL_TILES = ({"BLOCK_M": 16, "BLOCK_N": 32, "TAIL": 16, "num_warps": 4, "num_stages": 2},
              {"BLOCK": 32, "BLOCK_STEP": 32, "TAIL": 16, "num_warps": 4, "num_stages": 2})


# the backward forming rowsum(dO * O) in its main kernel instead of a launch of its own
FUSED_DELTA_TILES = (TAIL_TILES[0], {**TAIL_TILES[1], "FUSED_DELTA": True})
# the programs' own rows too: whole 32-row blocks, then 16-row programs in a second launch
ROW_TAIL_TILES = ({**TAIL_TILES[0], "BLOCK_M": 32, "ROW_TAIL": 16}, {**TAIL_TILES[1], "ROW_TAIL": 16})
# dQ added up with atomics by the dK, dV pass (several key blocks add to each query row)
DQ_ATOMIC_TILES = (SMALL_TILES[0], {**SMALL_TILES[1], "DQ_ATOMIC": True})
DQ_ATOMIC_ROW_TAIL_TILES = (ROW_TAIL_TILES[0], {**ROW_TAIL_TILES[1], "DQ_ATOMIC": True, "FUSED_DELTA": True})
# one program a (batch, head): key blocks in turn, dQ summed in its own fp32 scratch
WHOLE_HEAD_TILES = (SMALL_TILES[0], {**SMALL_TILES[1], "WHOLE_HEAD": True})
WHOLE_HEAD_TAIL_TILES = (TAIL_TILES[0], {**TAIL_TILES[1], "WHOLE_HEAD": True, "FUSED_DELTA": True})


@pytest.mark.parametrize("n,tiles", [(65, SMALL_TILES), (65, TAIL_TILES), (7, TAIL_TILES), (96, TAIL_TILES),
                                     (65, FUSED_DELTA_TILES), (65, ROW_TAIL_TILES), (50, ROW_TAIL_TILES),
                                     (7, ROW_TAIL_TILES), (96, ROW_TAIL_TILES), (65, DQ_ATOMIC_TILES),
                                     (65, DQ_ATOMIC_ROW_TAIL_TILES), (65, WHOLE_HEAD_TILES),
                                     (50, WHOLE_HEAD_TAIL_TILES), (7, WHOLE_HEAD_TILES)],
                         ids=["small", "tail", "tail-only", "no-tail", "fused-delta", "row-tail",
                              "row-tail-two-programs", "row-tail-only", "no-row-tail", "dq-atomic",
                              "dq-atomic-row-tail", "whole-head", "whole-head-tail", "whole-head-one-block"])
def test_small_tiles(n, tiles, device, gen):
    """Force small forward and backward tiles: several key tiles, the last one partial; with
    TAIL, unmasked whole tiles then a tail of narrower ones (N = 7: only the tail; N = 96:
    no tail at all); with FUSED_DELTA, no delta kernel; with ROW_TAIL, the rows past the last
    whole block in a second launch of narrower programs; with DQ_ATOMIC, dQ summed by atomic
    adds from every key block; with WHOLE_HEAD, by one program walking the key blocks (3 of
    them at N 65, 2 at N 50 with a tail of query steps, one at N 7)."""
    from kernels.attention import triton as kt

    d = 16
    fwd_cfg, bwd_cfg = tiles

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out, lse2 = kt.forward(q, k, v, d ** -0.5, fwd_cfg)
            ctx.save_for_backward(q, k, v, out, lse2)
            return out

        @staticmethod
        def backward(ctx, dout):
            return kt.backward(dout, *ctx.saved_tensors, d ** -0.5, bwd_cfg)

    q, k, v = packed_qkv(1, 3, n, d, dtype=torch.float16, device=device, gen=gen)
    check_attention(q, k, v, fn=Fn.apply, gen=gen)


@pytest.mark.parametrize("n,tiles", [(20, None), (7, ROW_TAIL_TILES[0])], ids=["N20", "N7-row-tail"])
def test_row_statistics_are_padded_to_16_rows_with_finite_values(n, tiles, device, gen):
    """lse2 (and the backward's delta) hold stat_rows(N) rows a (batch, head), N rounded up to 16,
    so that the backward reads them unmasked in 16-row groups: the rows past N must be finite
    (zero queries' log-sum-exp), or they would turn the backward's padded rows into NaN."""
    from kernels.attention import triton as kt

    assert [kt.stat_rows(m) for m in (1, 16, 17, 197, 1024)] == [16, 16, 32, 208, 1024]
    q, k, v = (torch.randn(2, 3, n, 16, generator=gen).to(device) for _ in range(3))
    out, lse2 = kt.forward(q, k, v, 0.25, tiles)
    assert lse2.shape == (2, 3, kt.stat_rows(n)) and torch.isfinite(lse2).all()
    # the rows past N are those of a zero query: log2 of the number of keys
    torch.testing.assert_close(lse2[..., n:], torch.full_like(lse2[..., n:], math.log2(n)))
    with pytest.raises(ValueError, match="lse2 must be the forward's"):
        kt.backward(out, q, k, v, out, lse2[..., :n], 0.25)


def _matches_the_two_pass_backward(config, b, n, dtype, device, gen):
    """The backward with `config` and with SMALL_TILES' two-pass one on the same random (b, 3, n,
    16) inputs agree to rounding, each gradient in its input's dtype and layout. Returns the
    backward's arguments but the scale (do, q, k, v, out, lse2) and the two-pass gradients."""
    from kernels.attention import triton as kt

    d = 16
    q, k, v, do = (_randn(b, 3, n, d, dtype=dtype, device=device, gen=gen) for _ in range(4))
    out, lse2 = kt.forward(q, k, v, d ** -0.5, SMALL_TILES[0])
    two_pass = kt.backward(do, q, k, v, out, lse2, d ** -0.5, SMALL_TILES[1])
    other = kt.backward(do, q, k, v, out, lse2, d ** -0.5, config)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for name, a, ref in zip(("dq", "dk", "dv"), other, two_pass):
        assert a.dtype == dtype and a.stride() == ref.stride(), name
        assert torch.allclose(a.float(), ref.float(), atol=tol, rtol=tol), name
    return (do, q, k, v, out, lse2), two_pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dq_atomic_and_deterministic_mode(dtype, device, gen, monkeypatch):
    """DQ_ATOMIC in fp32 adds straight into dQ, in fp16 into an fp32 buffer converted once;
    both match the two-pass dQ. Under torch.use_deterministic_algorithms the launcher takes
    the two-pass path (no atomics): checked by the kernel's DQ_ATOMIC flag at launch."""
    from kernels.attention import triton as kt

    (do, q, k, v, out, lse2), two_pass = _matches_the_two_pass_backward(DQ_ATOMIC_TILES[1], 2, 65, dtype, device, gen)
    d = q.shape[-1]
    launches = record_launches(monkeypatch, kt)
    kt.backward(do, q, k, v, out, lse2, d ** -0.5, DQ_ATOMIC_TILES[1])
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    deterministic = kt.backward(do, q, k, v, out, lse2, d ** -0.5, DQ_ATOMIC_TILES[1])
    assert [kw["DQ_ATOMIC"] for name, kw in launches if name == "_attn_bwd_tiled"] == [True, False]
    assert torch.equal(deterministic[0], two_pass[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_whole_head_matches_the_two_pass_backward(dtype, device, gen):
    """WHOLE_HEAD (one program a (batch, head), dQ summed over 2 key blocks in its scratch)
    gives the two-pass dQ, dK, dV to rounding, in dQ's own dtype and layout; asking for it
    together with DQ_ATOMIC is refused."""
    from kernels.attention import triton as kt

    args, _ = _matches_the_two_pass_backward(WHOLE_HEAD_TILES[1], 1, 40, dtype, device, gen)
    with pytest.raises(ValueError, match="choose one"):
        kt.backward(*args, 0.25, {**WHOLE_HEAD_TILES[1], "DQ_ATOMIC": True})


def _through_packed(heads, **kwargs):
    """fn(q, k, v) for check_attention that runs attention_packed: q, k, v packed into one
    (B, N, 3 * H * D) tensor, the (B, N, H * D) output viewed back as (B, H, N, D); autograd
    splits the packed gradient back into dq, dk, dv."""
    def fn(q, k, v):
        b, h, n, d = q.shape
        qkv = torch.stack([t.transpose(1, 2) for t in (q, k, v)], dim=2).reshape(b, n, 3 * h * d)
        return attention_packed(qkv, heads, backend="triton", **kwargs).view(b, n, h, d).transpose(1, 2)
    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,d", [(7, 16), (65, 32), (145, 2)])
def test_packed_matches_fp64(n, d, dtype, device, gen):
    """attention_packed: output and the packed gradient (split into dq, dk, dv) against fp64."""
    q, k, v = packed_qkv(3, 3, n, d, dtype=dtype, device=device, gen=gen)
    check_attention(q, k, v, fn=_through_packed(3), gen=gen)
    check_attention(q, k, v, scale=-0.5, fn=_through_packed(3, scale=-0.5), gen=gen)


@pytest.mark.parametrize("tiles", [DQ_ATOMIC_TILES, DQ_ATOMIC_ROW_TAIL_TILES, WHOLE_HEAD_TILES],
                         ids=["dq-atomic", "dq-atomic-row-tail", "whole-head"])
def test_packed_with_dq_summed_across_key_blocks(tiles, device, gen, monkeypatch):
    """In fp16 DQ_ATOMIC sums dQ in an fp32 buffer of its own layout while dK, dV go straight
    into the packed gradient: the kernel's separate dQ strides. WHOLE_HEAD sums it in a scratch
    and writes the packed gradient's dQ view from its last key block."""
    from kernels.attention import triton as kt

    monkeypatch.setattr(kt, "forward_config", lambda q: tiles[0])
    monkeypatch.setattr(kt, "backward_config", lambda q: tiles[1])
    q, k, v = packed_qkv(2, 3, 65, 16, dtype=torch.float16, device=device, gen=gen)
    check_attention(q, k, v, fn=_through_packed(3), gen=gen)


def test_packed_reference_path_and_errors(gen):
    qkv = _randn(2, 9, 3 * 4 * 8, dtype=torch.float32, device="cpu", gen=gen)
    q, k, v = (t.transpose(1, 2) for t in qkv.view(2, 9, 3, 4, 8).unbind(2))
    expected = attention(q, k, v, backend="reference").transpose(1, 2).reshape(2, 9, 32)
    assert torch.equal(attention_packed(qkv, 4, backend="reference"), expected)
    with pytest.raises(ValueError, match=r"3 \* heads \* D"):
        attention_packed(qkv, 5)
    with pytest.raises(ValueError, match="at least one token"):
        attention_packed(qkv[:, :0], 4)
    with pytest.raises(ValueError, match="positive int"):
        attention_packed(qkv, 0)


def test_block_backward_copies_nothing_around_the_kernel():
    """The attention block's backward, launches stubbed: the packed gradient reaches the qkv
    projection as it is. With per-tensor q, k, v it was stacked (UnbindBackward) and then
    copied into the projection's layout (ViewBackward's reshape)."""
    from composer.blocks.attention import Attention
    from kernels import host_cost

    block = Attention(64, 4, backend="triton")
    x = torch.randn(2, 16, 64, requires_grad=True)
    with host_cost.stubbed_launches() as counts, torch.profiler.profile() as prof:
        block(x).sum().backward()
    assert counts["_attn_fwd"] == 1 and counts["_attn_bwd_tiled"] == 1, counts

    def ancestors(event):
        names, p = [], event.cpu_parent
        while p is not None:
            names.append(p.name)
            p = p.cpu_parent
        return names

    copies = [(e.name, ancestors(e)[:3]) for e in prof.events()
              if e.name in ("aten::stack", "aten::cat", "aten::clone", "aten::copy_")
              and any("Unbind" in a or "View" in a or "Permute" in a or "Attention" in a for a in ancestors(e))]
    assert not copies, copies


def test_row_launches():
    from kernels.attention.triton import _row_launches

    assert _row_launches(197, 64, 0, 8) == [(0, 197, 64, 8)]
    assert _row_launches(197, 64, 16, 8) == [(0, 192, 64, 8), (192, 5, 16, 4)]
    assert _row_launches(144, 64, 16, 4) == [(0, 128, 64, 4), (128, 16, 16, 4)]
    assert _row_launches(128, 64, 16, 4) == [(0, 128, 64, 4)]
    assert _row_launches(7, 64, 16, 4) == [(0, 7, 16, 4)]


def test_empty_batch(device):
    q = torch.randn(0, 2, 5, 16, device=device, requires_grad=True)
    out = attention(q, q, q, backend="triton")
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape


@pytest.mark.parametrize("scale", [0.9, -0.7, 0.0])
def test_custom_scale(device, gen, scale):
    # N = 20 leaves masked keys in every tile: a negative scale flips which score is the row
    # maximum, and at scale 0 a masked key's -inf score must not become NaN (uniform weights)
    q, k, v = (_randn(1, 1, 20, 32, dtype=torch.float32, device=device, gen=gen) for _ in range(3))
    check_attention(q, k, v, scale=scale, gen=gen)


# --------------------------------------------------------- dispatch and API --

def test_triton_reasons():
    for d in (1, 2, 48, 64, 128):
        assert triton_reasons(dtype=torch.float16, head_dim=d) == [], d
    assert any("head_dim 192" in r for r in triton_reasons(dtype=torch.float16, head_dim=192))
    assert any("float64" in r for r in triton_reasons(dtype=torch.float64, head_dim=64))


def test_explicit_triton_raises_with_reasons(device, gen):
    q = _randn(1, 2, 5, 192, dtype=torch.float32, device=device, gen=gen)
    with pytest.raises(BackendUnavailable) as info:
        attention(q, q, q, backend="triton")
    assert any("head_dim 192" in r for r in info.value.reasons)
    # the reference still takes it
    out = attention(q, q, q, backend="auto")
    torch.testing.assert_close(out, reference.attention(q, q, q))


def test_auto_uses_reference_on_cpu(monkeypatch, gen):
    from kernels.attention import op

    def no_kernel(*args, **kwargs):
        raise AssertionError("auto took the Triton path on CPU")

    monkeypatch.setattr(op, "_attention_fwd", no_kernel)
    monkeypatch.setattr(op._EagerAttention, "apply", no_kernel)
    q, k, v = (_randn(2, 2, 9, 16, dtype=torch.float32, device="cpu", gen=gen) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v), reference.attention(q, k, v))


def test_library_op_path_matches_the_eager_path(device, gen):
    # Plain eager calls launch the kernels under an autograd.Function; torch.compile, dispatch
    # modes and tensor subclasses go through the torch.library op. Both must give the same numbers.
    from kernels.attention.op import _attention_fwd

    q, k, v = packed_qkv(3, 2, 37, 32, dtype=torch.float32, device=device, gen=gen)
    dout = _randn(*q.shape, dtype=q.dtype, device=device, gen=gen)
    library = check_attention(q, k, v, dout=dout, fn=lambda q, k, v: _attention_fwd(q, k, v, 32 ** -0.5)[0])
    eager = _run(lambda q, k, v: attention(q, k, v, backend="triton"), q, k, v, dout)
    for a, b in zip(library, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)   # the same kernels on the same inputs


def test_packed_library_op_path_matches_the_eager_path(device, gen):
    """The packed op through its torch.library ops (what torch.compile traces) against its
    eager autograd.Function: the same kernels, the same numbers."""
    from kernels.attention.op import _attention_packed_fwd

    q, k, v = packed_qkv(3, 2, 37, 32, dtype=torch.float32, device=device, gen=gen)
    dout = _randn(*q.shape, dtype=q.dtype, device=device, gen=gen)

    def library(q, k, v):
        b, h, n, d = q.shape
        qkv = torch.stack([t.transpose(1, 2) for t in (q, k, v)], dim=2).reshape(b, n, 3 * h * d)
        return _attention_packed_fwd(qkv, h, d ** -0.5)[0].view(b, n, h, d).transpose(1, 2)

    through_library = check_attention(q, k, v, dout=dout, fn=library)
    eager = _run(_through_packed(2), q, k, v, dout)
    for a, b in zip(through_library, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dispatch_mode_sees_the_library_op(monkeypatch, device, gen):
    from torch.utils._python_dispatch import TorchDispatchMode

    from kernels.attention import op

    def not_this_path(*args, **kwargs):
        raise AssertionError("the eager path hid the op from an active dispatch mode")

    class Seen(TorchDispatchMode):
        ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Seen.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(op._EagerAttention, "apply", not_this_path)
    q, k, v = (_randn(1, 2, 9, 16, dtype=torch.float32, device=device, gen=gen) for _ in range(3))
    with Seen():
        out = attention(q, k, v, backend="triton")
    assert any("kernels.attention_fwd" in name for name in Seen.ops), Seen.ops
    torch.testing.assert_close(out, reference.attention(q, k, v), rtol=1e-4, atol=1e-5)


def test_plain_eager_rules():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from kernels.dispatch import plain_eager

    x = torch.ones(2)
    assert plain_eager(x, None, x)
    assert plain_eager(x, torch.nn.Parameter(torch.ones(2)))   # a module's weights
    with FlopCounterMode(display=False):
        assert not plain_eager(x)
    with FakeTensorMode() as fake:
        assert not plain_eager(fake.from_tensor(x))
    seen = []
    torch.func.vmap(lambda t: seen.append(plain_eager(t)) or t)(torch.ones(3, 2))
    assert seen == [False]


def test_launch_grid_helpers_match_triton():
    # the launchers use plain-int versions of triton.cdiv / next_power_of_2 (cheaper on the host)
    import triton

    from kernels.grid import cdiv, next_pow2

    for n in range(1, 2050):
        assert next_pow2(n) == triton.next_power_of_2(n), n
        for block in (1, 7, 16, 64, 128):
            assert cdiv(n, block) == triton.cdiv(n, block), (n, block)


def test_bad_shapes_rejected(gen):
    q = _randn(1, 2, 5, 16, dtype=torch.float32, device="cpu", gen=gen)
    with pytest.raises(ValueError):
        attention(q, q[:, :, :4], q)
    with pytest.raises(ValueError):
        attention(q, q.half(), q)


def test_attention_probs(gen):
    q, k, v = (_randn(2, 3, 11, 16, dtype=torch.float16, device="cpu", gen=gen) for _ in range(3))
    p = reference.attention_probs(q, k)
    assert p.shape == (2, 3, 11, 11) and p.dtype == torch.float32
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 3, 11))
    torch.testing.assert_close(p @ v.float(), reference.attention(q.float(), k.float(), v.float()))


# ---------------------------------------------------------------- compile --

class _AttentionBlock(torch.nn.Module):
    """The shape of the builder's attention block: packed qkv in, (B, N, C) out."""

    def __init__(self, dim=32, heads=2, backend="auto"):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.to_qkv = torch.nn.Linear(dim, 3 * dim)
        self.to_out = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, c // self.heads).unbind(2)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend=self.backend)
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))


def _compile_matches_eager(block, x, backend):
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = block(x1), compiled(x2)
    g1, = torch.autograd.grad(y1.square().sum(), x1)
    g2, = torch.autograd.grad(y2.square().sum(), x2)
    # compiled Linear layers may reduce in another order: a few ulps of the dtype
    tol = {torch.float32: {}, torch.float16: dict(atol=3e-3, rtol=3e-3),
           torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}[x.dtype]
    torch.testing.assert_close(y2, y1, **tol)
    torch.testing.assert_close(g2, g1, **tol)


def test_compile_fullgraph_reference_path(gen):
    torch._dynamo.reset()
    block = _AttentionBlock()
    _compile_matches_eager(block, _randn(2, 7, 32, dtype=torch.float32, device="cpu", gen=gen), "aot_eager")


# ------------------------------------------------------------------ bench --

def test_bench_cases_smoke(gen):
    cases = bench.cases(torch.float32, "cpu", shapes=[(1, 3, 9, 16)])
    assert len(cases) == 1 and cases[0].anchor == "sdpa"
    case = cases[0]
    assert case.flops_fwd > 0 and case.bytes_fwd_bwd > case.bytes_fwd > 0
    names = [c.name for c in case.candidates]
    assert "sdpa" in names and "eager" in names and any(n.startswith("ours") for n in names)
    # CPU tensors reach the kernels only in Triton's interpreter (set on machines without CUDA);
    # elsewhere "ours" is the reference path and the library-op row is left out
    assert ("ours-library-op" in names) == dispatch.interpreter_mode()
    by_name = {c.name: c for c in case.candidates}
    want_out, want_grads = by_name["sdpa"].forward(), by_name["sdpa"].forward_backward()
    for cand in case.candidates:
        out = cand.forward()
        assert torch.isfinite(out).all(), cand.name
        grads = cand.forward_backward()
        assert all(torch.isfinite(g).all() for g in grads), cand.name
        if not cand.name.startswith("ours-packed"):  # the others share q, k, v and the output gradient: same numbers (fp32)
            torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-5, msg=cand.name)
            for g, w in zip(grads, want_grads):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=cand.name)


# -------------------------------------------------------------------- gpu --

@pytest.mark.gpu
@pytest.mark.parametrize("d", [1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 128])
@pytest.mark.parametrize("n", N_ALL)
def test_gpu_bf16_every_size(n, d, gen):
    q, k, v = packed_qkv(3, 5, n, d, dtype=torch.bfloat16, device="cuda", gen=gen)
    check_attention(q, k, v, gen=gen)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("d", [2, 4, 8, 16, 48, 64, 128])
@pytest.mark.parametrize("n", [7, 145, 257])
def test_gpu_compiled_fp16_fp32(n, d, dtype, gen):
    # the interpreter already covers these dtypes; this checks the compiled code
    q, k, v = packed_qkv(3, 5, n, d, dtype=dtype, device="cuda", gen=gen)
    check_attention(q, k, v, gen=gen)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", bench.SHAPES + [(4, 2, 4099, 64)], ids=lambda s: "B{} H{} N{} D{}".format(*s))
def test_gpu_benchmark_shapes(shape, dtype, gen):
    b, h, n, d = shape
    q, k, v = packed_qkv(b, h, n, d, dtype=dtype, device="cuda", gen=gen)
    check_attention(q, k, v, gen=gen)


@pytest.mark.gpu
@pytest.mark.parametrize("b, h", [(70000, 1), (8200, 8)])
def test_gpu_batch_times_heads_past_the_grid_limit(b, h, gen):
    """B x H over 65,535 (as many programs as a grid's second axis takes): the launches put
    (batch, head) on the first axis. Every output and gradient against fp64."""
    q, k, v = packed_qkv(b, h, 17, 16, dtype=torch.bfloat16, device="cuda", gen=gen)
    check_attention(q, k, v, gen=gen)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", bench.SHAPES[:4], ids=lambda s: "B{} H{} N{} D{}".format(*s))
def test_gpu_packed_benchmark_shapes_bf16(shape, gen):
    """attention_packed (the block's path) in bf16, with whatever launch configuration is saved."""
    b, h, n, d = shape
    q, k, v = packed_qkv(b, h, n, d, dtype=torch.bfloat16, device="cuda", gen=gen)
    check_attention(q, k, v, fn=_through_packed(h), gen=gen)


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{"TAIL": 16}, {"TAIL": 16, "ROW_TAIL": 16, "FUSED_DELTA": True},
                                     {"DQ_ATOMIC": True}, {"TAIL": 16, "DQ_ATOMIC": True},
                                     {"DQ_ATOMIC": True, "BLOCK_STEP": 64, "num_warps": 8, "num_stages": 2},
                                     {"WHOLE_HEAD": True}, {"TAIL": 16, "WHOLE_HEAD": True, "FUSED_DELTA": True},
                                     {"WHOLE_HEAD": True, "BLOCK_STEP": 64, "num_warps": 8, "num_stages": 2},
                                     {"WHOLE_HEAD": True, "BLOCK": 128, "BLOCK_STEP": 64, "num_warps": 8,
                                      "num_stages": 2}],
                         ids=str)
@pytest.mark.parametrize("n,d", [(7, 16), (144, 16), (197, 64)])
def test_gpu_launch_options_bf16(n, d, options, gen, monkeypatch):
    """The TAIL, ROW_TAIL, FUSED_DELTA, DQ_ATOMIC and WHOLE_HEAD launch options (sweep candidates), compiled, in bf16,
    on each configuration the sweep tries them with."""
    from kernels.attention import triton as kt

    fwd = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    bwd = {"BLOCK": 64, "BLOCK_STEP": 32, "num_warps": 4, "num_stages": 3}
    fwd_options = {k: v for k, v in options.items() if k not in ("FUSED_DELTA", "DQ_ATOMIC", "WHOLE_HEAD")}
    monkeypatch.setattr(kt, "forward_config", lambda q: {**fwd, **fwd_options})
    monkeypatch.setattr(kt, "backward_config", lambda q: {**bwd, **options})
    q, k, v = packed_qkv(3, 5, n, d, dtype=torch.bfloat16, device="cuda", gen=gen)
    check_attention(q, k, v, gen=gen)


@pytest.mark.gpu
def test_gpu_no_n_by_n_buffer(gen):
    b, h, n, d = 8, 16, 1024, 64
    q, k, v = (t.requires_grad_() for t in packed_qkv(b, h, n, d, dtype=torch.bfloat16, device="cuda", gen=gen))
    dout = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = attention(q, k, v, backend="triton")
    torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    scores = b * h * n * n * 2   # one bf16 N x N matrix
    assert extra < scores / 2, f"peak extra memory {extra} B suggests an N x N buffer ({scores} B)"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_compile_fullgraph_inductor(dtype, gen):
    torch._dynamo.reset()
    block = _AttentionBlock(dim=128, heads=2, backend="triton").to("cuda", dtype)
    x = _randn(4, 197, 128, dtype=dtype, device="cuda", gen=gen)
    _compile_matches_eager(block, x, "inductor")
