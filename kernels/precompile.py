"""Compile, ahead of a GPU run and without a GPU, the Triton kernels that run will launch, into a
Triton cache directory the run can start from.

    python -m kernels.precompile [--cache DIR] [--limit N] [--first]
                                 [--op attention|token_mlp|dwconv2d|batch_norm ...]

Why: on the GPU, every sweep configuration and every first launch compiles its kernel first
(1-3 s each with ptxas, one after the other), which is a large part of a short GPU call. Triton
looks compiled kernels up in its cache (`TRITON_CACHE_DIR`) by a hash of the kernel's source,
its specialization, the compile options, the target and the Triton build, and nothing that
depends on the machine: a kernel compiled here for sm_90 by the *same Triton build* (same
version, same Python: the wheel's compiled library is part of the hash) is found there and not
compiled again. The cache also names its files by absolute path, so it must sit at the same
path on both machines: DIR (default /tmp/composer-triton-cache), which `.ci/gpu` restores from
`.device/triton-cache`.

What is compiled: each op's launches at its benchmark shapes (the defaults, with the shipped
`kernels/tuned.json` entries for sm_<arch> in force, as on that card), the first `--limit` sweep
configurations of every sweep case (as `composer bench kernels --sweep --limit`), and the
ConvMixer training shapes of `specs/convmixer_cifar.yaml` (batch 512). The launches are recorded
on CPU tensors (their addresses are as aligned as CUDA's, so the specialization is the GPU's),
never run. Only the binary and its metadata are kept (the IR text is most of a cache's size).
A hash of the Triton build goes to DIR/triton_build.txt: `.ci/gpu` compares it with the GPU
machine's and says whether the cache can be used.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import torch

DEFAULT_CACHE = "/tmp/composer-triton-cache"
OPS = ("attention", "token_mlp", "dwconv2d", "batch_norm")
BENCH_MODULES = {"attention": "kernels.attention.bench", "token_mlp": "kernels.token_mlp.bench",
                 "dwconv2d": "kernels.dwconv.bench", "batch_norm": "kernels.batch_norm.bench"}
# convmixer_cifar's training step (batch 512, dim 256, 32x32, kernel 9): its depthwise and
# BatchNorm launches (batch size is not part of a kernel's specialization when it stays a
# multiple of 16, but the launch configuration can depend on it)
TRAINING_SHAPES = {"dwconv2d": [(512, 256, 32, 32, 9)], "batch_norm": [(512, 256, 32, 32)]}
_KEEP = (".json", ".cubin")   # what a cache hit reads: the metadata and the binary


def build_hash() -> str:
    """A short hash of the installed Triton build, as its cache keys see it."""
    from triton.runtime.cache import triton_key

    return hashlib.sha256(triton_key().encode()).hexdigest()[:16]


def _kernel_modules() -> list:
    """Every loaded module of this package that launches kernels through `wrap_triton`."""
    return [m for name, m in list(sys.modules.items())
            if name.startswith("kernels.") and m is not None and hasattr(m, "wrap_triton")]


def _sweep_launches(op: str, dtype: torch.dtype, limit: int | None, shapes: list) -> list:
    """The launches of the default and first `limit` configurations of each sweep case of `op` at
    `shapes`."""
    import importlib

    from kernels.compile_report import _record

    module = importlib.import_module(BENCH_MODULES[op])
    modules = _kernel_modules()
    cases: list = []
    # building the cases may launch kernels too (a reference output for the checks)
    launches = _record(op, lambda: cases.extend(module.sweep_cases(dtype, "cpu", shapes=shapes)), modules)
    for case in cases:
        for cfg in [case.default] + [c for c in case.configs if c != case.default][:limit]:
            try:
                launches += _record(f"{op} {case.shape} {cfg}", lambda: case.run(cfg), modules)
            except Exception as exc:   # a configuration the launcher refuses is not compiled
                print(f"  skipped {op} {case.shape} {cfg}: {type(exc).__name__}: {exc}"[:200])
    return launches


def _compile(launch, arch: int) -> float:
    """Seconds to compile one launch (next to nothing when the cache has it)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from kernels.compile_report import _specialized_source

    start = time.perf_counter()
    target = GPUTarget("cuda", arch, 32)
    source, options = _specialized_source(launch, target)
    triton.compile(source, target=target, options=options)
    return time.perf_counter() - start


