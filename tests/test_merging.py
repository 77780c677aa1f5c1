"""Token merging (ToMe) at inference: the matching against a plain loop, sizes and weighted means,
proportional attention and pooling as attention over copies, which blocks merge, the commands."""
import json

import pytest
import torch

from composer.blocks.attention import Attention
from composer.build import AttentionPool, Head, build_model
from composer.errors import UserError
from composer.merging import TokenMerging, flops_with, match, merge, merging, merging_blocks, tokens_after
from composer.spec import load_spec_text
from tests.helpers import SPECS, assert_user_error, count_cpu_attention_flops, run_cli


def spec_text(blocks: str, head: str = "{pool: cls}", extra: str = "", pos: str = "learned") -> str:
    return f"""\
model:
  image_size: 8
  num_classes: 4
  stem: {{patch_size: 2, dim: 16}}
  pos_embed: {pos}
{extra}  blocks: {blocks}
  head: {head}
data: {{kind: synthetic, num_samples: 128, val_split: 0.25}}
train: {{epochs: 1, batch_size: 32, device: cpu}}
"""


def spec_of(*args, overrides=(), **kwargs):
    return load_spec_text(spec_text(*args, **kwargs), "m.yaml", list(overrides))


def plain_merge(x: torch.Tensor, metric: torch.Tensor, r: int) -> torch.Tensor:
    """ToMe's matching and merge of one image, written as loops: each even token finds the odd
    token of highest cosine similarity; the r even tokens best matched are added to theirs."""
    t = x.shape[0]
    evens, odds = list(range(0, t, 2)), list(range(1, t, 2))
    unit = metric / metric.norm(dim=-1, keepdim=True)
    best = {}
    for i in evens:
        sims = [float(unit[i] @ unit[j]) for j in odds]
        k = max(range(len(odds)), key=lambda k: sims[k])
        best[i] = (sims[k], odds[k])
    merged = sorted(evens, key=lambda i: -best[i][0])[:r]
    out_odds = {j: x[j].clone() for j in odds}
    for i in merged:
        out_odds[best[i][1]] += x[i]
    return torch.stack([x[i] for i in evens if i not in merged] + [out_odds[j] for j in odds])


@pytest.mark.parametrize("tokens, r", [(13, 4), (16, 8), (7, 1)])
def test_matching_and_merging_as_plain_loops(tokens, r):
    g = torch.Generator().manual_seed(tokens)
    x, metric = torch.randn(3, tokens, 5, generator=g), torch.randn(3, tokens, 4, generator=g)
    out = merge(x, match(metric, r))
    assert out.shape == (3, tokens - r, 5)
    for b in range(3):
        torch.testing.assert_close(out[b], plain_merge(x[b], metric[b], r))


def test_weighted_merges_keep_each_images_patches_and_their_sum():
    g = torch.Generator().manual_seed(0)
    prefix, patches = 2, 20
    x = torch.randn(2, prefix + patches, 6, generator=g)
    state = TokenMerging(4, prefix)
    first = state(x, torch.randn(2, prefix + patches, 3, generator=g))
    second = state(first, torch.randn(2, prefix + patches - 4, 3, generator=g))
    assert second.shape == (2, prefix + patches - 8, 6)
    assert torch.equal(second[:, :prefix], x[:, :prefix]) and (state.size[:, :prefix] == 1).all()
    assert (state.size[:, prefix:].sum(1) == patches).all()
    # each token the size-weighted mean of the patches it stands for: the weighted sum is the patches' sum
    torch.testing.assert_close((second[:, prefix:] * state.size[:, prefix:]).sum(1), x[:, prefix:].sum(1))
    # more than half the patches cannot go in one block: r is cut to what the pairs allow
    small = TokenMerging(50, prefix)
    assert small(x, torch.randn(2, prefix + patches, 3, generator=g)).shape[1] == prefix + patches // 2


