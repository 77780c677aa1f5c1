"""`composer bench`: fused kernels against what a user would otherwise run, and training throughput.

Kernel timings are CUDA-event medians (triton.testing.do_bench) after warm-up, on
random data, every candidate in the same process. Each case also shows its floor:
bytes that must move / the card's copy bandwidth, or FLOPs / its dense bf16 matmul
rate, whichever is larger. Both ceilings are measured at the start of the same run
(a device-to-device copy and an 8192^3 bf16 matmul), so the floor fits the card.
"""
from __future__ import annotations

import collections
import importlib
import re
import statistics
import tempfile
import time

import torch

from composer.errors import UserError

OPS = ("attention", "token_mlp", "dwconv2d", "batch_norm")
BENCH_MODULES = {"attention": "kernels.attention.bench", "token_mlp": "kernels.token_mlp.bench",
                 "dwconv2d": "kernels.dwconv.bench", "batch_norm": "kernels.batch_norm.bench"}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MEMORY_BW = 3.0e12       # bytes/s, fallback: measured device-to-device copy on an H100 (2,962 GB/s)
DENSE_BF16 = 680e12      # FLOP/s, fallback: measured 8192^3 bf16 matmul on an H100 (lower end)
FP32_FMA = 67e12         # FLOP/s (a multiply-add = 2) of the CUDA cores, H100/H200 SXM datasheet


def measure_ceilings(device) -> tuple[float, float]:
    """(copy bytes/s counting read + write, bf16 matmul FLOP/s) of this card, on random data."""
    from kernels.benchmarking import time_us

    src = torch.randn(256 * 2**20, device=device)          # 1 GiB of fp32, far larger than L2
    dst = torch.empty_like(src)
    copy_us = time_us(lambda: dst.copy_(src), device)
    del src, dst
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    mm_us = time_us(lambda: a @ b, device)
    return 2 * 4 * 256 * 2**20 / (copy_us * 1e-6), 2 * 8192**3 / (mm_us * 1e-6)


def _time(fn, device, cuda_graph: bool = False) -> float | str:
    from kernels.benchmarking import time_us

    try:
        return time_us(fn, device, cuda_graph)
    except Exception as exc:  # one failing candidate must not hide the others' numbers...
        if _context_lost(exc):
            raise             # ...unless nothing can run after it (see CudaContextLost)
        return _error(exc)


def _error(exc: Exception) -> str:
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def _each_op_and_dtype(op: str, dtype: str, shapes: dict | None = None):
    """(op name, dtype name, its bench module) for every op and dtype asked for (with `shapes`,
    only the ops it names)."""
    for name in (OPS if op == "all" else (op,)):
        if shapes is not None and name not in shapes:
            continue
        module = importlib.import_module(BENCH_MODULES[name])
        for dname in (DTYPES if dtype == "all" else (dtype,)):
            yield name, dname, module


def _shapes_of(shapes, name: str) -> dict:
    return {"shapes": shapes[name]} if shapes else {}


def spec_shapes(spec, batch_size: int | None = None) -> dict[str, list[tuple]]:
    """The fused ops' input shapes in the model a spec builds, at its training batch size (or
    `batch_size`), in the form `bench_kernels` / `sweep_kernels` take: attention (B, H, N, D),
    token_mlp (B, N, C, Hd), dwconv2d (B, C, H, W, k); each distinct shape once."""
    from composer.blocks.windows import window_shapes
    from composer.build import build_model

    batch = batch_size or spec.train.batch_size
    with torch.device("meta"):   # shapes only
        model = build_model(spec, backend="reference")
    shapes: dict[str, list[tuple]] = {}
    for layer in model.layers:
        op = getattr(layer.module, "kernel_op", None)
        if not op:
            continue
        dims, ctx = layer.module.kernel_dims(layer.ctx), layer.ctx
        if op == "attention":
            heads, windows = ctx.dim // dims["head_dim"], getattr(layer.module, "windows", None)
            # window attention: one call per window shape, its windows side by side in the batch
            calls = collections.Counter(window_shapes(*windows)) if windows else {(ctx.tokens, 1): 1}
            found = [(batch * count, heads, a * c, dims["head_dim"]) for (a, c), count in calls.items()]
        elif op == "token_mlp":
            found = [(batch, ctx.tokens, ctx.dim, dims["hidden"])]
        else:
            found = [(batch, ctx.dim, *ctx.grid, dims["kernel_size"])]
        for shape in found:
            if shape not in shapes.setdefault(op, []):
                shapes[op].append(shape)
    return shapes


