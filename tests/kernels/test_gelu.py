"""The kernels' exact GELU and its derivative (kernels/gelu.py) against fp64, next to PyTorch's fp32.

Interpreter mode on the CPU runs the same arithmetic in NumPy fp32 (no fused multiply-adds,
an exact exp2): the GPU differs by rounding only, which the gpu test below covers.
"""
import math

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from kernels.gelu import G_COEFFICIENTS, fit_tail_polynomial, gelu, gelu_grad  # noqa: E402


@triton.jit
def _apply(X, Y, DY, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0.0)
    tl.store(Y + offs, gelu(x), mask=offs < n)
    tl.store(DY + offs, gelu_grad(x), mask=offs < n)


def _ours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y, dy = torch.empty_like(x), torch.empty_like(x)
    block = 4096
    _apply[(triton.cdiv(x.numel(), block),)](x, y, dy, x.numel(), BLOCK=block)
    return y, dy


def _exact(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    xs = x.double().cpu().numpy()
    cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in xs])
    pdf = np.exp(-0.5 * xs * xs) / math.sqrt(2 * math.pi)
    return xs * cdf, cdf + xs * pdf


def _points(device) -> torch.Tensor:
    grid = torch.linspace(-12, 12, 48001)
    gen = torch.Generator().manual_seed(0)
    return torch.cat([grid, 3 * torch.randn(16000, generator=gen), torch.tensor([0.0, -0.0, 1e-30, -1e-30])]).to(device)


def _errors(x: torch.Tensor, ours: torch.Tensor, exact: np.ndarray, floor: float = 0.0):
    """(abs error, error in ulps of the exact value, or of `floor` where that is larger) per point."""
    err = np.abs(ours.double().cpu().numpy() - exact)
    ulp = np.spacing(np.maximum(np.abs(exact), floor).astype(np.float32)).astype(np.float64)
    return err, err / ulp


def _check(x, y, dy):
    exact_y, exact_dy = _exact(x)
    xs = x.cpu().numpy()
    # PyTorch's own fp32 GELU and its backward, the yardstick of the kernels' tolerance rule
    xt = x.cpu().clone().requires_grad_()
    torch_y = torch.nn.functional.gelu(xt)
    (torch_dy,) = torch.autograd.grad(torch_y.sum(), xt)
    # gelu' crosses zero at -0.75: its ulps counted at least as those of 1/8
    for ours, theirs, exact, floor, name in ((y, torch_y.detach(), exact_y, 0.0, "gelu"),
                                             (dy, torch_dy, exact_dy, 0.125, "gelu'")):
        assert torch.isfinite(ours).all(), name
        err, ulps = _errors(x, ours, exact, floor)
        torch_err, torch_ulps = _errors(x, theirs, exact, floor)
        # from -1 up: a few ulps (here 3.0 and 4.8; PyTorch's 8.1 and 11.8)
        above = xs > -1
        assert ulps[above].max() <= 6, (name, float(ulps[above].max()), float(xs[above][ulps[above].argmax()]))
        assert ulps[above].max() <= torch_ulps[above].max(), name
        # the tail: small absolute errors (PyTorch's 1 + erf(a / sqrt(2)) cancels: ~2e-7 there)
        assert err[~above].max() <= 1e-7, (name, float(err[~above].max()))
        # and nowhere much worse than PyTorch's own fp32 error
        assert err.max() <= torch_err.max() * 1.25 + 1e-9, (name, float(err.max()), float(torch_err.max()))


def test_gelu_and_its_derivative_match_fp64(device):
    x = _points(device)
    y, dy = _ours(x)
    _check(x, y, dy)
    # odd cases: signed zeros give zero, NaN stays NaN
    y0, dy0 = _ours(torch.tensor([0.0, -0.0, float("nan")], device=device))
    assert y0[:2].tolist() == [0.0, 0.0] and dy0[:2].tolist() == [0.5, 0.5]
    assert math.isnan(y0[2].item()) and math.isnan(dy0[2].item())


def test_tail_polynomial_is_the_documented_fit():
    """The shipped coefficients are what `fit_tail_polynomial` computes (so the fit can be
    redone, e.g. for another range), and they are fp32 numbers."""
    assert tuple(fit_tail_polynomial()) == G_COEFFICIENTS
    assert all(float(np.float32(c)) == c for c in G_COEFFICIENTS)


@pytest.mark.gpu
def test_gpu_gelu_and_its_derivative_match_fp64():
    """On the GPU: fused multiply-adds and the hardware exp2 (ex2.approx) round differently."""
    x = _points("cuda")
    y, dy = _ours(x)
    _check(x, y, dy)
