"""Checkpoints: atomic save, validated load, and loading a trained run back as a model.

A checkpoint is one torch.save'd dict: model, optimizer, scheduler, scaler, EMA,
every RNG state, the position (epoch, step within the epoch), the spec, the
data normalization and library versions. Saving writes a temporary file in the
same directory, fsyncs it and renames it over the old one, so a crash at any
moment leaves either the old or the new checkpoint, never half of one.
"""
from __future__ import annotations

import os
import platform
import re
import tempfile
from pathlib import Path

import torch

from composer.errors import UserError, first_few
from composer.spec import Spec, load_spec_text

LAST, BEST = "last.pt", "best.pt"


def library_versions() -> dict:
    out = {"python": platform.python_version(), "torch": str(torch.__version__)}   # plain str: see load_checkpoint
    for name in ("triton", "pydantic", "einops"):
        try:
            out[name] = str(__import__(name).__version__)
        except Exception:
            out[name] = None
    return out


def _older_checkpoint_types() -> list:
    """What checkpoints of earlier versions hold beyond tensors and plain Python values: NumPy's
    random state (an array) and torch's version string class. Allowed as data (they construct
    values, run nothing), so such checkpoints load as safely as new ones."""
    import numpy as np
    from torch.torch_version import TorchVersion

    reconstruct = getattr(getattr(np, "_core", np.core).multiarray, "_reconstruct")
    return [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), TorchVersion]


def save_atomic(state: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path, fix: str = "resume from another checkpoint or start a fresh run") -> dict:
    """torch.load with user-facing errors; a corrupt file is named and left in place. `fix`: what
    to do instead, for the command at hand."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        # weights_only: the file is read as data (tensors, numbers, strings, lists, dicts) and no code in
        # it can run, so a checkpoint from anywhere is safe to evaluate, visualize or fine-tune from
        with torch.serialization.safe_globals(_older_checkpoint_types()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        unsafe = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(exc))   # torch's wordings
        if unsafe:
            raise UserError(f"checkpoint {path} holds Python objects composer does not load ({unsafe.group(1)}); a "
                            "composer checkpoint holds only tensors and plain values, read without running code "
                            f"from the file. It was left in place; {fix}.") from None
        raise UserError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {str(exc)[:200]}); "
                        f"it may be truncated or not a composer checkpoint. It was left in place; {fix}.") from None
    if not isinstance(state, dict) or "model" not in state or "spec_yaml" not in state:
        raise UserError(f"checkpoint {path} is not a composer checkpoint (no model/spec inside)")
    return state


def spec_from_checkpoint(state: dict, source: str) -> Spec:
    return load_spec_text(state["spec_yaml"], f"{source} (embedded spec)")


def model_differences(a: dict, b: dict, prefix: str = "model") -> list[str]:
    """Human-readable differences between two model sections (as plain dicts)."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        va, vb = a.get(key), b.get(key)
        path = f"{prefix}.{key}" if not isinstance(key, int) else f"{prefix}[{key}]"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += model_differences(va, vb, path)
        elif isinstance(va, list) and isinstance(vb, list) and len(va) == len(vb):
            out += model_differences(dict(enumerate(va)), dict(enumerate(vb)), path)
        elif va != vb:
            out.append(f"{path}: checkpoint has {va!r}, spec has {vb!r}")
    return out


def find_checkpoint(target: str | Path, prefer: str = BEST) -> Path:
    """A run directory -> its best (or last) checkpoint; a file -> itself."""
    target = Path(target)
    if target.is_dir():
        for name in (prefer, LAST, BEST):
            if (target / name).exists():
                return target / name
        raise UserError(f"{target} holds no checkpoint ({BEST} or {LAST}); train first: composer train SPEC --out {target}")
    if not target.exists():
        raise UserError(f"{target} does not exist; give a run directory or a checkpoint file")
    return target


def load_run(target: str | Path, device: str | torch.device = "cpu", use_ema: bool = True, backend: str = "auto"):
    """(spec, model in eval mode, checkpoint dict) of a trained run directory or checkpoint file;
    `backend`: the kernel backend of the model's blocks."""
    from composer.build import build_model

    path = find_checkpoint(target)
    state = load_checkpoint(path, fix=f"give a run directory or a checkpoint written by composer train "
                                      f"({BEST} or {LAST})")
    spec = spec_from_checkpoint(state, str(path))
    model = build_model(spec, backend=backend)
    weights = state["ema"] if use_ema and state.get("ema") else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise UserError(f"checkpoint {path} does not match its own spec: {str(exc)[:300]}") from None
    return spec, model.to(device).eval(), state


def needs_classifier(state: dict, target, what: str) -> None:
    """A run imported from a backbone (weights without a classifier, as DINOv2's) cannot classify:
    `what` (evaluate, predict, export) is refused with the way to use it."""
    if state.get("backbone_only"):
        raise UserError(f"{target} holds a backbone without a classifier (imported from {state.get('imported_from')}), "
                        f"so {what} has no classes to give. Fine-tune from it: composer train YOUR_SPEC.yaml --set "
                        f"train.init_from={target} (add --set train.freeze=backbone for a linear probe)")


