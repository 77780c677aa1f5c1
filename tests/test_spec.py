"""The spec language: loading, every class of mistake, overrides, schema."""
import json

import pytest

from composer.spec import Spec, SpecError, load_spec, load_spec_text
from tests.helpers import ROOT, SPECS, assert_user_error, run_cli

GOOD = """\
name: tiny
model:
  image_size: 32
  num_classes: 10
  stem: {patch_size: 4, dim: 64}
  blocks:
    - kind: vit
      heads: 4
data: {kind: synthetic}
"""


def problems(text, overrides=()):
    with pytest.raises(SpecError) as info:
        load_spec_text(text, "x.yaml", overrides)
    return [str(p) for p in info.value.problems]


def test_good_spec_loads_with_defaults():
    spec = load_spec_text(GOOD, "x.yaml")
    assert spec.model.blocks[0].heads == 4 and spec.model.blocks[0].repeat == 1
    assert spec.train.optimizer.kind == "adamw"


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_spec_validates(path):
    spec = load_spec(path)
    assert spec.name == path.stem


def test_all_problems_reported_at_their_lines():
    text = GOOD.replace("heads: 4", "heads: 5").replace("patch_size: 4", "patch_size: 5")
    text = text.replace("data: {kind: synthetic}", "data: {kind: synthetic, val_splt: 0.1}")
    found = problems(text)
    # in the file's order, whichever check found them (the cross-field rules run after the types)
    assert found == [
        "x.yaml:5:22: model.stem.patch_size: 5 does not divide the image_size 32 (try 1, 2, 4, 8, 16, 32)",
        "x.yaml:8:14: model.blocks[0].heads: 5 does not divide dim 64 (try 1, 2, 4, 8, 16, 32)",
        "x.yaml:9:25: data.val_splt: unknown key 'val_splt' (did you mean 'val_split'?); valid keys: "
        "kind, root, download, cache_dir, val_root, labels, val_labels, val_split, split_seed, stratify, num_samples, crop, augment",
    ]


def test_rules_still_run_around_an_invalid_block():
    # block 1 is unknown, so the model section does not validate; the stem and block 0 rules still speak,
    # and nothing is said about the stand-in that replaced block 1 (nor about cls pooling after it)
    text = GOOD.replace("heads: 4", "heads: 5\n    - {kind: mixr}").replace("patch_size: 4", "patch_size: 5")
    text = text.replace("data: {kind: synthetic}", "  head: {pool: cls}\ndata: {kind: synthetic}")
    found = problems(text)
    assert found[:2] == [
        "x.yaml:5:22: model.stem.patch_size: 5 does not divide the image_size 32 (try 1, 2, 4, 8, 16, 32)",
        "x.yaml:8:14: model.blocks[0].heads: 5 does not divide dim 64 (try 1, 2, 4, 8, 16, 32)",
    ]
    assert len(found) == 3
    assert found[2].startswith("x.yaml:9:7: model.blocks[1]: unknown block kind 'mixr' (did you mean 'mixer'?)")


def test_rules_still_run_around_invalid_fields():
    # an invalid stem activation and an invalid field inside block 1 leave the model section invalid;
    # the rules that do not rest on those values still report, in the same run
    text = GOOD.replace("dim: 64}", "dim: 64, activation: gelux}").replace("patch_size: 4", "patch_size: 5")
    text = text.replace("heads: 4", "heads: 7\n    - {kind: mixer, token_hidden: -1}")
    found = problems(text)
    assert found == [
        "x.yaml:5:22: model.stem.patch_size: 5 does not divide the image_size 32 (try 1, 2, 4, 8, 16, 32)",
        "x.yaml:5:46: model.stem.activation: input should be 'gelu' or 'relu'",
        "x.yaml:8:14: model.blocks[0].heads: 7 does not divide dim 64 (try 1, 2, 4, 8, 16, 32)",
        "x.yaml:9:35: model.blocks[1].token_hidden: input should be greater than 0",
    ], found