def bench_kernels(op: str = "all", dtype: str = "all", echo=print, device: str | None = None, shapes=None,
                  cuda_graph: bool = False) -> list:
    """Print (and return) one row per (op, dtype, shape, candidate).

    The main columns time eager calls, as a training loop makes them. With `cuda_graph`,
    two more columns replay each call from a CUDA graph: GPU time alone, without the
    host-side cost of Python, dispatch and launches.
    """
    device = _bench_device(device, echo)
    memory_bw, dense = MEMORY_BW, DENSE_BF16
    if device == "cuda":
        memory_bw, dense = measure_ceilings(device)
        echo(f"measured ceilings: copy {memory_bw / 1e9:,.0f} GB/s, bf16 matmul {dense / 1e12:,.0f} TFLOP/s")
    rows = []
    for name, dname, module in _each_op_and_dtype(op, dtype, shapes):
        echo(f"\n== {name} {dname} ==")
        echo(f"{'shape':<24} {'candidate':<26} {'fwd us':>9} {'TFLOP/s':>8} {'GB/s':>7} {'x anchor':>8} "
             f"{'fwd+bwd us':>11} {'TFLOP/s':>8} {'GB/s':>7} {'x anchor':>8}"
             + (f" {'graph fwd':>10} {'graph f+b':>10}" if cuda_graph else ""))
        for case in module.cases(DTYPES[dname], device, **_shapes_of(shapes, name)):
            times, graph = {}, {}
            for c in case.candidates:
                try:
                    times[c.name] = (_time(c.forward, device),
                                     _time(c.forward_backward, device) if c.forward_backward else "n/a")
                    if cuda_graph:
                        graph[c.name] = (_time(c.forward, device, True),
                                         _time(c.forward_backward, device, True) if c.forward_backward else "n/a")
                except Exception as exc:   # only a lost CUDA context gets here (see _time)
                    raise CudaContextLost(f"{name} {case.shape}: candidate {c.name} broke the CUDA context "
                                          f"({_error(exc)}). Nothing else can run in this process; the "
                                          f"rows above were measured before it.") from exc
            anchor = times.get(case.anchor, ("n/a", "n/a"))
            rate = dense if case.compute == "matmul" else FP32_FMA
            floor_f = max(case.bytes_fwd / memory_bw, case.flops_fwd / rate) * 1e6
            floor_b = max(case.bytes_fwd_bwd / memory_bw, case.flops_fwd_bwd / rate) * 1e6
            for cand in case.candidates:
                f, b = times[cand.name]
                row = {"op": name, "dtype": dname, "shape": case.shape, "candidate": cand.name,
                       "fwd_us": f, "fwd_bwd_us": b, "anchor": case.anchor,
                       "floor_fwd_us": floor_f, "floor_fwd_bwd_us": floor_b}
                if cuda_graph:
                    row["graph_fwd_us"], row["graph_fwd_bwd_us"] = graph[cand.name]
                rows.append(row)
                echo(f"{case.shape:<24} {cand.name:<26} "
                     + _cells(f, case.flops_fwd, case.bytes_fwd, anchor[0]) + " "
                     + _cells(b, case.flops_fwd_bwd, case.bytes_fwd_bwd, anchor[1], wide=True)
                     + ("".join(f" {_us(t):>10}" for t in graph[cand.name]) if cuda_graph else ""))
            echo(f"{'':<24} {'(floor)':<26} {floor_f:9.1f} {'':>8} {'':>7} {'':>8} {floor_b:11.1f}")
    return rows


# how far a configuration's output may be from the default's (relative to the output's largest
# value) and still count as correct when saving: the same math summed in another order
SAVE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
# a saved configuration must beat the default by this fraction: less is timing noise
SAVE_MIN_GAIN = 0.03


