"""The builder: every shipped spec builds and trains a step; counts match reality and references."""
import einops
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from composer.blocks import REGISTRY, set_backend
from composer.build import build_model, count_params
from composer.spec import load_spec, load_spec_text
from composer.summarize import summarize
from tests.helpers import SPECS, count_cpu_attention_flops

# Parameter counts of the published reference implementations (timm, pretrained=False).
PUBLISHED = {
    "vit_ti16": 5_717_416,
    "vit_s16": 22_050_664,
    "vit_b16": 86_567_656,
    "mixer_s16": 18_528_264,
    "mixer_b16": 59_880_472,
    "convmixer_768_32": 21_110_248,
    "convmixer_1536_20": 51_625_960,
    # timm's 22,059,496 and the class token's position row, which timm's DeiT III does not have
    # (the import sets it to zero: the same network)
    "deit3_s16": 22_059_496 + 384,
    "convnext_tiny": 28_589_128,
    "swin_t": 28_288_354,
    "deit_s16_distilled": 22_436_432,
}
ALL_SPECS = sorted(p for p in SPECS.glob("*.yaml"))
count_cpu_attention_flops()


@pytest.mark.parametrize("path", ALL_SPECS, ids=lambda p: p.stem)
def test_summary_counts_match_the_model(path):
    spec = load_spec(path)
    with torch.device("meta"):  # shapes only: fast even for ViT-B and ConvMixer-1536
        model = build_model(spec, backend="reference")
        summary = summarize(spec, model=model)
        m = spec.model
        with FlopCounterMode(display=False) as counter:
            model(torch.rand(1, m.in_channels, m.image_size, m.image_size))
    assert summary["params"] == count_params(model) == sum(r["params"] for r in summary["rows"])
    assert summary["flops"] == counter.get_total_flops(), (summary["flops"], counter.get_total_flops())


@pytest.mark.parametrize("path", ALL_SPECS, ids=lambda p: p.stem)
def test_spec_runs_forward_and_backward_on_cpu(path):
    """Every block of every shipped spec at its real width and image size, with at most two
    copies of each (the meta-device test above builds the full depth)."""
    torch.manual_seed(0)
    blocks = load_spec(path).model.blocks
    spec = load_spec(path, [f"model.blocks[{i}].repeat=2" for i, b in enumerate(blocks) if b.repeat > 2])
    model = build_model(spec, backend="reference")
    m = spec.model
    logits = model(torch.rand(1, m.in_channels, m.image_size, m.image_size))
    assert logits.shape == (1, m.num_classes) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_standard_specs_match_published_parameter_counts(name):
    with torch.device("meta"):  # no memory, no init cost
        model = build_model(load_spec(SPECS / f"{name}.yaml"))
    assert count_params(model) == PUBLISHED[name]


def per_layer_flops(spec):
    """flop_counter's count for each stage of the model, on the reference path."""
    model = build_model(spec, backend="reference")
    m = spec.model
    with FlopCounterMode(display=False) as counter:
        model(torch.rand(1, m.in_channels, m.image_size, m.image_size))
    counts = counter.get_flop_counts()
    return model, [sum(counts.get(f"ComposedModel.stages.{i}", {}).values()) for i in range(len(model.layers))]


def test_per_block_flops_match_flop_counter():
    spec = load_spec(SPECS / "seed_convmixer_mixer.yaml")
    model, measured = per_layer_flops(spec)
    assert [layer.cost.flops for layer in model.layers] == measured


HYBRID = """
model:
  image_size: 32
  num_classes: 10
  stem: {patch_size: 4, dim: 32}
  blocks:
    - {kind: convmixer, kernel_size: 3}
    - {kind: mixer, repeat: 2}
    - {kind: dwconv, kernel_size: 5}
    - {kind: vit, heads: 2}
  head: {pool: cls}
"""


def test_layout_adapters_only_where_layout_changes():
    model = build_model(load_spec_text(HYBRID))
    kinds = [layer.kind for layer in model.layers]
    assert kinds == ["stem (conv)", "dwconv", "pointwise", "rearrange", "token_mlp", "channel_mlp", "token_mlp",
                     "channel_mlp", "rearrange", "dwconv", "rearrange", "cls_token", "attention", "channel_mlp",
                     "head (cls)"]
    # the class token joins only for the trailing token run, so token_mlp sees 64 tokens and attention 65
    assert model.layers[4].ctx.tokens == 64 and model.layers[12].in_shape == (65, 32)
    out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_linear_stem_equals_conv_stem_math():
    conv = build_model(load_spec_text(HYBRID.replace("dim: 32}", "dim: 32, kind: conv}")))
    linear = build_model(load_spec_text(HYBRID.replace("dim: 32}", "dim: 32, kind: linear}")))
    assert count_params(conv) == count_params(linear)
    w = conv.layers[0].module.project.weight  # (C, Cin, p, p) -> Linear weight over (p q c)
    linear.layers[0].module.project[1].weight.data = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
    linear.layers[0].module.project[1].bias.data = conv.layers[0].module.project.bias.data
    x = torch.rand(2, 3, 32, 32)
    tokens = linear.layers[0].module(x)
    grid = conv.layers[0].module(x)
    torch.testing.assert_close(tokens, grid.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_every_registered_block_runs_on_triton_like_reference():
    # Each registered kind, built alone, gives the same output on the Triton path (the interpreter on CPU)
    # as on the reference path.
    for kind, cls in REGISTRY.items():
        extra = {"attention": "heads: 2", "dwconv": "kernel_size: 3"}.get(kind, "")
        text = f"model: {{image_size: 16, num_classes: 3, stem: {{patch_size: 4, dim: 32}}, " \
               f"blocks: [{{kind: {kind}{', ' + extra if extra else ''}}}]}}"
        torch.manual_seed(0)
        model = build_model(load_spec_text(text), backend="triton").eval()
        x = torch.rand(2, 3, 16, 16)
        with torch.no_grad():
            fast = model(x)
            set_backend(model, "reference")
            torch.testing.assert_close(fast, model(x), rtol=1e-4, atol=1e-4)
        assert any(isinstance(layer.module, cls) for layer in model.layers), kind


@pytest.mark.parametrize("kind, spec", [
    ("attention", "{kind: attention, heads: 2}"), ("token_mlp", "{kind: token_mlp}"),
    ("dwconv", "{kind: dwconv, kernel_size: 3}"), ("attention", "{kind: attention, heads: 2, qk_norm: true, "
                                                  "layer_scale: 0.1}"),
    ("token_mlp", "{kind: token_mlp, layer_scale: 0.1}"), ("attention (rope)", "{kind: attention, heads: 2}"),
    ("attention (shifted windows)", "{kind: attention, heads: 2, window: 2, shift: true, repeat: 2}"),
    ("attention (relative)", "{kind: attention, heads: 2, window: 2}"), ("pool", "{kind: pool, layer_scale: 0.1}")])
def test_blocks_compile_fullgraph(kind, spec):
    """torch.compile(fullgraph=True) traces each fused-op block without a graph break (reference path on CPU)."""
    from composer.blocks.base import Context

    ctx = Context(dim=8, tokens=16, grid=(4, 4), backend="auto", rotary=kind.endswith("(rope)"),
                  repeat=1, relative=kind.endswith("(relative)"))   # the second copy: its windows shifted
    kind = kind.split(" ")[0]
    block_spec = load_spec_text(f"model: {{image_size: 16, num_classes: 2, stem: {{patch_size: 4, dim: 8}}, "
                                f"blocks: [{spec}]}}").model.blocks[0]
    block = REGISTRY[kind].from_spec(block_spec, ctx).eval()
    x = torch.randn(2, 16, 8) if REGISTRY[kind].layout == "tokens" else torch.randn(2, 8, 4, 4)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), block(x))


def _fused_op_model(backend):
    text = ("model: {image_size: 16, num_classes: 3, stem: {patch_size: 4, dim: 16}, blocks: "
            "[{kind: convmixer, kernel_size: 3}, {kind: mixer, token_hidden: 8}, {kind: vit, heads: 2}]}")
    return build_model(load_spec_text(text), backend=backend)