def test_proportional_attention_is_attention_over_copies():
    """A token standing for s patches is attended as s copies of it: the block's output for each
    token equals the unmerged block's on the tokens repeated by their sizes."""
    torch.manual_seed(0)
    block = Attention(16, 2).eval()
    x = torch.randn(1, 6, 16)
    size = torch.tensor([1.0, 3.0, 1.0, 2.0, 1.0, 4.0]).view(1, 6, 1)
    state = TokenMerging(0, 1)   # r = 0: attention with the sizes, no further merge
    state.size = size
    block.token_merging = state
    with torch.no_grad():
        merged = block(x)
        block.token_merging = None
        copies = block(x.repeat_interleave(size.flatten().long(), dim=1))
    first = torch.cumsum(size.flatten().long(), 0) - size.flatten().long()   # each token's first copy
    torch.testing.assert_close(merged[0], copies[0, first], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", ["mean", "attention"])
def test_pooling_weighs_merged_tokens_as_copies(pool):
    torch.manual_seed(1)
    attention = AttentionPool(16, 2, 2.0) if pool == "attention" else None
    head = Head(16, 4, pool, "tokens", "pre", 0.0, prefix=1, attention=attention).eval()
    x = torch.randn(2, 5, 16)
    size = torch.tensor([[1.0, 2.0, 1.0, 3.0, 1.0], [1.0, 1.0, 4.0, 1.0, 2.0]]).view(2, 5, 1)
    state = TokenMerging(0, 1)
    state.size = size
    with torch.no_grad():
        head.token_merging = state
        merged = head(x)
        head.token_merging = None
        for b in range(2):
            copies = x[b:b + 1].repeat_interleave(size[b].flatten().long(), dim=1)
            torch.testing.assert_close(merged[b], head(copies)[0], atol=1e-5, rtol=1e-5)


def test_a_vit_merges_r_tokens_a_block_and_never_its_prefix_tokens():
    spec = spec_of("[{kind: vit, heads: 2, repeat: 3}]", extra="  registers: 2\n")
    model = build_model(spec).eval()
    x = torch.randn(3, 3, 8, 8)
    seen = []
    hooks = [layer.module.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
             for layer in model.layers if layer.kind == "channel_mlp"]
    with torch.no_grad():
        plain = model(x)
        assert seen == [19, 19, 19]   # class token, 2 registers, 16 patches
        seen.clear()
        with merging(model, 0):
            torch.testing.assert_close(model(x), plain, atol=0, rtol=0)
        seen.clear()
        with merging(model, 3) as layers:
            merged = model(x)
            state = model.token_merging
            assert seen == [16, 13, 10] and [layer.name for layer in layers] == [
                f"blocks[0].attention #{i}" for i in (1, 2, 3)]
            assert (state.size[:, :3] == 1).all() and (state.size[:, 3:].sum(1) == 16).all()
            assert tokens_after(model, 3) == [(layer.name, n, n - 3) for layer, n in zip(layers, (19, 16, 13))]
        assert model.token_merging is None and all(getattr(layer.module, "token_merging", None) is None for layer in model.layers)
        assert torch.equal(model(x), plain) and merged.shape == plain.shape and not torch.equal(merged, plain)


def test_which_blocks_merge_and_what_is_refused():
    hybrid = build_model(spec_of("[{kind: mixer, token_hidden: 8}, {kind: vit, heads: 2, repeat: 2}]"))
    assert [layer.name for layer in merging_blocks(hybrid)] == ["blocks[1].attention #1", "blocks[1].attention #2"]
    refused = {
        ("[{kind: vit, heads: 2}, {kind: mixer, token_hidden: 8}]", "learned"):
            "in this model blocks[1].token_mlp comes after its last attention block",
        ("[{kind: convmixer, kernel_size: 3}]", "learned"): "in this model it has no attention blocks",
        ("[{kind: vit, heads: 2, window: 2}]", "learned"): "cannot run in blocks[0].attention: windowed attention",
        ("[{kind: vit, heads: 2}]", "rope"): "cannot run in blocks[0].attention: rope needs each token's place",
    }
    for (blocks, pos), message in refused.items():
        with pytest.raises(UserError) as caught:
            merging_blocks(build_model(spec_of(blocks, "{pool: mean}", pos=pos)))
        assert message in str(caught.value), str(caught.value)


def test_evaluate_and_predict_merge_tokens(tmp_path):
    from PIL import Image

    from composer.api import train

    train(spec_of("[{kind: vit, heads: 2, repeat: 2}]", overrides=[f"train.out_dir={tmp_path / 'run'}"]),
          echo=lambda *a, **k: None)
    plain = run_cli("evaluate", tmp_path / "run")
    assert plain.returncode == 0 and " img/s" in plain.stdout and "token merging" not in plain.stdout, plain.stderr
    merged = run_cli("evaluate", tmp_path / "run", "--merge", 2)
    assert merged.returncode == 0, merged.stderr
    assert "token merging: 2 a block in 2 attention blocks, 17 -> 13 tokens, 252.16k -> 221.20k FLOPs an image" \
        in merged.stdout
    data = json.loads(run_cli("evaluate", tmp_path / "run", "--merge", 2, "--json").stdout)
    model = build_model(spec_of("[{kind: vit, heads: 2, repeat: 2}]"))
    assert data["merge"] == {"r": 2, "blocks": 2, "tokens": [17, 13],
                             "flops": [sum(layer.cost.flops for layer in model.layers), flops_with(model, 2)]}
    assert data["img_per_s"] > 0 and data["merge"]["flops"][1] < data["merge"]["flops"][0]
    Image.new("RGB", (20, 20), 90).save(tmp_path / "x.png")
    predicted = run_cli("predict", tmp_path / "run", tmp_path / "x.png", "--merge", 2)
    assert predicted.returncode == 0 and "17 -> 13 tokens" in predicted.stdout, predicted.stderr
    mixer = spec_of("[{kind: mixer, token_hidden: 8}]", "{pool: mean}", overrides=[f"train.out_dir={tmp_path / 'm'}"])
    train(mixer, echo=lambda *a, **k: None)
    assert_user_error(run_cli("evaluate", tmp_path / "m", "--merge", 2), "token merging runs in the attention blocks",
                      "it has no attention blocks")


def test_export_builds_token_merging_into_the_program(tmp_path):
    """`composer export --merge R`: the program merges as `evaluate --merge` does (its logits equal the
    merging model's at any batch size), and says so in its metadata."""
    from composer.api import train
    from composer.checkpoint import load_run
    from composer.data import normalize

    train(spec_of("[{kind: vit, heads: 2, repeat: 2}]", overrides=[f"train.out_dir={tmp_path / 'run'}"]),
          echo=lambda *a, **k: None)
    result = run_cli("export", tmp_path / "run", tmp_path / "m.pt2", "--merge", 3)
    assert result.returncode == 0 and "17 -> 11 tokens" in result.stdout, result.stderr
    extra = {"composer.json": ""}
    program = torch.export.load(tmp_path / "m.pt2", extra_files=extra)
    assert json.loads(extra["composer.json"])["merge"]["tokens"] == [17, 11]
    _, model, state = load_run(tmp_path / "run")
    for batch in (1, 5):
        images = torch.randint(0, 256, (batch, 3, 8, 8), dtype=torch.uint8)
        x = normalize(images, state["normalization"]["mean"], state["normalization"]["std"])
        with torch.no_grad(), merging(model, 3):
            expected = model(x)
        with torch.no_grad():
            assert not torch.allclose(model(x), expected)   # merging changed the logits: the program must too
        torch.testing.assert_close(program.module()(images), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blocks, head", [("[{kind: vit, heads: 2, repeat: 3}]", "{pool: cls}"),
                                         ("[{kind: mixer, token_hidden: 8}, {kind: vit, heads: 2, repeat: 2}]",
                                          "{pool: mean}")])
