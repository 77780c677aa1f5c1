"""`composer sweep`: train a spec once for every combination of some fields' values.

    composer sweep specs/convmixer_cifar.yaml --vary model.blocks[0].kernel_size=5,7,9 \
        --vary train.optimizer.lr=1e-3,3e-3

Each combination is the spec with `--set` overrides, trained into a run directory of its own
under `runs/<spec name>-sweep/` (or --out) named after its values. Every combination is
validated before the first one trains, so a value that cannot work is reported at once. A
sweep started again continues where it stopped: finished runs are kept, stopped ones resume.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path

from composer.errors import UserError
from composer.spec import SpecError, load_spec
from composer.spec.loading import Problem, parse_override_path


def parse_axis(text: str) -> tuple[str, list[str]]:
    """'train.optimizer.lr=1e-3,3e-3' -> ('train.optimizer.lr', ['1e-3', '3e-3']); commas inside
    brackets or braces belong to one value ('model.blocks=[...],[...]')."""
    if "=" not in text:
        raise UserError(f"--vary {text}: expected KEY.PATH=VALUE1,VALUE2,..., e.g. --vary train.optimizer.lr=1e-3,3e-3")
    key, raw = (part.strip() for part in text.split("=", 1))
    try:
        parse_override_path(key)
    except ValueError as exc:
        raise UserError(f"--vary {text}: {exc}") from None
    values, depth, current = [], 0, ""
    for ch in raw:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    values.append(current.strip())
    if any(not v for v in values):
        raise UserError(f"--vary {text}: an empty value; separate the values with single commas")
    if len(set(values)) != len(values):
        raise UserError(f"--vary {text}: a value is given twice")
    return key, values


def combinations(axes: list[tuple[str, list[str]]]) -> list[list[str]]:
    """Every combination of the axes' values as --set overrides, the last axis varying fastest."""
    keys = [key for key, _ in axes]
    return [[f"{k}={v}" for k, v in zip(keys, values)] for values in itertools.product(*(v for _, v in axes))]


def _in_sweep_terms(problem: Problem, combos: list[list[str]], axes: list[tuple[str, list[str]]]) -> Problem:
    """A spec problem of some combinations, said as the sweep was asked for: a varied value is
    located at its --vary, and a problem that only some values cause names those values."""
    where, message = problem.where, problem.message
    for key, _ in axes:   # the loader sees each combination's values as --set overrides
        where = where.replace(f"--set {key}=", f"--vary {key}=")
        message = message.replace(f"from --set {key}=", f"from --vary {key}=")
    if where.startswith("--vary "):
        return Problem(where, problem.path, message)
    causes = []
    for i, (key, values) in enumerate(axes):
        seen = sorted({combo[i].split("=", 1)[1] for combo in combos}, key=values.index)
        if len(seen) < len(values) and f"from --vary {key}=" not in message:
            causes.append(f"{key}={','.join(seen)}")
    return Problem(where, problem.path, message + (f" (with {' and '.join(causes)})" if causes else ""))


def run_name(overrides: list[str]) -> str:
    """A run directory's name from its values: the last part of each key path, '=', the value
    ('kernel_size=7,lr=3e-3'); characters a file name should not hold become '_'."""
    parts = []
    for item in overrides:
        key, value = item.split("=", 1)
        last = [p for p in parse_override_path(key) if not isinstance(p, int)][-1]
        parts.append(f"{last}={value}")
    return re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", ",".join(parts))[:200]


def sweep(spec_path: str, axes_text: list[str], overrides: list[str] = (), out: str | None = None,
          echo=print) -> list[dict]:
    """Train every combination; returns one row per run as `composer runs` describes it."""
    from composer.runs import describe
    from composer.train import NonFiniteLoss, train

    axes = [parse_axis(text) for text in axes_text]
    if not axes:
        raise UserError("give at least one --vary KEY.PATH=VALUE1,VALUE2")
    keys = [key for key, _ in axes]
    if len(set(keys)) != len(keys):
        raise UserError(f"--vary names {', '.join(sorted({k for k in keys if keys.count(k) > 1}))} twice; "
                        "give each field one --vary with all its values")
    combos = combinations(axes)
    names = [run_name(c) for c in combos]
    if len(set(names)) != len(names):   # two keys ending alike (model.stem.dim, ...): name by full path
        names = [re.sub(r"[^A-Za-z0-9_.=,+\[\]-]+", "_", ",".join(c))[:200] for c in combos]
    # every combination checked before anything trains: all the problems at once, each once, with
    # the combinations it appears in unless it appears in all of them
    specs, found = [], {}
    for combo in combos:
        try:
            specs.append(load_spec(spec_path, list(overrides) + combo))
        except SpecError as exc:
            for p in exc.problems:
                found.setdefault(str(p), (p, []))[1].append(combo)
    if found:
        raise SpecError([_in_sweep_terms(p, where, axes) for p, where in found.values()])
    root = Path(out) if out else Path("runs") / f"{specs[0].name}-sweep"
    echo(f"sweep: {len(combos)} runs into {root}")
    rows = []
    for i, (spec, name, combo) in enumerate(zip(specs, names, combos), 1):
        run_dir = root / name
        spec.train.out_dir = str(run_dir)
        echo(f"-- run {i}/{len(combos)}: {', '.join(combo)} -> {run_dir}")
        row = {}
        try:
            train(spec, resume="auto" if (run_dir / "last.pt").exists() else None, echo=echo)
        except NonFiniteLoss as exc:   # a learning rate too high for the model: an answer, not the sweep's end
            echo(f"run {i}/{len(combos)} diverged: {exc}")
            row["state"] = "diverged"
        rows.append({**describe(run_dir), **row, "values": dict(item.split("=", 1) for item in combo)})
    return rows
