"""`composer import`: timm's ViT, MLP-Mixer, ConvMixer and ConvNeXt weights as composer runs, computing what timm computes."""
import json

import pytest
import torch
import yaml

from composer.build import build_model
from composer.checkpoint import init_from_run, load_run
from composer.spec import load_spec_text
from tests.helpers import assert_user_error, run_cli

timm = pytest.importorskip("timm")   # in the dev extra

COMMON = "  image_size: 16\n  num_classes: 5\n"
SPECS = {
    "vit": ("  stem: {patch_size: 4, dim: 32}\n  pos_embed: learned\n"
            "  blocks: [{kind: vit, heads: 2, mlp_ratio: 2, repeat: 2}]\n  head: {pool: cls}\n"),
    "mixer": "  stem: {patch_size: 4, dim: 32}\n  blocks: [{kind: mixer, token_hidden: 8, repeat: 2}]\n  head: {pool: mean}\n",
    "convmixer": ("  stem: {patch_size: 4, dim: 32, activation: gelu, norm: batchnorm}\n"
                  "  blocks: [{kind: convmixer, kernel_size: 3, repeat: 2}]\n  head: {pool: mean}\n"),
    "swin": ("  stem: {patch_size: 2, dim: 8, norm: layernorm, norm_eps: 1.0e-5}\n  pos_embed: relative\n"
             "  blocks: [{kind: vit, heads: 2, mlp_ratio: 2, window: 4, shift: true, norm_eps: 1.0e-5, repeat: 2},\n"
             "           {kind: downsample, dim: 16, style: merge, norm_eps: 1.0e-5},\n"
             "           {kind: vit, heads: 2, mlp_ratio: 2, window: 4, norm_eps: 1.0e-5, repeat: 2}]\n"
             "  head: {pool: mean, norm: layernorm, norm_eps: 1.0e-5}\n"),
    "convnext": ("  stem: {patch_size: 1, dim: 8, norm: layernorm}\n"   # timm's: always four stages
                 "  blocks: [{kind: convnext, kernel_size: 3, repeat: 2}, {kind: downsample, dim: 16},\n"
                 "           {kind: convnext, kernel_size: 3}, {kind: downsample}, {kind: convnext, kernel_size: 3},\n"
                 "           {kind: downsample, dim: 24}, {kind: convnext, kernel_size: 3}]\n"
                 "  head: {pool: mean, norm: layernorm}\n"),
}


def timm_model(family, **options):
    from timm.models.convmixer import ConvMixer
    from timm.models.convnext import ConvNeXt
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.mlp_mixer import MlpMixer
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = {"vit": lambda: VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                              mlp_ratio=2, num_classes=5),
             "mixer": lambda: MlpMixer(num_classes=5, img_size=16, patch_size=4, num_blocks=2, embed_dim=32,
                                       mlp_ratio=(0.25, 4.0)),
             "convmixer": lambda: ConvMixer(dim=32, depth=2, kernel_size=3, patch_size=4, num_classes=5),
             "swin": lambda: SwinTransformer(img_size=16, patch_size=2, embed_dim=8, depths=(2, 2), num_heads=(2, 2),
                                             window_size=4, mlp_ratio=2, num_classes=5),
             "convnext": lambda: ConvNeXt(num_classes=5, depths=(2, 1, 1, 1), dims=(8, 16, 32, 24), kernel_sizes=3,
                                          patch_size=1, **options),
             }[family]()
    with torch.no_grad():   # every tensor random, norms and BatchNorm statistics too: a misplaced one shows
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                value.copy_(torch.rand_like(value) + 0.5 if "running_var" in name else torch.randn_like(value) * 0.2)
    return model.eval()


@torch.no_grad()
def pooled_features(model, x):
    """What the head of a composer model classifies: the pooled features, as timm's backbones return."""
    for stage in model.stages[:-1]:
        x = stage(x)
    return model.stages[-1].features(x)


def write_spec(tmp_path, family):
    path = tmp_path / f"{family}.yaml"
    path.write_text(f"name: {family}\nmodel:\n{COMMON}{SPECS[family]}data: {{kind: synthetic}}\n")
    return path