def test_flops_while_merging_as_flop_counter_counts_them(blocks, head):
    """flops_with: torch's flop counter over a merging forward pass (every projection, attention, MLP
    and the matching's similarities at the tokens they really see)."""
    from torch.utils.flop_counter import FlopCounterMode

    count_cpu_attention_flops()
    model = build_model(spec_of(blocks, head)).eval()
    for r in (0, 3):
        with torch.no_grad(), merging(model, r), FlopCounterMode(display=False) as counter:
            model(torch.randn(1, 3, 8, 8))
        assert flops_with(model, r) == counter.get_total_flops(), r
    assert flops_with(model, 0) == sum(layer.cost.flops for layer in model.layers)   # no merge: the summary's


def test_summarize_shows_tokens_and_flops_while_merging(tmp_path):
    from composer.summarize import summarize

    spec = spec_of("[{kind: mixer, token_hidden: 8}, {kind: vit, heads: 2, repeat: 2}]", "{pool: mean}")
    model = build_model(spec)
    plain, merged = summarize(spec), summarize(spec, merge=3)
    assert merged["flops"] == flops_with(model, 3) < plain["flops"] and merged["merge"] == 3
    shapes = [(r["name"], r["input"][1], r["output"][1]) for r in merged["rows"][-5:]]
    assert shapes == [("blocks[1].attention #1", 16, 13), ("blocks[1].channel_mlp #1", 13, 13),
                      ("blocks[1].attention #2", 13, 10), ("blocks[1].channel_mlp #2", 10, 10), ("head", 10, 4)]
    assert [r["input"] for r in merged["rows"][:-5]] == [r["input"] for r in plain["rows"][:-5]]
    (tmp_path / "m.yaml").write_text(spec_text("[{kind: vit, heads: 2, repeat: 2}]"))
    shown = run_cli("summarize", tmp_path / "m.yaml", "--merge", 3)
    assert shown.returncode == 0 and "(1, 14, 16) -> (1, 11, 16)" in shown.stdout and "Token merging (3)" in shown.stdout
    assert_user_error(run_cli("summarize", SPECS / "swin_t.yaml", "--merge", 3), "windowed attention")