def test_prepare_for_compile_policy():
    """Under torch.compile: kernels auto on CUDA runs the depthwise convolution as Triton kernels
    outside the graph and keeps the other blocks PyTorch; kernels triton runs every fused op
    outside the graph; on CPU auto leaves everything in the graph."""
    from composer.blocks import Block
    from composer.build import model_backend, prepare_for_compile

    def fused_blocks(model):
        return {m.kernel_op: m for m in model.modules() if isinstance(m, Block) and m.kernel_op}

    with torch.device("meta"):
        auto = _fused_op_model(model_backend("auto", compile_model=True))
        auto_cpu = _fused_op_model(model_backend("auto", compile_model=True))
        triton = _fused_op_model(model_backend("triton", compile_model=True))
    assert prepare_for_compile(auto, "auto", torch.device("cuda")) == ["dwconv2d"]
    blocks = fused_blocks(auto)
    assert blocks["dwconv2d"].backend == "auto" and blocks["dwconv2d"].kernel_outside_graph
    assert all(blocks[op].backend == "reference" and not blocks[op].kernel_outside_graph
               for op in ("attention", "token_mlp"))
    assert prepare_for_compile(auto_cpu, "auto", torch.device("cpu")) == []
    assert not any(b.kernel_outside_graph for b in fused_blocks(auto_cpu).values())
    assert prepare_for_compile(triton, "triton", torch.device("cpu")) == ["attention", "dwconv2d", "token_mlp"]
    assert all(b.backend == "triton" and b.kernel_outside_graph for b in fused_blocks(triton).values())


def test_kernels_outside_the_graph_run_between_compiled_regions():
    """A compiled model whose fused ops are marked to run outside the graph: each op is a graph
    break (the Triton kernels, interpreted here, run eagerly), and output and gradients equal
    the eager model's."""
    from composer.blocks import Block

    torch.manual_seed(0)
    model = _fused_op_model("triton").train()
    for module in model.modules():
        if isinstance(module, Block) and module.kernel_op:
            module.kernel_outside_graph = True
    x = torch.rand(2, 3, 16, 16)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count >= 3, explanation.break_reasons   # one per fused op
    torch._dynamo.reset()

    def loss_and_grads(m):
        loss = m(x).square().sum()
        return [loss] + list(torch.autograd.grad(loss, list(model.parameters())))

    compiled = torch.compile(model, backend="aot_eager")
    for got, want in zip(loss_and_grads(compiled), loss_and_grads(model)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _step_results(model, x) -> list:
    """One training step's loss, input gradient, parameter gradients and buffers (running statistics)."""
    xi = x.clone().requires_grad_()
    loss = model(xi).square().sum()
    loss.backward()
    return [loss, xi.grad] + [p.grad for p in model.parameters()] + list(model.buffers())


def _convmixer_pair(drop_path=0.0, activation="gelu"):
    text = ("model: {image_size: 16, num_classes: 3, stem: {patch_size: 2, dim: 16}, blocks: "
            f"[{{kind: convmixer, kernel_size: 3, repeat: 2, drop_path: {drop_path}, activation: {activation}}}]}}")
    torch.manual_seed(0)
    fused = build_model(load_spec_text(text), backend="triton").train()
    plain = build_model(load_spec_text(text), backend="reference").train()
    plain.load_state_dict(fused.state_dict())
    return fused, plain


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_convmixer_blocks_fused_batch_norm(activation, monkeypatch):
    """Training with kernels triton runs each ConvMixer BatchNorm (GELU before it, the residual
    after it) as kernels.batch_norm: output, input gradient, every parameter gradient and the
    running statistics (and batch count) equal nn.BatchNorm2d's."""
    import kernels
    from composer.blocks import base

    calls, blocks = [], []
    real, real_block = kernels.batch_norm, kernels.dwconv_batch_norm_residual
    monkeypatch.setattr(base.kernels, "batch_norm", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setattr(base.kernels, "dwconv_batch_norm_residual",
                        lambda *a, **k: blocks.append(k) or real_block(*a, **k))
    fused, plain = _convmixer_pair(activation=activation)
    x = torch.rand(3, 3, 16, 16)
    results = [_step_results(model, x) for model in (fused, plain)]
    # GELU: the depthwise blocks run as one op each, the pointwise blocks' GELU and BatchNorm as
    # another. ReLU: the depthwise blocks' BatchNorm and residual add fused, the pointwise
    # blocks keep nn.Sequential.
    assert len(blocks) == (2 if activation == "gelu" else 0)
    assert len(calls) == 2
    assert all((k["activation"] == "gelu") == (activation == "gelu") for k in calls)
    assert all((k["residual"] is None) == (activation == "gelu") for k in calls)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert all(int(b) == 1 for name, b in fused.named_buffers() if name.endswith("num_batches_tracked"))


def test_conv_stem_gelu_batch_norm_fused(monkeypatch):
    """A conv stem with GELU and BatchNorm (ConvMixer's) trains them as one kernels.batch_norm
    with kernels triton: output, input gradient, every parameter gradient and the running
    statistics equal the PyTorch stem's; in eval mode and on channels_last input it keeps
    nn.BatchNorm2d; a stem with another activation never takes it."""
    import kernels
    from composer.blocks import base

    calls = []
    real = kernels.batch_norm
    monkeypatch.setattr(base.kernels, "batch_norm", lambda *a, **k: calls.append(k) or real(*a, **k))
    text = ("model: {image_size: 8, num_classes: 3, stem: {patch_size: 1, dim: 8, activation: %s, norm: batchnorm},"
            " blocks: [{kind: pointwise, activation: relu}]}")
    torch.manual_seed(0)
    fused = build_model(load_spec_text(text % "gelu"), backend="triton").train()
    plain = build_model(load_spec_text(text % "gelu"), backend="reference").train()
    plain.load_state_dict(fused.state_dict())
    x = torch.rand(3, 3, 8, 8)
    results = [_step_results(model, x) for model in (fused, plain)]
    assert len(calls) == 1 and calls[0]["activation"] == "gelu" and calls[0]["residual"] is None
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), plain.eval()(x))
        fused.train(), plain.train()
        cl = x.to(memory_format=torch.channels_last)
        torch.testing.assert_close(fused(cl), plain(cl), rtol=1e-4, atol=1e-5)
    assert not calls
    relu = build_model(load_spec_text(text % "relu"), backend="triton").train()
    relu(x)
    assert not calls and relu.layers[0].module.norm_op is None


def test_convmixer_blocks_fused_batch_norm_falls_back(monkeypatch):
    """Where kernels.batch_norm does not apply the blocks keep nn.BatchNorm2d: eval mode,
    channels_last input, and drop-path (the branch is dropped before the residual add, which
    then stays apart) gives the same as the PyTorch model."""
    import kernels
    from composer.blocks import base

    calls = []
    real = kernels.batch_norm
    monkeypatch.setattr(base.kernels, "batch_norm", lambda *a, **k: calls.append(k) or real(*a, **k))
    fused, plain = _convmixer_pair()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), plain.eval()(x))
        assert not calls
        fused.train(), plain.train()
        cl = x.to(memory_format=torch.channels_last)
        torch.testing.assert_close(fused(cl), plain(cl), rtol=1e-4, atol=1e-5)
        assert not calls   # the stem keeps channels_last, and so does every block after it
    calls.clear()
    fused, plain = _convmixer_pair(drop_path=0.5)
    torch.manual_seed(1)
    got = fused(x)
    torch.manual_seed(1)
    torch.testing.assert_close(got, plain(x), rtol=1e-4, atol=1e-5)
    assert calls and all(k["residual"] is None for k in calls)


@pytest.mark.parametrize("backend, device", [("reference", "cpu"),
                                             pytest.param("triton", "cuda", marks=pytest.mark.gpu)])