@pytest.mark.parametrize("family", ["vit", "mixer", "convmixer", "convnext", "swin"])
def test_imported_weights_compute_what_timm_computes(tmp_path, family):
    reference = timm_model(family)
    weights = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), weights)
    result = run_cli("import", weights, write_spec(tmp_path, family), "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    tensors = len(reference.state_dict())
    assert f"wrote {tmp_path / 'run' / 'best.pt'}: timm {family}, {tensors} tensors, all of them" in result.stdout
    spec, model, state = load_run(tmp_path / "run", backend="reference")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected, got = reference(x), model(x)
    assert got.shape == (3, 5)
    # fp32 on both sides, the same operations in another order: a few ulps of logits of size ~10
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    mean = [0.485, 0.456, 0.406] if family in ("convmixer", "convnext", "swin") else [0.5, 0.5, 0.5]
    assert state["normalization"]["mean"] == mean and state["classes"] is None   # unnamed: the data's names apply
    listed = run_cli("runs", tmp_path, "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["state"] == "imported" and row["params"] == sum(p.numel() for p in reference.parameters())


def test_safetensors_file_and_class_names_then_fine_tuning(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    reference = timm_model("vit")
    weights = tmp_path / "model.safetensors"
    state = reference.state_dict()
    state["pos_embed"] = state["pos_embed"].half()   # a tensor stored in another dtype is converted
    safetensors.save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    names = tmp_path / "classes.txt"
    names.write_text("cat\ndog\nfox\nowl\nemu\n")
    result = run_cli("import", weights, write_spec(tmp_path, "vit"), "--out", tmp_path / "run", "--classes", names,
                     "--normalization", "imagenet")
    assert result.returncode == 0, result.stderr
    _, model, saved = load_run(tmp_path / "run", backend="reference")
    assert saved["classes"] == ["cat", "dog", "fox", "owl", "emu"] and saved["normalization"]["std"][0] == 0.229
    result = run_cli("import", weights, write_spec(tmp_path, "vit"), "--out", tmp_path / "clip", "--normalization", "clip")
    assert result.returncode == 0, result.stderr
    assert load_run(tmp_path / "clip", backend="reference")[2]["normalization"]["mean"][0] == 0.48145466   # OpenAI's
    assert torch.equal(model.state_dict()["stages.3.pos"], state["pos_embed"].float())
    # fine-tuning from the import: another class count and image size
    spec = load_spec_text(write_spec(tmp_path, "vit").read_text(), "ft.yaml", ["model.num_classes=3",
                                                                              "model.image_size=32"])
    fine = build_model(spec, backend="reference")
    with torch.no_grad():
        said = init_from_run(fine, spec, tmp_path / "run")
    assert "new classifier (5 -> 3 classes)" in said and "(4x4 -> 8x8 patches)" in said


def test_import_mistakes_are_named(tmp_path):
    weights = tmp_path / "weights.pth"
    torch.save(timm_model("mixer").state_dict(), weights)
    mixer, vit = write_spec(tmp_path, "mixer"), write_spec(tmp_path, "vit")
    assert_user_error(run_cli("import", weights, vit, "--out", tmp_path / "a"),
                      "holds a timm mixer, but", "vit.yaml has attention blocks; give a spec of mixer blocks")
    result = run_cli("import", weights, mixer, "--out", tmp_path / "a", "--set", "model.blocks[0].token_hidden=4")
    assert_user_error(result, "does not fit the model of", "blocks.0.mlp_tokens.fc1.weight: weights (8, 16), spec's "
                      "model (4, 16)", "The spec must describe the same network")
    assert_user_error(run_cli("import", weights, mixer, "--out", tmp_path / "a", "--set", "model.blocks[0].repeat=1"),
                      "blocks.1.norm1.weight (32,): not in the spec's model")
    assert not (tmp_path / "a").exists()
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle")
    assert_user_error(run_cli("import", junk, mixer, "--out", tmp_path / "a"), "cannot be read as weights")
    torch.save({"fc.weight": torch.zeros(2, 2)}, junk)
    assert_user_error(run_cli("import", junk, mixer, "--out", tmp_path / "a"),
                      "the weights are not a timm ViT, MLP-Mixer, ConvMixer, ConvNeXt or Swin")
    assert_user_error(run_cli("import", tmp_path / "nowhere.pth", mixer, "--out", tmp_path / "a"),
                      "nowhere.pth does not exist")
    names = tmp_path / "classes.txt"
    names.write_text("one\ntwo\n")
    assert_user_error(run_cli("import", weights, mixer, "--out", tmp_path / "a", "--classes", names),
                      "names 2 classes, but the model has 5")
    assert run_cli("import", weights, mixer, "--out", tmp_path / "b").returncode == 0
    before = (tmp_path / "b" / "best.pt").read_bytes()
    assert_user_error(run_cli("import", weights, mixer, "--out", tmp_path / "b"), "already holds a checkpoint")
    assert (tmp_path / "b" / "best.pt").read_bytes() == before


@pytest.mark.parametrize("name, timm_name", [
    ("vit_ti16", "vit_tiny_patch16_224"), ("vit_s16", "vit_small_patch16_224"), ("vit_b16", "vit_base_patch16_224"),
    ("mixer_s16", "mixer_s16_224"), ("mixer_b16", "mixer_b16_224"), ("convmixer_768_32", "convmixer_768_32"),
    ("convmixer_1536_20", "convmixer_1536_20"), ("deit3_s16", "deit3_small_patch16_224"),
    ("convnext_tiny", "convnext_tiny"), ("swin_t", "swin_tiny_patch4_window7_224"),
    ("deit_s16_distilled", "deit_small_distilled_patch16_224")])
def test_shipped_specs_take_timms_pretrained_models_tensor_for_tensor(name, timm_name):
    """On the meta device (shapes only): every tensor of the spec's model has one of timm's model of
    that name, of the same shape, and every one of timm's is used."""
    from composer.spec import load_spec
    from composer.timm_weights import family_of, fit_prefix_tokens, spec_from_timm, timm_names
    from tests.helpers import SPECS as SHIPPED

    with torch.device("meta"):
        model = build_model(load_spec(SHIPPED / f"{name}.yaml"), backend="reference")
        reference = timm.create_model(timm_name, pretrained=False)
        theirs = fit_prefix_tokens(reference.state_dict(), model)   # DeiT III's position table gets a class row
        # the spec timm:NAME reads from the model builds the same network
        derived = build_model(load_spec_text(yaml.safe_dump(spec_from_timm(reference, timm_name))), backend="reference")
    names, ours = timm_names(model, family_of(theirs)), model.state_dict()
    assert sorted(names) == sorted(ours) and sorted(names.values()) == sorted(theirs)
    assert all(ours[k].shape == theirs[v].shape for k, v in names.items())
    assert {k: v.shape for k, v in derived.state_dict().items()} == {k: v.shape for k, v in ours.items()}
    # the same blocks (drop path, a training choice, aside)
    assert ([b.model_dump(exclude={"drop_path"}) for b in derived.spec.blocks]
            == [b.model_dump(exclude={"drop_path"}) for b in model.spec.blocks])


@pytest.mark.parametrize("family", ["vit", "mixer", "convmixer", "convnext", "swin"])
def test_timm_name_reads_the_spec_and_normalization_from_timms_model(tmp_path, family, monkeypatch):
    """timm:NAME: timm makes the model with its pretrained weights (here: a small random one in their
    place, as no network is assumed); the spec comes from its modules, the normalization from its
    configuration."""
    reference = timm_model(family)
    reference.pretrained_cfg = {"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6), "input_size": (3, 16, 16),
                                "crop_pct": 0.9}
    asked = []
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained: asked.append((name, pretrained)) or reference)
    result = run_cli("import", "timm:tiny_one.v2", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert asked == [("tiny_one.v2", True)]
    assert f"the spec, read from timm's model: {tmp_path / 'run'}/spec.yaml" in result.stdout
    spec, model, state = load_run(tmp_path / "run", backend="reference")
    assert spec.name == "tiny_one_v2" and spec.model.num_classes == 5 and spec.model.image_size == 16
    assert spec.model.blocks[0].kind == {"swin": "vit"}.get(family, family) and spec.model.blocks[0].repeat == 2
    assert state["normalization"] == {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    assert spec.data.crop == 0.9   # timm's evaluation crop: evaluate and predict decode images so
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)


def test_timm_name_refuses_variants_composer_does_not_build(tmp_path, monkeypatch):
    from timm.models.vision_transformer import VisionTransformer

    variant = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=5,
                                global_pool="max", pre_norm=True)
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained: variant)
    assert_user_error(run_cli("import", "timm:max_pre", "--out", tmp_path / "run"),
                      "timm's max_pre is a ViT with max pooling: parts")
    variant = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=5,
                                global_pool="avg")
    assert_user_error(run_cli("import", "timm:avg_cls", "--out", tmp_path / "run"),
                      "timm's avg_cls is a ViT with a class token its average-pooled head leaves out")
    variant = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=5,
                                global_pool="map")
    assert_user_error(run_cli("import", "timm:map_cls", "--out", tmp_path / "run"),
                      "timm's map_cls is a ViT with a class token beside attention pooling")
    variant = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=5,
                                global_pool="map", class_token=False, reg_tokens=1, pool_include_prefix=True)
    assert_user_error(run_cli("import", "timm:map_all", "--out", tmp_path / "run"),
                      "timm's map_all is a ViT with pooling over the class token and registers too")
    variant.global_pool, variant.attn_pool.latent_len = "map", 2
    variant.pool_include_prefix = False
    assert_user_error(run_cli("import", "timm:map_two", "--out", tmp_path / "run"),
                      "timm's map_two is a ViT with attention pooling other than one query")

    def offline(name, pretrained):
        raise RuntimeError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    assert_user_error(run_cli("import", "timm:vit_small_patch16_224", "--out", tmp_path / "run"),
                      "timm could not make vit_small_patch16_224 with its pretrained weights (RuntimeError: no network)")
    assert_user_error(run_cli("import", tmp_path / "weights.pth", "--out", tmp_path / "run"),
                      "a weights file needs the SPEC of its model")
    assert not (tmp_path / "run").exists()