def sweep_kernels(op: str = "all", dtype: str = "all", echo=print, device: str | None = None, shapes=None,
                  save: bool = False, save_path: str | None = None, limit: int | None = None,
                  only_case: str | None = None) -> list:
    """Time every launch configuration of each op's sweep cases (kernel alone, CUDA-graph replay)
    and check its output against the default's; print one row per configuration, then the
    case's best broken down by kernel (torch.profiler's device time per call on CUDA).

    With `save`, each case's fastest configuration that is correct and at least SAVE_MIN_GAIN
    faster than the default goes into the tuning file (kernels.tuning; `save_path` or the user's
    file), written whenever a new one is found, so a sweep cut short keeps what it found.
    With `limit`, each case times the default and its first `limit` candidates only (each op's
    sweep lists its never-timed candidates first). With `only_case`, only the cases whose name
    ends with it ("backward", "weight grad", ...); UserError when none does."""
    from kernels import tuning

    device = _bench_device(device, echo)
    rows = []
    names = []   # every case's, for the message when `only_case` matches none
    for name, dname, module in _each_op_and_dtype(op, dtype, shapes):
        for case in module.sweep_cases(DTYPES[dname], device, **_shapes_of(shapes, name)):
            names.append(f"{name} {case.shape}")
            if only_case and not case.shape.endswith(only_case):
                continue
            echo(f"\n== sweep {name} {dname} {case.shape} ==")
            run = _launching_directly(case.run)
            reference = _tensors(run(case.default))
            configs = [case.default] + [c for c in case.configs if c != case.default][:limit]
            case_rows = []
            saved = None   # the row last written to the tuning file
            for cfg in configs:
                try:
                    err = max(((o.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-12)).item()
                              for o, r in zip(_tensors(run(cfg)), reference))
                    t = _time(lambda cfg=cfg: run(cfg), device, cuda_graph=True)
                except Exception as exc:  # a configuration that cannot launch must not stop the sweep
                    err, t = None, _error(exc)
                    if _context_lost(exc):
                        # ... unless it broke the CUDA context: every later launch in this
                        # process would fail too, so report what was measured and stop
                        case_rows.append(_echo_sweep_row(echo, name, dname, case, cfg, err, t))
                        rows += case_rows
                        raise CudaContextLost(
                            f"{name} {case.shape}: configuration {cfg} broke the CUDA context ({t}). "
                            f"Nothing else can run in this process; remove that configuration from "
                            f"{BENCH_MODULES[name]}.sweep_cases and rerun.") from exc
                # each row as soon as it is measured, and with `save` the best so far: a sweep
                # stopped by a time limit keeps what it timed and found
                case_rows.append(_echo_sweep_row(echo, name, dname, case, cfg, err, t))
                if save and case.tune:
                    winner = _winner(case_rows, DTYPES[dname])
                    if winner is not None and winner is not saved:
                        role, shape = case.tune
                        path = tuning.save({tuning.key(name, role, device, DTYPES[dname], shape): winner["config"]},
                                           save_path)
                        echo(f"    (the fastest so far: saved to {path})")
                        saved = winner
            timed = [r for r in case_rows if isinstance(r["us"], float)]
            wrong = [r for r in timed if not _correct(r, DTYPES[dname])]
            if wrong:   # fast but wrong is not a candidate: never the best, never saved
                echo(f"  WRONG (rel.err over {SAVE_TOLERANCE[DTYPES[dname]]:.0e} against the default): "
                     + "; ".join(str(r["config"]) for r in wrong))
            correct = [r for r in timed if r not in wrong]
            if correct:
                best = min(correct, key=lambda r: r["us"])
                best["best"] = True
                echo(f"  best: {best['us']:.1f} us  {best['config']}" + (" (the default)" if best["default"] else ""))
                # which kernels the winner's time is made of (on CUDA): where the next change should go
                cuda = torch.device(device).type == "cuda"
                echo("  the best, per call:")
                _profiler_tops(lambda cfg=best["config"]: run(cfg), device, 3 if cuda else 1, _activities(device),
                               echo, keys=("device",) if cuda else ("host",))
            rows += case_rows
    if only_case and not rows:
        raise UserError(f"no sweep case's name ends with {only_case!r}; they are: " + "; ".join(dict.fromkeys(names)))
    return rows