def test_accumulate_must_divide_the_batch():
    (msg,) = problems(GOOD + "train:\n  batch_size: 96\n  accumulate: 5\n")
    assert msg == ("x.yaml:12:15: train.accumulate: 5 slices do not divide train.batch_size 96 "
                   "(try 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48)"), msg
    # found with the rest of the train section invalid, and from an override
    (_, msg) = problems(GOOD + "train:\n  epochs: -1\n  accumulate: 3\n", ["train.batch_size=64"])
    assert msg.startswith("x.yaml:12:15: train.accumulate: 3 slices do not divide train.batch_size 64"), msg
    assert load_spec_text(GOOD + "train:\n  batch_size: 96\n  accumulate: 4\n", "x.yaml").train.accumulate == 4


def test_labels_files_are_for_folders():
    (msg,) = problems(GOOD.replace("data: {kind: synthetic}", "data: {kind: synthetic, labels: l.csv}"))
    assert msg.startswith("x.yaml:9:33: data.labels: a labels file names the classes of a folder's images"), msg
    (msg,) = problems(GOOD.replace("data: {kind: synthetic}", "data: {kind: folder, root: r, val_labels: v.csv}"))
    assert msg.startswith("x.yaml:9:43: data.val_labels: val_labels names the classes of val_root's images, but "
                          "there is no val_root"), msg


def test_a_validation_folder_is_for_folders_and_replaces_val_split():
    (msg,) = problems(GOOD.replace("data: {kind: synthetic}", "data: {kind: synthetic, val_root: v}"))
    assert msg.startswith("x.yaml:9:35: data.val_root: a separate validation folder is for folder datasets, "
                          "not synthetic"), msg
    folder = GOOD.replace("data: {kind: synthetic}", "data:\n  kind: folder\n  root: t\n  val_root: v\n")
    assert load_spec_text(folder, "x.yaml").data.held_out == 0
    (msg,) = problems(folder + "  val_split: 0.2\n")
    assert msg.startswith("x.yaml:14:14: data.val_split: val_split 0.2 would hold out training images, but "
                          "val_root already gives the validation set"), msg
    assert load_spec_text(folder + "  val_split: 0\n", "x.yaml").data.held_out == 0


def test_a_loaded_spec_locates_its_fields():
    spec = load_spec_text(GOOD, "x.yaml", ["train.epochs=3"])
    assert spec.locate("model.blocks[0].heads") == "x.yaml:8:14"
    assert spec.locate("train.epochs") == "--set train.epochs=3"
    assert spec.locate("model.stem.activation") == "x.yaml:5:9"   # unwritten: its enclosing mapping
    assert Spec.model_validate({"model": spec.model.model_dump()}).locate("model.image_size") is None


def test_two_crops_are_refused():
    text = GOOD.replace("data: {kind: synthetic}", "data:\n  kind: synthetic\n  augment: {crop_padding: 4, resized_crop: 0.3}\n")
    (msg,) = problems(text)
    assert msg.startswith("x.yaml:11:27: data.augment.crop_padding: crop_padding 4 and resized_crop 0.3 are two crops"), msg
    spec = load_spec_text(text.replace("crop_padding: 4, ", ""), "x.yaml")
    assert spec.data.augment.padding == 0 and spec.data.augment.resized_crop == 0.3


def test_a_resume_reads_an_unset_val_split_as_its_default():
    """Checkpoints written before val_split could be unset hold 0.1 where it was left out."""
    from composer.train import _split_fields

    before = {"kind": "folder", "root": "t", "val_split": 0.1}
    assert _split_fields(before) == _split_fields({"kind": "folder", "root": "t", "val_split": None})
    assert _split_fields(before) != _split_fields({"kind": "folder", "root": "t", "val_split": 0.2})
    assert _split_fields(before) != _split_fields({"kind": "folder", "root": "t", "val_root": "v"})


def test_no_rule_finding_rests_on_an_invalid_value():
    # resize is invalid, so whether patch 6 divides the input size cannot be known: only the resize
    # error is reported, not a guess made with resize left out (6 does not divide 32)
    text = GOOD.replace("image_size: 32", "image_size: 32\n  resize: big").replace("patch_size: 4", "patch_size: 6")
    (msg,) = problems(text)
    assert msg.startswith("x.yaml:4:11: model.resize: input should be a valid integer"), msg
    # an unknown dataset kind: nothing is said about num_classes against a dataset that was not named
    (msg,) = problems(GOOD.replace("num_classes: 10", "num_classes: 7").replace("kind: synthetic", "kind: cifar11"))
    assert msg.startswith("x.yaml:9:14: data.kind: input should be"), msg