def import_from_timm(reference, name, out, monkeypatch):
    """`composer import timm:NAME --out OUT` where timm makes `reference` (every tensor set at random,
    so that a misplaced one shows) instead of downloading NAME's weights; checks that every tensor
    was taken. Returns the command's output."""
    with torch.no_grad():
        for value in reference.state_dict().values():
            value.copy_(torch.randn_like(value) * 0.3)
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained: reference)
    result = run_cli("import", f"timm:{name}", "--out", out)
    assert result.returncode == 0, result.stderr
    assert f"{len(reference.state_dict())} tensors, all of them" in result.stdout
    return result.stdout


VIT_VARIANTS = {   # timm's keywords of ViTs with parts beyond the original ViT, as its pretrained models use them
    "deit3": dict(no_embed_class=True, init_values=1e-5),   # layer scale; no position for the class token
    "reg4_gap": dict(class_token=False, reg_tokens=4, no_embed_class=True, global_pool="avg"),   # fc_norm
    "registers_with_positions": dict(reg_tokens=2, qk_norm=True),
    "gap_norm_before_pooling": dict(class_token=False, reg_tokens=3, global_pool="avg", fc_norm=False),
    "everything": dict(reg_tokens=4, no_embed_class=True, init_values=1e-5, qk_norm=True),
    "map": dict(class_token=False, global_pool="map"),   # attention pooling (SigLIP)
    "reg2_map": dict(class_token=False, reg_tokens=2, global_pool="map", init_values=1e-5),   # vit_so150m_*_reg4_map
    "siglip2": dict(class_token=False, global_pool="map", act_layer="gelu_tanh"),   # vit_so400m_patch16_siglip_*
    # CLIP's: a LayerNorm before the blocks, no bias in the patch embedding, LayerNorms of eps 1e-5
    "clip": dict(pre_norm=True, norm_layer="layernorm"),
    "clip_quickgelu_registers": dict(pre_norm=True, act_layer="quick_gelu", reg_tokens=2),   # OpenAI's activation
}


