"""Knowledge distillation (train.distill): the loss, the teacher's view of each batch, the mistakes."""
import pytest
import torch
import torch.nn.functional as F

from composer import distill
from composer.checkpoint import load_run
from composer.graphed_step import reasons_against
from composer.spec import SpecError, load_spec_text
from composer.train import train
from tests.helpers import assert_user_error, run_cli

TEACHER = """\
name: teacher
model:
  image_size: 8
  num_classes: 4
  stem: {patch_size: 2, dim: 16}
  blocks: [{kind: convmixer, kernel_size: 3}]
data: {kind: synthetic, num_samples: 160, val_split: 0.2}
train: {epochs: 1, batch_size: 32, device: cpu}
"""

STUDENT = """\
name: student
model:
  image_size: 8
  num_classes: 4
  stem: {patch_size: 2, dim: 16}
  blocks: [{kind: vit, heads: 2, mlp_ratio: 2}]
data:
  kind: synthetic
  num_samples: 160
  val_split: 0.2
  augment: {crop_padding: 1, hflip: true, mixup: 0.2}
train:
  epochs: 1
  batch_size: 32
  label_smoothing: 0.1
  device: cpu
  distill: {teacher: TEACHER_RUN, kind: soft, weight: 0.7, temperature: 2.0}
"""