def _winner(case_rows: list, dtype: torch.dtype) -> dict | None:
    """The row worth saving: the fastest correct one, if it beats the default by SAVE_MIN_GAIN."""
    default = next((r for r in case_rows if r["default"]), None)
    if default is None or not isinstance(default["us"], float):
        return None
    correct = [r for r in case_rows if isinstance(r["us"], float) and _correct(r, dtype)]
    best = min(correct, key=lambda r: r["us"], default=None)
    if best is None or best["default"] or best["us"] > (1 - SAVE_MIN_GAIN) * default["us"]:
        return None
    return best


def _correct(row: dict, dtype: torch.dtype) -> bool:
    """Whether a timed row's output is within SAVE_TOLERANCE of the default's."""
    return row["rel_err"] is not None and row["rel_err"] <= SAVE_TOLERANCE[dtype]


def _echo_sweep_row(echo, name, dname, case, cfg, err, t) -> dict:
    """Print one configuration's row (an error in full, under it) and return it as a dict."""
    default = cfg is case.default
    err_s = "-" if err is None else f"{err:.1e}"
    timing = f"{t:10.1f} us" if isinstance(t, float) else f"{'failed':>13}"
    echo(f"  {timing}  rel.err {err_s:>8}  {cfg}" + (" (default)" if default else ""))
    if not isinstance(t, float):
        echo(f"                {t}")
    return {"op": name, "dtype": dname, "shape": case.shape, "config": cfg, "us": t,
            "rel_err": err, "default": default, "best": False}


class CudaContextLost(UserError):
    """A launch left the CUDA context unusable (e.g. an illegal memory access): the benchmark stops."""

    exit_code = 1


def _context_lost(exc: Exception) -> bool:
    # CUDA errors such as an illegal address are sticky: the context refuses all later work
    return isinstance(exc, getattr(torch, "AcceleratorError", ())) or "illegal memory access" in str(exc)


def host_us(fn, device, calls: int = 20, repeats: int = 5) -> float:
    """Host time of one call in µs: how long Python, dispatch, autograd and launches keep
    the CPU busy, measured without waiting for the GPU (median over `repeats` loops). Without a
    GPU the kernels run in the interpreter: a smoke number, from two calls."""
    if torch.device(device).type != "cuda":
        calls, repeats = 2, 1
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    _sync(device)
    return statistics.median(samples)


def _single_threaded(fn):
    """fn with the autograd engine kept on the calling thread (no hand-off to the device thread)."""
    def run():
        with torch.autograd.set_multithreading_enabled(False):
            return fn()
    return run


PROFILE_COLUMNS = ("eager f+b", "host f+b", "host fwd", "eager f+b 1T", "host f+b 1T", "GPU f+b")


def profile_kernels(op: str = "all", dtype: str = "all", echo=print, device: str | None = None, shapes=None,
                    calls: int = 10) -> list:
    """Where the time of our forward+backward goes, for each benchmark case.

    1. A host/GPU breakdown for each of our candidates and the case's anchor: eager time (as benchmarked),
       host time of forward+backward and of forward alone (CPU busy time, not waiting for
       the GPU), the same two with the autograd engine on the calling thread ("1T"), and
       GPU time alone (CUDA-graph replay). Eager far above GPU time with host time close to
       eager means the call is host-bound; "1T" far below the default means the hand-off
       to autograd's device thread is the cost.
    2. cProfile of our forward+backward on the calling thread: the top Python functions.
    3. torch.profiler's top host-side and device-side entries.
    """
    from kernels.benchmarking import hop_launches

    device = _bench_device(device, echo)
    cuda = torch.device(device).type == "cuda"
    activities = _activities(device)
    rows = []
    for name, dname, module in _each_op_and_dtype(op, dtype, shapes):
        for case in module.cases(DTYPES[dname], device, **_shapes_of(shapes, name)):
            mine = [c for c in case.candidates if c.name.startswith(("ours", "triton"))]
            ours = mine[0]
            echo(f"\n== profile {name} {dname} {case.shape}: {ours.name}, forward+backward, per call ==")
            echo(f"  {'candidate':<26}" + "".join(f" {c:>12}" for c in PROFILE_COLUMNS) + "   (us)")
            for cand in mine + [c for c in case.candidates if c.name == case.anchor and c not in mine]:
                values = _host_and_gpu_times(cand, device, cuda)
                rows.append({"op": name, "dtype": dname, "shape": case.shape, "candidate": cand.name,
                             **dict(zip(PROFILE_COLUMNS, values))})
                echo(f"  {cand.name:<26}" + "".join(f" {_us(v):>12}" for v in values))
            fn = ours.forward_backward or ours.forward
            echo(f"  Triton launches through torch's higher-order-op dispatch per call: {hop_launches(fn)}"
                 " (0 when every launch is direct)")
            _python_hot_spots(_single_threaded(fn), device, calls, echo)
            _profiler_tops(fn, device, calls, activities, echo)
    return rows


