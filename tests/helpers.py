"""Small shared helpers for tests: running the CLI as a user would, recording kernel launches."""
import subprocess
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"


def run_cli(*args, env=None, real_process=False, timeout=600):
    """Run `composer ARGS`; returns an object with returncode, stdout, stderr.

    In-process through click's test runner by default (fast); in a real `python -m composer`
    subprocess when `env` is given or `real_process` is set. An exception that escapes the
    CLI shows up as a traceback in stderr, as it would for a user.
    """
    args = [str(a) for a in args]
    if env is not None or real_process:
        return subprocess.run([sys.executable, "-m", "composer", *args], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=timeout)
    from click.testing import CliRunner

    from composer.cli import main

    result = CliRunner().invoke(main, args)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(result.exception))
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=stderr)


def assert_user_error(result, *fragments, code=2):
    """A user mistake: the exit code, each fragment in stderr, and no Python traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in stderr:\n{result.stderr}"


def record_launches(monkeypatch, *modules) -> list:
    """Every Triton launch the given launcher modules make from now on, as (kernel name, launch
    keywords), each still launched: what a test checks a launcher passes (switches, options)."""
    launches = []
    for module in modules:
        def recording(kernel, real_wrap=module.wrap_triton):
            launcher = real_wrap(kernel)

            class Launch:
                def __getitem__(self, grid):
                    def launch(*args, **kwargs):
                        launches.append((getattr(kernel, "__name__", str(kernel)), kwargs))
                        return launcher[grid](*args, **kwargs)
                    return launch
            return Launch()
        monkeypatch.setattr(module, "wrap_triton", recording)
    return launches


def count_cpu_attention_flops() -> None:
    """Teach torch's flop counter the CPU attention op the reference path runs: it knows the CUDA
    SDPA variants only (same formula)."""
    from torch.utils import flop_counter

    cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if cpu_sdpa not in flop_counter.flop_registry:
        @flop_counter.register_flop_formula(cpu_sdpa)
        def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs):
            return flop_counter.sdpa_flop_count(query, key, value)
