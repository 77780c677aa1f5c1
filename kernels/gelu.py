"""Exact (erf) GELU and its derivative as @triton.jit helpers, for every kernel that fuses it."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gelu(a):
    # a * Phi(a); 0.70710678 = 1/sqrt(2)
    return 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))


@triton.jit
def gelu_grad(a):
    # d/da a * Phi(a) = Phi(a) + a * phi(a); 0.39894228 = 1/sqrt(2 pi)
    cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
    return cdf + a * tl.exp(-0.5 * a * a) * 0.3989422804014327
