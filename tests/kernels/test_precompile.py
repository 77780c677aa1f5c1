"""`python -m kernels.precompile`: kernels compiled for sm_90 without a GPU into a Triton cache that
a GPU run starting from it finds instead of compiling them again."""
import os
import re
import subprocess
import sys

from tests.helpers import ROOT


def _precompile(*args, interpret="0"):
    env = {**os.environ, "TRITON_INTERPRET": interpret}
    return subprocess.run([sys.executable, "-m", "kernels.precompile", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_fills_a_cache_that_a_second_run_finds_everything_in(tmp_path):
    cache = str(tmp_path / "cache")
    args = ("--cache", cache, "--op", "attention", "--first", "--limit", "0")
    first = _precompile(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    compiled = re.search(r"compiled (\d+), found (\d+) in the cache, 0 failed", first.stdout)
    # the forward, the delta and main backward kernels, the WHOLE_HEAD candidate's backward
    assert compiled and int(compiled.group(1)) >= 4 and compiled.group(2) == "0", first.stdout
    files = [name for _, _, names in os.walk(cache) for name in names]
    # only what a cache hit reads stays: metadata, binaries, the group files naming them
    assert sum(name.endswith(".cubin") for name in files) == int(compiled.group(1))
    assert all(name.endswith((".json", ".cubin")) or name == "triton_build.txt" for name in files), files
    with open(os.path.join(cache, "triton_build.txt")) as f:
        assert re.fullmatch(r"[0-9a-f]{16}\n", f.read())
    # Triton's own lookup finds every kernel in the stripped cache: nothing is compiled again
    second = _precompile(*args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"compiled 0, found {compiled.group(1)} in the cache" in second.stdout, second.stdout


def test_refuses_the_interpreter(tmp_path):
    result = _precompile("--cache", str(tmp_path), "--op", "attention", "--first", interpret="1")
    assert result.returncode == 2 and "unset TRITON_INTERPRET" in result.stderr
    assert "Traceback" not in result.stderr