def _same_stages(model, spec: Spec, source_spec: Spec, path: Path) -> None:
    """Weights carry over stage by stage: a run whose model has other stages (another block kind, a
    position table or a class token more or less, another register count) is named by its first
    difference rather than by every tensor after it."""
    from composer.build import build_model

    if source_spec.model.registers != spec.model.registers:
        raise UserError(f"train.init_from {path}: its model has {source_spec.model.registers} register tokens and "
                        f"this one {spec.model.registers}; set model.registers: {source_spec.model.registers} to start "
                        "from it (the other blocks learned to work with those registers)")

    if source_spec.model.head.distill_token != spec.model.head.distill_token:
        has = "has a distillation token" if source_spec.model.head.distill_token else "has no distillation token"
        raise UserError(f"train.init_from {path}: its model {has} and this one "
                        f"{'does' if spec.model.head.distill_token else 'does not'}; set model.head.distill_token: "
                        f"{str(source_spec.model.head.distill_token).lower()} to start from it (the blocks learned "
                        "with that token in the sequence)")

    with torch.device("meta"):
        theirs = build_model(source_spec, backend="reference").layers
    for i, (there, here) in enumerate(zip(theirs, model.layers)):
        if there.kind != here.kind:
            raise UserError(f"train.init_from {path}: its model is built otherwise: stage {i} is {there.name} "
                            f"({there.kind}) there and {here.name} ({here.kind}) here; the blocks, "
                            "model.pos_embed (a table or not), model.registers and head.pool must be the run's")
    if len(theirs) != len(model.layers):
        raise UserError(f"train.init_from {path}: its model has {len(theirs)} stages and this one "
                        f"{len(model.layers)}; the blocks (and their repeats) must be the run's")


def init_from_run(model: torch.nn.Module, spec: Spec, source: str | Path, found: dict | None = None) -> str:
    """Fine-tuning: start `model` (built from `spec`) from the weights of a trained run or
    checkpoint (its EMA weights where it kept them). Tensors of the same name and shape are
    copied; the classifier stays new where the class count differs; a learned position embedding
    is resized (bicubic, over its patch grid) where the grid differs. Any other difference is a
    user error listing them. Returns a one-line account of what was done; `found`, when given,
    gets the source's input normalization (the statistics its weights learned with)."""
    import torch.nn.functional as F

    from composer.build import Head, PositionEmbedding

    path = find_checkpoint(source)
    state = load_checkpoint(path, fix="give train.init_from a run directory or a checkpoint written by composer train")
    source_spec = spec_from_checkpoint(state, str(path))
    _same_stages(model, spec, source_spec, path)
    weights = state["ema"] if state.get("ema") else state["model"]
    if found is not None:
        found["normalization"] = state.get("normalization")
    classifier = {f"{name}.{part}.{p}" for name, m in model.named_modules() if isinstance(m, Head)
                  for part in ("classify", "classify_dist") for p in ("weight", "bias")}
    backbone_only = bool(state.get("backbone_only"))   # its classifier is the import's random start
    positions = {f"{name}.pos" for name, m in model.named_modules()
                 if isinstance(m, PositionEmbedding) and isinstance(m.pos, torch.nn.Parameter)}
    grid_from = source_spec.model.input_size // source_spec.model.stem.patch_size
    grid_to = spec.model.input_size // spec.model.stem.patch_size

    own = model.state_dict()
    copied, new, resized, problems = 0, [], [], []
    for key, target in own.items():
        given = weights.get(key)
        if key in classifier and backbone_only:
            new.append(key)
        elif given is None:
            problems.append(f"{key} {tuple(target.shape)}: not in the checkpoint")
        elif given.shape == target.shape:
            target.copy_(given)
            copied += 1
        elif key in classifier:
            new.append(key)
        elif key in positions and given.shape[-1] == target.shape[-1] \
                and given.shape[1] - grid_from ** 2 == target.shape[1] - grid_to ** 2 >= 0:
            extra = target.shape[1] - grid_to ** 2   # the class token's row, when it is there
            grid = given[:, extra:].reshape(1, grid_from, grid_from, -1).permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=(grid_to, grid_to), mode="bicubic", align_corners=False)
            target.copy_(torch.cat([given[:, :extra].float(), grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1))
            resized.append(f"{key} ({grid_from}x{grid_from} -> {grid_to}x{grid_to} patches)")
        else:
            problems.append(f"{key}: checkpoint {tuple(given.shape)}, model {tuple(target.shape)}")
    problems += [f"{key} {tuple(value.shape)}: not in the model" for key, value in weights.items() if key not in own]
    if problems:
        raise UserError(f"train.init_from {path}: its weights do not fit this model:\n  " + first_few(problems, 12, "\n  ")
                        + "\nOnly the class count and the image size may differ (the classifier starts anew, "
                        "learned position embeddings are resized); token-mixing MLPs are tied to their "
                        "token count, so a model with them keeps its image size and patch size")
    said = [f"{copied} tensors"]
    if new:
        count = spec.model.num_classes
        said.append(f"new classifier ({count} class{'es' * (count != 1)}; the run had none)" if backbone_only else
                    f"new classifier ({source_spec.model.num_classes} -> {spec.model.num_classes} classes)")
    said += [f"resized {r}" for r in resized]
    return f"weights from {path} (epoch {state.get('epoch')}): " + ", ".join(said)
