"""`composer runs`: the training runs under some folders, side by side, best first.

A run directory is one `composer train` wrote: it holds metrics.csv (a row per finished epoch)
and spec.yaml (the resolved spec); one `composer import` wrote holds spec.yaml and best.pt.
Everything here is read from those files and the lock a running `composer train` holds; no
checkpoint is loaded, so listing many large runs is quick.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import yaml

from composer.errors import UserError

MAX_DEPTH = 4   # folders searched below each given path


def find_runs(paths: list[str]) -> list[Path]:
    """Run directories at or below `paths`, in order, each once."""
    found: dict[Path, Path] = {}   # resolved -> as found: a run reached through a link is listed once
    for given in paths:
        root = Path(given).expanduser()
        if not root.is_dir():
            raise UserError(f"{root} is not a folder; give run directories or folders that hold them (e.g. runs)")
        for run in [root] if _is_run(root) else sorted(_search(root, MAX_DEPTH)):
            found.setdefault(run.resolve(), run)
    return list(found.values())


def _is_run(path: Path) -> bool:
    """A spec and what training writes, or the best.pt alone that `composer import` writes."""
    return (path / "spec.yaml").is_file() and any((path / name).is_file() for name in ("metrics.csv", "last.pt",
                                                                                        "best.pt"))


def _search(folder: Path, depth: int):
    try:
        children = [c for c in folder.iterdir() if c.is_dir() and not c.name.startswith(".")]
    except OSError:   # unreadable: nothing to list there
        return
    for child in children:
        if _is_run(child):
            yield child
        elif depth > 1:
            yield from _search(child, depth - 1)


def describe(run: Path) -> dict:
    """One run: its spec, size, progress, best and last validation accuracy and its state."""
    try:
        spec = yaml.safe_load((run / "spec.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        spec = {}
    rows = _metrics(run / "metrics.csv")
    planned = (spec.get("train") or {}).get("epochs")
    done = int(float(rows[-1]["epoch"])) if rows else 0
    scored = [r for r in rows if _number(r.get("val_acc")) is not None]
    best = max(scored, key=lambda r: _number(r["val_acc"]), default=None)
    final = _final(run)
    soup = _soup(run)
    if soup:
        state = f"{soup['kind']} soup of {len(soup['from'])}"
        return {"run": str(run), "spec": spec.get("name") or run.name, "params": _params(spec), "epochs": 0,
                "planned_epochs": None, "state": state, "best_val_acc": _number(soup.get("val_acc")),
                "best_epoch": None, "last_val_acc": _number(soup.get("val_acc")), "img_per_s": None}
    if _running(run):
        state = "running"
    elif final.get("stopped_early") and final.get("epoch") == done:
        state = "stopped early"
    elif planned is not None and done >= planned:
        state = "finished"
    elif not rows and not (run / "last.pt").exists() and (run / "best.pt").exists():
        state = "imported"   # weights from elsewhere (composer import): never trained here
    else:
        state = "stopped" if rows else "no epoch yet"
    return {
        "run": str(run), "spec": spec.get("name") or run.name, "params": _params(spec),
        "epochs": done, "planned_epochs": planned, "state": state,
        "best_val_acc": _number(best["val_acc"]) if best else None,
        "best_epoch": int(float(best["epoch"])) if best else None,
        "last_val_acc": _number(rows[-1].get("val_acc")) if rows else None,
        "img_per_s": _number(rows[-1].get("img_per_s")) if rows else None,
    }


def list_runs(paths: list[str]) -> list[dict]:
    """Every run at or below `paths`, the best validation accuracy first (runs without one last)."""
    runs = [describe(run) for run in find_runs(paths)]
    if not runs:
        raise UserError(f"no runs under {', '.join(paths)}; a run directory holds the spec.yaml and "
                        "metrics.csv that composer train writes")
    return best_first(runs)


def best_first(runs: list[dict]) -> list[dict]:
    """Runs by best validation accuracy, highest first; those without one last."""
    return sorted(runs, key=lambda r: (r["best_val_acc"] is None, -(r["best_val_acc"] or 0.0)))


def render(runs: list[dict]) -> str:
    header = ("run", "spec", "params", "epochs", "best val", "(epoch)", "last val", "img/s", "state")
    table = [header] + [(
        r["run"], r["spec"], "?" if r["params"] is None else f"{r['params']:,}",
        f"{r['epochs']}/{r['planned_epochs'] if r['planned_epochs'] is not None else '?'}",
        _percent(r["best_val_acc"]), "" if r["best_epoch"] is None else f"({r['best_epoch']})",
        _percent(r["last_val_acc"]), "" if r["img_per_s"] is None else f"{r['img_per_s']:,.0f}", r["state"],
    ) for r in runs]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    right = {2, 3, 4, 6, 7}   # numbers line up on the right
    return "\n".join("  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in table)


def _metrics(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return [row for row in csv.DictReader(f) if row.get("epoch")]
    except OSError:
        return []


def _soup(run: Path) -> dict:
    """A soup's record (composer soup), or {} for a run that trained or was imported."""
    try:
        return json.loads((run / "soup.json").read_text())
    except (OSError, ValueError):
        return {}


def _final(run: Path) -> dict:
    """final.json, which a run writes when it ends (finished, or stopped early by train.patience)."""
    try:
        return json.loads((run / "final.json").read_text())
    except (OSError, ValueError):
        return {}


def _number(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _params(spec: dict) -> int | None:
    """The model's parameter count, built on the meta device (no memory, no initialization)."""
    import torch

    from composer.build import build_model, count_params
    from composer.spec import ModelSpec

    try:
        with torch.device("meta"):
            return count_params(build_model(ModelSpec.model_validate(spec.get("model")), backend="reference"))
    except Exception:   # a spec this version cannot build: the other columns still say what they can
        return None


def _running(run: Path) -> bool:
    """Whether a `composer train` holds the run's lock now (it takes it for as long as it writes)."""
    try:
        import fcntl
    except ImportError:   # not a POSIX system: no lock to ask
        return False
    lock = run / ".lock"
    if not lock.exists():
        return False
    try:
        with open(lock) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:
        return False
    return False