def test_unknown_block_kind_suggests():
    (msg,) = problems(GOOD.replace("kind: vit", "kind: atention"))
    assert msg.startswith("x.yaml:7:7: model.blocks[0]: unknown block kind 'atention' (did you mean 'attention'?)")


def test_misplaced_key_names_its_section():
    (msg,) = problems(GOOD + "train:\n  lr: 0.1\n")
    assert msg.startswith("x.yaml:11:3: train.lr: unknown key 'lr' (it belongs under 'optimizer:')"), msg


def test_leading_zeros_and_recursive_aliases():
    spec = load_spec_text(GOOD.replace("image_size: 32", "image_size: 032"), "x.yaml")
    assert spec.model.image_size == 32  # YAML 1.2: decimal, not octal
    (msg,) = problems("model: &a {x: *a}\n")
    assert "refers to itself" in msg


def test_missing_field_and_wrong_type():
    found = problems(GOOD.replace("  num_classes: 10\n", "").replace("heads: 4", "heads: four"))
    assert any("x.yaml:2:1: model.num_classes: required field is missing" == m for m in found), found
    assert any(m.startswith("x.yaml:7:14: model.blocks[0].heads: input should be a valid integer") for m in found)


def test_a_value_that_fits_no_member_of_a_union_is_one_problem():
    # train.freeze is a count or 'backbone': one problem at the value, each member's reason
    (msg,) = problems(GOOD + "train:\n  freeze: all\n")
    assert msg == ("x.yaml:11:11: train.freeze: input should be a valid integer, unable to parse string as an "
                   "integer; or 'backbone'"), msg
    (msg,) = problems(GOOD + "train:\n  freeze: [1]\n")
    assert msg == "x.yaml:11:11: train.freeze: input should be a valid integer; or 'backbone'", msg
    (msg,) = problems(GOOD, ["train.cuda_graph=maybe"])
    assert msg == ("--set train.cuda_graph=maybe: train.cuda_graph: input should be 'auto'; or a valid boolean, "
                   "unable to interpret input"), msg


def test_freeze_counts_at_most_the_models_blocks():
    text = GOOD.replace("heads: 4", "heads: 4\n      repeat: 3") + "train:\n  freeze: 4\n"
    (msg,) = problems(text)
    assert msg.startswith("x.yaml:12:11: train.freeze: 4 blocks to freeze, but the model has 3 (each repeat "
                          "counts"), msg
    assert load_spec_text(text.replace("freeze: 4", "freeze: 3"), "x.yaml").train.freeze == 3
    assert load_spec_text(text.replace("freeze: 4", "freeze: backbone"), "x.yaml").train.freeze == "backbone"


def test_cross_field_rules():
    text = GOOD.replace("kind: vit\n      heads: 4", "kind: convmixer\n      kernel_size: 4")
    text = text.replace("num_classes: 10", "num_classes: 10\n  head: {pool: cls}")
    found = problems(text)
    assert any("model.blocks[0].kernel_size: 4 is even" in m and m.startswith("x.yaml:9:") for m in found), found
    assert any("model.head.pool: cls pooling needs token layout at the end" in m for m in found), found
    found = problems(GOOD.replace("kind: synthetic", "kind: cifar10").replace("image_size: 32", "image_size: 64"))
    assert any("data.root" in m for m in found) and any("cifar10 images are 32x32" in m for m in found), found


def test_builtin_dataset_rules():
    mnist = GOOD.replace("kind: synthetic}", "kind: mnist, root: data}").replace("image_size: 32", "image_size: 28")
    assert load_spec_text(mnist.replace("image_size: 28", "image_size: 28\n  in_channels: 1"), "x.yaml")
    assert load_spec_text(mnist, "x.yaml").model.in_channels == 3  # grayscale repeated
    found = problems(mnist.replace("image_size: 28", "image_size: 28\n  in_channels: 2"))
    assert any("model.in_channels: mnist images are grayscale; set in_channels: 1" in m for m in found), found
    found = problems(GOOD.replace("kind: synthetic}", "kind: cifar100}").replace("image_size: 32", "image_size: 28"))
    assert any(m.startswith("x.yaml:4:16: model.num_classes: 10 does not match cifar100, which has 100 classes")
               for m in found), found
    assert any("data.root: the cifar100 dataset needs a root" in m for m in found), found
    assert any("cifar100 images are 32x32; set image_size: 32" in m for m in found), found
    found = problems(mnist.replace("image_size: 28", "image_size: 32"))
    assert any("mnist images are 28x28; set image_size: 28 (and resize: 32" in m for m in found), found