def test_hard_and_soft_distillation_losses_are_their_formulas():
    torch.manual_seed(0)
    student, teacher, base = torch.randn(6, 5), torch.randn(6, 5) * 3, torch.tensor(1.7)
    hard = distill.distillation_loss(student, teacher, base, "hard", 0.25)
    expected = 0.75 * base + 0.25 * -F.log_softmax(student, -1)[torch.arange(6), teacher.argmax(-1)].mean()
    torch.testing.assert_close(hard, expected)
    T = 3.0
    p, q = F.softmax(student / T, -1), F.softmax(teacher / T, -1)
    kl = (q * (q.log() - p.log())).sum(-1).mean() * T * T
    torch.testing.assert_close(distill.distillation_loss(student, teacher, base, "soft", 0.6, T), 0.4 * base + 0.6 * kl)
    # weight 0: the labels alone; a student that is the teacher has nothing to learn from it (soft)
    assert distill.distillation_loss(student, teacher, base, "soft", 0.0, T) == base
    assert distill.distillation_loss(teacher, teacher, base, "soft", 1.0, T).abs() < 1e-6


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A trained teacher whose checkpoints record other input statistics than the student's data
    gives (as an imported timm model's ImageNet ones would), so that re-normalizing matters."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    train(load_spec_text(TEACHER, "teacher.yaml", [f"train.out_dir={out}"]), echo=lambda *a, **k: None)
    for name in ("best.pt", "last.pt"):
        state = torch.load(out / name, weights_only=True)
        state["normalization"] = {"mean": [0.2, 0.3, 0.4], "std": [0.5, 0.6, 0.7]}
        torch.save(state, out / name)
    return out


def test_the_teacher_sees_each_training_batch_in_its_own_normalization(tmp_path, teacher_run, monkeypatch):
    """Every step asks the teacher about the batch the student trains on (augmented and mixed),
    re-normalized from the student's statistics to the teacher's; its logits are the teacher run's
    model's, and they enter the loss as the soft term says."""
    seen, losses = [], []
    real_logits, real_loss = distill.Teacher.logits, distill.distillation_loss

    def spy_logits(self, x):
        out = real_logits(self, x)
        seen.append((x.detach().clone(), out.clone()))
        return out

    def spy_loss(student, teacher, base, kind, weight, temperature):
        losses.append((kind, weight, temperature, teacher.clone()))
        return real_loss(student, teacher, base, kind, weight, temperature)

    monkeypatch.setattr(distill.Teacher, "logits", spy_logits)
    monkeypatch.setattr("composer.train.distillation_loss", spy_loss)
    text = STUDENT.replace("TEACHER_RUN", str(teacher_run))
    lines = []
    train(load_spec_text(text, "student.yaml", [f"train.out_dir={tmp_path / 'run'}"]), echo=lines.append)
    assert any(line.startswith("distillation: teacher teaches (soft, weight 0.7, temperature 2.0") for line in lines)
    assert len(seen) == len(losses) == 4   # 128 training images, 32 a step
    assert all(kind == "soft" and weight == 0.7 and temperature == 2.0 for kind, weight, temperature, _ in losses)

    _, teacher_model, teacher_state = load_run(teacher_run, backend="reference")
    _, _, student_state = load_run(tmp_path / "run", backend="reference")
    view = (1, -1, 1, 1)
    s_mean, s_std = (torch.tensor(student_state["normalization"][k]).view(view) for k in ("mean", "std"))
    t_mean, t_std = (torch.tensor(teacher_state["normalization"][k]).view(view) for k in ("mean", "std"))
    assert not torch.allclose(s_mean, t_mean)   # two runs, two sets of statistics: the mapping matters
    for (x, out), (*_, taught) in zip(seen, losses):
        pixels = x * s_std + s_mean   # back to [0, 1] images, then into the teacher's normalization
        with torch.no_grad():
            torch.testing.assert_close(out, teacher_model((pixels - t_mean) / t_std), rtol=1e-4, atol=1e-5)
        assert torch.equal(taught, out)


def test_a_teacher_of_another_size_sees_the_batch_resized(teacher_run):
    spec = load_spec_text(STUDENT.replace("TEACHER_RUN", str(teacher_run)).replace("image_size: 8", "image_size: 4")
                          .replace("patch_size: 2", "patch_size: 1").replace("crop_padding: 1, ", ""), "s.yaml")
    teacher = distill.Teacher(str(teacher_run), spec, [0.5] * 3, [0.25] * 3, torch.device("cpu"), "reference")
    x = torch.randn(2, 3, 4, 4)
    _, model, state = load_run(teacher_run, backend="reference")
    mean, std = (torch.tensor(state["normalization"][k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    expected_in = F.interpolate((x * 0.25 + 0.5 - mean) / std, size=(8, 8), mode="bilinear", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(teacher.logits(x), model(expected_in), rtol=1e-4, atol=1e-5)


def test_distillation_mistakes_are_named(tmp_path, teacher_run):
    spec = tmp_path / "student.yaml"
    spec.write_text(STUDENT.replace("TEACHER_RUN", str(tmp_path / "nowhere")))
    assert_user_error(run_cli("train", spec, "--out", tmp_path / "a"),
                      "student.yaml:17:22: train.distill.teacher: ", "nowhere does not exist")
    spec.write_text(STUDENT.replace("TEACHER_RUN", str(teacher_run)).replace("num_classes: 4", "num_classes: 5"))
    assert_user_error(run_cli("train", spec, "--out", tmp_path / "b"),
                      f"train.distill.teacher: {teacher_run} classifies 4 classes, this model 5")
    with pytest.raises(SpecError) as caught:
        load_spec_text(STUDENT.replace("kind: soft", "kind: hard"), "s.yaml")
    assert ("s.yaml:17:73: train.distill.temperature: hard distillation takes the teacher's top class, which no "
            "temperature changes; remove it, or set kind: soft") in str(caught.value)
    teacher = distill.Teacher(str(teacher_run), load_spec_text(STUDENT.replace("TEACHER_RUN", "x"), "s.yaml"),
                              [0.5] * 3, [0.25] * 3, torch.device("cpu"), "reference")
    with pytest.raises(distill.UserError, match="classes differ from the data's .teacher / data at 1: class_1 / dog"):
        teacher.check_classes(["class_0", "dog", "class_2", "class_3"])
    assert "train.distill is set" in " ".join(reasons_against(torch.device("cuda"), compile=False, processes=1,
                                                              grad_scaler=False, distill=True))


def test_a_distillation_token_learns_the_teacher_and_the_class_token_the_labels(tmp_path, teacher_run, monkeypatch):
    """DeiT's distillation token: in every training step the loss against the labels takes the class
    token's classifier, the teacher's term the distillation token's; the logged accuracy is the
    model's prediction (their mean). Without a teacher, both learn the labels through the mean."""
    from composer import train as training
    from composer.build import DistilledLogits, Head

    outputs, for_targets, for_teacher = [], [], []
    real_head, real_ce, real_loss = Head.forward, training.soft_cross_entropy, distill.distillation_loss

    def spy_head(self, x):
        out = real_head(self, x)
        outputs.append(out)
        return out

    def spy_ce(logits, targets, weights=None):
        for_targets.append(logits)
        return real_ce(logits, targets, weights)

    def spy_loss(student, teacher, base, kind, weight, temperature):
        for_teacher.append(student)
        return real_loss(student, teacher, base, kind, weight, temperature)

    monkeypatch.setattr(Head, "forward", spy_head)
    monkeypatch.setattr(training, "soft_cross_entropy", spy_ce)
    monkeypatch.setattr(training, "distillation_loss", spy_loss)
    text = (STUDENT.replace("TEACHER_RUN", str(teacher_run)).replace("kind: soft", "kind: hard")
            .replace(", temperature: 2.0", "").replace("heads: 2, mlp_ratio: 2}]", "heads: 2, mlp_ratio: 2}]\n"
                                                                             "  head: {pool: cls, distill_token: true}"))
    lines = []
    train(load_spec_text(text, "student.yaml", [f"train.out_dir={tmp_path / 'run'}"]), echo=lines.append)
    assert "distillation token: its classifier learns the teacher's predictions, the class token's the labels" in lines
    assert any(" val_acc " in line and " (class token 0." in line and ", distillation token 0." in line for line in lines)
    # the student's training steps (its validation, without gradients, gets both too: evaluate reports each)
    both = [out for out in outputs if isinstance(out, DistilledLogits) and out.cls.requires_grad]
    assert len(both) == len(for_targets) == len(for_teacher) == 4
    for out, labelled, taught in zip(both, for_targets, for_teacher):
        assert labelled is out.cls and taught is out.dist

    outputs.clear(), for_targets.clear()
    no_teacher = text.replace(f"  distill: {{teacher: {teacher_run}, kind: hard, weight: 0.7}}\n", "")
    assert "distill:" not in no_teacher
    lines = []
    train(load_spec_text(no_teacher, "student.yaml", [f"train.out_dir={tmp_path / 'plain'}"]), echo=lines.append)
    assert any("no train.distill teacher, so both classifiers learn the labels" in line for line in lines)
    assert not any(isinstance(out, DistilledLogits) and out.cls.requires_grad for out in outputs)
    assert len(for_targets) == 4


def test_evaluation_reports_each_classifier_of_a_distilled_model():
    """DeiT reports three accuracies: each classifier alone and their mean (the model's). Here the
    class token's classifier always says class 1 and the distillation token's (twice as sure)
    class 0, so the three differ; with and without the mirror-image average."""
    from composer.build import build_model
    from composer.data import normalize
    from composer.evaluate import classify, evaluate_model, render

    spec = load_spec_text(STUDENT.replace("TEACHER_RUN", "x").replace(
        "heads: 2, mlp_ratio: 2}]", "heads: 2, mlp_ratio: 2}]\n  head: {pool: cls, distill_token: true}"))
    model = build_model(spec, backend="reference").eval()
    head = model.stages[-1]
    with torch.no_grad():
        head.classify.bias[1] += 50.0
        head.classify_dist.bias[0] += 100.0
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 10)
    mean, std = [0.5] * 3, [0.25] * 3
    for flip in (False, True):
        result = evaluate_model(model, images, labels, mean, std, batch_size=16, flip=flip, num_classes=4)
        assert result["classifiers"] == {"class token": 0.5, "distillation token": 0.25}
        assert result["accuracy"] == 0.25   # the mean's: class 0
        with torch.no_grad():   # the plain forward: the mean of both, as the run predicts
            assert result["accuracy"] == (classify(model, normalize(images, mean, std), flip).argmax(1) == labels
                                          ).float().mean().item()
    assert not head.both_logits   # evaluation leaves the model as it found it
    result.update({"spec": "s", "split": "val", "epoch": 1, "classes": list("abcd"), "most_confused": []})
    assert ("each classifier alone: class token 0.5000, distillation token 0.2500 (the model predicts with their "
            "mean)") in render(result)
