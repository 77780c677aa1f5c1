"""Exact (erf) GELU and its derivative as @triton.jit helpers, for every kernel that fuses it.

GELU(a) = a * Phi(a), Phi the standard normal CDF. Both helpers form Phi from the tail
    h(a) = Phi(-|a|) = erfc(t) / 2,   t = |a| / sqrt(2),
as h = 2 ** (t * G(t) - 1), G a degree-11 polynomial fitted to log2(erfc(t)) / t on [0, 5]
(weighted least squares at Chebyshev nodes; `fit_tail_polynomial` below reproduces the
coefficients). Then Phi(a) = 1 - h for a >= 0 and h for a < 0.

Why not `erf` from libdevice: it picks its polynomial's coefficients per element between two
branches, and with the 16-32 elements a thread holds in these kernels that selection costs
more instructions than the polynomial itself (sm_90: ~34 instructions an element for GELU
against ~19 here), enough to make the BatchNorm passes that apply GELU compute-bound.

Accuracy (fp32 against fp64, `tests/kernels/test_gelu.py`, interpreter): GELU within 3.0 ulp
for a > -1 and 5.4e-8 absolute below; its derivative within 4.8 ulp (of 1/8 where it is
smaller: it crosses zero at a = -0.75) and 5.8e-8. PyTorch's own fp32 GELU: 8.1 ulp, 11.8 ulp,
and 2.6e-7 / 1.5e-7 below -1, where its 1 + erf(a / sqrt(2)) loses most of its digits.
Beyond |a| = 5 sqrt(2) the tail is that of t = 5 (h = 7.7e-12): below the resolution of Phi
near 1, and x * h < 1e-10 * |x|.
"""
from __future__ import annotations

import triton
import triton.language as tl

# G(t) = c0 + c1 t + ... + c11 t^11 ~ log2(erfc(t)) / t on [0, 5]; fp32 values
G_COEFFICIENTS = (-1.6279088258743286, -0.9184250831604004, -0.14836512506008148, 0.027772054076194763,
                  0.00017557422688696533, -0.00251532020047307, 0.0010824826313182712, -0.00027328822761774063,
                  4.5545246393885463e-05, -4.931067905999953e-06, 3.151338034967921e-07, -9.031004388759811e-09)
(_G0, _G1, _G2, _G3, _G4, _G5, _G6, _G7, _G8, _G9, _G10, _G11) = (tl.constexpr(c) for c in G_COEFFICIENTS)
TAIL_T_MAX = 5.0   # the end of the fitted range: t is clamped there
_T_MAX = tl.constexpr(TAIL_T_MAX)


@triton.jit
def _normal_cdf(a):
    # Phi(a) from h = Phi(-|a|) = 2 ** (t * G(t) - 1), t = |a| / sqrt(2) clamped to [0, 5];
    # in fp32 whatever a's dtype (the polynomial needs it)
    a = a.to(tl.float32)
    t = tl.minimum(tl.abs(a) * 0.7071067811865476, _T_MAX)
    g = _G11 * t + _G10
    g = g * t + _G9
    g = g * t + _G8
    g = g * t + _G7
    g = g * t + _G6
    g = g * t + _G5
    g = g * t + _G4
    g = g * t + _G3
    g = g * t + _G2
    g = g * t + _G1
    g = g * t + _G0
    h = tl.exp2(t * g - 1.0)
    return tl.where(a >= 0, 1.0 - h, h)


@triton.jit
def gelu(a):
    return a.to(tl.float32) * _normal_cdf(a)


@triton.jit
def gelu_grad(a):
    # d/da a * Phi(a) = Phi(a) + a * phi(a), phi(a) = exp(-a^2 / 2) / sqrt(2 pi)
    #                                              = 2 ** (-a^2 log2(e) / 2 - log2(sqrt(2 pi)))
    a = a.to(tl.float32)
    pdf = tl.exp2(a * a * -0.7213475204444817 - 1.3257480647361593)
    return _normal_cdf(a) + a * pdf


def fit_tail_polynomial(degree: int = 11, t_max: float = TAIL_T_MAX, nodes: int = 6000) -> list[float]:
    """G_COEFFICIENTS (c0..c<degree>), refitted: weighted least squares of
    log2(erfc(t)) / t at Chebyshev nodes on (0, t_max], weights t (the error that matters is
    that of t * G(t)), rounded to fp32."""
    import math

    import numpy as np
    from numpy.polynomial import chebyshev, polynomial

    u = np.cos(np.pi * (np.arange(nodes) + 0.5) / nodes)     # [-1, 1]
    t = (u + 1) * t_max / 2
    keep = t > 1e-6
    t, u = t[keep], u[keep]
    g = np.array([math.log2(math.erfc(v)) / v for v in t])
    in_u = chebyshev.cheb2poly(chebyshev.chebfit(u, g, degree, w=t))
    in_t = polynomial.Polynomial(in_u)(polynomial.Polynomial([-1.0, 2 / t_max])).coef
    return [float(np.float32(c)) for c in in_t]
