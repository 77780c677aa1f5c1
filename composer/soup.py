"""`composer soup`: model soups (Wortsman et al., 2022, "Model soups: averaging weights of multiple
fine-tuned models improves accuracy without increasing inference time").

Runs fine-tuned from the same pretrained weights (a sweep of learning rates, seeds, augmentations:
`composer sweep` over a spec with `train.init_from`) tend to end in one basin of the loss, where
the average of their weights is itself a good model: one model, as fast as each of them, often
more accurate than the best. `uniform` averages every run; `greedy` (the paper's recipe) sorts
the runs by validation accuracy and adds each to the soup only if the soup's validation accuracy
does not drop. The soup is written as a run directory: evaluate, predict, export or visualize it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from composer.errors import UserError

SOUP_FILE = "soup.json"   # in the soup's run directory: its kind, ingredients, validation accuracy


def soup(targets: list[str], out: str, greedy: bool = True, device: str = "auto", echo=print) -> dict:
    """Average the runs at or below `targets` into the run directory `out`; returns {"path", "runs":
    [(run, val acc)], "kept": [run], "accuracy", "kind"}."""
    from composer.checkpoint import BEST, find_checkpoint, library_versions, load_checkpoint, save_atomic, \
        spec_from_checkpoint
    from composer.runs import find_runs
    from composer.train import resolve_device, spec_yaml

    folder = Path(out)
    if (folder / BEST).exists():
        raise UserError(f"{folder} already holds a model ({BEST}); choose another --out")
    runs = find_runs(targets)
    if len(runs) < 2:
        raise UserError(f"a soup needs two runs or more; found {len(runs)} under {', '.join(targets)}")
    ingredients = []
    for run in runs:
        path = find_checkpoint(run)
        state = load_checkpoint(path, fix="remove that run from the soup")
        ingredients.append({"run": str(run), "state": state, "spec": spec_from_checkpoint(state, str(path)),
                            "weights": state["ema"] if state.get("ema") else state["model"]})
    _same_models(ingredients)
    first = ingredients[0]
    dev = resolve_device(device)
    score = _scorer(first, dev) if greedy else None
    if greedy:
        for ingredient in ingredients:
            ingredient["accuracy"] = score([ingredient["weights"]])
            echo(f"  {ingredient['accuracy']:.4f}  {ingredient['run']}")
        ingredients.sort(key=lambda i: i["accuracy"], reverse=True)
        kept, accuracy = [ingredients[0]], ingredients[0]["accuracy"]
        for ingredient in ingredients[1:]:
            tried = score([i["weights"] for i in kept + [ingredient]])
            joins = tried >= accuracy
            echo(f"  {'+' if joins else '-'} {ingredient['run']}: soup {tried:.4f} "
                 f"({'kept' if joins else 'left out'}; {accuracy:.4f} without it)")
            if joins:
                kept, accuracy = kept + [ingredient], tried
    else:
        kept, accuracy = ingredients, None
    weights = average([i["weights"] for i in kept])
    state = {"model": weights, "spec_yaml": spec_yaml(first["spec"]), "epoch": 0,
             "normalization": first["state"]["normalization"], "classes": first["state"].get("classes"),
             "versions": library_versions(), "souped_from": [i["run"] for i in kept],
             "soup": "greedy" if greedy else "uniform"}
    folder.mkdir(parents=True, exist_ok=True)
    save_atomic(state, folder / BEST)
    (folder / "spec.yaml").write_text(state["spec_yaml"])
    # what `composer runs` lists for it (no metrics.csv: it never trained)
    (folder / SOUP_FILE).write_text(json.dumps({"kind": state["soup"], "from": state["souped_from"],
                                                "val_acc": accuracy}, indent=2))
    return {"path": str(folder / BEST), "runs": [(i["run"], i.get("accuracy")) for i in ingredients],
            "kept": [i["run"] for i in kept], "accuracy": accuracy, "kind": state["soup"]}


def average(states: list[dict]) -> dict:
    """The element-wise mean of state dicts with the same tensors (floats averaged in float32 and
    stored in their own dtype; integer tensors, such as BatchNorm's step count, from the first)."""
    mean = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            mean[key] = torch.stack([s[key].float() for s in states]).mean(0).to(first.dtype)
        else:
            mean[key] = first.clone()
    return mean


def _same_models(ingredients: list[dict]) -> None:
    """One architecture, the same classes, input normalization and data split: only then are the
    weights averages of the same model, the soup's inputs what each run saw, and the validation
    images none that a run trained on."""
    first = ingredients[0]

    def split(spec):   # which images the run trained on: the greedy soup's validation must be none of them
        return spec.data.model_dump(include={"kind", "root", "val_root", "val_split", "split_seed", "stratify"})

    for other in ingredients[1:]:
        for what, mine, theirs in (
                ("model", first["spec"].model.model_dump(), other["spec"].model.model_dump()),
                ("data split", split(first["spec"]), split(other["spec"])),
                ("classes", first["state"].get("classes"), other["state"].get("classes")),
                ("input normalization", first["state"].get("normalization"), other["state"].get("normalization"))):
            if mine != theirs:
                raise UserError(f"{other['run']} has another {what} than {first['run']}; a soup averages runs of one "
                                "model, fine-tuned from the same weights (train.init_from) on the same data")


def _scorer(first: dict, device: torch.device):
    """weights -> validation accuracy of the first run's model with them, on its validation split."""
    from composer.build import build_model
    from composer.data import load_split
    from composer.evaluate import evaluate_model

    spec = first["spec"]
    if not (spec.data.held_out > 0 or spec.data.val_root):
        raise UserError(f"the greedy soup keeps a run if the soup's validation accuracy holds, but {first['run']}'s "
                        "data has no validation split (data.val_split or data.val_root); use --uniform")
    val = load_split(spec.data, spec.model, "val")
    model = build_model(spec, backend="reference").to(device)
    norm = first["state"]["normalization"]

    def score(weights: list[dict]) -> float:
        model.load_state_dict(average(weights) if len(weights) > 1 else weights[0])
        return evaluate_model(model, val.images, val.labels, norm["mean"], norm["std"], device=device,
                              num_classes=spec.model.num_classes)["accuracy"]

    return score


def render(result: dict) -> str:
    kept = len(result["kept"])
    lines = [f"wrote {result['path']}: a {result['kind']} soup of {kept} run{'s' * (kept != 1)}"
             + (f", validation accuracy {result['accuracy']:.4f}" if result["accuracy"] is not None else "")]
    if result["kind"] == "greedy":
        best = max(a for _, a in result["runs"])
        lines.append(f"the best run alone: {best:.4f}")
    lines.append(f"next: composer evaluate {Path(result['path']).parent}")
    return "\n".join(lines)
