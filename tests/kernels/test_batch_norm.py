"""batch_norm: the Triton kernels against an fp64 reference, dispatch, errors, compile, benchmark.

Tolerance rule as for the other ops (tests/kernels/test_token_mlp.py): the kernel's max error
against fp64 at most 3x PyTorch's own error in the same dtype plus a floor of one rounding at
the tensor's scale; NaN never passes. Running statistics are compared the same way.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import BackendUnavailable, batch_norm
from kernels.batch_norm import bench
from kernels.batch_norm.reference import batch_norm_reference
from tests.kernels.test_token_mlp import assert_within_rule

NAMES = ("y", "dx", "dweight", "dbias", "dresidual", "running_mean", "running_var")


def make_inputs(B, C, H, W, dtype, device, *, affine=True, residual=True, seed=0):
    """x (mean 1, std 2: the shifted sums matter), weight, bias, residual, dy."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype)

    x = rnd(B, C, H, W, scale=2.0, shift=1.0)
    weight = rnd(C, scale=0.2, shift=1.0).float() if affine else None
    bias = rnd(C, scale=0.2).float() if affine else None
    res = rnd(B, C, H, W) if residual else None
    return x, weight, bias, res, rnd(B, C, H, W)


def run(fn, x, weight, bias, res, dy, activation, dtype=None):
    """[y, dx, dweight, dbias, dresidual, running_mean, running_var] on fresh leaves (absent ones None);
    `dtype` casts every input first (the fp64 reference)."""
    cast = (lambda t: t if t is None else t.to(dtype)) if dtype else (lambda t: t)
    leaves = [None if t is None else cast(t).detach().requires_grad_() for t in (x, weight, bias, res)]
    C = x.shape[1]
    stats_dtype = dtype or torch.float32
    rm = torch.full((C,), 0.5, device=x.device, dtype=stats_dtype)
    rv = torch.full((C,), 2.0, device=x.device, dtype=stats_dtype)
    y = fn(leaves[0], leaves[1], leaves[2], rm, rv, activation=activation, residual=leaves[3])
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, wanted, cast(dy)))
    return [y] + [None if t is None else next(grads) for t in leaves] + [rm, rv]


def ours(x, w, b, rm, rv, activation, residual):
    return batch_norm(x, w, b, rm, rv, activation=activation, residual=residual, backend="triton")


def reference(x, w, b, rm, rv, activation, residual):
    return batch_norm_reference(x, w, b, rm, rv, True, 0.1, 1e-5, activation, residual)


def check_against_fp64(B, C, H, W, dtype, device, *, activation=None, affine=True, residual=True):
    inputs = make_inputs(B, C, H, W, dtype, device, affine=affine, residual=residual)
    got = run(ours, *inputs, activation)
    torch_low = run(reference, *inputs, activation)
    exact = run(reference, *inputs, activation, dtype=torch.float64)
    where = f" B{B} C{C} {H}x{W} act={activation} affine={affine} residual={residual}"
    for name, o, t, e in zip(NAMES, got, torch_low, exact):
        assert (o is None) == (e is None), name
        if o is not None:
            assert_within_rule(name, o, t, e, dtype if name != "running_mean" and name != "running_var"
                               else torch.float32, where)


# odd channel counts and planes, several images a split and several splits, a plane of one
# pixel, and planes past one 2048-element block (two blocks a row)
SHAPES = [(3, 5, 7, 7), (2, 3, 8, 9), (5, 4, 1, 1), (1, 2, 48, 48)]
VARIANTS = [dict(activation=None, affine=True, residual=True), dict(activation="gelu", affine=False, residual=False),
            dict(activation="gelu", affine=True, residual=True)]


