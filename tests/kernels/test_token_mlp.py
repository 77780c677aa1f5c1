"""token_mlp: the Triton kernels against an fp64 reference, dispatch, compile, benchmark smoke.

Tolerance rule (as for attention): on fresh random inputs, the kernel's max
error against the fp64 reference must be at most 3x PyTorch's own error (the
reference path run in the same low dtype) plus a floor of FLOOR[dtype] times
the tensor's scale (its largest value, at least 1: the inputs are O(1)). The
floor is needed where PyTorch's result is by luck almost exact, e.g. a bias
gradient summed in fp32 and rounded once: 3x a near-zero error is no bound.
NaN or inf never passes.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import kernels
from kernels import BackendUnavailable, token_mlp
from kernels.token_mlp import bench
from kernels.token_mlp.op import triton_reasons
from kernels.token_mlp.reference import token_mlp_reference
from tests.helpers import record_launches

FLOOR = {
    # fp32: the same few O(1) terms summed in another order differ by a few ulps
    # of the terms, not of a (possibly much smaller) result
    torch.float32: 4 * 2.0**-24,
    # fp16/bf16: one unit roundoff at the tensor's scale, i.e. a single rounding
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}
NAMES = ("y", "dx", "dln_weight", "dln_bias", "dw1", "db1", "dw2", "db2")


def make_inputs(B, N, C, Hd, dtype, device, *, strided=False, seed=0):
    """(inputs, grad): x, ln_weight, ln_bias, w1, b1, w2, b2 and an output gradient, all random."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype)

    if strided:  # every 2-D/3-D tensor a view with a non-unit last stride
        x = rnd(B, C, N).transpose(1, 2)
        w1 = rnd(N, Hd, scale=N**-0.5).t()
        w2 = rnd(N, 2 * Hd, scale=Hd**-0.5)[:, ::2]
        ln_weight = rnd(2 * C, scale=0.1, shift=1.0)[::2]
        grad = rnd(B, C, N).transpose(1, 2)
    else:
        x = rnd(B, N, C)
        w1 = rnd(Hd, N, scale=N**-0.5)
        w2 = rnd(N, Hd, scale=Hd**-0.5)
        ln_weight = rnd(C, scale=0.1, shift=1.0)
        grad = rnd(B, N, C)
    inputs = [x, ln_weight, rnd(C, scale=0.1), w1, rnd(Hd, scale=0.1), w2, rnd(N, scale=0.1)]
    return inputs, grad