@pytest.mark.parametrize("variant", sorted(VIT_VARIANTS))
def test_vit_variants_import_computing_what_timm_computes(tmp_path, variant, monkeypatch):
    """Layer scale, register tokens (with or without rows in timm's position table), qk-norm, mean
    pooling with the norm before or after it, a class token without a position, attention pooling
    (with registers, which it leaves out as mean pooling does): timm:NAME reads the
    spec, the weights carry over, and the logits are timm's. Every tensor random (the layer-scale
    factors and register tokens too)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    reference = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                                  num_classes=5, **VIT_VARIANTS[variant]).eval()
    import_from_timm(reference, variant, tmp_path / "run", monkeypatch)
    spec, model, _ = load_run(tmp_path / "run", backend="reference")
    keywords, block = VIT_VARIANTS[variant], spec.model.blocks[0]
    assert spec.model.registers == keywords.get("reg_tokens", 0)
    assert block.qk_norm == keywords.get("qk_norm", False) and (block.layer_scale is not None) == ("init_values" in keywords)
    assert spec.model.head.pool == {"avg": "mean", "map": "attention"}.get(keywords.get("global_pool"), "cls")
    assert spec.model.norm_pre == keywords.get("pre_norm", False)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)

    # a weights file with the spec the import wrote gives the same model
    weights = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), weights)
    result = run_cli("import", weights, tmp_path / "run" / "spec.yaml", "--out", tmp_path / "again")
    assert result.returncode == 0, result.stderr
    _, again, _ = load_run(tmp_path / "again", backend="reference")
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_deit_with_its_distillation_token_imports_computing_what_timm_computes(tmp_path, monkeypatch):
    """timm's distilled DeiTs: the spec read from the model has the distillation token; the logits
    are timm's, evaluating (the mean of both classifiers) and training (each classifier's, as
    timm's distilled training returns them); a weights file with that spec gives the same model,
    and fine-tuning to other classes starts both classifiers anew."""
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    reference = VisionTransformerDistilled(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                                           num_classes=5).eval()
    import_from_timm(reference, "deit_tiny_distilled", tmp_path / "run", monkeypatch)
    spec, model, _ = load_run(tmp_path / "run", backend="reference")
    assert spec.model.head.distill_token and spec.model.head.pool == "cls"
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)
        reference.set_distilled_training(True)
        reference.train(), model.train(), model.distilled_training()
        theirs, ours = reference(x), model(x)
        torch.testing.assert_close(ours.cls, theirs[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.dist, theirs[1], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(ours.cls, ours.dist, atol=1e-2)   # two classifiers: a swapped one would show

    weights = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), weights)
    result = run_cli("import", weights, tmp_path / "run" / "spec.yaml", "--out", tmp_path / "again")
    assert result.returncode == 0, result.stderr
    _, again, _ = load_run(tmp_path / "again", backend="reference")
    model.eval(), model.distilled_training(False)   # the prediction again: both classifiers' mean
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)

    tuned = load_spec_text((tmp_path / "run" / "spec.yaml").read_text(), "tuned.yaml", ["model.num_classes=7"])
    fresh = build_model(tuned, backend="reference")
    said = init_from_run(fresh, tuned, tmp_path / "run")
    assert "new classifier (5 -> 7 classes)" in said
    assert torch.equal(fresh.stages[2].dist_token, model.stages[2].dist_token)
    assert fresh.layers[-1].module.classify_dist.weight.shape == (7, 32)
    plain = load_spec_text((tmp_path / "run" / "spec.yaml").read_text(), "plain.yaml", ["model.head.distill_token=false"])
    with pytest.raises(Exception, match="its model has a distillation token and this one does not; set "
                                        "model.head.distill_token: true to start from it"):
        init_from_run(build_model(plain, backend="reference"), plain, tmp_path / "run")


@pytest.mark.parametrize("name, head, activation", [
    ("vit_base_patch16_siglip_224", {"pool": "attention", "heads": 12, "mlp_ratio": 4.0, "mlp_activation": None},
     "gelu"),
    ("vit_so400m_patch16_siglip_256", {"pool": "attention", "heads": 16, "mlp_ratio": 4304 / 1152,
                                       "mlp_activation": "gelu_tanh"}, "gelu_tanh"),
    ("vit_base_patch16_clip_224", {"pool": "cls", "norm_eps": 1e-5}, "gelu"),
    ("vit_base_patch16_clip_quickgelu_224", {"pool": "cls", "norm_eps": 1e-5}, "quick_gelu")])
def test_image_encoders_read_as_specs_whose_models_have_timms_tensors(name, head, activation):
    """SigLIP's ViT-B/16 and SigLIP 2's So400m/16 (backbones: attention pooling, no class token; the
    second with GELU's tanh approximation and an MLP of 4,304 = 3.74 x 1,152), CLIP's ViT-B/16 (a
    LayerNorm before the blocks, no bias in the patch embedding; OpenAI's with QuickGELU), on the
    meta device: the spec read from timm's model builds a model with each of timm's tensors, in its
    shape."""
    from composer.timm_weights import family_of, spec_from_timm, timm_names

    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False)
        spec = load_spec_text(yaml.safe_dump(spec_from_timm(reference, name)))
        model = build_model(spec, backend="reference")
    assert spec.model.head.model_dump(include=set(head)) == head
    assert spec.model.blocks[0].mlp_activation == activation
    assert spec.model.norm_pre == ("clip" in name) and spec.model.stem.bias == ("clip" not in name)
    theirs, ours = reference.state_dict(), model.state_dict()
    names = {k: v for k, v in timm_names(model, family_of(theirs)).items()
             if reference.num_classes or ".classify." not in k}   # a backbone: composer's classifier has no timm tensor
    assert sorted(names.values()) == sorted(theirs)
    assert all(ours[k].shape == theirs[v].shape for k, v in names.items())


def test_a_backbone_without_classifier_imports_for_fine_tuning(tmp_path, monkeypatch):
    """timm's backbones (num_classes 0, as DINOv2's: layer scale, registers, patch 14): the import
    keeps every weight it has, computes timm's features, refuses to classify, and fine-tuning from
    it starts a new classifier."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    backbone = VisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                                 init_values=1e-5, reg_tokens=4, no_embed_class=True).eval()
    said = import_from_timm(backbone, "tiny_dinov2", tmp_path / "run", monkeypatch)
    assert "the weights have no classifier (a backbone)" in said and "classes" not in said
    spec, model, state = load_run(tmp_path / "run", backend="reference")
    assert state["backbone_only"] and spec.model.registers == 4
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(pooled_features(model, x), backbone(x), rtol=1e-4, atol=1e-4)

    for command in (["evaluate", tmp_path / "run"], ["predict", tmp_path / "run", tmp_path],
                    ["export", tmp_path / "run", tmp_path / "m.pt2"]):
        assert_user_error(run_cli(*command), "holds a backbone without a classifier",
                          f"--set train.init_from={tmp_path / 'run'}")
    fine = load_spec_text((tmp_path / "run" / "spec.yaml").read_text(), "ft.yaml", ["model.num_classes=3"])
    tuned = build_model(fine, backend="reference")
    with torch.no_grad():
        said = init_from_run(tuned, fine, tmp_path / "run")
    assert "new classifier (3 classes; the run had none)" in said
    # its attention maps are still worth looking at (the caption says it has no classes)
    from PIL import Image

    Image.fromarray((torch.rand(28, 28, 3) * 255).byte().numpy()).save(tmp_path / "image.png")
    shown = run_cli("visualize", "attention", tmp_path / "run", "--file", tmp_path / "image.png", "--layer", 0,
                    "--out", tmp_path / "figures")
    assert shown.returncode == 0, shown.stderr


def test_convnext_variants_import_or_are_refused_by_name(tmp_path, monkeypatch):
    """ConvNeXt's small variants (atto to nano) run their MLP as 1x1 convolutions: the same weights
    in another shape, imported computing what timm computes; other parts are refused by name."""
    reference = timm_model("convnext", conv_mlp=True)
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained: reference)
    result = run_cli("import", "timm:convnext_small_one", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    spec, model, _ = load_run(tmp_path / "run", backend="reference")
    assert [b.kind for b in spec.model.blocks] == ["convnext", "downsample"] * 3 + ["convnext"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)
    for options, fragment in ((dict(use_grn=True), "a GlobalResponseNormMlp MLP"),
                              (dict(head_norm_first=True), "a norm before the head (head_norm_first)"),
                              (dict(stem_type="overlap"), "an overlapping stem")):
        variant = timm_model("convnext", **options)
        monkeypatch.setattr(timm, "create_model", lambda name, pretrained: variant)
        assert_user_error(run_cli("import", "timm:other", "--out", tmp_path / "other"),
                          f"timm's other is a ConvNeXt with {fragment}")


@pytest.mark.parametrize("family", ["convnext", "swin"])
def test_hierarchical_backbones_import_without_their_classifier(tmp_path, family, monkeypatch):
    """A ConvNeXt or Swin made with num_classes=0 (its head a pooled norm, no Linear) imports as a
    backbone, computing timm's pooled features."""
    reference = timm_model(family)
    reference.reset_classifier(0)
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained: reference)
    result = run_cli("import", f"timm:{family}_backbone", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert f"{len(reference.state_dict())} tensors, all of them" in result.stdout
    _, model, state = load_run(tmp_path / "run", backend="reference")
    assert state["backbone_only"]
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(pooled_features(model, x), reference(x), rtol=1e-4, atol=1e-4)
