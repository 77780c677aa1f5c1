"""Test-wide setup.

Without CUDA, Triton kernels run in interpreter mode on the CPU. The variable
must be set before any module decorates a function with @triton.jit, which is
why it is set here, before the test modules are imported.
"""
import os
import tempfile

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Saved launch configurations (kernels.tuning): never the user's own file. A run that wants
# to test a particular file (a GPU run testing what its sweep saved) sets COMPOSER_TUNED.
os.environ.setdefault("COMPOSER_TUNED", os.path.join(tempfile.gettempdir(), f"composer-tests-{os.getpid()}",
                                                     "tuned.json"))


def _interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run our kernels here (None when it can).

    Triton 3.6 and earlier turn a loop bound into a Python int with `int(array)`, which
    NumPy 2.4 refuses for 1-element arrays: every kernel with a runtime loop would fail
    with an opaque TypeError. One tiny kernel with such a loop finds out up front.
    """
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None  # the kernel tests say why they cannot run, one by one

    @triton.jit
    def _double(X, Y, n, BLOCK: tl.constexpr):
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * 2, mask=offs < n)

    x = torch.arange(5.0)
    y = torch.zeros_like(x)
    try:
        _double[(1,)](x, y, 5, BLOCK=4)
    except Exception as exc:
        import numpy

        return (f"Triton {triton.__version__}'s CPU interpreter cannot run a tiny kernel "
                f"({type(exc).__name__}: {exc}). Triton 3.6 and earlier fail this way with NumPy 2.4 "
                f"(NumPy {numpy.__version__} is installed): install 'numpy<2.4' or a newer Triton, then rerun.")
    if not torch.equal(y, x * 2):
        return f"Triton {triton.__version__}'s CPU interpreter computed a wrong result on a tiny kernel."
    return None


def pytest_sessionstart(session):
    # only where the kernel tests will use the interpreter (TRITON_INTERPRET=0 turns it off)
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        problem = _interpreter_problem()
        if problem:
            pytest.exit(problem, returncode=4)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: the GPU when there is one, else the CPU interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