def _host_and_gpu_times(cand, device, cuda: bool) -> tuple:
    """One candidate's PROFILE_COLUMNS."""
    fb = cand.forward_backward or cand.forward
    try:
        fb()
        return (_time(fb, device), host_us(fb, device), host_us(cand.forward, device),
                _time(_single_threaded(fb), device), host_us(_single_threaded(fb), device),
                _time(fb, device, cuda_graph=True) if cuda else "n/a")
    except Exception as exc:  # one failing candidate must not hide the other's numbers
        return (_error(exc),) + ("",) * (len(PROFILE_COLUMNS) - 1)


def _python_hot_spots(fn, device, calls: int, echo) -> None:
    """cProfile's top Python functions (by own time) over `calls` calls of fn."""
    import cProfile
    import io
    import pstats

    for _ in range(3):
        fn()
    _sync(device)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    _sync(device)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).strip_dirs().sort_stats("tottime").print_stats(12)
    echo(f"  python (cProfile, engine on the calling thread; tottime and cumtime are for {calls} calls, in s):")
    for line in text.getvalue().splitlines():
        if re.match(r"\s*(ncalls|\d)", line):
            echo("    " + line.strip()[:150])


def _activities(device) -> list:
    """torch.profiler's activities for `device`: the host always, the GPU's kernels on CUDA."""
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])


_PROFILE_KEYS = {"host": ("host (self CPU)", "self_cpu_time_total"), "device": ("device", "self_device_time_total")}


def _profiler_tops(fn, device, calls: int, activities, echo, keys=("host", "device")) -> None:
    """torch.profiler's top host-side and/or device-side entries, per call of fn."""
    from torch.profiler import profile

    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    events = prof.key_averages()
    for label, key in (_PROFILE_KEYS[k] for k in keys):
        top = sorted(events, key=lambda e: getattr(e, key, 0) or 0, reverse=True)[:10]
        top = [e for e in top if (getattr(e, key, 0) or 0) > 0]
        if top:
            echo(f"  {label}:")
        for e in top:
            echo(f"    {getattr(e, key) / calls:9.1f} us  x{e.count // calls:<3} {e.key[:80]}")