def _unique(launches: list, arch: int) -> list:
    """One launch for each distinct compiled kernel (same source, specialization and options)."""
    from triton.backends.compiler import GPUTarget

    from kernels.compile_report import _specialized_source

    target = GPUTarget("cuda", arch, 32)
    seen, out = set(), []
    for launch in launches:
        try:
            source, options = _specialized_source(launch, target)
        except Exception as exc:
            print(f"  cannot specialize {launch.label}: {type(exc).__name__}: {exc}"[:200])
            continue
        key = (source.hash(), tuple(sorted((k, str(v)) for k, v in options.items())))
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


def _strip(cache: str) -> int:
    """Delete all but the metadata and binaries; returns the bytes left."""
    total = 0
    for root, _, files in os.walk(cache):
        for name in files:
            path = os.path.join(root, name)
            if name.startswith("__grp__") or name.endswith(_KEEP) or name == "triton_build.txt":
                total += os.path.getsize(path)
            else:
                os.remove(path)
    return total


def _binaries(cache: str) -> int:
    return sum(1 for _, _, files in os.walk(cache) for name in files if name.endswith(".cubin"))


def run(cache: str = DEFAULT_CACHE, ops=OPS, limit: int | None = 4, arch: int = 90,
        dtype: torch.dtype = torch.bfloat16, first: bool = False, echo=print) -> int:
    """Compile every launch described above (`first`: at each op's first benchmark shape only)
    into `cache`; returns how many kernels it holds."""
    os.environ["TRITON_CACHE_DIR"] = os.path.abspath(cache)   # read by Triton at each compile
    from kernels import compile_report, dispatch, tuning

    if dispatch.interpreter_mode():
        raise RuntimeError("precompiling needs the compiler, not the interpreter: unset TRITON_INTERPRET")
    # the launchers look their configurations up for this card (kernels/tuned.json), as on the GPU
    cpu_arch = tuning.arch
    tuning.arch = lambda device: f"sm{arch}"
    launches = []
    try:
        # recorded as the GPU makes them: direct launches (their launch options, e.g. maxnreg)
        with dispatch.direct_launch():
            for op in ops:
                shapes = compile_report.benchmark_shapes(op)
                shapes = shapes[:1] if first else shapes + TRAINING_SHAPES.get(op, [])
                launches += compile_report.LAUNCHES[op](dtype, shapes)
                launches += _sweep_launches(op, dtype, limit, shapes)
    finally:
        tuning.arch = cpu_arch
    unique = _unique(launches, arch)
    echo(f"{len(launches)} launches, {len(unique)} distinct kernels to compile for sm_{arch} "
         f"(Triton build {build_hash()})")
    os.makedirs(cache, exist_ok=True)
    start, failed, before = time.perf_counter(), 0, _binaries(cache)
    for i, launch in enumerate(unique, 1):
        try:
            seconds = _compile(launch, arch)
        except Exception as exc:   # one kernel that cannot compile must not stop the others
            failed += 1
            echo(f"  [{i}/{len(unique)}] FAILED {launch.label} {launch.kernel.__name__}: "
                 f"{type(exc).__name__}: {str(exc).strip()[-160:]}")
            continue
        if seconds > 0.5 or i % 25 == 0:
            echo(f"  [{i}/{len(unique)}] {seconds:5.1f} s  {launch.label}  {launch.kernel.__name__}")
    with open(os.path.join(cache, "triton_build.txt"), "w") as f:
        f.write(build_hash() + "\n")
    size = _strip(cache)
    kernels = _binaries(cache)
    added = kernels - before
    echo(f"compiled {added}, found {len(unique) - failed - added} in the cache, {failed} failed "
         f"({time.perf_counter() - start:.0f} s); {cache} holds {kernels} kernels ({size / 2**20:.1f} MiB)")
    return kernels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=DEFAULT_CACHE,
                        help=f"the Triton cache to fill; the GPU run must find it at the same path "
                             f"(default {DEFAULT_CACHE})")
    parser.add_argument("--limit", type=int, default=4,
                        help="sweep configurations of each case besides the default (default 4, as .ci/gpu)")
    parser.add_argument("--op", action="append", choices=OPS, help="one op (repeatable; default: all)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability (default 90: H100, H200)")
    parser.add_argument("--first", action="store_true", help="each op's first benchmark shape only")
    args = parser.parse_args(argv)
    try:
        run(args.cache, args.op or OPS, args.limit, args.arch, first=args.first)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
