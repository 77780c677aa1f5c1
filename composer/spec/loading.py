"""YAML -> Spec, with every problem reported as FILE:LINE:COL: path: message.

The YAML is read with YAML 1.2 rules for plain scalars (only true/false are
booleans, so `no` stays the string "no"; `1e-3` is a float), duplicate keys
are errors, and every node's position is kept so that pydantic's error
locations and the cross-field rules can point at the line that is wrong.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from composer.errors import UserError
from composer.spec import rules
from composer.spec.data import DataSpec
from composer.spec.model import Block, ModelSpec
from composer.spec.spec import Spec
from composer.spec.train import TrainSpec

Path_ = tuple  # a path into the YAML data: ("model", "blocks", 2, "heads")


@dataclass
class Problem:
    where: str    # "specs/x.yaml:14:9" or "--set model.stem.dim=7"
    path: str     # "model.blocks[2].heads"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.path}: {self.message}" if self.path else f"{self.where}: {self.message}"


class SpecError(UserError):
    """A spec that cannot be used; carries every problem found."""

    def __init__(self, problems: list[Problem]):
        # in the order of the file, as an editor shows it (type errors and the cross-field rules
        # are found in two passes); problems without a line (overrides, the whole file) follow
        self.problems = sorted(problems, key=_file_order)
        super().__init__("\n".join(str(p) for p in self.problems))


def _file_order(problem: Problem) -> tuple:
    line_col = re.search(r":(\d+):(\d+)$", problem.where)
    return (0, int(line_col[1]), int(line_col[2])) if line_col else (1,)


# -- YAML with positions ----------------------------------------------------------

class _Loader(yaml.SafeLoader):
    pass


# Replace YAML 1.1's implicit scalar rules by YAML 1.2 core ones.
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float",
                                                  "tag:yaml.org,2002:int")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0x[0-9a-fA-F]+)$"),
                              list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(?=[eE]))(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _construct_int(loader, node):
    text = loader.construct_scalar(node)
    return int(text, 16) if text.lower().startswith("0x") else int(text, 10)  # "08" is 8, as YAML 1.2 reads it


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _mark(node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def parse_yaml(text: str, source: str) -> tuple[object, dict, dict, list[Problem]]:
    """Parse YAML text into plain data plus {path: (line, col)} for values and for keys."""
    problems: list[Problem] = []
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise SpecError([Problem(where, "", f"invalid YAML: {exc.problem or exc}")]) from None
    except yaml.YAMLError as exc:
        raise SpecError([Problem(source, "", f"invalid YAML: {exc}")]) from None
    finally:
        loader.dispose()
    values: dict = {}
    keys: dict = {}

    def build(node, path):
        values[path] = _mark(node)
        if isinstance(node, yaml.MappingNode):
            loader.flatten_mapping(node)
            out = {}
            for key_node, value_node in node.value:
                key = loader.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int)):
                    problems.append(Problem(f"{source}:{_mark(key_node)[0]}:{_mark(key_node)[1]}",
                                            format_path(path), f"keys must be strings, got {key!r}"))
                    continue
                if key in out:
                    line, col = _mark(key_node)
                    first = keys[path + (key,)]
                    problems.append(Problem(f"{source}:{line}:{col}", format_path(path + (key,)),
                                            f"duplicate key (first given at line {first[0]}); keep only one"))
                    continue
                keys[path + (key,)] = _mark(key_node)
                out[key] = build(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [build(item, path + (i,)) for i, item in enumerate(node.value)]
        return loader.construct_object(node, deep=True)

    try:
        data = None if root is None else build(root, ())
    except RecursionError:
        raise SpecError([Problem(source, "", "an alias refers to itself (or the nesting is too deep); "
                                             "remove the recursive *alias")]) from None
    return data, values, keys, problems


def format_path(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# -- overrides ----------------------------------------------------------------------

def parse_override_path(text: str) -> Path_:
    """'model.blocks[2].heads' or 'model.blocks.2.heads' -> ("model", "blocks", 2, "heads")."""
    parts: list = []
    for piece in re.split(r"\.(?![^\[]*\])", text):
        m = re.fullmatch(r"([^\[\]]*)((?:\[\d+\])*)", piece)
        if not m or (not m.group(1) and not m.group(2)):
            raise ValueError(f"cannot read the key path {text!r}")
        if m.group(1):
            parts.append(int(m.group(1)) if m.group(1).isdigit() else m.group(1))
        parts.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    return tuple(parts)


def apply_overrides(data: dict, overrides: list[str]) -> tuple[dict, list[Problem]]:
    """Apply `key.path=value` overrides; returns {path: label} for error reporting."""
    origins: dict = {}
    problems: list[Problem] = []
    for item in overrides:
        label = f"--set {item}"
        if "=" not in item:
            problems.append(Problem(label, "", "expected KEY.PATH=VALUE, e.g. --set train.epochs=5"))
            continue
        key, raw = item.split("=", 1)
        try:
            path = parse_override_path(key.strip())
            if path[:1] == ("base",):
                raise ValueError("a base spec is chosen in the file (base: ...), not with --set")
            value, _, _, errs = parse_yaml(raw, label) if raw.strip() else (None, {}, {}, [])
        except (ValueError, SpecError) as exc:
            problems.append(Problem(label, "", str(exc)))
            continue
        problems.extend(errs)
        target = data
        for i, part in enumerate(path[:-1]):
            nxt = path[i + 1]
            if isinstance(target, list):
                if not isinstance(part, int) or part >= len(target):
                    problems.append(Problem(label, format_path(path[: i + 1]),
                                            f"no such list item (the list has {len(target)})"))
                    break
                target = target[part]
            elif isinstance(target, dict):
                if target.get(part) is None:
                    target[part] = [] if isinstance(nxt, int) else {}
                target = target[part]
            else:
                problems.append(Problem(label, format_path(path[:i]), "is not a mapping or a list"))
                break
        else:
            last = path[-1]
            if isinstance(target, list) and isinstance(last, int) and last < len(target):
                target[last] = value
            elif isinstance(target, dict):
                target[last] = value
            else:
                problems.append(Problem(label, format_path(path), "cannot set this item"))
                continue
            origins[path] = label
    return origins, problems


# -- pydantic error locations -> YAML positions -----------------------------------------

def _data_path(data, loc: tuple) -> tuple[Path_, bool]:
    """Follow pydantic's loc through the data, dropping union tags; (path, fully found)."""
    path: list = []
    cur = data
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
            path.append(part)
        elif isinstance(cur, list) and isinstance(part, int) and part < len(cur):
            cur = cur[part]
            path.append(part)
        elif isinstance(cur, dict) and isinstance(part, str) and cur.get("kind") == part:
            continue  # discriminated-union tag
        elif not isinstance(cur, dict) and isinstance(part, str) and path:
            return tuple(path), True   # below a value, not a key: the tag of a union's member (int, 'backbone')
        else:
            return tuple(path) + tuple(loc[loc.index(part):]), False
    return tuple(path), True


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that validates the mapping at `loc` (tags included)."""
    cls: object = Spec
    for part in loc:
        cls = _unwrap(cls)
        if isinstance(cls, type) and issubclass(cls, BaseModel):
            field = cls.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            cls = field.annotation
        elif typing.get_origin(cls) is list:
            cls = typing.get_args(cls)[0]
        elif typing.get_origin(cls) is typing.Union:
            options = [_unwrap(a) for a in typing.get_args(cls)]
            cls = next((o for o in options if isinstance(o, type) and issubclass(o, BaseModel)
                        and "kind" in o.model_fields and part in typing.get_args(o.model_fields["kind"].annotation)),
                       None)
            if cls is None:
                return None
        else:
            return None
    cls = _unwrap(cls)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _unwrap(tp):
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin is typing.Union and type(None) in typing.get_args(tp) and len(typing.get_args(tp)) == 2:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        else:
            return tp


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _belongs_under(model: type[BaseModel] | None, key) -> str:
    """' (it belongs under optimizer)' when `key` is a field of one of model's sub-sections."""
    for name, field in (model.model_fields.items() if model else []):
        sub = _unwrap(field.annotation)
        if isinstance(sub, type) and issubclass(sub, BaseModel) and key in sub.model_fields:
            return f" (it belongs under '{name}:')"
    return ""


