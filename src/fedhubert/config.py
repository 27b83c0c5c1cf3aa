"""Stage configs: YAML files loaded into typed dataclasses, with `key.sub=value` command-line overrides.

Every field of a config dataclass is declared with `param(...)`, which carries its help text and its allowed
range. Loading layers three sources, later ones winning: the dataclass defaults, an optional YAML file, and
command-line overrides (`layer_file` lays one more file over a loaded config: a client's own overrides). Unknown
keys, wrong types and out-of-range values stop with one `ConfigError` listing every such mistake, each naming the
key, the source it came from (file, override or the flag the user typed) and what is allowed. A dataclass may
define `fill_defaults(given)` to set fields that follow others unless `given` (the names set explicitly) holds them.

Merging rules: a mapping given for a nested config merges key by key into it; a mapping given for a
dict-typed field replaces the whole dict in a YAML file, while an override such as `weights.a=0.5` sets one
entry of it.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar, Union, get_args, get_origin

import yaml

from fedhubert.atomic import atomic_write_text
from fedhubert.errors import ConfigError

T = TypeVar("T")

_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def param(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Sequence[Any] | None = None,
) -> Any:
    """Declare a config field with its help text and allowed range (bounds apply to numbers and to
    every number inside a list or dict value; `choices` to strings and list items)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": tuple(choices) if choices else None}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        snapshot = default

        def factory() -> Any:
            import copy

            return copy.deepcopy(snapshot)

        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------------- types
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        optional = len(args) < len(get_args(tp))
        if len(args) == 1:
            return args[0], optional
        # A union built at run time from a tuple of types; `X | Y` needs the members spelled out.
        return Union[tuple(args)], optional  # type: ignore[return-value]  # noqa: UP007
    return tp, False


def _type_name(tp: Any) -> str:
    tp, optional = _strip_optional(tp)
    origin = get_origin(tp)
    if origin is Literal:
        name = "one of " + ", ".join(repr(a) for a in get_args(tp))
    elif origin is list:
        (item,) = get_args(tp)
        name = f"a list, each item {_type_name(item)}"
    elif origin is dict:
        _, value = get_args(tp)
        name = f"a mapping, each value {_type_name(value)}"
    elif dataclasses.is_dataclass(tp):
        name = "a mapping of " + ", ".join(f.name for f in dataclasses.fields(tp))
    else:
        name = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}.get(
            tp, getattr(tp, "__name__", str(tp))
        )
    return name + (" (or null)" if optional else "")


def _is_textual(tp: Any) -> bool:
    """Whether an override's raw text should be kept as-is rather than parsed as YAML."""
    tp, _ = _strip_optional(tp)
    return tp in (str, Path) or (get_origin(tp) is Literal and all(isinstance(a, str) for a in get_args(tp)))


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


# --------------------------------------------------------------------------------------------------- layering
class Override(NamedTuple):
    """A KEY=VALUE override and, where a command-line flag stands for it, that flag (`--clients`), which the
    messages name instead of the override."""

    text: str
    flag: str | None = None


class _Source(NamedTuple):
    """Where a value came from: its name in messages and how it was written (for the list syntax hint)."""

    label: str
    kind: Literal["default", "file", "override", "flag", "data"]

    def __str__(self) -> str:
        return self.label


_DEFAULT = _Source("built-in default", "default")


class _Reported(Exception):
    """A nested config's mistakes, already recorded: its parent cannot be built either."""


