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
# pytest-xdist runs one test process per core (pyproject's addopts). Each takes its share of the
# cores for PyTorch's threads rather than as many threads as the machine has cores (2 cores, 2
# processes: a subset of test_train 36 s -> 24 s); processes a test starts inherit the setting.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _speed_up_the_interpreter() -> None:
    """Two repeated computations of Triton's CPU interpreter done once, with the same results.

    Triton's CPU interpreter patches triton.language (every builtin of the
    language modules a function sees, found with inspect.getmembers) when a kernel launch starts,
    and again at every call of a @triton.jit helper inside it (ours, and tl.max, tl.sum ... of
    triton.language.standard). A helper's patches are never undone before the launch ends, so
    within one launch only the first patch for a given set of language modules does anything; the
    repeats were a third of the kernel tests' time (cProfile, test_attention's N 257 case: 2,047
    patches, 3.7 s of 11.3 s). Here each set is patched once a launch, exactly as before, and the
    repeats are skipped. Only where the interpreter has the shape this was measured on (Triton 3.8).
    With the table of NumPy dtypes below: a subset of the kernel tests 109.5 s -> 63.8 s."""
    import inspect

    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    needed = ("GridExecutor", "InterpretedFunction", "_patch_lang", "InterpreterError", "_get_np_dtype")
    if not all(hasattr(interpreter, name) for name in needed) or not hasattr(interpreter.InterpretedFunction, "rewrite"):
        return
    launch, device_function = interpreter.GridExecutor, interpreter.InterpretedFunction
    patched: set[frozenset] = set()   # the language-module sets patched in the current launch
    langs_of: dict[object, frozenset] = {}   # a helper's language modules (its globals never change them)
    run_launch = launch.__call__

    def start_launch(self, *args, **kwargs):
        patched.clear()
        return run_launch(self, *args, **kwargs)

    def call(self, *args, **kwargs):   # InterpretedFunction.__call__, patching as it did the first time only
        langs = langs_of.get(self.fn)
        if langs is None:
            langs = langs_of[self.fn] = frozenset(id(v) for v in self.fn.__globals__.values()
                                                  if inspect.ismodule(v) and v in (tl, tl.core))
        if langs not in patched:
            interpreter._patch_lang(self.fn)
            patched.add(langs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise interpreter.InterpreterError(repr(exc)) from exc

    launch.__call__, device_function.__call__ = start_launch, call

    # _get_np_dtype builds its table of 17 NumPy dtypes on every call (53,000 calls, 2 s of a 35 s
    # dwconv test); it depends on its argument alone, so each scalar type's answer is kept. A
    # block's answer is its element type's; pointers it answers first, before building the table
    # (block and pointer types cannot be dictionary keys).
    original_np_dtype, known = interpreter._get_np_dtype, {}

    def np_dtype(tt):
        tt = tt.element_ty if isinstance(tt, tl.block_type) else tt
        if isinstance(tt, tl.pointer_type):
            return original_np_dtype(tt)
        if tt not in known:
            known[tt] = original_np_dtype(tt)
        return known[tt]

    interpreter._get_np_dtype = np_dtype


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
        _speed_up_the_interpreter()


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