def test_bench_infer_times_each_merge_setting(tmp_path, monkeypatch):
    """`composer bench infer`: every --merge setting timed once a round, interleaved, the median of
    the rounds after two warm-up ones; a spec's model (fresh weights) or a run's; mistakes named."""
    import composer.bench as bench

    (tmp_path / "m.yaml").write_text(spec_text("[{kind: vit, heads: 2, repeat: 2}]"))
    calls = []
    real = merging
    monkeypatch.setattr("composer.merging.merging", lambda model, r: calls.append(r) or real(model, r))
    rows = bench.bench_infer(str(tmp_path / "m.yaml"), batch_size=4, merges=(0, 3), rounds=4, echo=lambda *a: None)
    assert calls == [0, 3] * 4   # one of each a round
    model = build_model(spec_of("[{kind: vit, heads: 2, repeat: 2}]"))
    assert [(row["merge"], row["tokens"], row["flops_per_image"]) for row in rows] == [
        (0, None, sum(layer.cost.flops for layer in model.layers)), (3, (17, 11), flops_with(model, 3))]
    assert all(row["img_per_s"] > 0 and row["ms_per_batch"] > 0 for row in rows)
    shown = run_cli("bench", "infer", tmp_path / "m.yaml", "--merge", "0,3", "--batch-size", 4, "--rounds", 3)
    assert shown.returncode == 0, shown.stderr
    assert "--merge 3   17 -> 11 tokens" in shown.stdout and "medians of 1 interleaved rounds" in shown.stdout
    assert_user_error(run_cli("bench", "infer", tmp_path / "m.yaml", "--merge", "0,a"), "--merge 0,a: give whole numbers")
    assert_user_error(run_cli("bench", "infer", tmp_path / "m.yaml", "--rounds", 2), "--rounds 2: the first two")
    (tmp_path / "x.yaml").write_text(spec_text("[{kind: mixer, token_hidden: 8}]", "{pool: mean}"))
    assert_user_error(run_cli("bench", "infer", tmp_path / "x.yaml", "--merge", "4"), "it has no attention blocks")


