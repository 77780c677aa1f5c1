"""`composer visualize`: figures from tiny trained runs, and the attention numbers behind them.

One hybrid run (convmixer -> mixer -> vit, class token, two registers) is trained once with the Triton
kernels (interpreter mode on CPU, see conftest) so every command applies to it; a pure
ViT run checks the message for a block kind a run lacks.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from filelock import FileLock
from PIL import Image

from composer import visualize
from composer.blocks.base import set_backend
from composer.checkpoint import load_run
from composer.cli import main
from composer.data import load_split, normalize
from composer.spec import load_spec_text
from composer.train import train
from kernels.dispatch import interpreter_mode, triton_import_error

HAS_CUDA = torch.cuda.is_available()
# Triton runs natively on a GPU and in interpreter mode on the CPU (conftest sets TRITON_INTERPRET=1 there).
TRITON = triton_import_error() is None and (HAS_CUDA or interpreter_mode())

HYBRID = """\
name: tiny_hybrid
model:
  image_size: 12
  resize: 16
  num_classes: 4
  stem: {patch_size: 4, dim: 32}
  pos_embed: learned
  registers: 2
  blocks:
    - {kind: convmixer, kernel_size: 3}
    - {kind: mixer, token_hidden: 8, mlp_ratio: 2}
    - {kind: vit, heads: 2, mlp_ratio: 2}
  head: {pool: cls}
data:
  kind: synthetic
  num_samples: 40
  val_split: 0.2
train:
  epochs: 1
  batch_size: 16
  device: DEVICE
  kernels: KERNELS
"""

VIT = """\
name: tiny_vit
model:
  image_size: 8
  num_classes: 4
  stem: {patch_size: 2, dim: 16}
  blocks:
    - {kind: vit, heads: 2, mlp_ratio: 2, repeat: 2}
  head: {pool: mean}
data:
  kind: synthetic
  num_samples: 40
  val_split: 0.2
train:
  epochs: 1
  batch_size: 16
  device: cpu