def test_frozen_stages_keep_their_weights_and_statistics_and_run_as_in_evaluation(backend, device):
    import copy

    from composer.optim import frozen_stages
    spec = load_spec_text("""
model:
  image_size: 16
  num_classes: 5
  stem: {patch_size: 2, dim: 16, activation: gelu, norm: batchnorm}
  blocks:
    - {kind: convmixer, kernel_size: 3, repeat: 2, drop_path: 0.5}
    - {kind: mixer, token_hidden: 8, drop_path: 0.5}
  head: {pool: mean}
""")
    torch.manual_seed(0)
    model = build_model(spec, backend=backend).to(device)
    stages = frozen_stages(model, 1)   # the stem and the first convmixer block
    reference = copy.deepcopy(model)
    frozen = model.freeze(stages)
    assert frozen == sum(p.numel() for stage in model.stages[:stages] for p in stage.parameters()) > 0
    model.train()
    assert [stage.training for stage in model.stages] == [False] * stages + [True] * (len(model.stages) - stages)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    x = torch.randn(6, 3, 16, 16, device=device)
    torch.manual_seed(1)
    out = model(x)
    # the same as running the prefix in evaluation mode and the rest in training mode
    h = x
    torch.manual_seed(1)
    for i, stage in enumerate(reference.stages):
        stage.train(i >= stages)
        h = stage(h)
    torch.testing.assert_close(out, h, rtol=0, atol=0 if device == "cpu" else 1e-6)   # the same ops: equal
    out.square().mean().backward()
    for i, stage in enumerate(model.stages):
        for name, p in stage.named_parameters():
            assert (p.grad is None) == (i < stages), (model.layers[i].name, name)
            assert p.requires_grad == (i >= stages)
    after = model.state_dict()
    prefix = tuple(f"stages.{i}." for i in range(stages))
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    # the BatchNorm statistics move in the second convmixer block only
    assert moved and all(k.startswith(("stages.3.", "stages.4.")) for k in moved), moved
    assert any(k.endswith("running_mean") for k in before if k.startswith(prefix))


VARIANTS = """
model:
  image_size: 16
  num_classes: 3
  stem: {patch_size: 4, dim: 16}
  pos_embed: learned
  registers: 3
  blocks:
    - {kind: convmixer, kernel_size: 3}
    - {kind: mixer, token_hidden: 8, layer_scale: 0.5}
    - {kind: vit, heads: 2, qk_norm: true, layer_scale: 0.1}
  head: {pool: mean, norm: pooled}
"""


def test_register_tokens_join_with_the_class_token_and_leave_at_the_head():
    model = build_model(load_spec_text(VARIANTS.replace("pool: mean", "pool: cls")), backend="reference").eval()
    kinds = [layer.kind for layer in model.layers]
    # both join where the trailing token run starts, after the position embedding: registers have no position
    assert kinds[kinds.index("pointwise") + 1:kinds.index("token_mlp")] == ["rearrange", "cls_token", "registers"]
    assert model.layers[kinds.index("token_mlp")].in_shape == (16 + 1 + 3, 16)
    registers = model.layers[kinds.index("registers")].module
    assert registers.tokens.shape == (1, 3, 16) and registers.tokens.std() > 0.005
    assert len(set(registers.tokens[0, :, 0].tolist())) == 3   # distinct, or they would stay alike
    x = torch.randn(2, 5, 16)
    out = registers(x)
    # order: class token, registers, patches
    assert torch.equal(out[:, :1], x[:, :1]) and torch.equal(out[:, 4:], x[:, 1:])
    assert torch.equal(out[:, 1:4], registers.tokens.expand(2, -1, -1))

    # mean pooling leaves the registers out; norm: pooled normalizes the pooled vector
    model = build_model(load_spec_text(VARIANTS), backend="reference").eval()
    head = model.layers[-1].module
    tokens = torch.randn(2, 19, 16)
    expected = head.classify(torch.nn.functional.layer_norm(tokens[:, 3:].mean(1), (16,), head.norm.weight,
                                                            head.norm.bias, eps=1e-6))
    torch.testing.assert_close(head(tokens), expected)


def test_registers_need_tokens_at_the_end():
    from composer.spec import SpecError

    with pytest.raises(SpecError) as caught:
        load_spec_text(VARIANTS.replace("- {kind: vit, heads: 2, qk_norm: true, layer_scale: 0.1}",
                                        "- {kind: convmixer, kernel_size: 3}"), "v.yaml")
    assert "v.yaml:7:14: model.registers: register tokens need token layout at the end, but the last block " \
           "(convmixer) works on the grid" in str(caught.value)