def test_spec_rules_of_token_merging_point_at_their_lines():
    from composer.spec import SpecError

    cases = {
        spec_text("[{kind: vit, heads: 2}, {kind: mixer, token_hidden: 8}]", "{pool: mean}",
                  extra="  token_merging: 2\n"): ("model.token_merging", "blocks[1] (mixer) ends this one"),
        spec_text("[{kind: vit, heads: 2}]", extra="  token_merging: 2\n", pos="rope"):
            ("model.token_merging", "pos_embed rope needs each token's place on the grid"),
        spec_text("[{kind: vit, heads: 2, window: 2}]", "{pool: mean}", extra="  token_merging: 2\n"):
            ("model.token_merging", "blocks[0] attends within windows"),
        spec_text("[{kind: vit, heads: 2}]", extra="  token_merging: 2\n").replace(
            "device: cpu}", "device: cpu, recompute: true}"): ("train.recompute", "the tokens it merged are gone"),
    }
    for text, (field, message) in cases.items():
        with pytest.raises(SpecError) as caught:
            load_spec_text(text, "m.yaml")
        said = str(caught.value)
        key = field.split(".")[1] + ":"
        line = next(i for i, text_line in enumerate(text.splitlines(), 1) if key in text_line)
        assert message in said and f"m.yaml:{line}:" in said and field in said, said


def test_a_model_trained_with_token_merging(tmp_path):
    """model.token_merging: the model merges in training (its gradients those of the merging
    computation: gradcheck in float64), the log says so, and evaluate, summarize and export
    merge by default (--merge 0 turns it off); visualize draws the unmerged model's maps."""
    from composer.api import train
    from composer.summarize import summarize

    spec = spec_of("[{kind: vit, heads: 2, repeat: 2}]", extra="  token_merging: 2\n",
                   overrides=[f"train.out_dir={tmp_path / 'run'}", "train.ema=0.9"])   # (the EMA copy merges too)
    model = build_model(spec).double()
    assert model.token_merging is not None and model.token_merging.r == 2
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda images: model(images).sum(), (x,))
    with torch.no_grad(), merging(model, 0):
        assert model.token_merging is None
    assert model.token_merging.r == 2   # back to its own after the context
    said = []
    train(spec, echo=lambda line="", *a, **k: said.append(str(line)))
    assert "token merging: 2 a block in 2 attention blocks, 17 -> 13 tokens" in said, said
    assert summarize(spec)["merge"] == 2 and summarize(spec, merge=0).get("merge") is None
    own = json.loads(run_cli("evaluate", tmp_path / "run", "--json").stdout)
    assert own["merge"]["tokens"] == [17, 13]
    off = json.loads(run_cli("evaluate", tmp_path / "run", "--merge", "0", "--json").stdout)
    assert "merge" not in off
    drawn = run_cli("visualize", "attention", tmp_path / "run", "--image", 0, "--out", tmp_path / "fig")
    assert drawn.returncode == 0, drawn.stderr


def test_a_merging_model_compiles_to_the_same_forward_and_backward():
    torch.manual_seed(0)
    model = build_model(spec_of("[{kind: vit, heads: 2, repeat: 2}]", extra="  token_merging: 3\n"))
    x = torch.randn(4, 3, 8, 8)
    eager = model(x)
    eager.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)   # traced whole: no graph break
    compiled.square().sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)
    assert model.token_merging.size.shape == (4, 11, 1)   # 16 patches, 3 merged twice, and the class token
