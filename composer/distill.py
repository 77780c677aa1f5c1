"""Knowledge distillation (`train.distill`): a trained run teaches the model being trained.

DeiT (Touvron et al., 2021) trains ViTs on ImageNet alone to the accuracy of ConvNets by adding
a ConvNet teacher's predictions to the loss; a small model on little data gains the most. The
teacher is any run (or imported timm model) with the same classes: it sees every training
batch as the student does, after augmentation and mixing, and its logits enter the loss

    hard: (1 - w) * CE(student, targets) + w * CE(student, argmax teacher)        (DeiT's choice)
    soft: (1 - w) * CE(student, targets) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))

(Hinton et al., 2015: T^2 keeps the soft term's gradients at the scale of the hard one's.)

With a distillation token (`model.head.distill_token`, DeiT's own design) the model has two
classifiers: the class token's takes the term against the targets, the distillation token's the
teacher's term, and the model predicts with the mean of the two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from composer.build import DistilledLogits
from composer.errors import UserError


class Teacher:
    """A trained run's model, frozen, in evaluation mode, on the training device: `logits(x)` of the
    student's normalized batch (re-normalized with the teacher's own statistics, resized to its
    image size when that differs)."""

    def __init__(self, target: str, spec, student_mean, student_std, device: torch.device, backend: str = "auto"):
        from composer.checkpoint import load_run, needs_classifier

        try:
            teacher_spec, model, state = load_run(target, device=device, backend=backend)
            needs_classifier(state, target, "distillation")
        except UserError as exc:
            raise UserError(f"train.distill.teacher: {exc}") from None
        m, tm = spec.model, teacher_spec.model
        if tm.num_classes != m.num_classes:
            raise UserError(f"train.distill.teacher: {target} classifies {tm.num_classes} classes, this model "
                            f"{m.num_classes}; the teacher must know the same classes (fine-tune it on this data "
                            "first: composer train ... --set train.init_from=...)")
        if tm.in_channels != m.in_channels:
            raise UserError(f"train.distill.teacher: {target} takes {tm.in_channels}-channel images, this model "
                            f"{m.in_channels}-channel ones")
        self.classes = state.get("classes")
        self.model = model.requires_grad_(False)
        self.name, self.image_size = teacher_spec.name, tm.image_size
        # x_student = (x - mean_s) / std_s  ->  x_teacher = (x - mean_t) / std_t = x_student * a + b
        own = state["normalization"]
        shape = (1, -1, 1, 1)
        s_mean, s_std = (torch.tensor(v, dtype=torch.float32, device=device).view(shape) for v in (student_mean, student_std))
        t_mean, t_std = (torch.tensor(own[k], dtype=torch.float32, device=device).view(shape) for k in ("mean", "std"))
        self.scale, self.shift = s_std / t_std, (s_mean - t_mean) / t_std

    def check_classes(self, classes: list[str] | None) -> None:
        """Class names in the same order, where both runs know them."""
        if self.classes and classes and list(self.classes) != list(classes):
            pairs = [f"{i}: {a} / {b}" for i, (a, b) in enumerate(zip(self.classes, classes)) if a != b][:3]
            raise UserError(f"train.distill.teacher: {self.name}'s classes differ from the data's (teacher / data "
                            f"at {'; '.join(pairs)}); the teacher must have been trained on the same classes, in "
                            "the same order")

    def describe(self, kind: str, weight: float, temperature: float) -> str:
        how = f"{kind}, weight {weight}" + (f", temperature {temperature}" if kind == "soft" else "")
        return f"distillation: {self.name} teaches ({how}; {sum(p.numel() for p in self.model.parameters()):,} " \
               "parameters, a forward pass a step)"

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() * self.scale + self.shift
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self.model(x)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, base_loss: torch.Tensor, kind: str,
                      weight: float, temperature: float = 1.0) -> torch.Tensor:
    """(1 - weight) * base_loss + weight * the distillation term (see the module's docstring);
    `base_loss` is the usual loss against the targets (label smoothing, mixing, class weights)."""
    student = student.float()
    if kind == "hard":
        term = F.cross_entropy(student, teacher.argmax(dim=-1))
    else:
        log_p = F.log_softmax(student / temperature, dim=-1)
        log_q = F.log_softmax(teacher.float() / temperature, dim=-1)
        term = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * temperature ** 2
    return (1.0 - weight) * base_loss + weight * term


def student_logits(output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prediction, logits for the targets' loss, logits for the teacher's term) of what a training
    model returned: one tensor for all three, or from a model with a distillation token in
    distilled training (`DistilledLogits`) the mean of both classifiers, the class token's and the
    distillation token's."""
    if isinstance(output, DistilledLogits):
        return output.mean(), output.cls, output.dist
    return output, output, output
