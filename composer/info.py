"""`composer info`: what this machine gives composer, for a bug report or a first check.

Versions, the accelerator, whether the fused Triton kernels can run here (and why not), and
where composer keeps its caches and tuned kernel configurations.
"""
from __future__ import annotations

import os
import platform
import sys
from importlib import metadata


def machine_info() -> dict:
    import torch

    from composer.data import cache_root
    from kernels import tuning
    from kernels.dispatch import device_reasons, interpreter_mode, triton_import_error

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    devices = []
    for i in range(torch.cuda.device_count() if cuda else 0):
        props = torch.cuda.get_device_properties(i)
        devices.append({"name": props.name, "capability": f"{props.major}.{props.minor}",
                        "memory_gib": round(props.total_memory / 2**30, 1), "bf16": torch.cuda.is_bf16_supported()})
    triton_error = triton_import_error()
    device = "cuda" if cuda else "cpu"
    reasons = ([triton_error] if triton_error else []) + device_reasons(device)
    return {
        "composer": version("mixer-composer"), "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "triton": version("triton"),
        "torchvision": version("torchvision"), "pydantic": version("pydantic"), "onnx": version("onnx"),
        "cuda_devices": devices, "cpu_threads": torch.get_num_threads(),
        "kernels": {"backend": "triton" if not reasons else "reference", "interpreter": interpreter_mode(),
                    "reasons": reasons},
        "cache_dir": str(cache_root()),
        "tuned": {"user": tuning.user_path(), "user_exists": os.path.exists(tuning.user_path()),
                  "shipped": tuning.SHIPPED},
        "executable": sys.executable,
    }


def render(info: dict) -> str:
    k = info["kernels"]
    lines = [
        f"composer {info['composer']}   python {info['python']}   {info['platform']}",
        f"torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'})   triton {info['triton'] or 'not installed'}   "
        f"torchvision {info['torchvision']}   pydantic {info['pydantic']}   onnx {info['onnx'] or 'not installed'}",
    ]
    if info["cuda_devices"]:
        for i, d in enumerate(info["cuda_devices"]):
            lines.append(f"cuda:{i}  {d['name']}  sm_{d['capability'].replace('.', '')}  {d['memory_gib']} GiB"
                         + ("" if d["bf16"] else "  (no bf16)"))
    else:
        lines.append(f"no CUDA device: training runs on the CPU ({info['cpu_threads']} threads)")
    if k["backend"] == "triton":
        lines.append("fused kernels: Triton" + (" in interpreter mode (TRITON_INTERPRET=1: correct, slow)"
                                               if k["interpreter"] else ""))
    else:
        lines.append("fused kernels: PyTorch reference path (" + "; ".join(k["reasons"]) + ")")
    lines.append(f"data cache: {info['cache_dir']}")
    tuned = info["tuned"]
    lines.append(f"tuned kernel configurations: {tuned['user']} ("
                 + ("present" if tuned["user_exists"] else "none yet: composer bench kernels --sweep --save")
                 + f"), then {tuned['shipped']}")
    return "\n".join(lines)