def _message(err: dict) -> str:
    kind, loc = err["type"], err["loc"]
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        known = list(model.model_fields) if model else []
        hint = _suggest(loc[-1], known) or _belongs_under(model, loc[-1])
        return f"unknown key '{loc[-1]}'{hint}" + (f"; valid keys: {', '.join(known)}" if known else "")
    if kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        tags = [t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(",")]
        return f"unknown block kind '{ctx.get('tag')}'{_suggest(ctx.get('tag'), tags)}; kinds: {', '.join(tags)}"
    if kind == "union_tag_not_found":
        return f"a block needs a 'kind' (one of {', '.join(rules.LAYOUTS)})"
    if kind == "missing":
        return "required field is missing"
    return err["msg"][0].lower() + err["msg"][1:] if err["msg"] else kind


# -- the entry points ----------------------------------------------------------------

def load_spec_text(text: str, source: str = "<spec>", overrides: list[str] = ()) -> Spec:
    data, values, keys = _read_with_bases(text, source, ())
    origins, problems = apply_overrides(data, list(overrides))
    if problems:
        raise SpecError(problems)

    def where(path: Path_, prefer_key: bool = False) -> str:
        for n in range(len(path), -1, -1):
            if path[:n] in origins:
                return origins[path[:n]]
            pos = (keys.get(path[:n]) if prefer_key else None) or values.get(path[:n])
            if pos:
                return pos
        return source

    spec = None
    invalid: list[Path_] = []
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        said: dict[Path_, int] = {}   # a value that fits none of a union's members: one problem, each member's reason
        for err in exc.errors():
            path, found = _data_path(data, err["loc"])
            if found and path in said:
                first = problems[said[path]]
                also = _message(err).removeprefix("input should be ")
                problems[said[path]] = dataclasses.replace(first, message=f"{first.message}; or {also}")
                continue
            at_key = err["type"] in ("extra_forbidden", "missing")  # point at the key, not its contents
            problems.append(Problem(where(path if found else path[:-1], prefer_key=at_key),
                                    format_path(path), _message(err)))
            if found:
                said[path] = len(problems) - 1
                invalid.append(path)
    # Check the cross-field rules even around invalid values, so that every problem shows at once;
    # a finding that rests on a value that had to be replaced is left out rather than guessed at.
    if spec is not None:
        model, data_spec, train_spec, replaced = spec.model, spec.data, spec.train, set()
    else:
        model, data_spec, train_spec, replaced = _sections_for_rules(data, invalid)
    for path, message, inputs in rules.check(model, data_spec, train_spec):
        if not any(_overlap(used, gone) for used in inputs for gone in replaced):
            at = where(path)
            # a rule across a base and the file built on it: say where the other values came from
            elsewhere = [f"{format_path(used)} from {where(used)}" for used in inputs
                         if used != path and used in values and _file_of(where(used)) != _file_of(at)]
            problems.append(Problem(at, format_path(path), message + (f" ({'; '.join(elsewhere)})" if elsewhere else "")))
    if problems:
        raise SpecError(problems)
    if spec.name is None:
        spec.name = Path(source).stem if source and not source.startswith("<") else "spec"
    spec._origins = {**values, **origins}
    return spec