def run(fn, inputs, grad):
    """[y, *gradients of every input] on fresh leaves."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    y = fn(*leaves)
    return [y, *torch.autograd.grad(y, leaves, grad)]


def assert_within_rule(name, ours, torch_low, exact, dtype, where=""):
    assert ours.shape == exact.shape and ours.dtype == torch_low.dtype, (
        f"{name}{where}: got {tuple(ours.shape)} {ours.dtype}, expected {tuple(exact.shape)} {torch_low.dtype}")
    assert torch.isfinite(ours).all(), f"{name}{where}: {int((~torch.isfinite(ours)).sum())} non-finite values"
    err = (ours.double() - exact).abs()
    torch_err = (torch_low.double() - exact).abs().max().item()
    floor = FLOOR[dtype] * max(1.0, exact.abs().max().item())
    bound = 3.0 * torch_err + floor
    worst = err.max().item()
    if not worst <= bound:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        pytest.fail(
            f"{name}{where} ({dtype}): max |ours - fp64| = {worst:.3e} at {idx} "
            f"(ours {ours[idx].item():.6g}, fp64 {exact[idx].item():.6g}); allowed {bound:.3e} = "
            f"3 x PyTorch's {dtype} error {torch_err:.3e} + floor {floor:.3e}; "
            f"{int((err > bound).sum())} of {err.numel()} elements over")


def check_against_fp64(B, N, C, Hd, dtype, device, *, strided=False, param_dtype=None):
    inputs, grad = make_inputs(B, N, C, Hd, dtype, device, strided=strided)
    if param_dtype is not None:
        inputs = [inputs[0], *(t.to(param_dtype) for t in inputs[1:])]
    ours = run(lambda *a: token_mlp(*a, backend="triton"), inputs, grad)
    torch_low = run(token_mlp_reference, inputs, grad)
    exact = run(token_mlp_reference, [t.double() for t in inputs], grad.double())
    where = f" B{B} N{N} C{C} Hd{Hd}" + (" strided" if strided else "")
    for name, o, t, e in zip(NAMES, ours, torch_low, exact):
        assert_within_rule(name, o, t, e, dtype, where)


# Every size the issue names, without the full cross product (the interpreter is slow):
# every N at one (C, Hd), every C at one (N, Hd), every Hd at one (N, C), plus awkward ones.
SHAPES = (
    [(3, n, 100, 64) for n in (16, 49, 64, 144, 196)]
    + [(1, 144, c, 64) for c in (32, 256, 512)]
    + [(3, 64, 32, hd) for hd in (16, 256)]
    # 257 tokens (a 16x16 grid and a class token): BLOCK_N 512, hidden loop of 3 steps with a tail
    + [(1, 1, 8, 3), (3, 65, 33, 17), (1, 197, 40, 24), (1, 257, 24, 72)]
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-C{}-Hd{}".format(*s))
def test_matches_fp64(shape, dtype, device):
    check_against_fp64(*shape, dtype, device)


def _built_in_rules(monkeypatch):
    """The token_mlp launchers with saved configurations (kernels.tuning) out of the way: a test
    that forces a method through `_blocks` / `_weight_blocks` must get it even where a sweep
    saved a winner for its shape (a GPU run testing its saved file)."""
    from kernels import tuning
    from kernels.token_mlp import triton as kt

    monkeypatch.setattr(tuning, "lookup", lambda *args, **kwargs: None)
    # and no switch to the per-image GEMMs past 128 tokens: the forced rule applies at every N
    monkeypatch.setattr(kt, "SPLIT_ABOVE_TOKENS", 1 << 30)
    return kt


def _weights_method(monkeypatch, cfg):
    """Force the weight-gradient configuration of every backward."""
    kt = _built_in_rules(monkeypatch)
    monkeypatch.setattr(kt, "_weight_blocks", lambda *a: cfg)
    return kt


def _split_everywhere(monkeypatch, tiles=None, token_blocks=False):
    """Route the forward and the data backward through the per-image GEMMs (method "split"), with
    the token kernel over blocks of tokens if `token_blocks` (as the sweep's candidate)."""
    from kernels.token_mlp import gemms

    kt = _built_in_rules(monkeypatch)

    def blocks(n, c, hd, dtype, backward=False):
        cfg = {**gemms.split_blocks(n, c, hd, dtype, backward), **(tiles or {})}
        return bench.token_blocked(cfg) if token_blocks else cfg

    monkeypatch.setattr(kt, "_blocks", blocks)
    return kt


@pytest.mark.parametrize("method", ["gemm", "splitk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(3, 49, 100, 64), (1, 197, 40, 24)], ids=lambda s: "B{}-N{}-C{}-Hd{}".format(*s))
def test_other_weight_gradient_methods(shape, dtype, method, device, monkeypatch):
    """The weight gradients as two cuBLAS GEMMs (method "gemm") or two split-K Triton GEMMs over
    (image, channel) ("splitk"), selectable in sweeps: every output and gradient under the
    same rule as the fused weight-gradient kernel."""
    _weights_method(monkeypatch, {"method": method})
    check_against_fp64(*shape, dtype, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_splitk_weight_gradients_span_tiles_and_splits(dtype, device, monkeypatch):
    """Several output tiles each way, ragged last tiles, several units per program and a
    ragged last split."""
    tiles = {"method": "splitk", "BLOCK_I": 16, "BLOCK_J": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
    kt = _weights_method(monkeypatch, tiles)
    monkeypatch.setattr(kt, "_TARGET_PROGRAMS", 20)
    check_against_fp64(5, 37, 50, 40, dtype, device)


@pytest.mark.parametrize("weights", ["fused", "splitk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(3, 49, 100, 64), (1, 197, 40, 24), (2, 1, 8, 3)],
                         ids=lambda s: "B{}-N{}-C{}-Hd{}".format(*s))
def test_split_method(shape, dtype, weights, device, monkeypatch):
    """The forward and the data backward as per-image GEMMs (method "split", gemms.py), with the
    fused or the split-K weight gradients: every output and gradient under the same rule."""
    kt = _split_everywhere(monkeypatch)
    if weights == "splitk":
        monkeypatch.setattr(kt, "_weight_blocks", lambda *a: {"method": "splitk"})
    check_against_fp64(*shape, dtype, device)


@pytest.mark.parametrize("weights,shape", [("splitk", (3, 49, 100, 64)), ("fused", (1, 197, 40, 24))],
                         ids=["splitk", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_split_method_layer_norm_in_memory(shape, dtype, weights, device, monkeypatch):
    """The per-image GEMMs reading LayerNorm(X) written once by its own pass ("Z"), in the
    forward and the data backward: every output and gradient. The split-K dW1 recomputes LN(X)
    from x instead (reading Z there gave a wrong dW1 on an H100 in bf16)."""
    kt = _split_everywhere(monkeypatch, {"Z": True})
    if weights == "splitk":
        monkeypatch.setattr(kt, "_weight_blocks", lambda *a: {"method": "splitk"})
    from kernels.token_mlp import gemms

    calls = []
    real = gemms.layer_norm
    monkeypatch.setattr(gemms, "layer_norm", lambda *a: calls.append(1) or real(*a))
    launches = record_launches(monkeypatch, gemms)
    check_against_fp64(*shape, dtype, device)
    assert len(calls) >= 2   # the forward's and the backward's
    assert [kw["Z_IN_MEMORY"] for name, kw in launches if name == "_hidden_kernel"] == [True, True]
    if weights == "splitk":   # dW1 (LN(X) recomputed), then dW2 (H from memory)
        assert [kw["Q_IS_LN"] for name, kw in launches if name == "_contract_bc_kernel"] == [True, False]


@pytest.mark.parametrize("tiles,shape", [
    ({}, (3, 49, 100, 64)),
    ({"Z": True, "pad_w1": True}, (2, 197, 40, 24)),   # W1 padded for the token kernel, LN(X) in memory
    ({}, (2, 1, 8, 3))],
    ids=["N49", "N197-Z-padded", "N1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_split_method_dx_direct(tiles, shape, dtype, device, monkeypatch):
    """"dx_direct": the LayerNorm backward's row sums over channels from the split-K dW1 kernel
    (image by image), so that the token kernel writes dX itself; no fp32 partial of dX, no
    finishing pass. Every output and gradient under the same rule, and the finishing kernel
    never launched."""
    from kernels.token_mlp import triton as kt_module

    kt = _split_everywhere(monkeypatch, {"dx_direct": True, **tiles})
    monkeypatch.setattr(kt, "_weight_blocks", lambda *a: {"method": "splitk"})
    launched = record_launches(monkeypatch, kt_module)
    check_against_fp64(*shape, dtype, device)
    names = [name for name, _ in launched]
    assert "_ln_finish_kernel" not in names and "_ln_stats_kernel" in names, names


def test_dw1_row_sums_span_images_tiles_and_splits(device, monkeypatch):
    """The row-sums kernel's pieces against plain PyTorch, with several hidden and token blocks a
    program grid and several images a program (and a ragged last split): dW1, db1 and both row
    sums per image."""
    from kernels.token_mlp import gemms

    gen = torch.Generator().manual_seed(3)
    B, N, C, HD = 5, 37, 50, 40
    x = torch.randn(B, N, C, generator=gen).to(device)
    da = torch.randn(B, HD, C, generator=gen).to(device)
    w1 = torch.randn(HD, N, generator=gen).to(device)
    gamma, beta = (torch.randn(C, generator=gen).to(device) for _ in range(2))
    mean, var = x.mean(-1), x.var(-1, unbiased=False)
    rstd = (var + 1e-5).rsqrt()
    monkeypatch.setattr(gemms, "splitk_blocks", lambda wcfg, dtype: {
        "BLOCK_I": 16, "BLOCK_J": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2})
    dw1, db1, s1, s2 = gemms.dw1_row_sums(da, x, mean, rstd, gamma, beta, w1, target_programs=20)
    xhat = (x.double() - mean[..., None].double()) * rstd[..., None].double()
    z = xhat * gamma.double() + beta.double()
    dxhat = torch.einsum("hn,bhc->bnc", w1.double(), da.double()) * gamma.double()
    for name, ours, exact in (("dw1", dw1, torch.einsum("bhc,bnc->hn", da.double(), z)),
                              ("db1", db1, da.double().sum((0, 2))),
                              ("s1", s1, dxhat.sum(-1)), ("s2", s2, (dxhat * xhat).sum(-1))):
        assert ours.dtype == torch.float32 and ours.shape == exact.shape, name
        torch.testing.assert_close(ours.double(), exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_dx_direct_needs_splitk_weights(device, monkeypatch):
    kt = _split_everywhere(monkeypatch, {"dx_direct": True})
    monkeypatch.setattr(kt, "_weight_blocks", lambda *a: {"BLOCK_C": 16, "BLOCK_H": 16, "num_warps": 4})
    inputs, grad = make_inputs(2, 20, 16, 16, torch.float32, device)
    with pytest.raises(ValueError, match="splitk"):
        run(lambda *a: token_mlp(*a, backend="triton"), inputs, grad)


def _padding_flags(launches) -> list:
    """The W1_PADDED / W_PADDED switch of every recorded per-image GEMM launch that reads W1: the
    hidden kernel's W1 tiles; the token kernel's only in the backward (W1^T there, W2 in the forward)."""
    return [kw.get("W1_PADDED", kw.get("W_PADDED")) for _, kw in launches
            if "W1_PADDED" in kw or kw.get("BACKWARD") and "W_PADDED" in kw]


@pytest.mark.parametrize("pad_w1", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_split_method_w1_rows_padded_or_not(pad_w1, dtype, device, monkeypatch):
    """At N = 197 (not a multiple of 16) the per-image GEMMs get W1 in zero-padded rows and load its
    tiles unmasked along them (the forward's and backward's hidden kernels, the backward's token
    kernel), or, with "pad_w1": False, W1 as it is with masked tiles: every output and gradient."""
    kt = _split_everywhere(monkeypatch, {"pad_w1": pad_w1})
    monkeypatch.setattr(kt, "_weight_blocks", lambda *a: {"method": "splitk"})
    from kernels.token_mlp import gemms

    launches = record_launches(monkeypatch, gemms)
    check_against_fp64(2, 197, 40, 24, dtype, device)
    # the hidden kernel's forward and backward, the token kernel's backward
    flags = _padding_flags(launches)
    assert len(flags) == 3 and all(f is pad_w1 for f in flags), flags


def test_pad_token_axis():
    """W1's rows padded with zeros to a power of two (N not a multiple of 16), as a view of the
    first N columns; W1 itself otherwise; the kernels drop the mask only as far as it reaches."""
    from kernels.token_mlp import gemms

    w1 = torch.randn(24, 197)
    padded, flag = gemms.pad_token_axis(w1, {})
    assert flag and padded.shape == (24, 197) and padded.stride() == (256, 1)
    assert torch.equal(padded, w1)
    assert torch.equal(padded.as_strided((24, 256), (256, 1))[:, 197:], torch.zeros(24, 59))
    assert gemms._padded_past(padded, flag, 224) and gemms._padded_past(padded, flag, 256)
    assert not gemms._padded_past(padded, flag, 512) and not gemms._padded_past(padded, False, 224)
    square = torch.randn(24, 64)
    assert gemms.pad_token_axis(square, {}) == (square, False)
    assert gemms.pad_token_axis(w1, {"pad_w1": False}) == (w1, False)


def _image_backward(monkeypatch, tiles):
    kt = _built_in_rules(monkeypatch)
    real = kt.backward_config
    monkeypatch.setattr(kt, "backward_config", lambda x, hd: {**real(x, hd), "data": {"method": "image", **tiles}})
    return kt


@pytest.mark.parametrize("tiles", [{"BLOCK_C": 16}, {"BLOCK_C": 32, "IMAGES": 2}], ids=["default", "two-images"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(3, 49, 100, 64), (1, 64, 32, 128), (5, 16, 40, 16), (2, 1, 8, 3)],
                         ids=lambda s: "B{}-N{}-C{}-Hd{}".format(*s))
def test_image_backward(shape, dtype, tiles, device, monkeypatch):
    """The whole backward of an image in one program (method "image": dX, the LayerNorm and
    MLP weight gradients, no intermediate through memory but an L2-resident dX partial):
    every output and gradient under the same rule, ragged channel chunks, an odd batch over
    two-image programs."""
    _image_backward(monkeypatch, tiles)
    check_against_fp64(*shape, dtype, device)


def test_image_backward_refuses_what_does_not_fit(device, monkeypatch):
    """Past 64 tokens or 128 hidden units its tiles do not fit a program: a clear error (the
    sweep does not offer it there)."""
    kt = _image_backward(monkeypatch, {})
    assert kt.image_method_fits(64, 128) and not kt.image_method_fits(65, 16) and not kt.image_method_fits(16, 129)
    inputs, grad = make_inputs(1, 65, 8, 16, torch.float32, device)
    with pytest.raises(ValueError, match="at most 64 tokens"):
        run(lambda *a: token_mlp(*a, backend="triton"), inputs, grad)


def test_default_method_by_token_count():
    """16-bit inputs past 128 tokens take the per-image GEMMs with split-K weight gradients (faster
    on an H100 at N 196); fewer tokens, and fp32, the fused kernels."""
    from kernels.token_mlp import triton as kt

    def methods(n, dtype):
        x = torch.empty(2, n, 64, dtype=dtype)
        bwd = kt.backward_config(x, 32)
        return (kt.forward_config(x, 32).get("method", "fused"), bwd["data"].get("method", "fused"),
                bwd["weights"].get("method", "fused"))

    assert methods(196, torch.bfloat16) == methods(129, torch.float16) == ("split", "split", "splitk")
    assert methods(128, torch.bfloat16) == methods(64, torch.float16) == ("fused", "fused", "fused")
    assert methods(196, torch.float32)[:2] == ("fused", "fused")


@pytest.mark.parametrize("shape", [(3, 196, 100, 64), (1, 257, 24, 72)], ids=lambda s: "B{}-N{}-C{}-Hd{}".format(*s))
def test_fused_kernels_past_128_tokens_fp16(shape, device, monkeypatch):
    """The fused kernels where 16-bit inputs default to the per-image GEMMs (still reachable
    through saved configurations and sweeps)."""
    _built_in_rules(monkeypatch)
    check_against_fp64(*shape, torch.float16, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_split_method_spans_tiles(dtype, device, monkeypatch):
    """Several hidden tiles, channel tiles and steps over tokens and hidden units, each with a
    ragged last one."""
    small = {"BLOCK_M": 16, "BLOCK_C": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
    _split_everywhere(monkeypatch, {"hidden": small, "tokens": small})
    check_against_fp64(3, 37, 50, 40, dtype, device)


@pytest.mark.parametrize("direct", [False, True], ids=["finish", "dx_direct"])
@pytest.mark.parametrize("block_n,shape", [(16, (3, 37, 50, 40)), (64, (2, 197, 40, 24))], ids=["N37", "N197"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_split_method_token_blocks(block_n, shape, dtype, direct, device, monkeypatch):
    """The token kernel over several token blocks (`gemms.token_blocks`), the last one ragged, in
    the forward and in the data backward (LayerNorm partials per token block; with the finishing
    pass or dx_direct): every output and gradient under the rule."""
    from kernels.token_mlp import gemms

    tokens = {"BLOCK_N": block_n, "BLOCK_C": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
    kt = _split_everywhere(monkeypatch, {"tokens": tokens, "dx_direct": direct})
    monkeypatch.setattr(kt, "_weight_blocks", lambda *a: {"method": "splitk"})
    launches = record_launches(monkeypatch, gemms)
    check_against_fp64(*shape, dtype, device)
    blocks = [kw["BLOCK_N"] for name, kw in launches if name == "_tokens_kernel"]
    assert len(blocks) == 2 and set(blocks) == {block_n}, blocks   # forward and backward


def test_token_blocks_rule():
    from kernels.token_mlp import gemms

    assert gemms.token_blocks(196, {}) == (256, 1)
    assert gemms.token_blocks(196, {"BLOCK_N": 128}) == (128, 2)
    assert gemms.token_blocks(196, {"BLOCK_N": 512}) == (256, 1)   # never past the whole axis
    assert gemms.token_blocks(1, {"BLOCK_N": 64}) == (16, 1)
    with pytest.raises(ValueError, match="power of two"):
        gemms.token_blocks(196, {"BLOCK_N": 96})


def test_split_method_register_cap(device, monkeypatch):
    """The hidden kernel with a register cap (the sweep's "maxnreg" candidate) reaches the launch
    and computes the same thing: every output and gradient under the rule."""
    from kernels.token_mlp import gemms

    kt = _split_everywhere(monkeypatch)
    monkeypatch.setattr(kt, "_blocks", lambda n, c, hd, dtype, backward=False: bench._with(
        gemms.split_blocks(n, c, hd, dtype, backward), "hidden", maxnreg=128))
    launches = record_launches(monkeypatch, gemms)
    check_against_fp64(2, 49, 40, 24, torch.float16, device)
    caps = [kw.get("maxnreg") for name, kw in launches if name == "_hidden_kernel"]
    assert caps and all(c == 128 for c in caps), caps


def test_empty_batch(device):
    """No images: an empty output, an empty input gradient and all-zero parameter gradients."""
    inputs, grad = make_inputs(0, 16, 32, 16, torch.float32, device)
    ours = run(lambda *a: token_mlp(*a, backend="triton"), inputs, grad)
    ref = run(token_mlp_reference, inputs, grad)
    for name, o, r in zip(NAMES, ours, ref):
        assert o.shape == r.shape and o.dtype == r.dtype, name
        assert torch.equal(o, torch.zeros_like(r)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_strided_inputs(dtype, device):
    check_against_fp64(3, 49, 100, 64, dtype, device, strided=True)


def test_fp32_parameters_with_fp16_tokens(device):
    """Parameters kept in fp32 (as under autocast) with fp16 tokens: gradients come back fp32."""
    inputs, grad = make_inputs(3, 49, 32, 16, torch.float16, device)
    inputs = [inputs[0], *(t.float() for t in inputs[1:])]
    ours = run(lambda *a: token_mlp(*a, backend="triton"), inputs, grad)
    exact = run(token_mlp_reference, [t.double() for t in inputs], grad.double())
    assert [t.dtype for t in ours] == [torch.float16, torch.float16] + [torch.float32] * 6
    for name, o, e in zip(NAMES, ours, exact):
        # the kernel rounds weights to fp16 for its matmuls: judge by fp16 precision
        rel = ((o.double() - e).abs().max() / e.abs().max()).item()
        assert rel < 2e-3, f"{name}: max error {rel:.2e} of the largest value"


def test_weight_gradients_are_deterministic(device):
    inputs, grad = make_inputs(3, 49, 100, 64, torch.float32, device)
    first = run(lambda *a: token_mlp(*a, backend="triton"), inputs, grad)
    second = run(lambda *a: token_mlp(*a, backend="triton"), inputs, grad)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_triton_backend_unavailable_lists_reasons(device):
    inputs, _ = make_inputs(1, 4, 8, 4, torch.float64, device)
    with pytest.raises(BackendUnavailable) as info:
        token_mlp(*inputs, backend="triton")
    assert any("float64" in r for r in info.value.reasons), info.value.reasons

    inputs, _ = make_inputs(1, 600, 4, 4, torch.float32, device)
    with pytest.raises(BackendUnavailable, match="600 tokens"):
        token_mlp(*inputs, backend="triton")
    assert triton_reasons(dtype=torch.float16, tokens=196, channels=512, hidden=256) == []


def test_auto_uses_reference_on_cpu():
    inputs, _ = make_inputs(3, 16, 32, 16, torch.float32, "cpu")
    assert torch.equal(token_mlp(*inputs, backend="auto"), token_mlp_reference(*inputs))
    choice, why = kernels.backend_for("token_mlp", "auto", "cpu", torch.float32, tokens=16, channels=32, hidden=16)
    assert choice == "reference" and why


@pytest.mark.parametrize("param_dtype", [None, torch.float32], ids=["fp16", "fp32-params"])
def test_library_op_path_matches_the_eager_path(device, param_dtype):
    # Plain eager calls launch the kernels under an autograd.Function; torch.compile, dispatch
    # modes and tensor subclasses go through the torch.library op. Both must give the same numbers,
    # gradients in each parameter's dtype included.
    from kernels.token_mlp.op import _token_mlp_fwd

    inputs, grad = make_inputs(3, 49, 40, 24, torch.float16, device, strided=True)
    if param_dtype is not None:
        inputs = [inputs[0], *(t.to(param_dtype) for t in inputs[1:])]
    library = run(lambda *a: _token_mlp_fwd(*a, 1e-5)[0], inputs, grad)
    eager = run(lambda *a: token_mlp(*a, backend="triton"), inputs, grad)
    for name, a, b in zip(NAMES, library, eager):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)   # the same kernels on the same inputs


def test_shape_errors_are_explained():
    inputs, _ = make_inputs(1, 16, 32, 8, torch.float32, "cpu")
    inputs[3] = inputs[3].t()  # w1 given as (N, Hd)
    with pytest.raises(ValueError, match="w1 must have shape"):
        token_mlp(*inputs)


class TokenMixer(nn.Module):
    def __init__(self, tokens, channels, hidden, backend):
        super().__init__()
        self.backend = backend
        self.norm = nn.LayerNorm(channels)
        self.w1 = nn.Parameter(torch.randn(hidden, tokens) * tokens**-0.5)
        self.b1 = nn.Parameter(0.1 * torch.randn(hidden))
        self.w2 = nn.Parameter(torch.randn(tokens, hidden) * hidden**-0.5)
        self.b2 = nn.Parameter(0.1 * torch.randn(tokens))

    def forward(self, x):
        return token_mlp(x, self.norm.weight, self.norm.bias, self.w1, self.b1, self.w2, self.b2,
                         backend=self.backend)


def _compile_matches_eager(module, x, backend, atol):
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    outs = []
    for fn in (module, compiled):
        xi = x.detach().requires_grad_()
        y = fn(xi)
        grads = torch.autograd.grad(y.float().square().sum(), [xi, *module.parameters()])
        outs.append([y, *grads])
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, atol=atol, rtol=atol)


def test_compile_fullgraph_reference_cpu():
    torch.manual_seed(0)
    module = TokenMixer(16, 32, 24, "auto")
    _compile_matches_eager(module, torch.randn(3, 16, 32), "aot_eager", atol=1e-5)


def test_bench_cases_smoke(monkeypatch):
    # Inductor on this CPU would take most of the test budget: dynamo + aot_eager still traces it
    monkeypatch.setattr(bench, "compile_sublayer", lambda m: torch.compile(m, backend="aot_eager"))
    cases = bench.cases(torch.float32, "cpu", shapes=[(3, 16, 32, 16)])
    assert len(cases) == 1 and len(bench.SHAPES) == 3
    case = cases[0]
    assert case.op == "token_mlp" and case.shape == "B3 N16 C32 Hd16"
    assert case.anchor in [c.name for c in case.candidates]
    assert 0 < case.flops_fwd < case.flops_fwd_bwd and 0 < case.bytes_fwd < case.bytes_fwd_bwd
    for cand in case.candidates:
        assert cand.forward().shape == (3, 16, 32), cand.name
        assert len(cand.forward_backward()) == 7, cand.name


# -------------------------------------------------------------------- GPU only

@pytest.mark.gpu
# (8, 257, 64, 128): the Mixer blocks of a hybrid with a class token, whose forward hit an illegal
# memory access on an H100 with (64, 512) weight tiles (224 KiB of shared memory)
@pytest.mark.parametrize("shape", SHAPES[:5] + [(3, 144, 32, 64), (1, 144, 512, 256), (1, 257, 24, 72),
                                                (8, 257, 64, 128), (2, 512, 96, 256)],
                         ids=lambda s: "B{}-N{}-C{}-Hd{}".format(*s))
def test_matches_fp64_bf16(shape, device):
    check_against_fp64(*shape, torch.bfloat16, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", bench.SHAPES, ids=lambda s: "B{}-N{}-C{}-Hd{}".format(*s))
def test_benchmark_shapes(shape, dtype, device):
    check_against_fp64(*shape, dtype, device)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["gemm", "splitk"])
@pytest.mark.parametrize("shape", bench.SHAPES, ids=lambda s: "B{}-N{}-C{}-Hd{}".format(*s))
def test_other_weight_gradient_methods_bf16(shape, method, device, monkeypatch):
    _weights_method(monkeypatch, {"method": method})
    check_against_fp64(*shape, torch.bfloat16, device)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [{}, {"Z": True}, {"dx_direct": True}, "token_blocks"],
                         ids=["split", "Z", "dx_direct", "token_blocks"])
@pytest.mark.parametrize("shape", bench.SHAPES + [(3, 257, 40, 24)], ids=lambda s: "B{}-N{}-C{}-Hd{}".format(*s))
def test_split_method_bf16(shape, variant, device, monkeypatch):
    """The per-image GEMMs (method "split") with the split-K weight gradients, compiled, in
    bf16, on the benchmark shapes (the fused weight kernel after split data: test_split_method):
    as they are, reading LayerNorm(X) from memory ("Z"), with dX from the token kernel and the
    dW1 kernel's row sums ("dx_direct"), and the token kernel over blocks of 128 tokens."""
    token_blocks = variant == "token_blocks"
    kt = _split_everywhere(monkeypatch, None if token_blocks else variant, token_blocks=token_blocks)
    monkeypatch.setattr(kt, "_weight_blocks", lambda *a: {"method": "splitk"})
    check_against_fp64(*shape, torch.bfloat16, device)


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [{"BLOCK_C": 16}, {"BLOCK_C": 16, "IMAGES": 2}, {"BLOCK_C": 32}])
def test_image_backward_bf16(tiles, device, monkeypatch):
    _image_backward(monkeypatch, tiles)
    check_against_fp64(*bench.SHAPES[0], torch.bfloat16, device)
    check_against_fp64(5, 49, 100, 128, torch.bfloat16, device)


@pytest.mark.gpu
def test_bf16_strided(device):
    check_against_fp64(3, 196, 256, 64, torch.bfloat16, device, strided=True)


@pytest.mark.gpu
def test_compile_fullgraph_triton_inductor(device):
    torch.manual_seed(0)
    module = TokenMixer(49, 96, 64, "triton").to(device)
    _compile_matches_eager(module, torch.randn(3, 49, 96, device=device), "inductor", atol=1e-4)


@pytest.mark.gpu
def test_bench_cases_smoke_bf16(device):
    for case in bench.cases(torch.bfloat16, device, shapes=[(3, 16, 32, 16)]):
        for cand in case.candidates:
            assert cand.forward().shape == (3, 16, 32), cand.name
            assert len(cand.forward_backward()) == 7, cand.name