def test_layer_scale_and_qk_norm_compute_what_they_say():
    torch.manual_seed(0)
    model = build_model(load_spec_text(VARIANTS), backend="reference").eval()
    token_mlp, channel_mlp, attention = (layer.module for layer in model.layers
                                         if layer.kind in ("token_mlp", "attention")
                                         or layer.name == "blocks[1].channel_mlp")
    assert torch.equal(token_mlp.scale.gamma, torch.full((16,), 0.5))
    assert torch.equal(attention.scale.gamma, torch.full((16,), 0.1))
    with torch.no_grad():
        for module in (token_mlp, channel_mlp, attention):
            module.scale.gamma.normal_()
            for p in module.parameters():
                if p.ndim == 1 and p is not module.scale.gamma:
                    p.normal_()   # norms and biases away from their starting values: a misplaced one shows
    x = torch.randn(2, 19, 16)
    with torch.no_grad():
        for module in (token_mlp, channel_mlp):
            scale = module.scale
            module.scale = torch.nn.Identity()
            branch = module(x) - x   # the block without its factor
            module.scale = scale
            torch.testing.assert_close(module(x), x + scale.gamma * branch, rtol=1e-5, atol=1e-6)

        # attention: per-head LayerNorm of queries and keys, then softmax attention, projection, factor
        h, d = 2, 8
        q, k, v = attention.to_qkv(attention.norm(x)).reshape(2, 19, 3, h, d).unbind(2)
        q = torch.nn.functional.layer_norm(q, (d,), attention.q_norm.weight, attention.q_norm.bias, 1e-6)
        k = torch.nn.functional.layer_norm(k, (d,), attention.k_norm.weight, attention.k_norm.bias, 1e-6)
        weights = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) / d ** 0.5, -1)
        mixed = torch.einsum("bhnm,bmhd->bnhd", weights, v).reshape(2, 19, 16)
        expected = x + attention.scale.gamma * attention.to_out(mixed)
        torch.testing.assert_close(attention(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(attention.attention_probs(x), weights, rtol=1e-5, atol=1e-6)

    # under bf16 autocast the packed projection stays bf16 (LayerNorm's fp32 output is cast back)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention.packed_qkv(x).dtype == torch.bfloat16


def assert_triton_path_matches_reference(text: str):
    """The model of `text` on the Triton path (the interpreter on CPU) against the reference path,
    in training mode, fp32: outputs and every gradient. Its weights moved away from their starting
    values first (layer-scale factors and norms start at constants, where a misplaced one could
    hide). Returns the reference model."""
    torch.manual_seed(0)
    reference = build_model(load_spec_text(text), backend="reference").train()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    triton = build_model(load_spec_text(text), backend="triton").train()
    triton.load_state_dict(reference.state_dict())
    x = torch.randn(3, 3, 16, 16)
    out_ref, out_tri = reference(x), triton(x)
    torch.testing.assert_close(out_tri, out_ref, rtol=1e-4, atol=1e-5)
    out_ref.square().sum().backward()
    out_tri.square().sum().backward()
    for (name, p), q in zip(reference.named_parameters(), triton.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)
    return reference


def test_vit_variants_run_on_triton_like_reference_with_gradients():
    """Registers, layer scale (the token-MLP's around its fused op) and qk-norm."""
    assert_triton_path_matches_reference(VARIANTS)


def test_layer_scale_factors_and_registers_get_no_weight_decay():
    from composer.optim import param_groups

    model = build_model(load_spec_text(VARIANTS), backend="reference")
    decayed = {id(p) for group in param_groups(model, 0.05) if group["weight_decay"] for p in group["params"]}
    names = {name for name, p in model.named_parameters() if id(p) not in decayed}
    assert {name for name in names if name.endswith((".gamma", ".tokens"))} == {
        name for name, _ in model.named_parameters() if name.endswith((".gamma", ".tokens"))}
    matrices = {name for name, p in model.named_parameters() if name in names and p.ndim >= 2}
    assert matrices == {"stages.2.pos", "stages.7.tokens"}   # the position table and the registers


DEIT = """
model:
  image_size: 16
  num_classes: 3
  stem: {patch_size: 4, dim: 16}
  pos_embed: POS
  registers: 2
  blocks:
    - {kind: vit, heads: 2, repeat: 2}
  head: {pool: cls, distill_token: true, dropout: 0.5}
"""


@pytest.mark.parametrize("pos", ["learned", "sincos"])
def test_distillation_token_joins_beside_the_class_token_with_a_classifier_of_its_own(pos):
    """DeiT's distillation token: token 1, after the class token and before the registers; it
    gets a position like the class token (a learned row, or a zero row of the fixed table); its
    classifier reads it; the model returns their mean, or both logits in distilled training; it costs
    what flop_counter counts; neither token gets weight decay."""
    from composer.build import DistilledLogits
    from composer.optim import param_groups

    spec = load_spec_text(DEIT.replace("POS", pos))
    plain = build_model(load_spec_text(DEIT.replace("POS", pos).replace("distill_token: true, ", "")))
    model = build_model(spec, backend="reference")
    kinds = [layer.kind for layer in model.layers]
    assert kinds[1:kinds.index("attention")] == ["rearrange", "cls_token", f"pos_embed ({pos})", "registers"]
    assert model.layers[kinds.index("attention")].in_shape == (16 + 2 + 2, 16)
    tokens, table = (model.layers[kinds.index(k)].module for k in ("cls_token", f"pos_embed ({pos})"))
    assert table.pos.shape == (1, 18, 16)
    if pos == "sincos":
        assert torch.equal(table.pos[0, :2], torch.zeros(2, 16)) and table.pos[0, 2:].abs().sum() > 0
    assert tokens.dist_token.std() > 0.005 and not torch.equal(tokens.dist_token, tokens.token)
    x = torch.randn(2, 16, 16)
    assert torch.equal(tokens(x)[:, 1], tokens.dist_token.expand(2, -1, -1)[:, 0])
    head = model.layers[-1].module
    extra = 16 + 16 * 3 + 3   # the distillation token, its classifier, and one more position row when learned
    assert count_params(model) == count_params(plain) + extra + 16 * (pos == "learned")

    # the head: both classifiers on the LayerNormed tokens 0 and 1; dropout while training
    features = torch.randn(4, 20, 16)
    normed = torch.nn.functional.layer_norm(features, (16,), head.norm.weight, head.norm.bias, eps=1e-6)
    cls, dist = head.classify(normed[:, 0]), head.classify_dist(normed[:, 1])
    head.eval()
    torch.testing.assert_close(head(features), (cls + dist) / 2)
    torch.testing.assert_close(head.features(features), (normed[:, 0] + normed[:, 1]) / 2)
    head.train()
    torch.manual_seed(0)
    mean = head(features)   # a plain training forward: the mean, as evaluating (timm's default too)
    torch.manual_seed(0)
    assert model.distilled_training() and head.both_logits   # what train does when a teacher teaches
    out = head(features)
    assert isinstance(out, DistilledLogits)
    torch.testing.assert_close(mean, out.mean())
    torch.manual_seed(0)   # the same dropout masks, drawn in the same order
    kept = torch.nn.functional.dropout(normed[:, 0], 0.5), torch.nn.functional.dropout(normed[:, 1], 0.5)
    torch.testing.assert_close(out.cls, head.classify(kept[0]))
    torch.testing.assert_close(out.dist, head.classify_dist(kept[1]))
    torch.testing.assert_close(out.mean(), (out.cls + out.dist) / 2)

    model.eval()
    _, measured = per_layer_flops(spec)
    assert [layer.cost.flops for layer in model.layers] == measured
    decayed = {id(p) for group in param_groups(model, 0.05) if group["weight_decay"] for p in group["params"]}
    assert {name for name, p in model.named_parameters() if p.ndim >= 2 and id(p) not in decayed} == \
        {"stages.2.token", "stages.2.dist_token", "stages.4.tokens"} | ({"stages.3.pos"} if pos == "learned" else set())


def test_distillation_token_needs_the_class_token():
    from composer.spec import SpecError

    with pytest.raises(SpecError) as caught:
        load_spec_text(DEIT.replace("POS", "learned").replace("pool: cls", "pool: mean"), "d.yaml")
    assert ("d.yaml:10:37: model.head.distill_token: the distillation token sits beside the class token (DeiT), and "
            "mean pooling has none; set head.pool: cls, or remove distill_token") in str(caught.value)


def test_attention_pooling_is_one_query_attending_then_an_mlp_and_costs_what_flop_counter_counts():
    """head.pool: attention (MAP): the pooled vector is a learned query's multi-head attention over
    the patch tokens (registers left out), projected, plus an MLP of its LayerNorm; written out
    here with plain matrix products. Its FLOPs are flop_counter's; the query gets no weight decay."""
    from composer.optim import param_groups

    text = DEIT.replace("POS", "learned").replace("pool: cls, distill_token: true, dropout: 0.5",
                                                  "pool: attention, heads: 4, mlp_ratio: 2")
    spec = load_spec_text(text)
    model = build_model(spec, backend="reference").eval()
    head = model.stages[-1]
    pool = head.attend
    assert pool.heads == 4 and pool.mlp[0].out_features == 32
    tokens = torch.randn(3, 18, 16)   # 2 registers, then 16 patches
    x = head.norm(tokens)[:, 2:]
    q = pool.q(pool.latent[0, 0]).view(4, 4)                      # (heads, d)
    k, v = pool.kv(x).view(3, 16, 2, 4, 4).unbind(2)              # (B, N, heads, d)
    weights = torch.einsum("hd,bnhd->bhn", q, k).div(2.0).softmax(-1)
    assert torch.allclose(weights, pool.probs(x), atol=1e-6)
    attended = pool.proj(torch.einsum("bhn,bnhd->bhd", weights, v).reshape(3, 16))
    pooled = attended + pool.mlp(pool.norm(attended))
    torch.testing.assert_close(head(tokens), head.classify(pooled), rtol=1e-5, atol=1e-5)

    _, measured = per_layer_flops(spec)
    assert [layer.cost.flops for layer in model.layers] == measured
    decayed = {id(p) for group in param_groups(model, 0.05) if group["weight_decay"] for p in group["params"]}
    assert id(pool.latent) not in decayed and id(pool.q.weight) in decayed
    # without head.heads: the last attention block's
    assert build_model(load_spec_text(text.replace(", heads: 4", ""))).stages[-1].attend.heads == 2
    # GELU's tanh approximation (SigLIP's), in the pooling's MLP and the blocks' channel MLPs
    tanh = build_model(load_spec_text(text.replace("mlp_ratio: 2", "mlp_ratio: 2, mlp_activation: gelu_tanh").replace(
        "{kind: vit, heads: 2, repeat: 2}", "{kind: vit, heads: 2, repeat: 2, mlp_activation: gelu_tanh}")))
    gelus = [m for m in tanh.modules() if isinstance(m, torch.nn.GELU)]
    assert len(gelus) == 3 and all(g.approximate == "tanh" for g in gelus)

    # a linear probe (train.freeze: backbone) keeps the pooling and the LayerNorm before it: the classifier trains
    from composer.optim import frozen_stages

    frozen = model.freeze(frozen_stages(model, "backbone"))
    trains = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trains == [f"stages.{len(model.stages) - 1}.classify.weight", f"stages.{len(model.stages) - 1}.classify.bias"]
    assert frozen == count_params(model) - 16 * 3 - 3


@pytest.mark.parametrize("change, fragment", [
    (("pool: attention, heads: 4, mlp_ratio: 2", "pool: attention, heads: 3"),
     "d.yaml:10:34: model.head.heads: attention pooling's 3 heads do not divide the final 16 channels"),
    (("pool: attention, heads: 4, mlp_ratio: 2", "pool: mean, heads: 4"),
     "d.yaml:10:29: model.head.heads: heads belongs to attention pooling, and this head pools by mean; set "
     "head.pool: attention, or remove heads"),
    (("- {kind: vit, heads: 2, repeat: 2}", "- {kind: vit, heads: 2}\n    - {kind: convmixer, kernel_size: 3}"),
     "model.head.pool: attention pooling attends over tokens, but the last block (convmixer) works on the grid"),
])
def test_attention_pooling_rules(change, fragment):
    from composer.spec import SpecError

    text = DEIT.replace("POS", "learned").replace("pool: cls, distill_token: true, dropout: 0.5",
                                                  "pool: attention, heads: 4, mlp_ratio: 2").replace(*change)
    with pytest.raises(SpecError) as caught:
        load_spec_text(text.replace("registers: 2", "registers: 0"), "d.yaml")
    assert fragment in str(caught.value)


def test_pool_block_mixes_each_patch_with_the_mean_of_its_neighbourhood():
    """PoolFormer's token mixer: the LayerNormed patch grid's k x k mean (at the borders, of the cells
    inside the grid) minus the cell, times LayerScale, added to the input; a class token passes
    unmixed. Written out here cell by cell. It costs no FLOPs (flop_counter counts none) and a
    poolformer block is pool + channel_mlp, each with its own parameters."""
    from composer.blocks.pool import Pool

    torch.manual_seed(0)
    block = Pool(dim=4, grid=(3, 5), pool_size=3, scale=0.5)
    with torch.no_grad():
        block.scale.gamma.copy_(torch.tensor([0.5, -1.0, 2.0, 0.25]))
        block.norm.weight.copy_(torch.randn(4))
    x = torch.randn(2, 1 + 15, 4)   # a class token, then 3 x 5 patches
    normed = block.norm(x)[:, 1:].reshape(2, 3, 5, 4)
    expected = x.clone()
    for r in range(3):
        for c in range(5):
            around = normed[:, max(r - 1, 0):r + 2, max(c - 1, 0):c + 2].mean(dim=(1, 2))
            expected[:, 1 + r * 5 + c] += block.scale.gamma * (around - normed[:, r, c])
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)

    spec = load_spec_text("model: {image_size: 16, num_classes: 3, stem: {patch_size: 2, dim: 16}, blocks: "
                          "[{kind: poolformer, pool_size: 5, repeat: 2}, {kind: downsample}, {kind: poolformer}], "
                          "head: {pool: mean}}")
    model, measured = per_layer_flops(spec)
    assert [layer.cost.flops for layer in model.layers] == measured
    kinds = [layer.kind for layer in model.layers]
    assert kinds.count("pool") == 3 and kinds.count("channel_mlp") == 3
    assert model.layers[kinds.index("pool")].module.pool_size == 5
    assert [layer.module.grid for layer in model.layers if layer.kind == "pool"] == [(8, 8), (8, 8), (4, 4)]
    with pytest.raises(Exception, match=r"model.blocks\[0\].pool_size: 4 is even; 'same' padding needs an odd "
                                        r"pool size \(try 3 or 5\)"):
        load_spec_text("model: {image_size: 16, num_classes: 3, stem: {patch_size: 2, dim: 16}, blocks: "
                       "[{kind: pool, pool_size: 4}]}")


def test_clips_parts_a_norm_before_the_blocks_no_stem_bias_and_quick_gelu():
    """model.norm_pre: a LayerNorm (its own eps) over every token after the class token, the position
    table and the registers, before the first block; stem.bias: false leaves the projection without
    one; mlp_activation: quick_gelu is x * sigmoid(1.702 x). norm_pre needs a token block first."""
    from composer.blocks.base import QuickGELU
    from composer.spec import SpecError

    text = ("model:\n  image_size: 16\n  num_classes: 3\n  stem: {patch_size: 4, dim: 16, bias: false}\n"
            "  pos_embed: learned\n  registers: 1\n  norm_pre: true\n  norm_pre_eps: 1.0e-5\n"
            "  blocks: [{kind: vit, heads: 2, mlp_activation: quick_gelu}]\n  head: {pool: cls}\n")
    model = build_model(load_spec_text(text), backend="reference")
    kinds = [layer.kind for layer in model.layers]
    assert kinds[1:kinds.index("attention")] == ["rearrange", "cls_token", "pos_embed (learned)", "registers",
                                                 "norm_pre"]
    norm = model.layers[kinds.index("norm_pre")].module.norm
    assert norm.eps == 1e-5 and model.layers[kinds.index("norm_pre")].in_shape == (16 + 2, 16)
    assert model.stages[0].project.bias is None
    (act,) = [m for m in model.modules() if isinstance(m, QuickGELU)]
    x = torch.randn(50)
    torch.testing.assert_close(act(x), x * torch.sigmoid(1.702 * x))
    with pytest.raises(SpecError) as caught:
        load_spec_text(text.replace("[{kind: vit,", "[{kind: convmixer, kernel_size: 3}, {kind: vit,"), "c.yaml")
    assert ("c.yaml:7:13: model.norm_pre: norm_pre normalizes the tokens before the first block, but blocks[0] "
            "(convmixer) works on the grid") in str(caught.value)


def test_model_drop_path_rises_linearly_over_depth():
    """model.drop_path: 0 at the first block, the rate at the last, each repeat a step, the halves of a
    composite block sharing one (timm's linspace(0, drop_path_rate, depth))."""
    text = HYBRID.replace("  blocks:", "  drop_path: 0.3\n  blocks:")   # convmixer, mixer x2, dwconv, vit: depth 5
    model = build_model(load_spec_text(text), backend="reference")
    rates = {layer.name: layer.module.drop_path.p for layer in model.blocks() if hasattr(layer.module, "drop_path")}
    expected = [0.0, 0.075, 0.15, 0.225, 0.3]
    assert rates == pytest.approx({
        "blocks[0].dwconv": expected[0], "blocks[1].token_mlp #1": expected[1], "blocks[1].channel_mlp #1": expected[1],
        "blocks[1].token_mlp #2": expected[2], "blocks[1].channel_mlp #2": expected[2],
        "blocks[2].dwconv": expected[3], "blocks[3].attention": expected[4], "blocks[3].channel_mlp": expected[4]})
    # the spec as written is left alone (a resume or a summary reads the same spec)
    assert load_spec_text(text).model.blocks[1].drop_path == 0.0


def test_model_and_block_drop_path_together_are_refused():
    from composer.spec import SpecError

    text = HYBRID.replace("  blocks:", "  drop_path: 0.3\n  blocks:").replace("{kind: vit, heads: 2}",
                                                                             "{kind: vit, heads: 2, drop_path: 0.1}")
    with pytest.raises(SpecError) as caught:
        load_spec_text(text, "h.yaml")
    assert "h.yaml:11:40: model.blocks[3].drop_path: 0.1 here and model.drop_path 0.3: give one" in str(caught.value)


ROPE = """
model:
  image_size: 16
  num_classes: 3
  stem: {patch_size: 4, dim: 16}
  pos_embed: rope
  registers: 2
  blocks:
    - {kind: vit, heads: 2, qk_norm: true}
  head: {pool: cls}
"""


def test_rotary_embedding_turns_channel_pairs_by_the_patch_position():
    from composer.blocks.attention import ROTARY_BASE, rotary_tables, rotate

    grid, prefix, d = (3, 4), 2, 8
    cos, sin = rotary_tables(grid, prefix + 12, d)
    x = torch.randn(2, prefix + 12, 3, d)
    turned = rotate(x, cos, sin)
    assert torch.equal(turned[:, :prefix], x[:, :prefix])   # class token and registers do not turn
    # independently: each pair as a complex number times e^(i angle); the first d/4 angles from the
    # column, the last d/4 from the row
    freqs = ROTARY_BASE ** (-torch.arange(d // 4, dtype=torch.float64) / (d // 4))
    for token in range(12):
        row, col = divmod(token, grid[1])
        angles = torch.cat([col * freqs, row * freqs])
        pairs = torch.view_as_complex(x[:, prefix + token].double().unflatten(-1, (-1, 2)).contiguous())
        expected = torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2)
        torch.testing.assert_close(turned[:, prefix + token].double(), expected, rtol=1e-5, atol=1e-6)
    # q·k of equal contents depends on the two patches' offset only
    q = rotate(torch.randn(1, 1, 1, d).expand(1, prefix + 12, 1, d), cos, sin)[0, prefix:, 0]
    k = rotate(torch.randn(1, 1, 1, d).expand(1, prefix + 12, 1, d), cos, sin)[0, prefix:, 0]
    logits = q @ k.T
    position = [divmod(t, grid[1]) for t in range(12)]
    by_offset = {}
    for i, (ri, ci) in enumerate(position):
        for j, (rj, cj) in enumerate(position):
            by_offset.setdefault((ri - rj, ci - cj), []).append(float(logits[i, j]))
    assert all(max(v) - min(v) < 1e-5 for v in by_offset.values())
    assert len({round(v[0], 4) for v in by_offset.values()}) > 1   # and it does depend on the offset


def test_rope_model_runs_on_triton_like_reference_and_takes_another_image_size():
    reference = assert_triton_path_matches_reference(ROPE)
    kinds = [layer.kind for layer in reference.layers]
    assert not any(kind.startswith("pos_embed") for kind in kinds)   # nothing added to the tokens
    attention = reference.layers[kinds.index("attention")].module
    assert attention.rotary_cos.shape == (16 + 1 + 2, 4)
    # the tables are not weights: a model for 32x32 images takes the 16x16 model's state dict as it is
    larger = build_model(load_spec_text(ROPE.replace("image_size: 16", "image_size: 32")), backend="reference")
    larger.load_state_dict(reference.state_dict())
    assert larger(torch.randn(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("block, fragment", [
    ("{kind: vit, heads: 4}", "model.blocks[0].heads: 4 heads of dim 24 have 6 channels each; rope turns them in "
                              "pairs along two axes, so it needs a multiple of 4 (try heads: 1, 2, 3, 6)"),
    ("{kind: mixer}", "model.pos_embed: rope turns the queries and keys of attention, but the model has no attention "
                      "block"),
])
def test_rope_rules(block, fragment):
    from composer.spec import SpecError

    text = ROPE.replace("dim: 16", "dim: 24").replace("{kind: vit, heads: 2, qk_norm: true}", block)
    with pytest.raises(SpecError) as caught:
        load_spec_text(text, "r.yaml")
    assert fragment in str(caught.value)


CONVNEXT = """
model:
  image_size: 16
  num_classes: 3
  stem: {patch_size: 2, dim: 16, norm: layernorm}
  blocks:
    - {kind: convnext, kernel_size: 7, mlp_ratio: 3, repeat: 2}
    - {kind: vit, heads: 2}
"""


def test_convnext_block_computes_timms_convnext_block():
    """The block equals timm's ConvNeXtBlock (its weights copied, every one random), on the reference
    path and through the depthwise kernel (the interpreter on CPU), in NCHW and channels_last."""
    timm = pytest.importorskip("timm")
    from composer.blocks.base import Context
    from composer.blocks.convnext import ConvNext

    torch.manual_seed(0)
    theirs = timm.models.convnext.ConvNeXtBlock(16, kernel_size=7, mlp_ratio=3, ls_init_value=0.5).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 16, 5, 6)
    for backend in ("reference", "triton"):
        ours = ConvNext.from_spec(load_spec_text(CONVNEXT).model.blocks[0],
                                  Context(dim=16, tokens=30, grid=(5, 6), backend=backend)).eval()
        ours.load_state_dict({"conv.weight": theirs.conv_dw.weight, "conv.bias": theirs.conv_dw.bias,
                              "norm.weight": theirs.norm.weight, "norm.bias": theirs.norm.bias,
                              "mix_channels.0.weight": theirs.mlp.fc1.weight, "mix_channels.0.bias": theirs.mlp.fc1.bias,
                              "mix_channels.2.weight": theirs.mlp.fc2.weight, "mix_channels.2.bias": theirs.mlp.fc2.bias,
                              "scale.gamma": theirs.gamma})
        with torch.no_grad():
            expected = theirs(x)
            torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ours(x.contiguous(memory_format=torch.channels_last)), expected,
                                       rtol=1e-4, atol=1e-4)


def test_convnext_model_costs_and_layer_scale_start():
    spec = load_spec_text(CONVNEXT)
    model, measured = per_layer_flops(spec)
    assert [layer.cost.flops for layer in model.layers] == measured
    blocks = [layer.module for layer in model.layers if layer.kind == "convnext"]
    assert len(blocks) == 2 and torch.equal(blocks[0].scale.gamma, torch.full((16,), 1e-6))
    assert blocks[0].mix_channels[0].out_features == 48


def test_convnext_model_runs_on_triton_like_reference_with_gradients():
    assert_triton_path_matches_reference(CONVNEXT)


def test_swiglu_channel_mlp_is_a_gated_mlp_and_costs_what_flop_counter_counts():
    text = ("model: {image_size: 16, num_classes: 3, stem: {patch_size: 4, dim: 24}, "
            "blocks: [{kind: vit, heads: 2, mlp_ratio: 2, mlp_activation: swiglu}]}")
    model, measured = per_layer_flops(load_spec_text(text))
    assert [layer.cost.flops for layer in model.layers] == measured
    mlp = next(layer.module for layer in model.layers if layer.kind == "channel_mlp").eval()
    fc1, fc2 = mlp.mix_channels[0], mlp.mix_channels[3]
    assert (fc1.in_features, fc1.out_features, fc2.in_features) == (24, 96, 48)
    x = torch.randn(2, 16, 24)
    with torch.no_grad():
        h = fc1(torch.nn.functional.layer_norm(x, (24,), mlp.norm.weight, mlp.norm.bias, 1e-6))
        expected = x + fc2(h[..., :48] * torch.sigmoid(h[..., 48:]) * h[..., 48:])   # value * SiLU(gate)
        torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)


HIERARCHICAL = """
model:
  image_size: 16
  num_classes: 3
  stem: {patch_size: 2, dim: 8, norm: layernorm}
  pos_embed: rope
  drop_path: 0.2
  blocks:
    - {kind: convnext, kernel_size: 3, layer_scale: 0.5}
    - {kind: downsample}
    - {kind: vit, heads: 2, repeat: 2}
    - {kind: downsample, dim: 24, norm: batchnorm}
    - {kind: mixer, token_hidden: 8}
  head: {pool: cls}
"""


def test_downsample_blocks_shrink_the_grid_and_change_the_width():
    """Each downsample halves the grid and sets the width for the blocks after it; the blocks there
    are built for what they get (rope on the 4x4 grid, a token-MLP over 4 patches and the class
    token); every layer's cost is flop_counter's; model.drop_path steps over blocks with a residual
    branch only."""
    spec = load_spec_text(HIERARCHICAL)
    assert spec.model.stages() == [(8, 8), (8, 8), (16, 4), (16, 4), (24, 2), (24, 2)]
    model, measured = per_layer_flops(spec)
    assert [layer.cost.flops for layer in model.layers] == measured
    shapes = {layer.name: (layer.in_shape, layer.out_shape) for layer in model.layers}
    assert shapes["blocks[1].downsample"] == ((8, 8, 8), (16, 4, 4))
    assert shapes["blocks[2].attention #1"] == ((16, 16), (16, 16))
    assert shapes["blocks[3].downsample"] == ((16, 4, 4), (24, 2, 2))
    assert shapes["blocks[4].token_mlp"] == ((5, 24), (5, 24))   # the class token joins the last token run
    assert shapes["head"] == ((5, 24), (3,))
    attention = next(layer for layer in model.layers if layer.kind == "attention")
    assert attention.module.rotary_cos.shape[0] == 16   # one rotation per patch of the 4x4 grid
    rates = [layer.module.drop_path.p for layer in model.blocks() if hasattr(layer.module, "drop_path")]
    # convnext, vit #1 (both halves), vit #2 (both halves), mixer (both halves): depth 4
    assert rates == pytest.approx([0.0, 0.2 / 3, 0.2 / 3, 0.4 / 3, 0.4 / 3, 0.2, 0.2])
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 3)