def test_duplicate_keys_are_errors():
    (msg,) = problems(GOOD.replace("  num_classes: 10\n", "  num_classes: 10\n  num_classes: 100\n"))
    assert msg.startswith("x.yaml:5:3: model.num_classes: duplicate key (first given at line 4)")


def test_yaml11_traps():
    # `no`/`off` stay strings where a string is meant, and still work as booleans where one is meant;
    # 1e-3 is a float, not the string "1e-3".
    text = GOOD.replace("name: tiny", "name: no") + "train:\n  compile: off\n  optimizer: {lr: 1e-3}\n"
    spec = load_spec_text(text, "x.yaml")
    assert spec.name == "no" and spec.train.compile is False and spec.train.optimizer.lr == 1e-3


@pytest.mark.parametrize("text, fragment", [
    ("", "the file is empty"),
    ("- a\n- b\n", "not a list"),
    ("model: [1, 2\n", "invalid YAML"),
])
def test_malformed_files(text, fragment):
    (msg,) = problems(text)
    assert fragment in msg and msg.startswith("x.yaml"), msg


def test_overrides_apply_and_report_origin():
    spec = load_spec_text(GOOD, "x.yaml", ["model.blocks[0].heads=8", "train.optimizer.lr=0.01", "model.blocks.0.repeat=2"])
    assert spec.model.blocks[0].heads == 8 and spec.model.blocks[0].repeat == 2 and spec.train.optimizer.lr == 0.01
    (msg,) = problems(GOOD, ["model.blocks[0].heads=7"])
    assert msg.startswith("--set model.blocks[0].heads=7: model.blocks[0].heads: 7 does not divide dim 64")
    (msg,) = problems(GOOD, ["model.blocks[3].heads=2"])
    assert msg.startswith("--set model.blocks[3].heads=2") and "no such list item" in msg
    (msg,) = problems(GOOD, ["train.epochs"])
    assert "expected KEY.PATH=VALUE" in msg


def test_cli_validate_reports_every_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("heads: 4", "heads: 5"))
    garbage = tmp_path / "garbage.yaml"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    # a real `python -m composer` process: the entry point itself, exit code and stderr as a user sees them
    result = run_cli("validate", SPECS / "quickstart.yaml", bad, garbage, tmp_path / "missing.yaml",
                     real_process=True)
    assert "quickstart.yaml: OK (quickstart: mixer x2)" in result.stdout
    assert_user_error(result, f"{bad}:8:14: model.blocks[0].heads: 5 does not divide dim 64",
                      f"{garbage}: is a binary file", f"{tmp_path / 'missing.yaml'}: no such file")


def test_cli_set_errors_exit_2():
    result = run_cli("summarize", SPECS / "quickstart.yaml", "--set", "model.stem.dim=0")
    assert_user_error(result, "--set model.stem.dim=0: model.stem.dim: input should be greater than 0")


def test_schema_into_missing_directory_is_a_user_error(tmp_path):
    assert_user_error(run_cli("schema", "-o", tmp_path / "no" / "such" / "dir.json"), "cannot write")


def test_schema_matches_models_and_committed_copy(tmp_path):
    out = tmp_path / "schema.json"
    result = run_cli("schema", "-o", out)
    assert result.returncode == 0, result.stderr
    schema = json.loads(out.read_text())
    assert schema == Spec.model_json_schema()
    assert schema == json.loads((SPECS / "composer.schema.json").read_text()), \
        "specs/composer.schema.json is stale: run `composer schema -o specs/composer.schema.json`"
    blocks = schema["$defs"]["ModelSpec"]["properties"]["blocks"]
    assert "description" in blocks and "discriminator" in json.dumps(blocks)


