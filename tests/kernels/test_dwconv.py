"""dwconv2d: the Triton kernel against an fp64 reference, forward and every gradient.

Tolerance rule: on fresh random inputs, the kernel's max abs error against the
fp64 reference must be at most 3x PyTorch's own error (the reference path run
in the same low dtype) plus a small floor. NaN/inf never passes.
On CPU the kernels run in Triton's interpreter, so shapes stay tiny.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from kernels import BackendUnavailable, dwconv2d
from kernels.dwconv import bench, op as dwconv_op
from tests.helpers import record_launches

# Floor per dtype, in units of the reference's magnitude (max(1, max|ref|)): it
# only matters where PyTorch happens to be (nearly) exact, and is about 2 ulps
# of the dtype so that a different summation order is not a failure.
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
FACTOR = 3.0


def _inputs(B, C, H, W, k, device, *, channels_last=False, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(C, 1, k, k, generator=g, dtype=torch.float64) / k  # outputs O(1)
    b = torch.randn(C, generator=g, dtype=torch.float64) if bias else None
    dy = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        dy = dy.to(memory_format=torch.channels_last)
    move = (lambda t: None if t is None else t.to(device))
    return move(x), move(w), move(b), move(dy)


def _run(x, w, b, dy, dtype, activation, backend):
    """Output and gradients of one path, inputs cast to `dtype` (memory format kept)."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (x, w, b)]
    y = dwconv2d(*leaves, activation=activation, backend=backend)
    y.backward(dy.to(dtype))
    return y, {"y": y.detach(), "dx": leaves[0].grad, "dw": leaves[1].grad,
               **({"db": leaves[2].grad} if b is not None else {})}


def _compare(name, got, ours_low, ref64, dtype):
    err_k = (got.double() - ref64).abs()
    err_pt = (ours_low.double() - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item())
    bound = FACTOR * err_pt + FLOOR[dtype] * scale
    finite = bool(torch.isfinite(got).all())
    worst = err_k.max().item() if finite else float("inf")
    if not finite or worst > bound:
        where = tuple(int(i) for i in torch.nonzero(err_k == err_k.max())[0]) if finite else "non-finite"
        return (f"{name}: max abs err {worst:.3e} at {where} > allowed {bound:.3e} "
                f"(= {FACTOR} x PyTorch {dtype} err {err_pt:.3e} + floor {FLOOR[dtype]:.0e} x scale {scale:.3g})")
    return None