# -- base specs -----------------------------------------------------------------------

def _file_of(where: str) -> str:
    """The file of a "file:line:col" position (a --set label is its own)."""
    return re.sub(r":\d+:\d+$", "", where)


def _read_with_bases(text: str, source: str, chain: tuple[str, ...]) -> tuple[dict, dict, dict]:
    """The spec's data with its `base:` chain merged in, and {path: "file:line:col"} for each value
    and each key, pointing into whichever file gave it. `chain`: the files that led here."""
    data, values, keys, problems = parse_yaml(text, source)
    if data is None and not problems:
        raise SpecError([Problem(source, "", "the file is empty; a spec needs at least a 'model:' section "
                                             "(see specs/quickstart.yaml)")])
    if problems:
        raise SpecError(problems)
    if not isinstance(data, dict):
        raise SpecError([Problem(f"{source}:1:1", "", f"a spec is a mapping with a 'model:' key, "
                                                      f"not a {type(data).__name__}")])
    values = {path: f"{source}:{line}:{col}" for path, (line, col) in values.items()}
    keys = {path: f"{source}:{line}:{col}" for path, (line, col) in keys.items()}
    if data.get("base") is None:
        return data, values, keys
    given = data["base"]
    if not isinstance(given, str):
        raise SpecError([Problem(values[("base",)], "base", f"expected the path of a spec file, got {given!r}")])
    here = Path(source).parent if not source.startswith("<") else Path.cwd()
    path = (here / Path(given).expanduser()).resolve()
    chain = chain + (str(Path(source).resolve()),)
    if str(path) in chain:
        loop = " -> ".join(Path(c).name for c in chain + (str(path),))
        raise SpecError([Problem(values[("base",)], "base", f"the bases form a loop ({loop}); remove one 'base:'")])
    try:
        base_text = _read_spec_file(path)
    except SpecError as exc:   # a missing or unreadable base is this line's mistake
        reason = exc.problems[0].message
        raise SpecError([Problem(values[("base",)], "base", f"{given} ({path}) {reason}; give the path of a spec "
                                                            f"file, relative to {here}")]) from None
    base, base_values, base_keys = _read_with_bases(base_text, _shown_path(path), chain)
    for field in INHERITED_NOT:   # these describe the base file itself
        base.pop(field, None)
    base.pop("base", None)   # the base's own base is merged in already
    merged = _merge(base, data)   # with this file's `base:` as written (Spec.base; never dumped)
    replaced = _replaced_paths(base, data)
    return merged, _positions_after(replaced, base_values, values), _positions_after(replaced, base_keys, keys)


