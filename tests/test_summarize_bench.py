"""`composer summarize` and `composer bench` as a user runs them."""
import json
import re

import pytest
import torch

from composer.bench import bench_kernels, profile_kernels, sweep_kernels
from tests.helpers import SPECS, assert_user_error, run_cli


def test_summarize_json_and_table():
    result = run_cli("summarize", SPECS / "vit_ti16.yaml", "--json", "--batch-size", "8")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["params"] == 5_717_416 and isinstance(data["flops"], int)
    assert data["flops"] == sum(r["flops_per_image"] for r in data["rows"])
    assert "multiply-add = 2 FLOPs" in data["flop_convention"]
    attention = [r for r in data["rows"] if r["kind"] == "attention"]
    assert len(attention) == 12 and attention[0]["input"] == [8, 197, 192]
    expected = "attention: triton" if torch.cuda.is_available() else "attention: reference"
    assert attention[0]["kernel"] == expected and (torch.cuda.is_available() or attention[0]["kernel_reasons"])
    table = run_cli("summarize", SPECS / "seed_convmixer_mixer.yaml")
    assert table.returncode == 0, table.stderr
    for fragment in ("blocks[0].dwconv", "grid->tokens", "blocks[1].token_mlp", "total", "FLOPs: multiply-add"):
        assert fragment in table.stdout, fragment


def test_summarize_shows_the_stochastic_depth_ramp():
    result = run_cli("summarize", SPECS / "deit3_s16.yaml", "--json")
    assert result.returncode == 0, result.stderr
    rates = [r["drop_path"] for r in json.loads(result.stdout)["rows"] if r["kind"] == "attention"]
    assert rates == pytest.approx([0.05 * i / 11 for i in range(12)])
    table = run_cli("summarize", SPECS / "deit3_s16.yaml")
    assert "Stochastic depth (model.drop_path): 0 at the first block, rising linearly to 0.05" in \
        " ".join(table.stdout.split())