def test_downsample_computes_convnexts_downsampling_layer():
    """With layernorm: timm's ConvNeXt stage downsampling (LayerNorm2d, then a 2x2 convolution of
    stride 2), every weight random; with batchnorm: BatchNorm2d then the same convolution."""
    timm = pytest.importorskip("timm")
    from composer.blocks.base import Context
    from composer.blocks.downsample import Downsample

    torch.manual_seed(0)
    theirs = torch.nn.Sequential(timm.layers.LayerNorm2d(8, eps=1e-6), torch.nn.Conv2d(8, 12, 2, stride=2))
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p))
    text = HIERARCHICAL.replace("{kind: downsample}", "{kind: downsample, dim: 12}").replace("rope", "none")
    spec = load_spec_text(text).model.blocks[1]
    ours = Downsample.from_spec(spec, Context(dim=8, tokens=30, grid=(6, 10)))
    ours.load_state_dict({"norm.weight": theirs[0].weight, "norm.bias": theirs[0].bias,
                          "merge.weight": theirs[1].weight, "merge.bias": theirs[1].bias})
    x = torch.randn(2, 8, 6, 10)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert ours.output_context(Context(dim=8, tokens=60, grid=(6, 10))) == Context(dim=12, tokens=15, grid=(3, 5))

    with_bn = Downsample(8, 12, norm="batchnorm").train()
    expected = torch.nn.functional.conv2d(torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-6),
                                          with_bn.merge.weight, with_bn.merge.bias, stride=2)
    torch.testing.assert_close(with_bn(x), expected, rtol=1e-5, atol=1e-5)