"""


def _train(tmp_path_factory, config, text, name, kernels="reference", device="cpu"):
    """The run directory of `text` trained once for the whole test session: with several test
    processes (pytest-xdist), the first to get here trains it in the folder they share and the
    others wait for it and read it."""
    base = tmp_path_factory.getbasetemp()
    worker = hasattr(config, "workerinput")   # one of pytest-xdist's processes
    shared = base.parent if worker else base   # this session's folder, whichever process asks
    run = shared / f"{name}-run"
    with FileLock(str(shared / f"{name}-run.lock")):
        if not (run / "final.json").exists():   # written last by a finished run
            text = text.replace("KERNELS", kernels).replace("DEVICE", device)
            spec = load_spec_text(text, f"{name}.yaml", [f"train.out_dir={run}"])
            train(spec, echo=lambda *a, **k: None)
    return run


@pytest.fixture(scope="session")
def hybrid_run(tmp_path_factory, pytestconfig):
    # Trained through the Triton kernels: an explicit "triton" raises rather than falling back,
    # so a finished run proves they ran, and the figures below must not care.
    # Without Triton the same run trains on the reference path and the figures are checked all the same.
    return _train(tmp_path_factory, pytestconfig, HYBRID, "hybrid", kernels="triton" if TRITON else "reference",
                  device="cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="session")
def vit_run(tmp_path_factory, pytestconfig):
    return _train(tmp_path_factory, pytestconfig, VIT, "vit")


def invoke(*args):
    """`composer visualize ARGS` in this process (stdout and stderr both in .output)."""
    return CliRunner().invoke(main, ["visualize", *map(str, args)])


def assert_pngs(paths, count):
    assert len(paths) == count, paths
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG"
            width, height = image.size
            image.load()  # decodes the whole file: a truncated PNG fails here
        assert 300 <= width <= 4000 and 200 <= height <= 4000, (path, image.size)


def printed_paths(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return [line for line in result.output.splitlines() if line.endswith(".png")]


@pytest.mark.skipif(not TRITON, reason="Triton is not importable")
def test_hybrid_run_was_trained_on_the_triton_kernels(hybrid_run):
    spec, _, _ = load_run(hybrid_run)
    assert spec.train.kernels == "triton"


# -- the numbers ----------------------------------------------------------------------------

def independent_probs(model, x):
    """softmax(Q K^T / sqrt(d)) of every attention layer, from its input and to_qkv weights, in float64."""
    inputs = []
    hooks = [layer.module.register_forward_pre_hook(lambda m, args: inputs.append((m, args[0])))
             for layer in model.layers if layer.kind == "attention"]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    out = []
    for module, inp in inputs:
        x64 = inp[0].double()  # (N, C)
        ln = F.layer_norm(x64, x64.shape[-1:], module.norm.weight.double(), module.norm.bias.double(), module.norm.eps)
        qkv = ln @ module.to_qkv.weight.double().T + module.to_qkv.bias.double()
        n, c = x64.shape
        d = c // module.heads
        q, k, _ = qkv.reshape(n, 3, module.heads, d).permute(1, 2, 0, 3)  # packed as (three, heads, d)
        out.append(torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1))
    return out


def test_drawn_attention_equals_softmax_of_the_model(hybrid_run, tmp_path, monkeypatch):
    drawn = []

    def recording(model, x):
        maps = real(model, x)
        drawn.extend(maps)
        return maps

    real = visualize.attention_maps
    monkeypatch.setattr(visualize, "attention_maps", recording)
    paths = visualize.attention(hybrid_run, image_index=3, split="val", out=tmp_path)
    assert_pngs(paths, 3)

    spec, model, state = load_run(hybrid_run)
    data = load_split(spec.data, spec.model, "val")
    x = normalize(data.images[3:4], state["normalization"]["mean"], state["normalization"]["std"])
    expected = independent_probs(model, x)
    assert [name for name, _ in drawn] == ["blocks[2].attention"]
    assert len(expected) == 1
    probs = drawn[0][1]
    assert probs.shape == (2, 19, 19)  # 2 heads; 16 patches after the 12 -> 16 resize, the class token, 2 registers
    torch.testing.assert_close(probs.double(), expected[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 19), atol=1e-5, rtol=0)


def test_attention_maps_do_not_depend_on_the_kernel_backend(hybrid_run):
    spec, model, state = load_run(hybrid_run)
    x = normalize(load_split(spec.data, spec.model, "val").images[:1], **state["normalization"])
    reference = visualize.attention_maps(model, x)
    set_backend(model, "triton")
    model.train()
    on_triton = visualize.attention_maps(model, x)
    for (name_a, a), (name_b, b) in zip(reference, on_triton):
        assert name_a == name_b
        assert torch.equal(a, b)
    # the model is handed back as it came: its backends and its training mode
    assert all(m.backend == "triton" for m in model.modules() if getattr(m, "kernel_op", None))
    assert model.training


def test_rollout_averages_heads_adds_identity_and_admits_a_late_class_token():
    torch.manual_seed(0)
    first = torch.softmax(torch.randn(2, 4, 4), -1)
    second = torch.softmax(torch.randn(3, 5, 5), -1)  # a class token joined in between
    one = visualize.attention_rollout([first])
    expected = (first.mean(0) + torch.eye(4)) / 2
    torch.testing.assert_close(one, expected)
    both = visualize.attention_rollout([first, second])
    a2 = (second.mean(0) + torch.eye(5)) / 2
    torch.testing.assert_close(both, a2 @ torch.block_diag(torch.eye(1), expected))
    torch.testing.assert_close(both.sum(-1), torch.ones(5))


def test_tokens_before_the_patches_are_named():
    assert visualize.prefix_tokens(16, (4, 4), class_tokens=1) == []   # not joined yet
    assert visualize.prefix_tokens(17, (4, 4), class_tokens=1) == ["class token"]
    assert visualize.prefix_tokens(19, (4, 4), class_tokens=1) == ["class token", "register 0", "register 1"]
    assert visualize.prefix_tokens(18, (4, 4), class_tokens=0) == ["register 0", "register 1"]
    assert visualize._prefix_note(["class token"]) == "token 0 = class token"
    assert visualize._prefix_note(["class token", "register 0", "register 1"]) == \
        "tokens 0 = class token, 1-2 = registers"
    assert visualize._prefix_note(["register 0"]) == "token 0 = register"
    # DeiT's distillation token comes second, before the registers
    named = visualize.prefix_tokens(20, (4, 4), class_tokens=2)
    assert named == ["class token", "distillation token", "register 0", "register 1"]
    assert visualize._prefix_note(named) == "tokens 0 = class token, 1 = distillation token, 2-3 = registers"
    assert visualize._prefix_kinds(named) == "class token, distillation token and registers"
    assert visualize._prefix_kinds(named[:2]) == "class token and distillation token"
    assert visualize._prefix_kinds(["register 0"]) == "registers"


def test_rollout_of_a_distilled_model_draws_both_tokens_rows(monkeypatch):
    """With a distillation token the model predicts with both tokens: the pooled map is the mean of
    their rollout rows over the patches."""
    torch.manual_seed(0)
    maps = [("a", torch.softmax(torch.randn(2, 6, 6), -1))]   # class and distillation tokens, a 2 x 2 grid
    drawn = []
    monkeypatch.setattr(visualize, "_overlay", lambda ax, image, values, lo, hi: drawn.append(values) or
                        ax.imshow(values))
    visualize._rollout_figure(maps, np.zeros((8, 8)), "caption", "spec", (2, 2), class_tokens=2)
    r = visualize.attention_rollout([maps[0][1]])
    np.testing.assert_allclose(drawn[-1], r[:2, 2:].mean(0).reshape(2, 2).numpy(), rtol=1e-6)


def test_rollout_of_mean_pooling_leaves_registers_out(monkeypatch):
    """The rollout figure's pooled map: with registers and mean pooling, the mean over patch
    queries of their rollout over the patches."""
    torch.manual_seed(0)
    maps = [("a", torch.softmax(torch.randn(2, 6, 6), -1))]   # 2 registers, a 2 x 2 grid
    drawn = []
    monkeypatch.setattr(visualize, "_overlay", lambda ax, image, values, lo, hi: drawn.append(values) or
                        ax.imshow(values))
    visualize._rollout_figure(maps, np.zeros((8, 8)), "caption", "spec", (2, 2), class_tokens=0)
    r = visualize.attention_rollout([maps[0][1]])
    np.testing.assert_allclose(drawn[-1], r[2:, 2:].mean(0).reshape(2, 2).numpy(), rtol=1e-6)


def test_position_similarity_is_the_cosine_of_the_patches_embeddings():
    from composer.visualize import position_similarity

    pos = torch.randn(1, 1 + 3 * 4, 8)   # a class token's row, then a 3 x 4 grid
    sim = position_similarity(pos, 3, 4)
    patches = pos[0, 1:]
    for (r, c, r2, c2), value in np.ndenumerate(sim):
        expected = F.cosine_similarity(patches[r * 4 + c], patches[r2 * 4 + c2], dim=0)
        assert value == pytest.approx(float(expected), abs=1e-6)
    assert np.allclose(sim[np.arange(3)[:, None], np.arange(4), np.arange(3)[:, None], np.arange(4)], 1.0)


# -- the commands ---------------------------------------------------------------------------

def test_every_command_writes_pngs(hybrid_run, vit_run, tmp_path):
    # one layer: matrix and overlay, no rollout
    assert_pngs(printed_paths(invoke("attention", hybrid_run, "--layer", 0, "--head", 1, "--out", tmp_path)), 2)
    # every layer: two layers x (matrix, overlay), then the rollout through both
    paths = printed_paths(invoke("attention", vit_run, "--split", "train", "--image", 5, "--out", tmp_path))
    assert_pngs(paths, 5)
    assert paths[-1].endswith("attention_train5_rollout.png")
    # an image file of one's own, any size: decoded as the run's data is (no data read)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(tmp_path / "mine.png")
    paths = printed_paths(invoke("attention", vit_run, "--file", tmp_path / "mine.png", "--out", tmp_path))
    assert_pngs(paths, 5)
    assert paths[-1].endswith("attention_mine_rollout.png")
    # default destination: RUN_DIR/figures
    paths = printed_paths(invoke("token-mlp", hybrid_run))
    assert_pngs(paths, 1)
    assert all(p.startswith(str(hybrid_run / "figures")) for p in paths)
    assert_pngs(printed_paths(invoke("dwconv", hybrid_run, "--block", 0, "--out", tmp_path)), 1)
    assert_pngs(printed_paths(invoke("curves", hybrid_run, vit_run, "--out", tmp_path)), 1)
    assert_pngs(printed_paths(invoke("pos-embed", hybrid_run, "--out", tmp_path)), 1)
    paths = printed_paths(invoke("confusion", vit_run / "best.pt", "--split", "val"))
    assert_pngs(paths, 1)
    assert paths == [str(vit_run / "figures" / "confusion_val.png")]


@pytest.mark.parametrize("args, fragments", [
    (("token-mlp", "VIT"), ["no token_mlp layers", "blocks[0].attention", "composer visualize attention"]),
    (("dwconv", "VIT"), ["no dwconv layers"]),
    (("attention", "HYBRID", "--layer", 1), ["--layer 1 is out of range", "1 attention layer"]),
    (("token-mlp", "HYBRID", "--block", 2), ["--block 2 is out of range", "1 token_mlp layer"]),
    (("attention", "HYBRID", "--image", 8), ["--image 8 is out of range", "8 images"]),
    (("attention", "HYBRID", "--head", 2), ["--head 2 is out of range", "2 heads"]),
    (("attention", "VIT", "--image", 1, "--file", "NOWHERE"), ["--image picks an image of the run's data and "
                                                              "--file gives one of your own; give one of them"]),
    (("curves", "NOWHERE"), ["not a run directory"]),
    (("pos-embed", "VIT"), ["run 'tiny_vit' has no position embedding (model.pos_embed: none)"]),
    (("confusion", "NOWHERE"), ["does not exist", "give a run directory or a checkpoint"]),
])
def test_user_errors(hybrid_run, vit_run, tmp_path, args, fragments):
    where = {"VIT": vit_run, "HYBRID": hybrid_run, "NOWHERE": tmp_path / "missing"}
    result = invoke(*[where.get(a, a) if isinstance(a, str) else a for a in args], "--out", tmp_path)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_pos_embed_of_a_rope_model_draws_its_rotations(tmp_path, monkeypatch):
    """With rope, the figure compares the rotations' (cos, sin): each patch is itself (1), and the
    similarity of two patches depends on their offset only."""
    from composer.build import build_model
    from tests.test_build import ROPE

    spec = load_spec_text(ROPE, "rope.yaml")
    model = build_model(spec, backend="reference")
    monkeypatch.setattr(visualize, "load_run", lambda run_dir, device: (spec, model, {}))
    assert_pngs(visualize.pos_embed(tmp_path, out=tmp_path), 1)
    attention = next(layer.module for layer in model.layers if layer.kind == "attention")
    sim = visualize.position_similarity(torch.cat([attention.rotary_cos, attention.rotary_sin], -1)[None], 4, 4)
    assert np.allclose(sim[np.arange(4)[:, None], np.arange(4), np.arange(4)[:, None], np.arange(4)], 1.0)
    assert sim[0, 0, 1, 2] == pytest.approx(sim[2, 1, 3, 3], abs=1e-6)   # offset (1, 2) both


def test_dwconv_figure_draws_convnext_blocks_kernels_too(tmp_path, monkeypatch):
    from composer.build import build_model
    from tests.test_build import CONVNEXT

    spec = load_spec_text(CONVNEXT, "convnext.yaml")
    model = build_model(spec, backend="reference")
    monkeypatch.setattr(visualize, "load_run", lambda run_dir, device: (spec, model, {}))
    drawn = []
    real = visualize._weight_tiles
    monkeypatch.setattr(visualize, "_weight_tiles", lambda tiles, title, label: drawn.append(tiles) or
                        real(tiles, title, label))
    assert_pngs(visualize.dwconv(tmp_path, out=tmp_path), 2)
    convs = [layer.module.conv.weight[:, 0] for layer in model.layers if layer.kind == "convnext"]
    assert all(torch.equal(a, b) for a, b in zip(drawn, convs)) and drawn[0].shape == (16, 7, 7)


TWO_STAGES = """\
name: two_stages
model:
  image_size: 16
  num_classes: 3
  stem: {patch_size: 2, dim: 8}
  blocks:
    - {kind: vit, heads: 2, window: 4}
    - {kind: downsample}
    - {kind: mixer, token_hidden: 4}
    - {kind: vit, heads: 2}
  head: {pool: cls}