def _bench_device(device, echo):
    device = device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        raise UserError("composer bench kernels times CUDA kernels and needs a CUDA GPU; none is visible here")
    if device == "cuda":
        import triton

        echo(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    return device


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _tensors(result) -> list:
    return [t for t in (result if isinstance(result, (tuple, list)) else (result,)) if isinstance(t, torch.Tensor)]


def _launching_directly(run):
    """The sweeps call our launchers outside the library ops: launch as those ops do, not
    through torch's higher-order-op dispatch (same kernels, far less host time)."""
    from kernels.dispatch import direct_launch

    def launch(cfg):
        with direct_launch():
            return run(cfg)
    return launch


def _us(t) -> str:
    return f"{t:.1f}" if isinstance(t, float) else str(t)[:10]


def _cells(us, flops, nbytes, anchor, wide=False) -> str:
    w = 11 if wide else 9
    if isinstance(us, str):
        return f"{us:>{w}}"
    ratio = f"{anchor / us:8.2f}" if isinstance(anchor, float) else f"{'-':>8}"
    return f"{us:{w}.1f} {flops / us / 1e6:8.2f} {nbytes / us / 1e3:7.0f} {ratio}"


def bench_train(spec, steps: int = 30, source: str = "both", echo=print) -> dict:
    """Training img/s of `spec` on its real data and on synthetic data of the same shape (steady-state steps)."""
    from composer.spec import load_spec_text
    from composer.train import WARMUP_STEPS, spec_yaml, train

    steps = max(steps, 2 * WARMUP_STEPS + 1)
    results = {}
    sources = ("real", "synthetic") if source == "both" else (source,)
    for src in sources:
        with tempfile.TemporaryDirectory() as out:
            overrides = ["train.epochs=1", f"train.max_steps_per_epoch={steps}", f"train.out_dir={out}",
                         "train.checkpoint_every=0"]
            if src == "synthetic":
                # all of it for training (val_split 0), so the requested number of steps really runs
                overrides += ["data.kind=synthetic", f"data.num_samples={steps * spec.train.batch_size}",
                              "data.root=null", "data.val_root=null", "data.val_split=0"]
            run_spec = load_spec_text(spec_yaml(spec), f"{spec.name} (bench)", overrides)
            run_spec._origins = spec._origins   # errors point at the user's file, not at this copy
            # of the training log, only whether the step was recorded as a CUDA graph (train.cuda_graph)
            final = train(run_spec, echo=lambda line="", *a, **k: echo(line)
                          if str(line).startswith("cuda graph:") else None)["final"]
        results[src] = final["img_per_s"]
        echo(f"{spec.name}: {src} data: {final['img_per_s']:,.0f} img/s (batch {spec.train.batch_size}, {steps} steps)")
    if len(results) == 2:
        echo(f"real / synthetic: {results['real'] / results['synthetic']:.3f}")
    return results


# profiler events that carry device time but are no device work: the host waiting on a full
# launch queue (what a GPU-bound step shows)
_NOT_DEVICE_WORK = ("Command Buffer Full",)


def device_work(events) -> list:
    """The events that are work on the GPU (kernels, copies, memsets), each counted once: the
    operators and autograd functions that launched them report the same time as device time
    of their own, which would count every kernel twice."""
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
            and e.self_device_time_total > 0 and e.key not in _NOT_DEVICE_WORK]