def test_hierarchical_model_runs_on_triton_like_reference_with_gradients():
    # without drop path: the two models would draw different branches to drop
    assert_triton_path_matches_reference(HIERARCHICAL.replace("drop_path: 0.2", "drop_path: 0.0"))


def test_convs_stem_is_vit_c_stem_and_costs_what_flop_counter_counts():
    """kind: convs: for patch 16 and dim 384, 3x3 stride-2 convolutions to 48, 96, 192 and 384
    channels (BatchNorm and ReLU after each), then a 1x1 convolution (Xiao et al.'s ViT_C stem);
    computed as written out with torch.nn.functional; costs equal flop_counter's."""
    from torch.nn import functional as F

    from composer.build import conv_stem

    stem = conv_stem(3, 384, 16)
    convs = [m for m in stem if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (48, (3, 3), (2, 2)), (96, (3, 3), (2, 2)), (192, (3, 3), (2, 2)), (384, (3, 3), (2, 2)), (384, (1, 1), (1, 1))]
    small = conv_stem(3, 16, 4).train()
    x = torch.randn(2, 3, 12, 12)
    y = x
    for conv in [m for m in small if isinstance(m, torch.nn.Conv2d)][:-1]:
        y = F.relu(F.batch_norm(F.conv2d(y, conv.weight, None, stride=2, padding=1), None, None, training=True))
    final = small[-1]
    torch.testing.assert_close(small(x), F.conv2d(y, final.weight, final.bias), rtol=1e-5, atol=1e-5)

    text = ("model: {image_size: 32, num_classes: 3, stem: {kind: convs, patch_size: 4, dim: 24, norm: layernorm}, "
            "blocks: [{kind: vit, heads: 2}]}")
    model, measured = per_layer_flops(load_spec_text(text))
    assert [layer.cost.flops for layer in model.layers] == measured and model.layers[0].out_shape == (24, 8, 8)
    from composer.spec import SpecError
    with pytest.raises(SpecError) as caught:
        load_spec_text(text.replace("image_size: 32", "image_size: 24").replace("patch_size: 4", "patch_size: 6"),
                       "s.yaml")
    assert ("s.yaml:1:73: model.stem.patch_size: 6 is not a power of two: the convs stem halves the image with each "
            "of its stride-2 convolutions (try 2, 4, 8)") in str(caught.value)