def test_summarize_shows_each_stage_and_its_windows():
    """A hierarchical windowed model: each layer's shapes at its stage, its windows and their shift."""
    result = run_cli("summarize", SPECS / "swin_t_rope.yaml", "--json", "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    rows = [r for r in json.loads(result.stdout)["rows"] if r["kind"] in ("attention", "downsample")]
    assert [(r["kind"], r["input"][1:], r["window"]) for r in rows[:4]] == [
        ("attention", [3136, 96], {"size": 7, "shift": 0}), ("attention", [3136, 96], {"size": 7, "shift": 3}),
        ("downsample", [96, 56, 56], None), ("attention", [784, 192], {"size": 7, "shift": 0})]
    assert rows[4]["window"] == {"size": 7, "shift": 3} and rows[-1]["window"] == {"size": 7, "shift": 0}
    table = " ".join(run_cli("summarize", SPECS / "swin_t_rope.yaml").stdout.split())
    assert "blocks[0].attention #2 (7x7 windows, shifted 3)" in table and "(1, 96, 56, 56) -> (1, 192, 28, 28)" in table
    swin = " ".join(run_cli("summarize", SPECS / "swin_t.yaml").stdout.split())
    assert "Positions: a learned relative position bias in every attention block (Swin's); those blocks run " \
           "PyTorch's attention" in swin
    rows = json.loads(run_cli("summarize", SPECS / "swin_t.yaml", "--json").stdout)["rows"]
    assert {r["kernel"] for r in rows if r["kind"] == "attention"} == {"pytorch"}


def test_summarize_says_where_rope_positions_go(tmp_path):
    from tests.test_build import ROPE

    spec = tmp_path / "rope.yaml"
    spec.write_text(ROPE)
    table = run_cli("summarize", spec)
    assert table.returncode == 0, table.stderr
    assert "pos_embed" not in table.stdout and "Positions: 2-D rotary embedding (rope)" in table.stdout


def test_summarize_several_specs_side_by_side(tmp_path):
    names = ["vit_ti16", "mixer_s16", "convmixer_768_32"]
    result = run_cli("summarize", *(SPECS / f"{n}.yaml" for n in names), "--json", "--batch-size", "4")
    assert result.returncode == 0, result.stderr
    each = json.loads(result.stdout)
    assert [s["spec"] for s in each] == names and [s["params"] for s in each] == [5_717_416, 18_528_264, 21_110_248]
    alone = json.loads(run_cli("summarize", SPECS / "mixer_s16.yaml", "--json", "--batch-size", "4").stdout)
    assert each[1] == alone and alone["blocks"] == "mixer x8"
    table = run_cli("summarize", *(SPECS / f"{n}.yaml" for n in names)).stdout
    rows = {line.split("│")[1].strip(): line for line in table.splitlines() if line.count("│") > 2}
    assert set(rows) >= set(names) and "18,528,264" in rows["mixer_s16"] and "(384, 14, 14)" not in rows["mixer_s16"]
    assert "224x224" in rows["vit_ti16"] and "(192, 14, 14)" in rows["vit_ti16"] and "convmixer x32" in table
    # every file's problems at once
    bad = tmp_path / "bad.yaml"
    bad.write_text((SPECS / "vit_ti16.yaml").read_text().replace("heads: 3", "heads: 5"))
    result = run_cli("summarize", bad, SPECS / "mixer_s16.yaml", tmp_path / "missing.yaml")
    assert_user_error(result, "model.blocks[0].heads: 5 does not divide dim 192", f"{tmp_path / 'missing.yaml'}: no such file")


def test_summarize_counts_what_recomputed_blocks_keep():
    """With train.recompute a token block keeps only its input (B, N, C) for the backward; the
    grid blocks' (BatchNorm) estimates stay as they were."""
    def summary(*overrides):
        result = run_cli("summarize", SPECS / "seed_convmixer_mixer.yaml", "--json", "--batch-size", "4", *overrides)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    kept, recomputed = summary(), summary("--set", "train.recompute=true")
    assert recomputed["activation_bytes"] < kept["activation_bytes"] and recomputed["recompute"]
    for a, b in zip(kept["rows"], recomputed["rows"], strict=True):
        if b["kind"] in ("token_mlp", "channel_mlp"):
            assert b["activation_bytes"] == 4 * b["input"][1] * b["input"][2] * 4 < a["activation_bytes"], b
        else:
            assert b["activation_bytes"] == a["activation_bytes"], b
    table = run_cli("summarize", SPECS / "seed_convmixer_mixer.yaml", "--set", "train.recompute=true")
    assert "train.recompute: token blocks keep only their inputs" in table.stdout


def test_summarize_counts_what_frozen_layers_keep_and_train():
    from composer.spec import load_spec
    from composer.summarize import render, summarize

    plain = summarize(load_spec(SPECS / "seed_convmixer_mixer.yaml"), batch_size=4)
    probe = summarize(load_spec(SPECS / "seed_convmixer_mixer.yaml", ["train.freeze=backbone"]), batch_size=4)
    head = probe["rows"][-1]
    assert [r["frozen"] for r in probe["rows"]] == [True] * (len(probe["rows"]) - 1) + [False]
    assert probe["activation_bytes"] == head["activation_bytes"] == plain["rows"][-1]["activation_bytes"] > 0
    assert probe["trainable_params"] == head["params"] < probe["params"] == plain["trainable_params"]
    assert [r["params"] for r in probe["rows"]] == [r["params"] for r in plain["rows"]]
    caption = render(probe).caption
    assert f"train.freeze: layers 0-{head['index'] - 1} keep their weights and no activations; " \
           f"{head['params']:,} of {probe['params']:,} parameters train." in caption


def test_summarize_shows_the_compile_policy():
    """With train.compile on and kernels auto, training builds the PyTorch blocks: summarize says so."""
    result = run_cli("summarize", SPECS / "seed_mixer_vit.yaml", "--json", "--set", "train.compile=true")
    assert result.returncode == 0, result.stderr
    fused = [r for r in json.loads(result.stdout)["rows"] if r["kernel"] != "pytorch"]
    assert fused and all(r["kernel"].endswith(": reference") for r in fused)
    assert all("train.compile is on" in " ".join(r["kernel_reasons"]) for r in fused)


def test_summarize_shows_kernels_run_between_compiled_regions():
    """With train.compile on and kernels triton, training runs the Triton ops between the
    compiled regions: summarize says so in the kernel column (no "not on Triton" reason)."""
    result = run_cli("summarize", SPECS / "seed_convmixer_mixer.yaml", "--json", "--set", "train.compile=true",
                     "--kernels", "triton")
    assert result.returncode == 0, result.stderr
    fused = [r for r in json.loads(result.stdout)["rows"] if r["kernel"] != "pytorch"]
    assert [r["kernel"] for r in fused] == ["dwconv2d: triton (between compiled regions)",
                                            "token_mlp: triton (between compiled regions)"]
    assert not any(r["kernel_reasons"] for r in fused)


def test_summarize_shows_the_fused_batch_norm():
    """With kernels triton a ConvMixer's BatchNorms train as kernels.batch_norm: the kernel column
    names it next to the depthwise op (pointwise blocks: alone); kernels auto uses it on CUDA only
    (composer.blocks.base.FUSED_BATCH_NORM_IN_AUTO), so not in this CPU summary."""
    result = run_cli("summarize", SPECS / "convmixer_cifar.yaml", "--json", "--kernels", "triton")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    kinds = {r["kind"]: r["kernel"] for r in rows}
    assert re.fullmatch(r"dwconv2d: \w+, batch_norm: \w+", kinds["dwconv"]), kinds
    assert re.fullmatch(r"batch_norm: \w+", kinds["pointwise"]), kinds
    assert re.fullmatch(r"batch_norm: \w+", kinds["stem (conv)"]), kinds   # its GELU and BatchNorm
    auto = json.loads(run_cli("summarize", SPECS / "convmixer_cifar.yaml", "--json").stdout)["rows"]
    assert not any("batch_norm" in r["kernel"] for r in auto)
    auto_cuda = json.loads(run_cli("summarize", SPECS / "convmixer_cifar.yaml", "--json",
                                   "--set", "train.device=cuda").stdout)["rows"]
    assert any("batch_norm" in r["kernel"] for r in auto_cuda), auto_cuda
    # on CUDA a kernel under 7 trains channels_last (memory_format auto), where nn.BatchNorm2d stays
    for k, fused in ((5, False), (7, True), (9, True)):
        rows = json.loads(run_cli("summarize", SPECS / "convmixer_cifar.yaml", "--json", "--kernels", "triton",
                                  "--set", "train.device=cuda", "--set", f"model.blocks.0.kernel_size={k}").stdout)["rows"]
        assert any("batch_norm" in r["kernel"] for r in rows) == fused, (k, rows)


def test_summarize_errors_exit_2(tmp_path):
    assert_user_error(run_cli("summarize", tmp_path / "nope.yaml"), "no such file")
    listing = tmp_path / "list.yaml"
    listing.write_text("- model\n- data\n")
    assert_user_error(run_cli("summarize", listing), f"{listing}:1:1: a spec is a mapping")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without CUDA")
def test_bench_kernels_without_cuda_is_a_user_error():
    assert_user_error(run_cli("bench", "kernels"), "needs a CUDA GPU")


def test_bench_kernels_runner_prints_every_candidate():
    # attention only: its candidates need no torch.compile, which takes half a minute on a CPU.
    # Every op's own cases() is smoke-tested in tests/kernels/.
    lines = []
    rows = bench_kernels("attention", "fp32", echo=lines.append, device="cpu",
                         shapes={"attention": [(1, 1, 5, 16), (1, 2, 7, 16)]})
    assert {r["shape"] for r in rows} == {"B1 H1 N5 D16", "B1 H2 N7 D16"}
    assert {r["candidate"] for r in rows} >= {"sdpa", "eager"}
    for r in rows:
        assert isinstance(r["fwd_us"], float) and r["fwd_us"] > 0 and r["anchor"] == "sdpa", r
        assert isinstance(r["fwd_bwd_us"], float) and r["fwd_bwd_us"] > 0, r
    assert sum("(floor)" in line for line in lines) == 2


def test_bench_kernels_cuda_graph_columns():
    """--cuda-graph adds GPU-time columns to every row (on the CPU they fall back to wall clock)."""
    lines = []
    rows = bench_kernels("attention", "fp32", echo=lines.append, device="cpu", cuda_graph=True,
                         shapes={"attention": [(1, 1, 5, 16)]})
    assert rows and all(isinstance(r["graph_fwd_us"], float) and r["graph_fwd_us"] > 0 for r in rows)
    assert all(isinstance(r["graph_fwd_bwd_us"], float) and r["graph_fwd_bwd_us"] > 0 for r in rows)
    assert "graph fwd" in "\n".join(lines)


SWEEP_SHAPES = {"attention": [(1, 2, 20, 16)], "token_mlp": [(2, 20, 16, 16)], "dwconv2d": [(1, 3, 6, 6, 3)]}


def test_sweep_checks_and_times_the_configurations():
    """Each op's sweep runs the default and its candidate configurations on the Triton kernels
    (interpreter here; the first few of each case, as --limit does, to keep the suite short):
    every correct configuration agrees with the default, one is marked best."""
    lines = []
    rows = sweep_kernels("all", "fp32", echo=lines.append, device="cpu", shapes=SWEEP_SHAPES, limit=3)
    cases = {(r["op"], r["shape"]) for r in rows}
    assert len(cases) == 2 + 2 + 6          # attention fwd/bwd; token_mlp fwd/bwd; dwconv 2 layouts x 3
    for op, shape in cases:
        mine = [r for r in rows if (r["op"], r["shape"]) == (op, shape)]
        assert sum(r["default"] for r in mine) == 1 and sum(r["best"] for r in mine) == 1, (op, shape)
        ran = [r for r in mine if r["rel_err"] is not None]
        assert len(ran) >= 2, (op, shape, mine)
        for r in ran:   # fp32, the same math in another blocking: agreement to a few ulps of the output scale
            assert r["rel_err"] < 1e-4, r
            assert isinstance(r["us"], float) and r["us"] > 0, r
    # after each case's best, the profiler's entries of one call of it (the GPU's kernels on CUDA)
    assert sum(line.startswith("  best: ") for line in lines) == len(cases)
    for i, line in enumerate(lines):
        if line.startswith("  best: "):
            assert lines[i + 1] == "  the best, per call:" and lines[i + 2] == "  host (self CPU):", lines[i:i + 3]
            assert re.match(r"\s+[\d.]+ us  x\d+", lines[i + 3]), lines[i + 3]


def test_profile_breaks_down_host_and_python_time():
    lines = []
    rows = profile_kernels("attention", "fp32", echo=lines.append, device="cpu",
                           shapes={"attention": [(1, 1, 8, 16)]}, calls=2)
    text = "\n".join(lines)
    assert "== profile attention fp32 B1 H1 N8 D16" in text and "host (self CPU)" in text
    assert any(" us  x" in line for line in lines)
    # the breakdown: our op and the anchor, each with measured host and eager times (no GPU column on CPU)
    assert [r["candidate"] for r in rows] == ["ours", "ours-packed", "ours-library-op", "sdpa"]
    for r in rows:
        for column in ("eager f+b", "host f+b", "host fwd", "eager f+b 1T", "host f+b 1T"):
            assert isinstance(r[column], float) and r[column] > 0, (column, r)
        assert r["GPU f+b"] == "n/a"
    # cProfile's table of the Python functions behind our forward+backward
    start = next(i for i, line in enumerate(lines) if "python (cProfile" in line)
    assert any("ncalls" in line and "tottime" in line for line in lines[start:start + 3])
    rows_shown = [line for line in lines[start:] if re.match(r"\s+[\d/]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+\S", line)]
    assert len(rows_shown) >= 5, lines[start:]


def test_sweep_and_profile_are_exclusive():
    assert_user_error(run_cli("bench", "kernels", "--sweep", "--profile"), "separate runs")


def _fake_sweep(monkeypatch, failure):
    """Make sweep_kernels see one op whose second configuration raises `failure`."""
    from types import SimpleNamespace

    import composer.bench as bench_module
    from kernels.benchmarking import SweepCase

    def run(cfg):
        if cfg["k"] == 2:
            raise failure
        return torch.full((3,), 1.0 + 1e-7 * cfg["k"])

    module = SimpleNamespace(sweep_cases=lambda dtype, device, **_: [
        SweepCase("attention", "S1", {"k": 0}, [{"k": 1}, {"k": 2}, {"k": 3}], run),
        SweepCase("attention", "S2", {"k": 0}, [{"k": 1}], run)])
    monkeypatch.setattr(bench_module, "_each_op_and_dtype", lambda op, dtype, shapes=None: [("attention", "fp32", module)])


def test_sweep_reports_a_failing_configuration_in_full_and_goes_on(monkeypatch):
    _fake_sweep(monkeypatch, RuntimeError("out of resources: shared memory, required 300000, limit 232448"))
    lines = []
    rows = sweep_kernels("attention", "fp32", echo=lines.append, device="cpu")
    assert [(r["shape"], r["config"]["k"]) for r in rows] == [("S1", 0), ("S1", 1), ("S1", 2), ("S1", 3),
                                                               ("S2", 0), ("S2", 1)]
    failed = next(r for r in rows if r["config"]["k"] == 2)
    assert failed["rel_err"] is None and "required 300000, limit 232448" in failed["us"]
    text = "\n".join(lines)
    assert "failed" in text and "RuntimeError: out of resources: shared memory, required 300000, limit 232448" in text


def test_sweep_stops_with_a_message_when_a_configuration_breaks_the_cuda_context(monkeypatch):
    from composer.bench import CudaContextLost

    _fake_sweep(monkeypatch, RuntimeError("CUDA error: an illegal memory access was encountered"))
    lines = []
    with pytest.raises(CudaContextLost) as info:
        sweep_kernels("attention", "fp32", echo=lines.append, device="cpu")
    message = str(info.value)
    assert "{'k': 2}" in message and "illegal memory access" in message and "remove that configuration" in message
    assert info.value.exit_code != 0
    text = "\n".join(lines)   # what ran before the failure is still printed; nothing after it ran
    assert "{'k': 0} (default)" in text and "{'k': 1}" in text and "{'k': 3}" not in text and "S2" not in text


def test_bench_stops_with_a_message_when_a_candidate_breaks_the_cuda_context(monkeypatch):
    from types import SimpleNamespace

    import composer.bench as bench_module
    from composer.bench import CudaContextLost
    from kernels.benchmarking import BenchCase, Candidate

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    case = BenchCase("attention", "S1", 1, 3, 1, 3, "good", candidates=[
        Candidate("good", lambda: torch.ones(1), lambda: torch.ones(1)), Candidate("broken", broken, broken),
        Candidate("after", lambda: torch.ones(1), lambda: torch.ones(1))])
    module = SimpleNamespace(cases=lambda dtype, device, **_: [case])
    monkeypatch.setattr(bench_module, "_each_op_and_dtype", lambda op, dtype, shapes=None: [("attention", "fp32", module)])
    with pytest.raises(CudaContextLost) as info:
        bench_kernels("attention", "fp32", echo=lambda line: None, device="cpu")
    assert "candidate broken broke the CUDA context" in str(info.value) and "illegal memory access" in str(info.value)


def test_bench_reports_an_ordinary_failure_in_its_row(monkeypatch):
    from types import SimpleNamespace

    import composer.bench as bench_module
    from kernels.benchmarking import BenchCase, Candidate

    def failing():
        raise ValueError("shape not supported")

    case = BenchCase("attention", "S1", 1, 3, 1, 3, "good", candidates=[
        Candidate("good", lambda: torch.ones(1), lambda: torch.ones(1)), Candidate("failing", failing, failing)])
    module = SimpleNamespace(cases=lambda dtype, device, **_: [case])
    monkeypatch.setattr(bench_module, "_each_op_and_dtype", lambda op, dtype, shapes=None: [("attention", "fp32", module)])
    lines = []
    rows = bench_kernels("attention", "fp32", echo=lines.append, device="cpu")
    failed = next(r for r in rows if r["candidate"] == "failing")
    assert "ValueError: shape not supported" in failed["fwd_us"]
    assert isinstance(next(r for r in rows if r["candidate"] == "good")["fwd_us"], float)


def test_sweep_save_picks_the_fastest_correct_configuration():
    from composer import bench as b

    rows = [{"default": True, "us": 100.0, "rel_err": 0.0, "config": {"a": 0}},
            {"default": False, "us": 50.0, "rel_err": 1.0, "config": {"a": 1}},       # wrong output: never
            {"default": False, "us": 90.0, "rel_err": 1e-6, "config": {"a": 2}},
            {"default": False, "us": "failed", "rel_err": None, "config": {"a": 3}}]
    assert b._winner(rows, torch.float32)["config"] == {"a": 2}
    assert b._winner(rows, torch.bfloat16)["config"] == {"a": 2}
    rows[2]["us"] = 98.0          # within timing noise of the default: keep the default
    assert b._winner(rows, torch.float32) is None
    rows[0]["us"] = "failed"      # nothing to compare with
    assert b._winner(rows, torch.float32) is None


def test_sweep_never_calls_a_wrong_configuration_best(monkeypatch):
    """A configuration whose output is off is reported as wrong, even when it is the fastest:
    the best line (and the per-kernel breakdown under it) is the fastest correct one."""
    import importlib

    from composer import bench as b
    from kernels.benchmarking import SweepCase

    out = {"good": torch.ones(4), "fast but wrong": torch.full((4,), 1.3)}
    times = {"default": 30.0, "good": 20.0, "fast but wrong": 10.0}
    case = SweepCase(op="attention", shape="fake", default={"name": "default"},
                     configs=[{"name": "fast but wrong"}, {"name": "good"}],
                     run=lambda cfg: out.get(cfg["name"], torch.ones(4)))
    module = importlib.import_module(b.BENCH_MODULES["attention"])
    monkeypatch.setattr(module, "sweep_cases", lambda *a, **k: [case])
    monkeypatch.setattr(b, "_time", lambda fn, device, cuda_graph=False: times[_last_config(fn)])
    lines = []
    rows = sweep_kernels("attention", "fp32", echo=lines.append, device="cpu", shapes={"attention": [(1, 1, 8, 16)]})
    best = [r for r in rows if r["best"]]
    assert [r["config"]["name"] for r in best] == ["good"]
    assert any(line.startswith("  WRONG") and "fast but wrong" in line for line in lines), lines
    assert "  best: 20.0 us  {'name': 'good'}" in lines


def _last_config(fn):
    """The configuration a sweep's timing closure launches (its default argument `cfg`)."""
    return fn.__defaults__[0]["name"]


def test_sweep_save_writes_what_the_launchers_then_use(tmp_path, monkeypatch):
    """--save end to end on the interpreter: each case's winner lands in the tuning file under
    this card, dtype and shape, and the launcher picks it from then on."""
    from composer import bench as b
    from kernels import tuning
    from kernels.attention import triton as kt

    path = tmp_path / "tuned.json"
    monkeypatch.setenv("COMPOSER_TUNED", str(path))
    tuning.reload()
    # timings on the interpreter are noise: let the first non-default configuration win
    monkeypatch.setattr(b, "_winner", lambda rows, dtype: next((r for r in rows if not r["default"]), None))
    try:
        lines = []
        sweep_kernels("attention", "fp32", echo=lines.append, device="cpu", shapes={"attention": [(1, 2, 20, 16)]},
                      save=True)
        saved = json.loads(path.read_text())["configs"]
        assert sorted(saved) == ["attention/backward/cpu/float32/N20 D16", "attention/forward/cpu/float32/N20 D16"]
        q = torch.empty(1, 2, 20, 16)
        assert kt.forward_config(q) == saved["attention/forward/cpu/float32/N20 D16"]
        assert sum(f"saved to {path}" in line for line in lines) == 2   # one winner per case, saved once
    finally:
        tuning.reload()


def test_save_and_limit_need_sweep():
    assert_user_error(run_cli("bench", "kernels", "--save"), "--sweep")
    assert_user_error(run_cli("bench", "kernels", "--limit", "3"), "--sweep")
    assert_user_error(run_cli("bench", "kernels", "--case", "backward"), "--sweep")


def test_sweep_case_filter_keeps_the_cases_it_names():
    from composer.errors import UserError

    shapes = {"attention": [(1, 2, 20, 16)]}
    rows = sweep_kernels("attention", "fp32", echo=lambda *a: None, device="cpu", shapes=shapes, limit=1,
                         only_case="backward")
    assert {r["shape"] for r in rows} == {"B1 H2 N20 D16 backward"} and len(rows) == 2
    with pytest.raises(UserError, match=r"ends with 'weight grad'; they are: attention B1 H2 N20 D16 forward; "
                                        r"attention B1 H2 N20 D16 backward"):
        sweep_kernels("attention", "fp32", echo=lambda *a: None, device="cpu", shapes=shapes, only_case="weight grad")


def test_sweep_limit_times_the_first_candidates_only():
    lines = []
    rows = sweep_kernels("attention", "fp32", echo=lines.append, device="cpu", shapes={"attention": [(1, 2, 20, 16)]},
                         limit=2)
    for case in {r["shape"] for r in rows}:
        assert len([r for r in rows if r["shape"] == case]) == 3, case     # the default and two candidates


def test_spec_shapes_are_the_fused_ops_inputs_of_its_model():
    """--spec: each fused op's input shape as the spec's model runs it, at its batch size."""
    from composer.bench import spec_shapes
    from composer.spec import load_spec

    hybrid = load_spec(SPECS / "hybrid_mixer_vit_cifar.yaml")
    assert spec_shapes(hybrid) == {"token_mlp": [(512, 64, 256, 128)], "attention": [(512, 4, 64, 64)]}
    assert spec_shapes(hybrid, batch_size=8)["attention"] == [(8, 4, 64, 64)]
    conv = load_spec(SPECS / "convmixer_cifar.yaml", ["train.batch_size=16"])
    assert spec_shapes(conv) == {"dwconv2d": [(16, 256, 32, 32, 9)]}   # 8 layers, one shape
    # window attention: a call per window shape. On the first stage's 56x56 grid: 64 windows of 7x7
    # unshifted; shifted by 3, 49 whole ones, 7 each of 3x7, 7x3, 4x7 and 7x4 cells, corners of 3x3,
    # 3x4, 4x3, 4x4 (each shape once below: 3x7 and 7x3 are both (14, 3, 21, 32))
    swin = spec_shapes(load_spec(SPECS / "swin_t_rope.yaml", ["train.batch_size=2"]))["attention"]
    assert swin[:7] == [(2 * 64, 3, 49, 32), (2 * 1, 3, 9, 32), (2 * 7, 3, 21, 32), (2 * 1, 3, 12, 32),
                        (2 * 49, 3, 49, 32), (2 * 7, 3, 28, 32), (2 * 1, 3, 16, 32)]


def test_bench_spec_options_are_checked():
    assert_user_error(run_cli("bench", "kernels", "--batch-size", "8"), "--spec")
    assert_user_error(run_cli("bench", "kernels", "--spec", SPECS / "convmixer_cifar.yaml", "--op", "attention"),
                      "none of the fused ops")
    assert_user_error(run_cli("bench", "kernels", "--spec", SPECS / "no_such_spec.yaml"), "no_such_spec.yaml")


def test_bench_train_profile_lists_where_a_step_goes(tmp_path):
    """`composer bench train SPEC --profile`: the model's training step profiled (CPU here), the
    operations that take the most time a step, with their share and calls a step."""
    from composer.bench import profile_train
    from composer.spec import load_spec

    spec = load_spec(SPECS / "quickstart.yaml")
    # every operation (top past their count): which ones lead depends on the machine's load, so
    # the backward is looked for in the whole list, and the shares of the whole list add up to 1
    lines = []
    rows = profile_train(spec, steps=2, top=10_000, echo=lines.append)
    assert "quickstart: batch 64 on cpu (float32, contiguous_format)" in lines[0] and "ms a step" in lines[0]
    assert len(rows) > 5 and len(lines) == 2 + len(rows)
    assert all(r["us_per_step"] >= 0 and r["calls_per_step"] > 0 for r in rows)
    assert [r["us_per_step"] for r in rows] == sorted((r["us_per_step"] for r in rows), reverse=True)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    # the backward of the model's layers is part of the step
    assert any("backward" in r["name"].lower() for r in rows), [r["name"] for r in rows]

    lines = []
    rows = profile_train(spec, steps=1, top=3, echo=lines.append)
    assert len(rows) == 3 and len(lines) == 2 + 3
    assert all(r["us_per_step"] > 0 for r in rows)

    # with train.accumulate the step runs the model once a slice: twice the LayerNorms a step
    calls = {r["name"]: r["calls_per_step"] for r in profile_train(spec, steps=1, top=10_000, echo=lambda _: None)}
    lines = []
    sliced = profile_train(load_spec(SPECS / "quickstart.yaml", ["train.accumulate=2"]), steps=1, top=10_000,
                           echo=lines.append)
    assert "quickstart: batch 64 in 2 slices on cpu" in lines[0]
    norms = {r["name"]: r["calls_per_step"] for r in sliced}["aten::native_layer_norm"]
    assert norms == 2 * calls["aten::native_layer_norm"] > 0
    assert 0 < sum(r["share"] for r in rows) < 1.0

    result = run_cli("bench", "train", SPECS / "quickstart.yaml", "--profile", "--steps", "2")
    assert result.returncode == 0, result.stderr
    assert "ms a step under the profiler" in result.stdout and "calls/step" in result.stdout


def test_train_profile_counts_each_kernel_once():
    """On a GPU the operator that launches a kernel reports the kernel's time as its own device
    time: only the device-side events count (an H100 profile listed BatchNorm's backward twice),
    and the host's wait on a full launch queue is no device work."""
    from types import SimpleNamespace

    from composer.bench import device_work

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(key, device_type, us):
        return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=us)

    events = [event("aten::native_batch_norm_backward", cpu, 19.0), event("batch_norm_backward_kernel", cuda, 19.0),
              event("_EagerDwConvBackward", cpu, 20.7), event("_dwconv_bwd_w_toeplitz_kernel", cuda, 10.0),
              event("Command Buffer Full", cuda, 17.5), event("aten::empty", cpu, 0.0), event("idle", cuda, 0.0)]
    assert [e.key for e in device_work(events)] == ["batch_norm_backward_kernel", "_dwconv_bwd_w_toeplitz_kernel"]


def test_bench_train_profile_refuses_kernels_that_cannot_run():
    import os

    # without the interpreter, as on a user's machine without a GPU (the tests run with it)
    result = run_cli("bench", "train", SPECS / "quickstart.yaml", "--profile", "--set", "train.kernels=triton",
                     env={**os.environ, "TRITON_INTERPRET": "0"})
    assert_user_error(result, "token_mlp", "Triton kernels need CUDA", "--kernels auto")
