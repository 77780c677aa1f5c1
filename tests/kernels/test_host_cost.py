"""`python -m kernels.host_cost`: the host's share of each op's forward+backward, launches stubbed."""
from kernels import host_cost


def test_every_op_is_measured_with_its_launches_counted():
    measured = host_cost.measure(reps=3, echo=lambda *_: None)
    names = {"attention": "attention", "token_mlp": "token_mlp", "token_mlp GEMMs": "(GEMMs)",
             "dwconv2d k7": "dwconv2d", "dwconv2d k9": "k9", "batch_norm": "batch_norm",
             "convmixer block": "dwconv_batch_norm_residual"}
    rows = {name: next(r for r in measured if key in r["case"]) for name, key in names.items()}
    assert len(measured) == 7 and "k7" in rows["dwconv2d k7"]["case"]
    for r in rows.values():
        assert r["host_us"] > 0 and r["launches"] >= 2 and r["torch_ops"] > 0, r
    # attention: forward, delta, backward; dwconv k9 (Toeplitz): banded matrices and forward, then
    # the GELU / bias pass, weight gradient, flipped banded matrices and input gradient
    assert rows["attention"]["launches"] == 3
    assert rows["dwconv2d k9"]["launches"] == 6
    # token_mlp: LayerNorm statistics, forward, data backward, LayerNorm finish, weights (fused
    # kernels); the GEMM path forms H and Y apart and the weight gradients as two GEMMs
    assert rows["token_mlp"]["launches"] == 5 and rows["token_mlp GEMMs"]["launches"] == 8
    # batch_norm: statistics, finalize and apply, each way; the block op: the convolution's and
    # BatchNorm's launches, the convolution's bias gradient summed by BatchNorm's backward (no
    # pass of its own)
    assert rows["batch_norm"]["launches"] == 6 and rows["convmixer block"]["launches"] == 11
    # the banded matrices are one launch each, not a dozen PyTorch ops: the Toeplitz path calls
    # no more PyTorch ops than the tap path
    assert rows["dwconv2d k9"]["torch_ops"] <= rows["dwconv2d k7"]["torch_ops"], rows


def test_cli_runs_one_op(capsys):
    assert host_cost.main(["--op", "attention", "--reps", "2"]) == 0
    out = capsys.readouterr().out
    assert "attention_packed B2 H2 N16 D16" in out and "Triton launches 3" in out and "token_mlp" not in out