def _merge(base, child):
    """The child's values over the base's: mappings merge key by key; anything else (a list of
    blocks, a number) replaces the base's value whole."""
    if isinstance(base, dict) and isinstance(child, dict):
        return {**base, **{k: _merge(base[k], v) if k in base else v for k, v in child.items()}}
    return child


def _replaced_paths(base: dict, child: dict, path: tuple = ()) -> list[tuple]:
    """The paths where `_merge` puts a value of the child's in place of anything the base had there."""
    out = []
    for k, v in child.items():
        if k in base and isinstance(base[k], dict) and isinstance(v, dict):
            out += _replaced_paths(base[k], v, path + (k,))
        else:
            out.append(path + (k,))
    return out


def _positions_after(replaced: list[tuple], base_pos: dict, child_pos: dict) -> dict:
    """Positions after `_merge`: the base's, less those under a value the child replaced, then the child's."""
    kept = {p: at for p, at in base_pos.items() if not any(p[:len(r)] == r for r in replaced)}
    return {**kept, **child_pos}


# A child spec never inherits its base's name: runs go to runs/<name>, and two specs should not share one.
INHERITED_NOT = ("name",)


def _shown_path(path: Path) -> str:
    """A base file as messages show it: relative to the working directory when it lies below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


_BLOCK = TypeAdapter(Block)
# valid with no fields at all
_STAND_IN = {"kind": "channel_mlp"}


def _sections_for_rules(data: dict, invalid: list[Path_]) -> tuple[ModelSpec | None, DataSpec | None,
                                                                   TrainSpec | None, set]:
    """The model, data and train sections as the cross-field rules need them, even when some values are
    invalid: each invalid value is removed so that its default applies, and each block that is
    still invalid is swapped for a stand-in (so the other blocks keep their indices). Returns the
    sections (None where one still does not validate) and the paths of everything replaced."""
    fixed = copy.deepcopy(data)
    replaced = {_remove(fixed, path) for path in invalid}
    model_raw = fixed.get("model")
    blocks = model_raw.get("blocks") if isinstance(model_raw, dict) else None
    for i, block in enumerate(blocks if isinstance(blocks, list) else []):
        if _valid_or_none(_BLOCK, block) is None:
            blocks[i] = _STAND_IN
            replaced.add(("model", "blocks", i))
    model = _valid_or_none(ModelSpec, model_raw)
    data_spec = _valid_or_none(DataSpec, fixed["data"]) if "data" in fixed else None
    train_spec = _valid_or_none(TrainSpec, fixed.get("train", {}))
    return model, data_spec, train_spec, replaced


def _remove(data: dict, path: Path_) -> Path_:
    """Delete the value at `path` so that its default applies; returns what was removed. A list
    item goes with its whole list (deleting it would renumber the rest), except a block, which
    the caller swaps for a stand-in."""
    if not path:
        return path
    parent = data
    for part in path[:-1]:
        try:
            parent = parent[part]
        except (KeyError, IndexError, TypeError):
            return path  # already removed with an enclosing value
    if isinstance(parent, dict):
        parent.pop(path[-1], None)
        return path
    if path[:2] == ("model", "blocks") and len(path) == 3:
        return path
    return _remove(data, path[:-1])


def _overlap(a: Path_, b: Path_) -> bool:
    """One path lies inside the other (or they are equal)."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _valid_or_none(cls, value):
    try:
        return cls.validate_python(value) if isinstance(cls, TypeAdapter) else cls.model_validate(value)
    except ValidationError:
        return None


def load_spec(path: str | Path, overrides: list[str] = ()) -> Spec:
    """Read and validate a spec file; raises SpecError naming every problem."""
    path = Path(path)
    return load_spec_text(_read_spec_file(path), str(path), overrides)


def _read_spec_file(path: Path) -> str:
    source = str(path)
    if not path.exists():
        raise SpecError([Problem(source, "", "no such file")])
    if path.is_dir():
        raise SpecError([Problem(source, "", "is a directory; give a spec file such as specs/quickstart.yaml")])
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise SpecError([Problem(source, "", "is a binary file, not a YAML spec")])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([Problem(source, "", f"is not UTF-8 text (byte {exc.start}); save the spec as UTF-8")]) \
            from None