def check(B, C, H, W, k, dtype, device, *, channels_last=False, bias=True, activation="gelu", seed=0):
    x, w, b, dy = _inputs(B, C, H, W, k, device, channels_last=channels_last, bias=bias, seed=seed)
    y_k, got = _run(x, w, b, dy, dtype, activation, "triton")
    _, low = _run(x, w, b, dy, dtype, activation, "reference")
    _, ref = _run(x, w, b, dy, torch.float64, activation, "reference")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y_k.dtype == dtype and y_k.shape == x.shape
    assert y_k.is_contiguous(memory_format=fmt), "output lost the input's memory format"
    problems = [p for name in ref if (p := _compare(name, got[name], low[name], ref[name], dtype))]
    assert not problems, (f"B{B} C{C} {H}x{W} k{k} {dtype} channels_last={channels_last} "
                          f"bias={bias} act={activation}:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------- correctness (CPU interpreter or GPU)

DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [3, 5, 7, 9])
def test_kernel_sizes(k, dtype, device):
    check(2, 3, 8, 8, k, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hw", [(7, 7), (14, 14), (32, 32), (9, 13)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_sizes(hw, dtype, device):
    # k=9 is larger than the 7x7 image: every tap meets the zero padding somewhere
    check(2, 5, *hw, 9, dtype, device, channels_last=(hw[0] == 32))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("bias,activation", [(False, None), (True, None), (False, "gelu"), (True, "gelu")])
def test_formats_and_epilogue(channels_last, bias, activation, device):
    check(2, 3, 10, 11, 5, torch.float16, device, channels_last=channels_last, bias=bias, activation=activation)


@pytest.mark.parametrize("C,channels_last", [(1, False), (1, True), (37, True), (37, False)])
def test_channel_counts(C, channels_last, device):
    # 37 channels is more than one channel block in channels_last, with a ragged last block
    check(1, C, 6, 5, 3, torch.float32, device, channels_last=channels_last)


def test_strided_inputs(device):
    """Views with gaps in every dimension, and an upstream gradient in another layout."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 7, 12, 15, generator=g, dtype=torch.float64).to(device)
    x = base[::2, 1::2, 1:-1, ::2]                              # (2, 3, 10, 8), no unit stride
    w = (torch.randn(6, 1, 5, 5, generator=g, dtype=torch.float64) / 5).to(device)[::2]
    b = torch.randn(3, generator=g, dtype=torch.float64).to(device)
    dy = torch.randn(2, 3, 10, 8, generator=g, dtype=torch.float64).to(device)
    dy = dy.to(memory_format=torch.channels_last)
    assert not x.is_contiguous() and not w.is_contiguous()
    for dtype in (torch.float32, torch.float16):
        _, got = _run(x, w, b, dy, dtype, "gelu", "triton")
        _, low = _run(x, w, b, dy, dtype, "gelu", "reference")
        _, ref = _run(x, w, b, dy, torch.float64, "gelu", "reference")
        problems = [p for n in ref if (p := _compare(n, got[n], low[n], ref[n], dtype))]
        assert not problems, f"strided {dtype}:\n  " + "\n  ".join(problems)


def test_empty_batch(device):
    x = torch.randn(0, 3, 5, 5, device=device, requires_grad=True)
    w = torch.randn(3, 1, 3, 3, device=device, requires_grad=True)
    b = torch.randn(3, device=device, requires_grad=True)
    y = dwconv2d(x, w, b, activation="gelu", backend="triton")
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert not w.grad.any() and not b.grad.any()


def test_inference_without_grad(device):
    """No grad: the pre-activation is not stored and the output is unchanged."""
    x, w, b, _ = _inputs(2, 3, 9, 9, 7, device, channels_last=True)
    x, w, b = (t.float() for t in (x, w, b))
    with torch.no_grad():
        y = dwconv2d(x, w, b, activation="gelu", backend="triton")
    y_ref = dwconv2d(x, w, b, activation="gelu", backend="reference")
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias, needs", [(True, (True, True, True)), (False, (True, False, False)),
                                         (True, (False, True, True))], ids=["all", "dx-only", "params-only"])
def test_library_op_path_matches_the_eager_path(bias, needs, device):
    # Plain eager calls launch the kernels under an autograd.Function; torch.compile, dispatch
    # modes and tensor subclasses go through the torch.library op. Both must give the same numbers
    # and the same set of gradients.
    x, w, b, dy = _inputs(2, 5, 9, 11, 5, device, channels_last=True, bias=bias)
    results = []
    for path in ("eager", "library"):
        leaves = [None if t is None else t.detach().float().requires_grad_(need)
                  for t, need in zip((x, w, b), needs)]
        if path == "library":
            y, _ = dwconv_op._dwconv2d_fwd(*leaves, True, True)
        else:
            y = dwconv2d(*leaves, activation="gelu", backend="triton")
        y.backward(dy.float())
        results.append([y.detach()] + [None if t is None else t.grad for t in leaves])
    for eager, library in zip(*results):
        if eager is None or library is None:
            assert eager is None and library is None
        else:
            torch.testing.assert_close(eager, library, rtol=0, atol=0)   # the same kernels on the same inputs


# ----------------------------------------------------------------------------- dispatch

def test_triton_refuses_unsupported_inputs(device):
    x = torch.randn(1, 3, 8, 8, device=device)
    with pytest.raises(BackendUnavailable) as info:
        dwconv2d(x, torch.randn(3, 1, 4, 4, device=device), backend="triton")
    assert any("even" in r for r in info.value.reasons), info.value.reasons
    with pytest.raises(BackendUnavailable) as info:
        dwconv2d(x.double(), torch.randn(3, 1, 3, 3, device=device, dtype=torch.float64), backend="triton")
    assert any("float64" in r for r in info.value.reasons), info.value.reasons
    assert dwconv_op.triton_reasons(dtype=torch.bfloat16, channels=3, kernel_size=17)
    assert dwconv_op.triton_reasons(dtype=torch.float16, channels=768, kernel_size=15) == []


# PyTorch warns that 'same' padding with an even kernel may copy the input: expected here
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_reference_takes_even_kernels():
    x = torch.randn(1, 3, 8, 7)
    y = dwconv2d(x, torch.randn(3, 1, 4, 4), backend="auto")
    assert y.shape == x.shape


def test_bad_arguments():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="activation"):
        dwconv2d(x, torch.randn(3, 1, 3, 3), activation="relu")
    with pytest.raises(ValueError, match="weight"):
        dwconv2d(x, torch.randn(4, 1, 3, 3))
    with pytest.raises(ValueError, match="bias"):
        dwconv2d(x, torch.randn(3, 1, 3, 3), torch.randn(4))


def test_auto_uses_reference_on_cpu(monkeypatch):
    calls = []
    real = dwconv_op.reference.dwconv2d_reference
    monkeypatch.setattr(dwconv_op.reference, "dwconv2d_reference",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn(2, 3, 8, 8)
    dwconv2d(x, torch.randn(3, 1, 3, 3), activation="gelu", backend="auto")
    assert calls == [1]


# ----------------------------------------------------------------------------- torch.compile

class _Mixer(nn.Module):
    """The ConvMixer depthwise sublayer: x + GELU(dwconv(x)) (BatchNorm left out)."""

    def __init__(self, C: int, k: int, backend: str):
        super().__init__()
        self.mix_space = nn.Conv2d(C, C, k, padding=k // 2, groups=C)
        self.backend = backend

    def forward(self, x):
        return x + dwconv2d(x, self.mix_space.weight, self.mix_space.bias,
                            activation="gelu", backend=self.backend)


def _compile_check(device, backend, compile_backend, channels_last=False):
    torch.manual_seed(0)
    model = _Mixer(5, 7, backend).to(device)
    x = torch.randn(2, 5, 9, 9, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    outs = []
    for fn in (model, compiled):
        model.zero_grad()
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.square().sum().backward()
        outs.append((y.detach(), xi.grad, model.mix_space.weight.grad.clone(), model.mix_space.bias.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_compile_reference_cpu():
    _compile_check("cpu", "reference", "aot_eager")


# Under TRITON_INTERPRET=1, kernels.dispatch.wrap_triton hands back the raw interpreted
# kernel, which cannot run on the fake tensors compile traces with: the Triton
# path is compiled on the GPU only.
TOEPLITZ = {"method": "toeplitz", "BLOCK_C": 2, "TILE_H": 16, "num_warps": 4}


@pytest.mark.parametrize("k,hw,channels_last,dtype", [
    (3, (8, 8), False, torch.float32), (9, (7, 7), True, torch.float16),
    (5, (9, 13), False, torch.float16), (7, (14, 14), True, torch.float32)])
def test_toeplitz_method(k, hw, channels_last, dtype, device, monkeypatch):
    """The tensor-core formulation of the forward, of dx (its flipped convolution) and of dw,
    selected for every launch: output and all gradients under the tolerance rule."""
    from kernels.dwconv import triton as kt

    monkeypatch.setattr(kt, "forward_tile", lambda x, k, role="forward": TOEPLITZ)
    monkeypatch.setattr(kt, "weight_grad_tile", lambda x, k: TOEPLITZ)
    check(2, 3, *hw, k, dtype, device, channels_last=channels_last)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_toeplitz_from_an_nchw_copy(dtype, device, monkeypatch):
    """channels_last inputs through the Toeplitz kernels via contiguous copies: every output and
    gradient, and the output stays channels_last."""
    from kernels.dwconv import triton as kt

    tile = {**TOEPLITZ, "copy_to_nchw": True}
    monkeypatch.setattr(kt, "forward_tile", lambda x, k, role="forward": tile)
    monkeypatch.setattr(kt, "weight_grad_tile", lambda x, k: tile)
    check(2, 3, 9, 13, 9, dtype, device, channels_last=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,hw", [(9, (10, 11)), (5, (9, 13))])
def test_toeplitz_gathering_the_weights(k, hw, dtype, device, monkeypatch):
    """The Toeplitz forward and input gradient reading the banded matrices' entries straight
    from the weights ("gather"): every output and gradient."""
    from kernels.dwconv import triton as kt

    monkeypatch.setattr(kt, "forward_tile", lambda x, k, role="forward": {**TOEPLITZ, "gather": True})
    check(2, 3, *hw, k, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_toeplitz_narrow_windows(dtype, device, monkeypatch):
    """16-wide output windows over a 40-wide image: several windows a row, a ragged last one."""
    from kernels.dwconv import triton as kt

    tile = {"method": "toeplitz", "BLOCK_C": 2, "TILE_H": 16, "TILE_W": 16, "num_warps": 4}
    monkeypatch.setattr(kt, "forward_tile", lambda x, k, role="forward": tile)
    monkeypatch.setattr(kt, "weight_grad_tile", lambda x, k: tile)
    check(2, 3, 20, 40, 9, dtype, device)


def test_toeplitz_weight_grad_spans_tiles(device, monkeypatch):
    """Several column and row windows per image and several units per program."""
    from kernels.dwconv import triton as kt

    from kernels.dwconv import toeplitz

    monkeypatch.setattr(kt, "weight_grad_tile", lambda x, k: TOEPLITZ)
    monkeypatch.setattr(toeplitz, "_TARGET_PROGRAMS", 2)
    check(3, 2, 20, 40, 7, torch.float32, device, channels_last=True)


@pytest.mark.parametrize("images", [2, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_toeplitz_images_and_units_per_program(dtype, images, device, monkeypatch):
    """The forward (and input gradient) stacking two or four images a program, over an odd batch
    (the last program's stack runs past it), and the weight gradient summing three windows a
    program: every output and gradient."""
    from kernels.dwconv import triton as kt

    monkeypatch.setattr(kt, "forward_tile", lambda x, k, role="forward": {**TOEPLITZ, "IMAGES": images})
    monkeypatch.setattr(kt, "weight_grad_tile", lambda x, k: {**TOEPLITZ, "UNITS": 3})
    check(5, 3, 20, 40, 9, dtype, device)


STREAM = {"method": "toeplitz", "stream": True}
RELOAD = {**STREAM, "reload": True}   # the weight gradient re-reading g from memory (the forward ignores it)


_STREAMING_CASES = {   # id: (k, (H, W), tile, batch, dtypes)
    "k9": (9, (13, 40), {"TILE_W": 16}, 3, DTYPES),                 # several column windows, a ragged last one
    "k7-rows-units": (7, (9, 13), {"ROWS": 4, "UNITS": 1}, 17, DTYPES),   # row chunks, two image groups,
                                                                    # a unit a program
    "k5-wide": (5, (32, 32), {"TILE_W": 32, "BLOCK_C": 2}, 2, DTYPES),    # 32-wide windows, two channels
    "k3": (3, (7, 8), {}, 3, DTYPES),
    "copy-to-nchw": (9, (12, 24), {"copy_to_nchw": True}, 2, DTYPES),     # g written back channels_last
    "reload-k9": (9, (12, 20), {"reload": True}, 3, DTYPES),       # g rows re-read, two column windows
    # the reload kernel's other tiles in fp16 only (its fp32 dots, the same code, run at k9)
    "reload-k7-units": (7, (9, 13), {"reload": True, "UNITS": 1}, 17, [torch.float16]),   # a unit a program
    "reload-k7-images32": (7, (9, 13), {"reload": True, "IMAGES": 32}, 17, [torch.float16]),  # 32 images a unit
    "reload-k5-wide": (5, (32, 32), {"reload": True, "TILE_W": 32}, 2, [torch.float16]),  # KP 64: 4 warps
}


@pytest.mark.parametrize("k,hw,tile,batch,dtype", [
    pytest.param(k, hw, tile, batch, dtype, id=f"{dtype}-{name}")
    for name, (k, hw, tile, batch, dtypes) in _STREAMING_CASES.items() for dtype in dtypes])
def test_toeplitz_streaming(k, hw, tile, batch, dtype, device, monkeypatch):
    """The forward, input gradient and weight gradient streaming down the image with the K input
    rows in use in registers ("stream"; the weight gradient forms g and the bias gradient
    itself, or with "reload" reads g from memory, formed by the tap kernel's pass under GELU):
    with and without bias and GELU, NCHW and channels_last (strided loads), every output and
    gradient."""
    from kernels.dwconv import toeplitz
    from kernels.dwconv import triton as kt

    monkeypatch.setattr(kt, "forward_tile", lambda x, k, role="forward": {**STREAM, **tile})
    monkeypatch.setattr(kt, "weight_grad_tile", lambda x, k: {**STREAM, **tile})
    launches = record_launches(monkeypatch, kt, toeplitz)
    check(batch, 5, *hw, k, dtype, device, bias=True, activation="gelu")
    check(batch, 5, *hw, k, dtype, device, bias=False, activation=None)
    check(2, 3, *hw, k, dtype, device, channels_last=True)
    wgrad = [name for name, _ in launches if name.startswith("_dwconv_bwd_w")]
    want = "_dwconv_bwd_w_reload_kernel" if tile.get("reload") else "_dwconv_bwd_w_stream_kernel"
    # one weight-gradient launch a check; re-reading g, the tap kernel forms it first under GELU
    # (the first and last checks), as nothing else does
    taps = 2 if tile.get("reload") else 0
    assert sorted(wgrad) == sorted([want] * 3 + ["_dwconv_bwd_w_kernel"] * taps), wgrad


@pytest.mark.parametrize("method", ["toeplitz", "stream", "reload"])
@pytest.mark.parametrize("hw", [(6, 28), (5, 14)], ids=["28-wide", "14-wide"])
def test_widths_that_are_not_multiples_of_8(hw, method, device, monkeypatch):
    """Rows of 28 and 14 elements, whose width and row strides the Toeplitz and streaming kernels
    restate as multiples of 4 and 2 (fp16): every output and gradient, both layouts."""
    from kernels.dwconv import toeplitz
    from kernels.dwconv import triton as kt

    tile = {"stream": STREAM, "reload": RELOAD}.get(method, TOEPLITZ)
    monkeypatch.setattr(kt, "forward_tile", lambda x, k, role="forward": tile)
    monkeypatch.setattr(kt, "weight_grad_tile", lambda x, k: tile)
    x = torch.empty(2, 3, *hw, dtype=torch.float16)
    assert toeplitz._row_align(x) == (4 if hw[1] == 28 else 2)
    check(2, 3, *hw, 7, torch.float16, device, bias=True, activation="gelu")
    check(2, 3, *hw, 9, torch.float16, device, channels_last=True)


def test_row_align():
    """The largest power of two, up to 16 bytes of elements, dividing the width and every row stride."""
    from kernels.dwconv import toeplitz

    half = torch.empty(2, 3, 4, 32, dtype=torch.float16)
    assert toeplitz._row_align(half) == 8 and toeplitz._row_align(half.float()) == 4
    assert toeplitz._row_align(torch.empty(2, 3, 4, 28, dtype=torch.float16)) == 4
    # a channels_last tensor's row stride is W * C: 32 * 3 = 96, a multiple of 8; 20 * 3 = 60 of 4
    assert toeplitz._row_align(half, half.to(memory_format=torch.channels_last)) == 8
    x20 = torch.empty(2, 3, 4, 40, dtype=torch.float16)[..., :20]   # row stride 40, width 20
    assert toeplitz._row_align(x20) == 4
    assert toeplitz._row_align(torch.empty(1, 1, 3, 7, dtype=torch.float16)) == 1


def test_stream_needs_triton_3_3(monkeypatch):
    """Triton 3.2 cannot compile the streaming kernels' tuples: selecting them says so, and the
    sweep leaves them out (its interpreter runs them, so the tests above still do)."""
    import triton

    from kernels import dispatch
    from kernels.dwconv import bench, toeplitz
    from kernels.dwconv import triton as kt

    monkeypatch.setattr(dispatch, "interpreter_mode", lambda: False)
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    assert not toeplitz.stream_supported()
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(RuntimeError, match="Triton 3.3 or newer"):
        kt.conv_forward(x, torch.randn(2, 1, 3, 3), None, torch.empty_like(x), None, gelu=False, tile=STREAM)
    configs = [c for case in bench.sweep_cases(torch.float32, "cpu", [(1, 2, 8, 8, 9)]) for c in case.configs]
    assert configs and not any(c.get("stream") for c in configs)
    monkeypatch.setattr(triton, "__version__", "3.3.0")
    configs = [c for case in bench.sweep_cases(torch.float32, "cpu", [(1, 2, 8, 8, 9)]) for c in case.configs]
    # 4 forward, 4 input-gradient and 6 weight-gradient ones (2 re-reading g) on NCHW, one of
    # each on NCHW copies
    assert sum(bool(c.get("stream")) for c in configs) == 17
    assert sum(bool(c.get("reload")) for c in configs) == 2


def test_stream_without_input_gradient(device):
    """A layer whose input needs no gradient: the streaming weight gradient then keeps g to
    itself; the weight and bias gradients are the same as with the input gradient."""
    from kernels.dwconv import triton as kt

    gen = torch.Generator().manual_seed(0)
    x, dy, z = (torch.randn(2, 3, 12, 12, generator=gen).to(device) for _ in range(3))
    w = torch.randn(3, 1, 9, 9, generator=gen).to(device)
    dx, dw, db = kt.conv_backward(dy, x, w, z, gelu=True, has_bias=True, need_dx=True, need_dw=True, tile=STREAM)
    no_dx, dw2, db2 = kt.conv_backward(dy, x, w, z, gelu=True, has_bias=True, need_dx=False, need_dw=True,
                                      tile=STREAM)
    assert dx is not None and no_dx is None
    assert torch.equal(dw, dw2) and torch.equal(db, db2)


def _block_run(x, w, b, dy, dtype, backend, fused):
    """ConvMixer's spatial mixing, x + BatchNorm(GELU(dwconv(x))), in training mode: as the fused
    op or composed of the public ops; outputs, gradients and the running statistics."""
    from kernels import batch_norm, dwconv_batch_norm_residual

    C = x.shape[1]
    g = torch.Generator().manual_seed(1)
    gamma, beta = (1.0 + 0.1 * torch.randn(C, generator=g, dtype=torch.float64)), 0.1 * torch.randn(
        C, generator=g, dtype=torch.float64)
    leaves = [t.detach().to(x.device, dtype).requires_grad_() for t in (x, w, b, gamma, beta)]
    stats = [torch.zeros(C, device=x.device, dtype=dtype), torch.ones(C, device=x.device, dtype=dtype)]
    if fused:
        y = dwconv_batch_norm_residual(*leaves, *stats, momentum=0.1, eps=1e-5, backend=backend)
    else:
        z = dwconv2d(*leaves[:3], backend=backend)
        y = batch_norm(z, leaves[3], leaves[4], *stats, training=True, activation="gelu", residual=leaves[0],
                       backend=backend)
    y.backward(dy.to(dtype))
    names = ("dx", "dw", "db", "dgamma", "dbeta")
    return {"y": y.detach(), **{n: t.grad for n, t in zip(names, leaves)},
            "running_mean": stats[0], "running_var": stats[1]}


@pytest.mark.parametrize("tile,k", [(STREAM, 9), (RELOAD, 9), (None, 9), (None, 5)],
                         ids=["stream", "reload", "toeplitz", "taps"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dwconv_batch_norm_residual(tile, k, dtype, device, monkeypatch):
    """ConvMixer's spatial mixing as one op (the residual's gradient added in the epilogue of
    the input gradient's kernel, whichever it is): every output, gradient and running statistic
    against fp64 under the tolerance rule."""
    from kernels.dwconv import toeplitz
    from kernels.dwconv import triton as kt

    if tile is not None:
        monkeypatch.setattr(kt, "forward_tile", lambda x, k, role="forward": tile)
        monkeypatch.setattr(kt, "weight_grad_tile", lambda x, k: tile)
    calls = []
    real = kt.conv_backward
    monkeypatch.setattr(kt, "conv_backward", lambda *a, **k: calls.append(k) or real(*a, **k))
    launches = record_launches(monkeypatch, kt, toeplitz)
    x, w, b, dy = _inputs(3, 5, 9, 13, k, device)
    got = _block_run(x, w, b, dy, dtype, "triton", fused=True)
    assert calls and all(k["add_to_dx"] is not None for k in calls)   # the fused backward ran
    # ... adding dy in every input-gradient launch (a forward kernel: the block's own forward adds nothing)
    adds = [kw.get("HAS_ADD") for name, kw in launches if name.startswith("_dwconv_fwd")]
    assert adds.count(True) == len(calls) and adds.count(False) == len(calls), adds
    if k >= 7:   # the bias gradient from the BatchNorm backward: no pass of the tap kernel over dz
        assert "_dwconv_bwd_w_kernel" not in [name for name, _ in launches], launches
    low = _block_run(x, w, b, dy, dtype, "reference", fused=False)
    ref = _block_run(x, w, b, dy, torch.float64, "reference", fused=False)
    problems = [p for name in ref if (p := _compare(name, got[name], low[name], ref[name], dtype))]
    assert not problems, "\n  ".join(problems)


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [STREAM, RELOAD, None], ids=["stream", "reload", "default"])
def test_dwconv_batch_norm_residual_bf16(tile, device, monkeypatch):
    from kernels.dwconv import triton as kt

    if tile is not None:
        monkeypatch.setattr(kt, "forward_tile", lambda x, k, role="forward": tile)
        monkeypatch.setattr(kt, "weight_grad_tile", lambda x, k: tile)
    x, w, b, dy = _inputs(17, 19, 32, 32, 9, device)
    got = _block_run(x, w, b, dy, torch.bfloat16, "triton", fused=True)
    low = _block_run(x, w, b, dy, torch.bfloat16, "reference", fused=False)
    ref = _block_run(x, w, b, dy, torch.float64, "reference", fused=False)
    problems = [p for name in ref if (p := _compare(name, got[name], low[name], ref[name], torch.bfloat16))]
    assert not problems, "\n  ".join(problems)


def test_dwconv_batch_norm_residual_compiles_fullgraph(device):
    """Under torch.compile the block op is the composition of the two ops: one graph (their
    library ops on CUDA, their reference paths on CPU, where the interpreter cannot be traced)."""
    from kernels import dwconv_batch_norm_residual

    x, w, b, _ = (t.float() for t in _inputs(2, 3, 8, 8, 5, device))
    gamma, beta = torch.ones(3, device=device), torch.zeros(3, device=device)

    def block(x):
        return dwconv_batch_norm_residual(x, w, b, gamma, beta, None, None, backend="auto")

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), block(x), rtol=1e-4, atol=1e-5)


def test_dwconv_batch_norm_residual_composes_elsewhere(device):
    """Where the fused op does not run (the reference backend, eval-free composition) it gives
    the composition's result exactly."""
    x, w, b, dy = _inputs(2, 3, 8, 8, 5, device)
    fused = _block_run(x, w, b, dy, torch.float64, "reference", fused=True)
    composed = _block_run(x, w, b, dy, torch.float64, "reference", fused=False)
    for name in composed:
        assert torch.equal(fused[name], composed[name]), name


@pytest.mark.parametrize("k,tile_w,kp,lead", [(9, 32, 64, None), (9, 16, 32, None), (3, 16, 32, None),
                                               (15, 32, 64, None), (1, 16, 16, None), (7, 16, 32, 8), (9, 16, 32, 8)])
def test_banded_matrices(k, tile_w, kp, lead, device):
    """The Toeplitz kernels' banded matrices, T[c, i, j, n] = w[c, i, j - n - (lead - k // 2)]
    inside the band, exactly as indexing the weights gives them."""
    from kernels.dwconv import toeplitz

    w = torch.randn(5, 1, k, k, device=device)
    shift = 0 if lead is None else lead - k // 2
    d = torch.arange(kp, device=device)[:, None] - torch.arange(tile_w, device=device)[None, :] - shift
    band = (d >= 0) & (d < k)
    expected = torch.where(band, w.reshape(5, k, k)[:, :, d.clamp(0, k - 1)], 0.0)
    for dtype in (torch.float32, torch.float16):
        got = toeplitz.toeplitz_matrices(w, tile_w, kp, dtype, lead)
        assert got.dtype == dtype and torch.equal(got, expected.to(dtype)), dtype


def test_window_rows_start_16_byte_aligned():
    """The Toeplitz and streaming kernels load each window's input rows from a 16-byte-aligned
    column (16-bit: 8 elements before the window, fp32: 4) wherever that and the halo after the
    window fit in KP columns, else from the halo's first column."""
    from kernels.dwconv import toeplitz

    half, single = torch.empty(1, dtype=torch.float16), torch.empty(1)
    for k in (3, 7, 9, 15):
        assert toeplitz._lead(half, k, 16, 32) == toeplitz._lead(half, k, 32, 64) == 8, k
        assert toeplitz._lead(single, k, 16, 32) == (4 if k < 15 else 8), k
    assert toeplitz._lead(half, 9, 16, 24) == 4   # 8 + 16 + 4 > 24: the halo's first column


def test_default_method_by_layout_and_kernel_size():
    """The Toeplitz kernels are the default for NCHW at K >= 7 only (where they were measured faster)."""
    from kernels.dwconv import triton as kt

    nchw = torch.empty(2, 8, 16, 16)
    channels_last = nchw.to(memory_format=torch.channels_last)
    for k in (7, 9):
        assert kt.forward_tile(nchw, k)["method"] == kt.weight_grad_tile(nchw, k)["method"] == "toeplitz"
    assert kt.forward_tile(nchw, 15)["method"] == "toeplitz"
    for x, k in ((nchw, 5), (channels_last, 9), (channels_last, 3)):
        assert "method" not in kt.forward_tile(x, k) and "method" not in kt.weight_grad_tile(x, k), (x.stride(), k)


@pytest.mark.parametrize("bias,activation", [(False, None), (True, None), (False, "gelu"), (True, "gelu")])
def test_toeplitz_default_epilogues(bias, activation, device):
    """NCHW at k9 takes the Toeplitz kernels by default: every bias / activation combination."""
    check(2, 3, 10, 11, 9, torch.float16, device, bias=bias, activation=activation)


def test_tap_kernel_at_k9_nchw(device, monkeypatch):
    """The tap kernel stays correct where it is no longer the default (sweeps still time it)."""
    from kernels.dwconv import triton as kt

    monkeypatch.setattr(kt, "TOEPLITZ_MIN_K", 99)
    assert "method" not in kt.forward_tile(torch.empty(1, 3, 9, 13), 9)
    check(2, 3, 9, 13, 9, torch.float32, device)
    check(2, 3, 10, 11, 9, torch.float16, device, bias=False, activation=None)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("k,hw", [(3, (8, 8)), (9, (32, 32)), (9, (9, 13)), (15, (28, 28))])
def test_toeplitz_method_bf16(k, hw, channels_last, device, monkeypatch):
    from kernels.dwconv import triton as kt

    tile = {"method": "toeplitz", "BLOCK_C": 8, "TILE_H": 32, "num_warps": 8}
    monkeypatch.setattr(kt, "forward_tile", lambda x, k, role="forward": tile)
    monkeypatch.setattr(kt, "weight_grad_tile", lambda x, k: tile)
    check(4, 19, *hw, k, torch.bfloat16, device, channels_last=channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["gather", "copy_to_nchw"])
@pytest.mark.parametrize("k,hw", [(9, (32, 32)), (9, (9, 13)), (15, (28, 28))])
def test_toeplitz_variants_bf16(k, hw, variant, device, monkeypatch):
    from kernels.dwconv import triton as kt

    tile = {**kt.TOEPLITZ_FORWARD, variant: True}
    monkeypatch.setattr(kt, "forward_tile", lambda x, k, role="forward": tile)
    monkeypatch.setattr(kt, "weight_grad_tile", lambda x, k: {**kt.TOEPLITZ_WEIGHT_GRAD, variant: True})
    check(4, 19, *hw, k, torch.bfloat16, device, channels_last=variant == "copy_to_nchw")


@pytest.mark.gpu
@pytest.mark.parametrize("forward,weight_grad,channels_last", [
    ({"method": "toeplitz", "BLOCK_C": 4, "TILE_H": 32, "num_warps": 8, "IMAGES": 2}, {**TOEPLITZ, "UNITS": 4}, False),
    ({"method": "toeplitz", "BLOCK_C": 4, "TILE_H": 32, "TILE_W": 16, "num_warps": 8, "IMAGES": 4},
     {"method": "toeplitz", "BLOCK_C": 4, "TILE_H": 32, "TILE_W": 16, "num_warps": 4, "UNITS": 4}, False),
    ({"method": "toeplitz", "BLOCK_C": 16, "TILE_H": 16, "TILE_W": 16, "num_warps": 8, "IMAGES": 2},
     {"method": "toeplitz", "BLOCK_C": 16, "TILE_H": 16, "num_warps": 4, "UNITS": 4}, True),
    ({"method": "toeplitz", "BLOCK_C": 16, "TILE_H": 16, "TILE_W": 16, "num_warps": 8, "gather": True},
     {**TOEPLITZ, "UNITS": 2}, True)],
    ids=["images-units", "narrow", "wide-channels_last", "gather"])
@pytest.mark.parametrize("k,hw", [(9, (32, 32)), (7, (9, 13))])
def test_toeplitz_sweep_candidates_bf16(k, hw, forward, weight_grad, channels_last, device, monkeypatch):
    """The Toeplitz configurations the sweep tries first, compiled, in bf16, odd batch and channels."""
    from kernels.dwconv import triton as kt

    monkeypatch.setattr(kt, "forward_tile", lambda x, k, role="forward": forward)
    monkeypatch.setattr(kt, "weight_grad_tile", lambda x, k: weight_grad)
    check(5, 19, *hw, k, torch.bfloat16, device, channels_last=channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize("forward,weight_grad,channels_last", [
    (STREAM, STREAM, False),
    ({**STREAM, "BLOCK_C": 2}, {**STREAM, "num_warps": 2}, False),
    ({**STREAM, "BLOCK_C": 8, "ROWS": 16}, {**STREAM, "UNITS": 4}, False),
    ({**STREAM, "copy_to_nchw": True}, {**STREAM, "copy_to_nchw": True}, True),
    (STREAM, RELOAD, False),
    (STREAM, {**RELOAD, "IMAGES": 32}, True)],
    ids=["default", "two-channels", "eight-channels-rows", "nchw-copy", "reload", "reload-images32-channels_last"])
@pytest.mark.parametrize("k,hw", [(9, (32, 32)), (7, (9, 13)), (15, (28, 28)), (3, (14, 14))])
def test_toeplitz_streaming_bf16(k, hw, forward, weight_grad, channels_last, device, monkeypatch):
    """The streaming kernels (and the sweep's variants of them), compiled, in bf16: two image
    groups (batch 17), odd channels, with bias and GELU."""
    from kernels.dwconv import triton as kt

    monkeypatch.setattr(kt, "forward_tile", lambda x, k, role="forward": forward)
    monkeypatch.setattr(kt, "weight_grad_tile", lambda x, k: weight_grad)
    check(17, 19, *hw, k, torch.bfloat16, device, channels_last=channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_triton_gpu(compile_backend, device):
    _compile_check(device, "triton", compile_backend)
    _compile_check(device, "triton", compile_backend, channels_last=True)


@pytest.mark.gpu
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_streaming_reload_weight_grad_under_compile_gpu(compile_backend, device, monkeypatch):
    """The re-reading weight gradient's launcher reads the diagonals of its products through a
    strided view of an intermediate: traced inside the library op by torch.compile, the same
    gradients as eager."""
    from kernels.dwconv import triton as kt

    monkeypatch.setattr(kt, "weight_grad_tile", lambda x, k: RELOAD)
    _compile_check(device, "triton", compile_backend)


# ----------------------------------------------------------------------------- GPU: bf16 and the benchmark shapes

@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("k,hw", [(3, (8, 8)), (5, (7, 7)), (7, (14, 14)), (9, (32, 32)), (9, (9, 13)),
                                  (15, (28, 28))])
def test_bf16(k, hw, channels_last, device):
    check(4, 33, *hw, k, torch.bfloat16, device, channels_last=channels_last)
    check(4, 33, *hw, k, torch.bfloat16, device, channels_last=channels_last, bias=False, activation=None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", bench.SHAPES, ids=lambda s: "B{}_C{}_{}x{}_k{}".format(*s))
def test_benchmark_shapes(shape, dtype, device):
    B, C, H, W, k = shape
    check(B, C, H, W, k, dtype, device, channels_last=(dtype == torch.bfloat16))


# ----------------------------------------------------------------------------- benchmark contract

def test_bench_cases_smoke():
    tiny = (2, 3, 6, 6, 3)
    cases = bench.cases(torch.float32, "cpu", shapes=[tiny])
    assert len(cases) == 1
    case = cases[0]
    assert case.flops_fwd > 0 and case.bytes_fwd > 0 and case.flops_fwd_bwd > case.flops_fwd
    assert case.anchor in {c.name for c in case.candidates}
    for cand in case.candidates:
        cand.forward()
        cand.forward_backward()