def profile_train(spec, steps: int = 10, top: int = 15, echo=print) -> list[dict]:
    """Where one training step's time goes: the spec's model, optimizer, precision and memory
    format as `composer train` sets them up, on a synthetic batch of its batch size (no data
    pipeline), profiled over `steps` steps after a warm-up. Prints the wall time a step and
    the `top` operations by device time a step (CPU time where there is no GPU), and returns
    those rows."""
    from composer.build import build_model, model_backend, prepare_for_compile
    from composer.optim import make_optimizer
    from composer.train import (_check_triton, in_slices, precision, resolve_device, soft_cross_entropy,
                                training_memory_format)

    t, m = spec.train, spec.model
    device = resolve_device(t.device)
    cuda = device.type == "cuda"
    model = build_model(spec, backend=model_backend(t.kernels, t.compile)).to(device)
    if t.recompute:
        model.recompute_token_blocks()
    if t.compile:   # as `composer train` sets it up
        prepare_for_compile(model, t.kernels, device)
    memory_format = training_memory_format(spec, device)
    x = torch.randn(t.batch_size, m.in_channels, m.image_size, m.image_size, device=device)
    if memory_format is not None:
        model, x = model.to(memory_format=memory_format), x.contiguous(memory_format=memory_format)
    forward = torch.compile(model) if t.compile else model
    targets = torch.nn.functional.one_hot(torch.randint(0, m.num_classes, (t.batch_size,), device=device),
                                          m.num_classes).float()
    optimizer = make_optimizer(spec, model)
    autocast_dtype, use_scaler = precision(spec, device)
    if t.kernels == "triton":   # the same check and message as `composer train`
        _check_triton(model, device, autocast_dtype or torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    def forward_backward(x, targets, share):
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = forward(x)
        loss = soft_cross_entropy(logits, targets)
        scaler.scale(loss * share).backward()
        return logits, loss

    def step():
        in_slices(forward_backward, x, targets, t.accumulate)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def synchronize():
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(3):   # allocation, autotuning, compilation
        step()
    synchronize()
    activities = _activities(device)
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize()
    wall_ms = (time.perf_counter() - start) / steps * 1e3   # with the profiler's own overhead
    events = prof.key_averages()
    if cuda:
        key = "self_device_time_total"
        events = device_work(events)
    else:
        key = "self_cpu_time_total"
    events = sorted(events, key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) / steps
    dtype = str(autocast_dtype or torch.float32).removeprefix("torch.")
    layout = str(memory_format or torch.contiguous_format).removeprefix("torch.")
    slices = f" in {t.accumulate} slices" if t.accumulate > 1 else ""
    echo(f"{spec.name}: batch {t.batch_size}{slices} on {device} ({dtype}, {layout}): {wall_ms:.2f} ms a step under "
         f"the profiler, {total / 1e3:.2f} ms of {'device' if cuda else 'CPU'} time "
         f"({t.batch_size / wall_ms * 1e3:,.0f} img/s)")
    echo(f"  {'us/step':>10} {'share':>6} {'calls/step':>10}  operation")
    rows = []
    for e in events[:top]:
        us = getattr(e, key) / steps
        rows.append({"name": e.key, "us_per_step": us, "share": us / total if total else 0.0,
                     "calls_per_step": e.count / steps})
        echo(f"  {us:10.1f} {us / total if total else 0:6.1%} {e.count / steps:10.1f}  {e.key[:110]}")
    return rows


def bench_infer(target: str, batch_size: int = 256, merges: tuple[int, ...] | None = None, rounds: int = 10,
                device: str = "auto", echo=print) -> list[dict]:
    """Inference throughput of a trained run (directory or checkpoint) or of a spec's model (fresh
    weights) on random images of its input size: each of `merges` (tokens merged a block,
    composer.merging; 0: none) timed once a round, round after round (so that a machine's drift
    falls on every setting alike), the median of the rounds after the first two; default: the
    model's own (model.token_merging). In the run's
    precision (bf16 autocast on CUDA by default), with its kernels, under no_grad."""
    from composer.build import build_model
    from composer.checkpoint import load_run
    from composer.merging import describe, merging
    from composer.spec import load_spec
    from composer.summarize import human
    from composer.train import precision, resolve_device

    if rounds < 3:
        raise UserError(f"--rounds {rounds}: the first two rounds warm up; give at least 3")
    dev = resolve_device(device)
    if str(target).endswith((".yaml", ".yml")):
        spec = load_spec(target)
        model = build_model(spec).to(dev).eval()
    else:
        spec, model, _ = load_run(target, device=dev)
    autocast, _ = precision(spec, dev) if not (dev.type == "cpu" and spec.train.precision == "fp16") else (None, False)
    m = spec.model
    merges = (m.token_merging,) if merges is None else merges   # default: as the model was built
    x = torch.randn(batch_size, m.in_channels, m.image_size, m.image_size, device=dev)
    settings = []
    for r in merges:
        info = describe(model, r) if r else None
        settings.append((r, tuple(info["tokens"]) if info else None,
                         info["flops"][1] if info else sum(layer.cost.flops for layer in model.layers)))
    times = {r: [] for r, _, _ in settings}
    with torch.no_grad(), torch.autocast(dev.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        for _ in range(rounds):
            for r, _, _ in settings:
                with merging(model, r):
                    _sync(dev)
                    start = time.perf_counter()
                    model(x)
                    _sync(dev)
                    times[r].append(time.perf_counter() - start)
    rows = []
    for r, tokens, flops in settings:
        seconds = statistics.median(times[r][2:])
        rows.append({"merge": r, "tokens": tokens, "flops_per_image": flops, "img_per_s": batch_size / seconds,
                     "ms_per_batch": 1e3 * seconds})
    base = rows[0]["img_per_s"]
    for row in rows:
        tokens = f"{row['tokens'][0]} -> {row['tokens'][1]} tokens" if row["tokens"] else "no merging"
        echo(f"{spec.name}: --merge {row['merge']:<3d} {tokens:<20s} {human(row['flops_per_image'])} FLOPs an image  "
             f"{row['img_per_s']:,.0f} img/s  {row['ms_per_batch']:.1f} ms a batch of {batch_size}  "
             f"({row['img_per_s'] / base:.2f}x the first)")
    echo(f"({dev}, {str(autocast or torch.float32).replace('torch.', '')}, medians of {rounds - 2} interleaved rounds)")
    return rows
