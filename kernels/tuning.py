"""Launch configurations measured fastest on a card, by `composer bench kernels --sweep --save`.

Each launcher asks `lookup(op, role, device, dtype, shape)` before its built-in rule; a hit
replaces the rule for that (card, dtype, shape). Entries come from two files, the second
winning: `kernels/tuned.json` (shipped with the project: what its own sweeps measured) and
the user's file, `$COMPOSER_TUNED` or else `~/.cache/composer/tuned.json`, which `--save`
writes. Keys name the card by compute capability ("sm90"): a configuration measured on one
kind of GPU is never used on another. Batch size is not in the key, and neither is the
Triton version: a winner stays correct under another Triton but may not stay fastest
(rerun the sweep after upgrading; `python -m kernels.compile_report` shows spills).

    {"configs": {"attention/forward/sm90/bfloat16/N144 D16": {"BLOCK_M": 64, ...}, ...}}
"""
from __future__ import annotations

import json
import os
import warnings

import torch

SHIPPED = os.path.join(os.path.dirname(__file__), "tuned.json")

_table: dict | None = None     # merged entries, read once
_arch: dict = {}               # device index -> "sm90"


def user_path() -> str:
    """Where `--save` writes and where the user's entries are read from."""
    return os.environ.get("COMPOSER_TUNED") or os.path.join(os.path.expanduser("~"), ".cache", "composer",
                                                            "tuned.json")


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:   # unreadable or not JSON: the built-in rules still work
        warnings.warn(f"ignoring the launch configurations in {path} ({exc}); delete or fix the file")
        return {}
    configs = data.get("configs") if isinstance(data, dict) else None
    if not isinstance(configs, dict):
        warnings.warn(f'ignoring {path}: expected {{"configs": {{...}}}}')
        return {}
    return {k: v for k, v in configs.items() if isinstance(v, dict)}


def table() -> dict:
    """Every entry in force: the shipped file's, then the user's on top."""
    global _table
    if _table is None:
        _table = {**_read(SHIPPED), **_read(user_path())}
    return _table


def reload() -> None:
    """Forget the entries read so far (after a save, or when COMPOSER_TUNED changes)."""
    global _table
    _table = None


def arch(device: torch.device | str) -> str:
    """"sm90" for a CUDA device of compute capability 9.0; the device type otherwise."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _arch:
        major, minor = torch.cuda.get_device_capability(index)
        _arch[index] = f"sm{major}{minor}"
    return _arch[index]


def key(op: str, role: str, device, dtype: torch.dtype, shape: str) -> str:
    return f"{op}/{role}/{arch(device)}/{str(dtype).removeprefix('torch.')}/{shape}"


def lookup(op: str, role: str, device, dtype: torch.dtype, shape: str) -> dict | None:
    """The saved configuration for this launch, or None (then the launcher's own rule applies)."""
    entries = table()
    if not entries:
        return None
    cfg = entries.get(key(op, role, device, dtype, shape))
    return None if cfg is None else _copy(cfg)   # callers may change what they get


def _copy(cfg: dict) -> dict:
    # configurations are dicts of numbers, strings and dicts: a copy of each level (every launch
    # asks, so not a JSON round trip, ~4x the time)
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in cfg.items()}


def save(entries: dict, path: str | None = None) -> str:
    """Add `entries` (key -> configuration) to the file at `path` (default: `user_path()`),
    keeping its other entries; returns the path. The file is replaced in one step."""
    path = path or user_path()
    merged = {**_read(path), **entries}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"configs": dict(sorted(merged.items()))}, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    reload()
    return path