BAD_INPUTS = {
    "unknown key": (GOOD.replace("heads: 4", "heads: 4\n      haeds: 2"), ":9:7:", "unknown key 'haeds'"),
    "unknown kind": (GOOD.replace("kind: vit", "kind: vitt"), ":7:7:", "unknown block kind 'vitt'"),
    "duplicate key": (GOOD.replace("  num_classes: 10\n", "  num_classes: 10\n  num_classes: 10\n"), ":5:3:",
                      "duplicate key"),
    "wrong type": (GOOD.replace("heads: 4", "heads: [4]"), ":8:14:", "valid integer"),
    "missing field": (GOOD.replace("  num_classes: 10\n", ""), ":2:1:", "required field is missing"),
    "rule": (GOOD.replace("heads: 4", "heads: 3"), ":8:14:", "3 does not divide dim 64"),
    "invalid yaml": (GOOD.replace("heads: 4", "heads: [4"), ":", "invalid YAML"),
    "not a mapping": ("- 1\n", ":1:1:", "a spec is a mapping"),
    "empty": ("", "", "the file is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_cli_bad_input_exit_2_with_position_and_no_traceback(tmp_path, case):
    from click.testing import CliRunner

    from composer.cli import main

    text, position, fragment = BAD_INPUTS[case]
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    for command in (["validate"], ["summarize"], ["train", "--out", str(tmp_path / "run")]):
        result = CliRunner().invoke(main, command + [str(spec)])
        assert result.exit_code == 2, (command, result.output)
        assert isinstance(result.exception, SystemExit)  # handled: no traceback printed
        assert f"{spec}{position}" in result.stderr and fragment in result.stderr, result.stderr
        assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # nothing started


def test_readme_spec_example_validates():
    import re

    readme = (ROOT / "README.md").read_text()
    # read as if in specs/, where the example with a base says it lives
    examples = [load_spec_text(text, str(SPECS / "README.md"))
                for text in re.findall(r"```yaml\n(.*?)```", readme, re.S)]
    assert [spec.name for spec in examples] == ["my_vit", "seed_mixer_vit", "staged_hybrid", "vit_cifar_long"]
    assert len(examples[1].model.blocks) == 2 and examples[0].data.augment.padding == 0
    assert examples[2].model.stages()[-1] == (256, 4)   # as its comments say
    long, recipe = examples[3], load_spec(SPECS / "vit_cifar.yaml")
    assert long.model == recipe.model and long.train.epochs == 300
    assert long.train.optimizer.weight_decay == recipe.train.optimizer.weight_decay


# -- base specs -------------------------------------------------------------------------

BASE = """\
name: the_base
description: a small ViT
model:
  image_size: 32
  num_classes: 10
  stem: {patch_size: 4, dim: 64}
  blocks:
    - {kind: vit, heads: 4, repeat: 2}
data: {kind: synthetic}
train: {epochs: 3, optimizer: {lr: 0.001, weight_decay: 0.1}}
"""


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_spec_merges_sections_and_points_into_both_files(tmp_path):
    base = write(tmp_path / "bases" / "vit.yaml", BASE)
    child = write(tmp_path / "wide.yaml", "base: bases/vit.yaml\nmodel:\n  stem: {dim: 96}\ntrain:\n"
                                          "  optimizer: {lr: 0.01}\n")
    spec = load_spec(child)
    assert spec.name == "wide" and spec.description == "a small ViT"   # the name is the file's own
    assert spec.model.stem.dim == 96 and spec.model.stem.patch_size == 4 and spec.model.blocks[0].repeat == 2
    assert spec.train.optimizer.lr == 0.01 and spec.train.optimizer.weight_decay == 0.1 and spec.train.epochs == 3
    assert spec.locate("model.stem.dim") == f"{child}:3:15"
    assert spec.locate("model.blocks[0].heads").endswith("vit.yaml:8:26")
    assert spec.locate("train.optimizer.lr") == f"{child}:5:19"
    # the resolved spec a run keeps stands alone: no base to find again
    from composer.train import spec_yaml
    assert "base" not in spec_yaml(spec) and load_spec_text(spec_yaml(spec), "run.yaml").model == spec.model
    # a list replaces the base's list whole; a base may have a base of its own, relative to itself
    write(tmp_path / "bases" / "deeper.yaml", "base: vit.yaml\nmodel: {blocks: [{kind: mixer}]}\n")
    grandchild = load_spec(write(tmp_path / "g.yaml", "base: bases/deeper.yaml\ntrain: {epochs: 1}\n"))
    assert [b.kind for b in grandchild.model.blocks] == ["mixer"] and grandchild.model.stem.dim == 64
    assert grandchild.train.epochs == 1 and grandchild.train.optimizer.lr == 0.001
    assert base.exists()


def test_base_spec_mistakes_point_at_the_line(tmp_path):
    write(tmp_path / "vit.yaml", BASE)
    child = write(tmp_path / "c.yaml", "name: c\nbase: nowhere.yaml\n")
    (msg,) = [str(p) for p in pytest.raises(SpecError, load_spec, child).value.problems]
    assert msg.startswith(f"{child}:2:7: base: nowhere.yaml ({tmp_path / 'nowhere.yaml'}) no such file")
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    (msg,) = [str(p) for p in pytest.raises(SpecError, load_spec, tmp_path / "a.yaml").value.problems]
    assert "the bases form a loop (a.yaml -> b.yaml -> a.yaml)" in msg
    (msg,) = [str(p) for p in pytest.raises(SpecError, load_spec,
                                            write(tmp_path / "n.yaml", "base: 3\n")).value.problems]
    assert msg == f"{tmp_path / 'n.yaml'}:1:7: base: expected the path of a spec file, got 3"
    # a rule that reads values from both files names where each came from
    child = write(tmp_path / "odd.yaml", "base: vit.yaml\nmodel:\n  stem: {dim: 90}\n")
    (msg,) = [str(p) for p in pytest.raises(SpecError, load_spec, child).value.problems]
    assert msg.endswith(f"vit.yaml:8:26: model.blocks[0].heads: 4 does not divide dim 90 (try 1, 2, 3, 5, 6, 9, "
                        f"10, 15, 18, 30) (model.stem.dim from {child}:3:15)"), msg
    # a mistake in the base file is reported in the base file
    write(tmp_path / "broken.yaml", BASE.replace("epochs: 3", "epochs: three"))
    (msg,) = [str(p) for p in pytest.raises(SpecError, load_spec,
                                            write(tmp_path / "d.yaml", "base: broken.yaml\n")).value.problems]
    assert "broken.yaml:10:17: train.epochs: input should be a valid integer" in msg
    found = [str(p) for p in pytest.raises(SpecError, load_spec, tmp_path / "vit.yaml", ["base=x.yaml"]).value.problems]
    assert found == ["--set base=x.yaml: a base spec is chosen in the file (base: ...), not with --set"]



HIERARCHICAL = """\
model:
  image_size: 32
  num_classes: 10
  stem: {patch_size: 4, dim: 16}
  blocks:
    - {kind: convnext}
    - {kind: downsample, factor: 3}
    - {kind: vit, heads: 6}
    - {kind: downsample, dim: 20, repeat: 3}
    - {kind: vit, heads: 8}
data: {kind: synthetic}
"""


def test_downsample_rules_name_the_grid_and_the_width_a_block_gets():
    """A factor must divide the grid a downsample gets (the grids after a wrong one are not
    checked: they are not what was meant); heads divide the width of their stage, not the stem's."""
    assert problems(HIERARCHICAL) == [
        "x.yaml:7:34: model.blocks[1].factor: 3 does not divide the 8x8 grid it gets (try factor: 2, 4, 8)",
        "x.yaml:8:26: model.blocks[2].heads: 6 does not divide the 32 channels it gets (try 1, 2, 4, 8, 16, 32)",
        "x.yaml:10:26: model.blocks[4].heads: 8 does not divide the 20 channels it gets (try 1, 2, 4, 5, 10, 20)",
    ]
    found = problems(HIERARCHICAL.replace("factor: 3", "factor: 2"))
    assert found[1] == ("x.yaml:9:7: model.blocks[3].factor: 2, 3 times over (8x), does not divide the 4x4 grid it "
                        "gets (try repeat: 2)")
    # an earlier block that is not valid might have been a downsample: nothing is said of the widths after it
    found = problems(HIERARCHICAL.replace("{kind: downsample, factor: 3}", "{kind: downsampel}"))
    assert len(found) == 1 and "unknown block kind 'downsampel' (did you mean 'downsample'?)" in found[0], found
    fixed = load_spec_text(HIERARCHICAL.replace("factor: 3", "factor: 2").replace("heads: 6", "heads: 4")
                           .replace("repeat: 3", "repeat: 2").replace("heads: 8", "heads: 4"))
    assert fixed.model.stages() == [(16, 8), (16, 8), (32, 4), (32, 4), (20, 1), (20, 1)]