"""


def test_figures_of_a_hierarchical_model_use_each_layers_grid(tmp_path, monkeypatch):
    """After a downsample block, attention maps and token-MLP units are drawn on the smaller grid
    their layer sees; the rollout multiplies the attention layers of the last grid only."""
    from PIL import Image

    from composer.build import build_model

    spec = load_spec_text(TWO_STAGES, "two_stages.yaml")
    model = build_model(spec, backend="reference")
    state = {"normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}, "classes": ["a", "b", "c"]}
    monkeypatch.setattr(visualize, "load_run", lambda run_dir, device: (spec, model, state))
    grids, rolled = [], []
    real_overlay, real_rollout = visualize._overlay_figure, visualize._rollout_figure
    monkeypatch.setattr(visualize, "_overlay_figure", lambda p, head, image, caption, title, grid, prefix:
                        grids.append((p.shape[-1], grid, prefix)) or
                        real_overlay(p, head, image, caption, title, grid, prefix))
    monkeypatch.setattr(visualize, "_rollout_figure", lambda maps, *args, earlier: rolled.append((maps, earlier)) or
                        real_rollout(maps, *args, earlier=earlier))
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(image)

    titles = []
    real_matrix = visualize._matrix_figure
    monkeypatch.setattr(visualize, "_matrix_figure", lambda p, head, image, caption, title, prefix:
                        titles.append(title) or real_matrix(p, head, image, caption, title, prefix))
    assert_pngs(visualize.attention(tmp_path, file=str(image), out=tmp_path), 5)
    assert titles[0].endswith("(attention layer 0 of 2, within 4x4 windows)") and titles[1].endswith("of 2)")
    # the class token joins where the last run of token blocks starts: after the downsample
    assert grids == [(64, (8, 8), []), (17, (4, 4), ["class token"])]
    ((maps, earlier),) = rolled
    assert earlier == 1 and [p.shape[-1] for _, p in maps] == [17]

    tiles = []
    real_tiles = visualize._weight_tiles
    monkeypatch.setattr(visualize, "_weight_tiles", lambda t, title, label: tiles.append(t) or real_tiles(t, title, label))
    assert_pngs(visualize.token_mlp(tmp_path, out=tmp_path), 1)
    assert tiles[0].shape == (4, 4, 4)   # 4 hidden units, each over the 4x4 grid of its 16 tokens


def test_attention_pooling_map_is_the_pooling_querys_attention_over_the_patches():
    """`visualize attention` draws where attention pooling looks: the pooling query's softmax over
    the patches (registers left out), computed from the features the head gets; nothing for a head
    that pools otherwise."""
    from composer.build import build_model

    text = ("model:\n  image_size: 16\n  num_classes: 3\n  stem: {patch_size: 4, dim: 16}\n  registers: 1\n"
            "  blocks: [{kind: vit, heads: 2}]\n  head: {pool: attention, heads: 4}\n")
    torch.manual_seed(0)
    model = build_model(load_spec_text(text), backend="reference").eval()
    x = torch.randn(1, 3, 16, 16)
    p = visualize.pooling_map(model, x)
    assert p.shape == (4, 16)
    torch.testing.assert_close(p.sum(-1), torch.ones(4))
    head = model.stages[-1]
    features = x
    with torch.no_grad():
        for stage in model.stages[:-1]:
            features = stage(features)
        torch.testing.assert_close(p, head.attend.probs(head.norm(features)[:, 1:])[0])
    assert visualize._pooling_figure(p, np.zeros((16, 16, 3)), "caption", "spec", (4, 4)) is not None
    plain = build_model(load_spec_text(text.replace("pool: attention, heads: 4", "pool: mean")), backend="reference")
    assert visualize.pooling_map(plain, x) is None