WINDOWS = """
model:
  image_size: 24
  num_classes: 3
  stem: {patch_size: 2, dim: 16}
  pos_embed: rope
  blocks:
    - {kind: vit, heads: 2, window: 4, shift: true, repeat: 2}
    - {kind: downsample}
    - {kind: vit, heads: 2, window: 3, shift: true, repeat: 2}
"""


def swin_window_attention(qkv, grid, window, shift, heads):
    """Swin's own computation (Liu et al., 2021): roll the grid by -shift, cut whole windows, mask
    the pairs whose cells came from different regions of the unrolled grid, roll back."""
    b, (h, w) = qkv.shape[0], grid
    cells = qkv.view(b, h, w, -1).roll((-shift, -shift), dims=(1, 2))
    region = torch.zeros(h, w, dtype=torch.long)
    if shift:
        cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
        for i, rows in enumerate(cuts):
            for j, cols in enumerate(cuts):
                region[rows, cols] = 3 * i + j
    windows = einops.rearrange(cells, "b (i a) (j c) (three n d) -> three (b i j) n (a c) d", a=window, c=window,
                               three=3, n=heads)
    labels = einops.rearrange(region, "(i a) (j c) -> (i j) (a c)", a=window, c=window).repeat(b, 1)
    allowed = (labels[:, :, None] == labels[:, None, :])[:, None]   # (windows, 1, n, n)
    out = torch.nn.functional.scaled_dot_product_attention(*windows, attn_mask=allowed)
    out = einops.rearrange(out, "(b i j) n (a c) d -> b (i a) (j c) (n d)", b=b, i=h // window, a=window, c=window)
    return out.roll((shift, shift), dims=(1, 2)).reshape(b, h * w, -1)


@pytest.mark.parametrize("grid, window, shift", [((12, 12), 4, 0), ((12, 12), 4, 2), ((6, 6), 3, 1), ((6, 9), 3, 1)])
def test_window_attention_is_swins_shifted_window_attention(grid, window, shift):
    """Narrow border windows instead of a roll and a mask: the same attention as Swin computes it,
    also where windows of three sizes meet (window 3, shift 1); the recomputed probabilities are zero
    across windows and give the same output; the cost counts each window's pairs (flop_counter's)."""
    from composer.blocks.attention import Attention

    torch.manual_seed(0)
    h, w = grid
    block = Attention(16, 2, windows=(grid, window, shift), rotary=(grid, h * w)).eval()
    x = torch.randn(2, h * w, 16)
    qkv = block.packed_qkv(x)
    with torch.no_grad():
        expected = x + block.to_out(swin_window_attention(qkv, grid, window, shift, 2))
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
        probs = block.attention_probs(x)                                   # (B, H, N, N)
        v = einops.rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=2)[2]
        torch.testing.assert_close(x + block.to_out(einops.rearrange(probs @ v, "b h n d -> b n (h d)")), expected,
                                   rtol=1e-5, atol=1e-5)
    windows_of = torch.tensor([[r // window, c // window] for r in range(h) for c in range(w)])  # unshifted
    if shift == 0:
        apart = (windows_of[:, None] != windows_of[None, :]).any(-1)
        assert probs[:, :, apart].abs().max() == 0


def test_windowed_model_costs_and_runs_on_triton_like_reference():
    """Windows of 4 (shifted by 2 in every second repeat) on 12x12, then of 3 (shift 1) on 6x6 after a
    downsample, with rope: FLOPs equal flop_counter's on the reference path; and the Triton path
    (interpreter) matches it with every gradient on a smaller one."""
    spec = load_spec_text(WINDOWS)
    model, measured = per_layer_flops(spec)
    assert [layer.cost.flops for layer in model.layers] == measured
    assert [layer.module.windows for layer in model.layers if layer.kind == "attention"] == [
        ((12, 12), 4, 0), ((12, 12), 4, 2), ((6, 6), 3, 0), ((6, 6), 3, 1)]
    # at 16 px: windows of 4 (shift 2) on 8x8, of 2 (shift 1) on 4x4: four window shapes each
    assert_triton_path_matches_reference(WINDOWS.replace("image_size: 24", "image_size: 16")
                                         .replace("window: 3", "window: 2"))


@pytest.mark.parametrize("change, fragment", [
    (("window: 3", "window: 5"), "w.yaml:10:37: model.blocks[2].window: 5 does not divide the 6x6 grid it gets "
                                 "(try 2, 3, 6)"),
    (("shift: true, repeat: 2}\n    - {kind: downsample}", "shift: true}\n    - {kind: downsample}"),
     "model.blocks[0].shift: shifted windows alternate over the block's repeats (the 2nd, 4th, ... shift), so with "
     "repeat 1 none would; set repeat: 2 or more"),
    (("window: 4, shift: true", "shift: true"), "model.blocks[0].shift: shift moves the windows of window attention; "
                                                "set window (e.g. 4) or remove shift"),
    (("window: 3", "window: 6"), "model.blocks[2].shift: one 6x6 window covers the whole grid here: there is nothing "
                                 "to shift"),
    (("pos_embed: rope", "pos_embed: rope\n  head: {pool: cls}"),
     "model.blocks[2].window: window attention works on the patch grid alone, but a class token joins the tokens it "
     "gets (where the last run of token blocks starts); use head.pool: mean and registers: 0, or put a grid block")])
def test_window_rules(change, fragment):
    from composer.spec import SpecError

    with pytest.raises(SpecError) as caught:
        load_spec_text(WINDOWS.replace(*change), "w.yaml")
    assert fragment in str(caught.value)


SWIN_PAIR = """
model:
  image_size: 16
  num_classes: 3
  stem: {patch_size: 2, dim: 16, norm: layernorm}
  pos_embed: relative
  blocks:
    - {kind: vit, heads: 2, mlp_ratio: 2, window: 4, shift: true, norm_eps: 1.0e-5, repeat: 2}
"""


@pytest.mark.parametrize("repeat, shift", [(0, 0), (1, 2)])
def test_relative_position_bias_windows_compute_timms_swin_block(repeat, shift):
    """pos_embed: relative with window attention: a vit block pair (attention, channel MLP) equals
    timm's SwinTransformerBlock (every weight random, its bias table included), unshifted and
    shifted by half a window."""
    timm = pytest.importorskip("timm")
    from timm.models.swin_transformer import SwinTransformerBlock

    torch.manual_seed(0)
    theirs = SwinTransformerBlock(16, (8, 8), num_heads=2, window_size=4, shift_size=shift, mlp_ratio=2).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    model = build_model(load_spec_text(SWIN_PAIR), backend="reference").eval()
    attention, mlp = [layer.module for layer in model.layers if layer.kind in ("attention", "channel_mlp")][
        2 * repeat:2 * repeat + 2]
    assert attention.windows == ((8, 8), 4, shift) and attention.kernel_op is None
    attention.load_state_dict({"norm.weight": theirs.norm1.weight, "norm.bias": theirs.norm1.bias,
                               "to_qkv.weight": theirs.attn.qkv.weight, "to_qkv.bias": theirs.attn.qkv.bias,
                               "to_out.weight": theirs.attn.proj.weight, "to_out.bias": theirs.attn.proj.bias,
                               "relative.table": theirs.attn.relative_position_bias_table})
    mlp.load_state_dict({"norm.weight": theirs.norm2.weight, "norm.bias": theirs.norm2.bias,
                         "mix_channels.0.weight": theirs.mlp.fc1.weight, "mix_channels.0.bias": theirs.mlp.fc1.bias,
                         "mix_channels.3.weight": theirs.mlp.fc2.weight, "mix_channels.3.bias": theirs.mlp.fc2.bias})
    x = torch.randn(2, 8, 8, 16)
    with torch.no_grad():
        expected = theirs(x).reshape(2, 64, 16)
        tokens = x.reshape(2, 64, 16)
        torch.testing.assert_close(mlp(attention(tokens)), expected, rtol=1e-4, atol=1e-4)
        # the probabilities `visualize` draws (bias and windows in them) give the same output
        v = einops.rearrange(attention.packed_qkv(tokens), "b n (three h d) -> three b h n d", three=3, h=2)[2]
        mixed = einops.rearrange(attention.attention_probs(tokens) @ v, "b h n d -> b n (h d)")
        torch.testing.assert_close(tokens + attention.to_out(mixed), attention(tokens), rtol=1e-4, atol=1e-5)


def test_relative_position_bias_over_the_grid_and_its_costs():
    """Without windows the table spans the grid's offsets, a class token gets no bias; the model's
    FLOPs equal flop_counter's; the block runs PyTorch's attention on either backend."""
    from composer.blocks.attention import RelativePositionBias, grid_cells

    bias = RelativePositionBias(heads=3, extent=(2, 3), prefix=1)
    with torch.no_grad():
        bias.table.copy_(torch.arange(15 * 3, dtype=torch.float32).view(15, 3))
    full = bias((2, 3))                                   # (H, 1 + 6, 1 + 6)
    assert full.shape == (3, 7, 7) and full[:, 0].abs().sum() == 0 and full[:, :, 0].abs().sum() == 0
    cells = grid_cells((2, 3))
    for i, j in ((0, 5), (4, 1), (2, 2)):
        dy, dx = (cells[i] - cells[j]).tolist()
        assert torch.equal(full[:, 1 + i, 1 + j], bias.table[(dy + 1) * 5 + dx + 2])
    text = SWIN_PAIR.replace("window: 4, shift: true, ", "").replace("stem:", "head: {pool: cls}\n  stem:")
    model, measured = per_layer_flops(load_spec_text(text))
    assert [layer.cost.flops for layer in model.layers] == measured
    triton = build_model(load_spec_text(text), backend="triton")
    assert not any(getattr(layer.module, "kernel_op", None) for layer in triton.layers if layer.kind == "attention")
    triton.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(triton.eval()(x), model.eval()(x))


def test_relative_positions_need_attention():
    from composer.spec import SpecError

    text = "model: {image_size: 16, num_classes: 3, stem: {patch_size: 4, dim: 16}, pos_embed: relative, " \
           "blocks: [{kind: mixer}]}"
    with pytest.raises(SpecError) as caught:
        load_spec_text(text, "r.yaml")
    assert ("model.pos_embed: relative biases attention's logits, but the model has no attention block; use "
            "learned or sincos") in str(caught.value)


def test_downsample_merge_style_is_swins_patch_merging():
    """style: merge equals timm's PatchMerging (each 2x2 patch's channels in its order, LayerNorm over
    them, Linear without bias), every weight random; batchnorm does not go with it."""
    timm = pytest.importorskip("timm")
    from timm.models.swin_transformer import PatchMerging

    from composer.blocks.downsample import Downsample
    from composer.spec import SpecError

    torch.manual_seed(0)
    theirs = PatchMerging(8, 12)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p))
    ours = Downsample(8, 12, norm_eps=1e-5, style="merge")
    ours.load_state_dict({"norm.weight": theirs.norm.weight, "norm.bias": theirs.norm.bias,
                          "merge.weight": theirs.reduction.weight})
    x = torch.randn(2, 6, 10, 8)   # timm's layout (B, H, W, C); ours the grid (B, C, H, W)
    torch.testing.assert_close(ours(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), theirs(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(SpecError) as caught:
        load_spec_text(HIERARCHICAL.replace("norm: batchnorm", "norm: batchnorm, style: merge"), "m.yaml")
    assert "model.blocks[3].norm: patch merging normalizes each merged patch's values: layernorm or none" in \
        str(caught.value)