# bf16 too: these kernels have no tl.dot, the one interpreter operation that is wrong in bf16
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS, ids=["residual", "gelu-plain", "gelu-residual"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-C{}-{}x{}".format(*s))
def test_matches_fp64(shape, variant, dtype, device):
    check_against_fp64(*shape, dtype, device, **variant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_small_tiles_span_steps_and_splits(dtype, device, monkeypatch):
    """Two planes and 16 pixels a step: several image steps in a split (a ragged last one),
    several pixel blocks a plane (a ragged last one), splits of uneven size."""
    from kernels.batch_norm import triton as kt

    monkeypatch.setattr(kt, "_tile", lambda hw, planes: (2, 16))
    monkeypatch.setattr(kt, "_TARGET_PROGRAMS", 6)
    monkeypatch.setattr(kt, "_TILE_ELEMENTS", 16)   # splits of one image and more
    check_against_fp64(7, 3, 7, 7, dtype, device, activation="gelu", affine=True, residual=True)


def test_statistics_programs_each_get_a_tile_of_work():
    """Small images: the statistics pass splits the batch no finer than a tile's worth of pixels
    a program, and steps over no more images at once than a split has; at ConvMixer's training
    shapes the card is filled as before."""
    from kernels.batch_norm import triton as kt

    assert kt._splits(16, 32, 16) == (1, 16)                 # 4x4 images: one split of all 16 images
    assert kt._tile(16, 16) == (16, 16)                      # 16 images a step, not 256 rows mostly masked
    assert kt._splits(512, 256, 1024) == (3, 171)            # 32x32 at batch 512: 3 splits a channel
    assert kt._tile(1024, 171) == (4, 1024)
    assert kt._tile(4, 3 * 8) == (32, 16)                    # the apply passes: rows are (image, channel) planes


def test_library_op_path_equals_the_eager_path(device, monkeypatch):
    """The torch.library ops (what torch.compile traces) give what the eager autograd.Function gives."""
    from kernels import dispatch

    inputs = make_inputs(3, 4, 6, 6, torch.float32, device)
    eager = run(ours, *inputs, "gelu")
    monkeypatch.setattr(dispatch, "plain_eager", lambda *a: False)
    library = run(ours, *inputs, "gelu")
    for name, a, b in zip(NAMES, eager, library):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_what_goes_to_pytorch(device):
    """Eval mode and channels_last take PyTorch's path under auto (exactly F.batch_norm) and are
    refused with the reason under backend="triton"."""
    x, w, b, res, _ = make_inputs(2, 3, 5, 5, torch.float32, device)
    rm, rv = torch.rand(3, device=device), torch.rand(3, device=device) + 0.5
    expected = F.batch_norm(x, rm.clone(), rv.clone(), w, b, False) + res
    torch.testing.assert_close(batch_norm(x, w, b, rm, rv, training=False, residual=res), expected)
    with pytest.raises(BackendUnavailable, match="eval mode"):
        batch_norm(x, w, b, rm, rv, training=False, backend="triton")
    with pytest.raises(BackendUnavailable, match="contiguous NCHW"):
        batch_norm(x.to(memory_format=torch.channels_last), w, b, backend="triton")
    cl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(batch_norm(cl, w, b), F.batch_norm(cl, None, None, w, b, True))
    assert kernels.backend_for("batch_norm", "auto", "cpu", torch.float32)[0] == "reference"


@pytest.mark.parametrize("call, message", [
    (lambda x: batch_norm(x[0]), "must be (B, C, H, W)"),
    (lambda x: batch_norm(x, torch.ones(4)), "weight must be (3,)"),
    (lambda x: batch_norm(x, running_mean=torch.zeros(3)), "both running_mean and running_var"),
    (lambda x: batch_norm(x, training=False), "needs running_mean"),
    (lambda x: batch_norm(x, residual=x[:1]), "residual must have x's shape"),
    (lambda x: batch_norm(x, activation="relu"), "activation must be None or 'gelu'"),
    (lambda x: batch_norm(x, momentum=2.0), "momentum must be a number in [0, 1]"),
    (lambda x: batch_norm(x[:1, :, :1, :1]), "more than one value per channel"),
], ids=["rank", "weight", "running", "eval", "residual", "activation", "momentum", "one-value"])
def test_bad_arguments_name_the_problem(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        call(torch.randn(2, 3, 4, 4))


def test_compile_fullgraph_reference_path():
    """torch.compile(fullgraph=True) traces the op (reference path on CPU), running stats included."""
    x, w, b, res, _ = make_inputs(2, 3, 4, 4, torch.float32, "cpu")
    rm1, rv1, rm2, rv2 = torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3)

    def fn(x, rm, rv):
        return batch_norm(x, w, b, rm, rv, activation="gelu", residual=res, backend="reference")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, rm1, rv1), fn(x, rm2, rv2))
    torch.testing.assert_close((rm1, rv1), (rm2, rv2))


def test_bench_cases_smoke():
    cases = bench.cases(torch.float32, "cpu", shapes=[(2, 3, 4, 4), (2, 5, 3, 3)])
    assert [c.shape for c in cases] == ["B2 C3 4x4 +residual", "B2 C3 4x4 gelu", "B2 C5 3x3 +residual"]
    for case, shape, grads in zip(cases, [(2, 3, 4, 4), (2, 3, 4, 4), (2, 5, 3, 3)], [4, 3, 4]):
        assert case.anchor in [c.name for c in case.candidates]
        assert 0 < case.bytes_fwd < case.bytes_fwd_bwd
        for cand in case.candidates:   # x, weight, bias (and the residual) get gradients
            assert cand.forward().shape == shape, cand.name
            assert len(cand.forward_backward()) == grads, cand.name


# -------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS, ids=["residual", "gelu-plain", "gelu-residual"])
@pytest.mark.parametrize("shape", [(8, 256, 32, 32), (3, 5, 7, 7), (4, 96, 28, 28)],
                         ids=lambda s: "B{}-C{}-{}x{}".format(*s))
def test_matches_fp64_bf16(shape, variant, device):
    check_against_fp64(*shape, torch.bfloat16, device, **variant)


@pytest.mark.gpu
def test_compile_fullgraph_triton_inductor(device):
    x, w, b, res, dy = make_inputs(4, 8, 8, 8, torch.float32, device)

    def fn(x, w, b, res):
        return batch_norm(x, w, b, activation="gelu", residual=res, backend="triton")

    leaves = [t.detach().requires_grad_() for t in (x, w, b, res)]
    compiled = torch.compile(fn, fullgraph=True)
    got = [compiled(*leaves)]
    got += torch.autograd.grad(got[0], leaves, dy)
    want = [fn(*leaves)]
    want += torch.autograd.grad(want[0], leaves, dy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
