"""Backend choice for the public ops: "auto" | "triton" | "reference".

Every op states, for a given input, the reasons its Triton kernel cannot take
it (`triton_reasons`). "auto" picks Triton only for CUDA tensors with no
reasons; an explicit "triton" that cannot run raises with every reason, so a
user who asked for the fast path never silently gets the slow one.
"""
from __future__ import annotations

import os

import torch
from torch.library import wrap_triton as _torch_wrap_triton  # imports Triton only when called

BACKENDS = ("auto", "triton", "reference")


class BackendUnavailable(RuntimeError):
    """Raised when backend="triton" is requested for an input it cannot take."""

    def __init__(self, op: str, reasons: list[str]):
        self.op = op
        self.reasons = list(reasons)
        lines = "\n".join(f"  - {r}" for r in self.reasons)
        super().__init__(
            f"{op}: the Triton backend cannot run this input:\n{lines}\n"
            f'Use backend="auto" or "reference" to fall back to the PyTorch path.'
        )


def interpreter_mode() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_IMPORT_ERROR: list = []  # filled on first use; a plain list so torch.compile traces the lookup quietly


def triton_import_error() -> str | None:
    """None when `import triton` works, else why not (imported lazily, once)."""
    if not _IMPORT_ERROR:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _IMPORT_ERROR.append(None)
        except Exception as exc:  # ImportError, or a broken install
            _IMPORT_ERROR.append(f"triton is not importable ({type(exc).__name__}: {exc})")
    return _IMPORT_ERROR[0]


def device_reasons(device: torch.device | str) -> list[str]:
    """Why a Triton kernel cannot run on this device (empty when it can)."""
    device = torch.device(device)
    if device.type == "cuda" or (device.type == "cpu" and interpreter_mode()):
        return []
    return [f"tensors are on {device.type}; Triton kernels need CUDA (or TRITON_INTERPRET=1 on CPU)"]


def dtype_reasons(dtype: torch.dtype) -> list[str]:
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return []
    return [f"dtype {dtype} is not supported (float32, float16, bfloat16 are)"]


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)   # Parameter opts out of __torch_function__


def plain_eager(*tensors) -> bool:
    """True when an op may call its Triton launchers directly under a plain autograd.Function.

    That skips the torch.library layer, whose dispatch cost the host ~100 µs per
    forward+backward of token_mlp or dwconv2d (`python -m kernels.host_cost`, development CPU).
    The library op stays in charge whenever something must see it as an operator:
    torch.compile / export tracing, fake or other tensor subclasses, a dispatch mode (e.g.
    FlopCounterMode), a functorch transform (vmap, grad). A module's nn.Parameter weights are
    plain tensors here (its exact type, not subclasses that wrap other tensors).
    """
    return (not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()
            and torch._C._len_torch_dispatch_stack() == 0
            and all(t is None or type(t) in _PLAIN_TYPES for t in tensors))


def wrap_triton(kernel):
    """`torch.library.wrap_triton(kernel)`, which lets torch.compile trace a launch inside a
    triton_op, except that an interpreted kernel (TRITON_INTERPRET=1) comes back as it is:
    nothing can trace an interpreted launch, and PyTorch 2.11 and earlier refuse to wrap one
    (2.14 passes it through the same way)."""
    if type(kernel).__name__ == "InterpretedFunction":
        return kernel
    return _torch_wrap_triton(kernel)


def direct_launch():
    """Context in which `wrap_triton(kernel)[grid](...)` launches the kernel directly instead of
    going through torch's higher-order-op dispatch (what torch.library.triton_op does for plain
    tensors; the HOP path costs far more on the host)."""
    from torch._library.triton import set_wrap_triton_enabled  # private, used by triton_op itself

    return set_wrap_triton_enabled(False)


def launch_options(cfg: dict) -> dict:
    """The launch options of a configuration beyond num_warps / num_stages that a launch may take:
    "maxnreg" (a cap on registers a thread, so that more programs fit an SM), on direct launches
    only. torch's traced launch path (torch.compile through torch.library.triton_op) knows only
    num_warps, num_stages and a few others and would pass maxnreg to the kernel as an argument;
    there the cap is dropped (same results, the compiler's own register count)."""
    if "maxnreg" not in cfg:
        return {}
    from torch._library.triton import is_wrap_triton_enabled   # private, as direct_launch's setter

    return {} if is_wrap_triton_enabled() and not interpreter_mode() else {"maxnreg": cfg["maxnreg"]}


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")


def select(op: str, backend: str, device: torch.device | str, reasons: list[str]) -> str:
    """Return "triton" or "reference" for one call.

    `reasons` are the op's own shape/dtype reasons; import and device reasons
    are added here. "auto" never picks the interpreter: on CPU it is far slower
    than the reference and is only meant for testing the kernels.
    """
    check_backend(backend)
    if backend == "reference":
        return "reference"
    all_reasons = list(reasons) + device_reasons(device)
    err = triton_import_error()
    if err:
        all_reasons.append(err)
    if backend == "triton":
        if all_reasons:
            raise BackendUnavailable(op, all_reasons)
        return "triton"
    return "triton" if (torch.device(device).type == "cuda" and not all_reasons) else "reference"


def explain(op: str, backend: str, device: torch.device | str, reasons: list[str]) -> tuple[str, list[str]]:
    """Like `select` but never raises: (choice, reasons the Triton path was not taken)."""
    check_backend(backend)
    if backend == "reference":
        return "reference", ["reference backend requested"]
    all_reasons = list(reasons) + device_reasons(device)
    err = triton_import_error()
    if err:
        all_reasons.append(err)
    if torch.device(device).type != "cuda" and backend == "auto" and not all_reasons:
        all_reasons.append("auto uses Triton only on CUDA")
    return ("reference", all_reasons) if all_reasons else ("triton", [])