def _field_map(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _words(name: str) -> set[str]:
    """The words of a key, singular (`num_layers`: num, layer)."""
    return {w[:-1] if w.endswith("s") and len(w) > 2 else w for w in re.split(r"[_\-\s]+", name.lower()) if w}


def _closest(key: str, names: Sequence[str]) -> str | None:
    """The field most likely meant by `key`: the same name spelt otherwise (`num-clients`), else a name whose words
    all occur in the key or the other way round (`num_layers`: `layers`; `rounds`: `num_rounds`), else the nearest
    spelling."""
    spelt = key.lower().replace("-", "_")
    if spelt in names:
        return spelt
    mine = _words(key)
    related = [n for n in names if mine and (_words(n) <= mine or mine <= _words(n))]
    if related:
        return max(related, key=lambda n: (len(_words(n) & mine), difflib.SequenceMatcher(None, key, n).ratio()))
    close = difflib.get_close_matches(key, names, n=1)
    return close[0] if close else None


def _unknown_key(cls: type, key: str, path: str, source: _Source) -> str:
    names = sorted(_field_map(cls))
    close = _closest(key, names)
    hint = f" (did you mean '{close}'?)" if close else ""
    return f"{source}: unknown key '{path}'{hint}; allowed keys here: {', '.join(names)}"


def _apply_mapping(
    cls: type, base: dict, layer: Any, source: _Source, origins: dict, prefix: str, errors: list[str]
) -> None:
    if not isinstance(layer, dict):
        where = f"key '{prefix[:-1]}'" if prefix else "the top level"
        errors.append(f"{source}: {where} must be {_type_name(cls)}, got {_describe(layer)}")
        return
    hints = _hints(cls)
    fields = _field_map(cls)
    for key, value in layer.items():
        path = f"{prefix}{key}"
        if key not in fields:
            errors.append(_unknown_key(cls, str(key), path, source))
            continue
        inner, _ = _strip_optional(hints[key])
        if dataclasses.is_dataclass(inner) and isinstance(value, dict) and isinstance(base.get(key), dict):
            _apply_mapping(inner, base[key], value, source, origins, path + ".", errors)
        else:
            base[key] = value
            for old in [k for k in origins if k.startswith(path + ".")]:
                del origins[old]
            origins[path] = source


def _apply_override(cls: type, base: dict, override: Override, origins: dict, errors: list[str]) -> None:
    text = override.text
    source = _Source(override.flag, "flag") if override.flag else _Source(f"command-line override '{text}'", "override")
    if "=" not in text:
        errors.append(f"{source}: expected KEY=VALUE, for example seed=3 or model.layers=2")
        return
    dotted, raw = text.split("=", 1)
    dotted = dotted.strip()
    parts = dotted.split(".")
    if not dotted or any(not p for p in parts):
        errors.append(f"{source}: '{dotted}' is not a valid key (use dots between nested keys)")
        return
    node, node_cls, tp = base, cls, None
    for depth, part in enumerate(parts):
        path = ".".join(parts[: depth + 1])
        if node_cls is not None:
            fields = _field_map(node_cls)
            if part not in fields:
                errors.append(_unknown_key(node_cls, part, path, source))
                return
            tp = _hints(node_cls)[part]
        last = depth == len(parts) - 1
        inner, optional = _strip_optional(tp)
        if last:
            if optional and raw.strip() in ("", "null", "~"):
                node[part] = None
            else:
                node[part] = raw.strip() if _is_textual(inner) else _parse_scalar(raw)
            for old in [k for k in origins if k.startswith(path + ".")]:
                del origins[old]
            origins[path] = source
            return
        if dataclasses.is_dataclass(inner):
            if not isinstance(node.get(part), dict):
                node[part] = dataclasses.asdict(inner())
            node, node_cls = node[part], inner
        elif get_origin(inner) is dict:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
            node_cls, tp = None, get_args(inner)[1]
        else:
            errors.append(f"{source}: key '{path}' is {_type_name(tp)} and has no sub-keys")
            return
    raise AssertionError("unreachable")


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


# --------------------------------------------------------------------------------------------------- building
def _origin_of(origins: dict, path: str) -> _Source:
    while path:
        if path in origins:
            return origins[path]
        path = path.rpartition(".")[0]
    return _DEFAULT


def _as_list_hint(value: Any, path: str, source: _Source) -> str:
    """How to write `value` as a one-item list in the source it came from (empty where that does not apply)."""
    if isinstance(value, (dict, list)) or "[" in path or source.kind not in ("file", "override"):
        return ""
    text = str(value).lower() if isinstance(value, bool) else value
    if source.kind == "override":
        return f"; write {path}=[{text}]"
    return f"; write {path.rpartition('.')[2]}: [{text}]"


def _coerce(value: Any, tp: Any, path: str, origins: dict, errors: list[str]) -> Any:
    inner, optional = _strip_optional(tp)
    source = _origin_of(origins, path)

    def fail(hint: str = "") -> ConfigError:
        return ConfigError(f"{source}: key '{path}' must be {_type_name(tp)}, got {_describe(value)}{hint}")

    if value is None:
        if optional:
            return None
        raise fail()
    origin = get_origin(inner)
    if origin is Literal:
        if value not in get_args(inner):
            raise fail()
        return value
    if origin in (Union, types.UnionType):
        for option in get_args(inner):
            try:
                return _coerce(value, option, path, origins, [])
            except (ConfigError, _Reported):
                continue
        raise fail()
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise fail(_as_list_hint(value, path, source))
        (item,) = get_args(inner)
        return [_coerce(v, item, f"{path}[{i}]", origins, errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        key_tp, value_tp = get_args(inner)
        return {
            _coerce(k, key_tp, f"{path}.{k}", origins, errors): _coerce(v, value_tp, f"{path}.{k}", origins, errors)
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(inner):
        if isinstance(value, inner):
            value = dataclasses.asdict(value)
        if not isinstance(value, dict):
            raise fail()
        return _build(inner, value, origins, errors, path + ".")
    if inner is bool:
        if not isinstance(value, bool):
            raise fail()
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
        return value
    if inner is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        return float(value)
    if inner is str:
        if not isinstance(value, str):
            raise fail()
        return value
    if inner is Path:
        if not isinstance(value, (str, Path)) or str(value) == "":
            raise fail()
        return Path(value)
    raise TypeError(f"config field '{path}' has unsupported type {tp!r}")


def _check_bounds(value: Any, meta: dict, path: str, origins: dict) -> None:
    if value is None:  # null passed the type check: the field is Optional, and bounds apply to values only
        return
    source = _origin_of(origins, path)
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_bounds(item, meta, f"{path}[{i}]", origins)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _check_bounds(item, meta, f"{path}.{key}", origins)
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{source}: key '{path}' must be one of {allowed}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for name, ok, word in (
            ("ge", lambda v, b: v >= b, ">="),
            ("gt", lambda v, b: v > b, ">"),
            ("le", lambda v, b: v <= b, "<="),
            ("lt", lambda v, b: v < b, "<"),
        ):
            bound = meta.get(name)
            if bound is not None and not ok(value, bound):
                raise ConfigError(f"{source}: key '{path}' must be {word} {bound}, got {value!r}")


def _apply_preset(cls: type, raw: dict, origins: dict, prefix: str) -> None:
    """A dataclass with a `PRESETS` class attribute ({name: {field: value}}) and a `preset` field takes the named
    preset's value for every field that no file or override set explicitly."""
    presets = getattr(cls, "PRESETS", None)
    if presets is None:
        return
    name = raw.get("preset")
    if name not in presets:
        source = _origin_of(origins, f"{prefix}preset")
        raise ConfigError(
            f"{source}: key '{prefix}preset' must be one of {', '.join(map(repr, presets))}, got {name!r}"
        )
    for key, value in presets[name].items():
        path = f"{prefix}{key}"
        if not any(o == path or o.startswith(path + ".") for o in origins):
            raw[key] = value


def _build(cls: type[T], raw: dict, origins: dict, errors: list[str], prefix: str = "") -> T:
    """`cls` from `raw`; every mistake in its fields is added to `errors`, and then `_Reported` is raised."""
    hints = _hints(cls)
    raw = dict(raw)
    failed: set[str] = set()
    try:
        _apply_preset(cls, raw, origins, prefix)
    except ConfigError as err:
        errors.append(str(err))
        failed.add("preset")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in failed:
            continue
        path = f"{prefix}{f.name}"
        try:
            value = _coerce(raw[f.name], hints[f.name], path, origins, errors)
            _check_bounds(value, dict(f.metadata), path, origins)
        except ConfigError as err:
            errors.append(str(err))
            failed.add(f.name)
        except _Reported:
            failed.add(f.name)
        else:
            kwargs[f.name] = value
    if failed:
        raise _Reported
    obj = cls(**kwargs)
    fill_defaults = getattr(obj, "fill_defaults", None)
    if callable(fill_defaults):
        fill_defaults(frozenset(re.split(r"[.\[]", k.removeprefix(prefix))[0] for k in origins if k.startswith(prefix)))
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as err:
            sources = sorted({str(s) for k, s in origins.items() if k.startswith(prefix)} or {str(_DEFAULT)})
            errors.append(f"{' / '.join(sources)}: {err}")
            raise _Reported from None
    return obj


def _finish(cls: type[T], raw: dict, origins: dict, errors: list[str]) -> T:
    """Build `cls`, and raise one ConfigError holding every mistake found while layering and building."""
    try:
        cfg = _build(cls, raw, origins, errors)
    except _Reported:
        pass
    else:
        if not errors:
            return cfg
    mistakes = list(dict.fromkeys(errors))
    if len(mistakes) == 1:
        raise ConfigError(mistakes[0])
    raise ConfigError(f"{len(mistakes)} config mistakes:\n  " + "\n  ".join(mistakes))


def _read_yaml(path: Path, errors: list[str]) -> Any:
    """The YAML document in `path` (None when it is missing or invalid: the mistake is added to `errors`)."""
    if not path.is_file():
        errors.append(f"config file {path} does not exist")
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        errors.append(f"{path}: not valid YAML: {err}")
        return None


# --------------------------------------------------------------------------------------------------- public API
def load_config(cls: type[T], path: Path | None = None, overrides: Sequence[str | Override] = ()) -> T:
    """Build `cls` from its defaults, then the YAML file at `path` (if any), then `overrides` (KEY=VALUE)."""
    raw = dataclasses.asdict(cls())
    origins: dict[str, _Source] = {}
    errors: list[str] = []
    if path is not None:
        layer = _read_yaml(Path(path), errors)
        if layer is not None:
            _apply_mapping(cls, raw, layer, _Source(str(path), "file"), origins, "", errors)
    for override in overrides:
        _apply_override(cls, raw, Override(override) if isinstance(override, str) else override, origins, errors)
    return _finish(cls, raw, origins, errors)


def layer_file(cfg: T, path: Path, keys: Sequence[str]) -> T:
    """`cfg` with the YAML file at `path` laid over it (a client's own overrides), merged and checked as
    `load_config` does its file; the file may set only the top-level `keys`."""
    cls = type(cfg)
    raw = dataclasses.asdict(cls())
    origins: dict[str, _Source] = {}
    errors: list[str] = []
    _apply_mapping(cls, raw, dataclasses.asdict(cfg), _Source("the config it overrides", "data"), origins, "", errors)
    layer = _read_yaml(Path(path), errors)
    if isinstance(layer, dict):
        for key in [k for k in layer if k not in keys]:
            errors.append(f"{path}: key '{key}' cannot be set in this file (it may set {', '.join(keys)})")
            del layer[key]
    if layer is not None:
        _apply_mapping(cls, raw, layer, _Source(str(path), "file"), origins, "", errors)
    return _finish(cls, raw, origins, errors)


def config_from_dict(cls: type[T], data: dict, source: str) -> T:
    """Build `cls` from its defaults updated by a nested mapping (e.g. a config received in a message)."""
    raw = dataclasses.asdict(cls())
    origins: dict[str, _Source] = {}
    errors: list[str] = []
    _apply_mapping(cls, raw, data, _Source(source, "data"), origins, "", errors)
    return _finish(cls, raw, origins, errors)


def absolute_paths(cfg: T, base: Path | None = None) -> T:
    """The same config with every relative path made absolute (against `base`, by default the current folder),
    so that records and processes started elsewhere (Flower's ServerApp, batch jobs) see the same files."""
    base = Path(base) if base is not None else Path.cwd()
    changes = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, Path):
            changes[f.name] = value if value.is_absolute() else base / value
        elif dataclasses.is_dataclass(value):
            changes[f.name] = absolute_paths(value, base)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def config_to_dict(cfg: Any) -> dict:
    """Plain data (str, numbers, lists, dicts) for YAML and JSON records."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


class _PlainDumper(yaml.SafeDumper):
    """YAML without anchors and aliases (&id001), which make configs hard to read."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_config(cfg: Any) -> str:
    return yaml.dump(config_to_dict(cfg), Dumper=_PlainDumper, sort_keys=False, default_flow_style=None, width=110)


def save_config(cfg: Any, path: Path) -> None:
    """Write the resolved config (every key, defaults included) so the run can be repeated from it."""
    header = f"# Resolved {type(cfg).__name__}: every key, defaults included. Reload with --config {Path(path).name}\n"
    atomic_write_text(Path(path), header + dump_config(cfg))


class KeyDoc(NamedTuple):
    """One leaf key of a config: its dotted name, type (without Optional), type in words, default, help text
    and allowed values (from `choices` or a Literal type; None when any value of the type goes)."""

    key: str
    type: Any
    type_name: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None


def describe_fields(cls: type, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of `cls`, nested configs' keys dotted (`model.preset`), for --help and flags."""
    rows = []
    defaults = cls()
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        inner, _ = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(inner):
            rows.extend(describe_fields(inner, f"{prefix}{f.name}."))
        else:
            literal = get_args(inner) if get_origin(inner) is Literal else None
            rows.append(
                KeyDoc(
                    key=f"{prefix}{f.name}",
                    type=inner,
                    type_name=_type_name(hints[f.name]),
                    default=getattr(defaults, f.name),
                    help=f.metadata.get("help", ""),
                    choices=f.metadata.get("choices") or literal,
                )
            )
    return rows
