"""Building a config: defaults, then a YAML file, then `key=value` overrides, each value converted by its field's
type, every mistake a `UserError` naming the key and where it came from (`file.yaml:12` or the override) with the
closest valid key for a typo; writing it back, and the keys and docs of a config class."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhf.config.yaml_file import _read_yaml
from rlhf.errors import UserError
from rlhf.store.fileio import atomic_write_text


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Build a `cls` config from defaults, then the YAML file at `path`, then `key=value` overrides."""
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        data, lines = _read_yaml(Path(path))
    for override in overrides:
        key, raw = _split_override(override)
        _set_dotted(data, key, _OverrideValue(raw, override))
    cfg = _build(cls(), data, prefix="", source=source, lines=lines)
    cfg.validate()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: Path) -> None:
    """Write the resolved config as YAML, atomically (a reader never sees half a file)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def field_docs(cls: type) -> dict[str, str]:
    """Dotted key -> the docstring under that field (for `rlhf config`)."""
    import ast
    import inspect

    docs: dict[str, str] = {}

    def walk(klass: type, prefix: str) -> None:
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError):
            tree = None
        body = tree.body[0].body if tree and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[prefix + node.target.id] = " ".join(nxt.value.value.split())
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")

    walk(cls, "")
    return docs


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config class."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


@dataclass(frozen=True)
class _OverrideValue:
    """A value typed on the command line: kept as text, converted by the field's type."""

    raw: str
    origin: str


def _split_override(text: str) -> tuple[str, str]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override '{text}' is not key=value (for example optim.lr=1e-4)")
    return key.strip(), raw


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _build(base: Any, data: dict[str, Any], *, prefix: str, source: str, lines: dict[str, int]) -> Any:
    """`base` (a config dataclass instance) with the values in `data` set on it.

    Sections start from the parent's default for them, not from their class defaults, so a stage
    that changes a shared section's default (rm's model.name_or_path) keeps it when a file or an
    override sets another key of that section.
    """
    cls = type(base)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = prefix + key
        where = _where(dotted, _first_leaf(value), source, lines)
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys here: {', '.join(names)}"
            raise UserError(f"{where}: unknown config key '{dotted}'; {hint}")
        target = hints[key]
        if isinstance(value, dict) and not dataclasses.is_dataclass(target):
            raise UserError(f"{where}: '{dotted}' is a single value, not a section; set it as {dotted}=VALUE")
        if dataclasses.is_dataclass(target):
            if not isinstance(value, dict):
                raise UserError(f"{where}: '{dotted}' is a section; give its keys ({dotted}.KEY=...)")
            kwargs[key] = _build(getattr(base, key), value, prefix=dotted + ".", source=source, lines=lines)
        else:
            kwargs[key] = _coerce(value, target, dotted, where)
    return dataclasses.replace(base, **kwargs)


def _first_leaf(value: Any) -> Any:
    """The first non-mapping value inside nested mappings (an override's value carries its origin)."""
    while isinstance(value, dict) and value:
        value = next(iter(value.values()))
    return value


def _where(dotted: str, value: Any, source: str, lines: dict[str, int]) -> str:
    if isinstance(value, _OverrideValue):
        return f"override '{value.origin}'"
    line = lines.get(dotted)
    return f"{source}:{line}" if line else source


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Convert `value` (parsed YAML, or raw override text) to type `tp`, or say what is wrong."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_optional(value, tp, key, where)
    if origin is Literal:
        return _coerce_choice(value, tp, key, where)
    if origin is list:
        return _coerce_list(value, tp, key, where)
    return _coerce_scalar(value, tp, key, where)


def _raw(value: Any) -> tuple[bool, Any]:
    """(whether it was typed on the command line, the value as given: override text or parsed YAML)."""
    from_cli = isinstance(value, _OverrideValue)
    return from_cli, value.raw if from_cli else value


def _expected(tp: Any, raw: Any, key: str, where: str) -> UserError:
    return UserError(f"{where}: '{key}' expects {_type_name(tp)}, got {raw!r}")


def _coerce_optional(value: Any, tp: Any, key: str, where: str) -> Any:
    from_cli, raw = _raw(value)
    args = typing.get_args(tp)
    if from_cli and raw.strip().lower() in ("null", "none", "~", ""):
        return None
    if raw is None and type(None) in args:
        return None
    inner = [a for a in args if a is not type(None)]
    return _coerce(value, inner[0], key, where) if len(inner) == 1 else raw


def _coerce_choice(value: Any, tp: Any, key: str, where: str) -> Any:
    for choice in typing.get_args(tp):
        try:
            converted = _coerce(value, type(choice), key, where)
        except UserError:
            continue
        if converted == choice:
            return choice
    raise UserError(f"{where}: '{key}' must be one of {_type_name(tp)}, got {_raw(value)[1]!r}")


def _coerce_list(value: Any, tp: Any, key: str, where: str) -> list[Any]:
    from_cli, raw = _raw(value)
    items = raw
    if from_cli:
        try:
            parsed = yaml.safe_load(raw) if raw.strip() else []
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or "invalid YAML"
            raise UserError(f"{where}: '{key}' is not a valid list ({problem}); write a,b or '[a, b]'") from None
        items = parsed if isinstance(parsed, list) else [s.strip() for s in raw.split(",") if s.strip()]
    if isinstance(items, str):
        items = [items]  # one value where a list may hold several (reward.name_or_path: rm:latest)
    if not isinstance(items, list):
        raise _expected(tp, raw, key, where)
    return [_coerce(item, typing.get_args(tp)[0], key, where) for item in items]


def _coerce_scalar(value: Any, tp: Any, key: str, where: str) -> Any:
    from_cli, raw = _raw(value)
    if tp is bool:
        if from_cli:
            lowered = raw.strip().lower()
            if lowered in ("true", "yes", "on", "1"):
                return True
            if lowered in ("false", "no", "off", "0"):
                return False
            raise _expected(tp, raw, key, where)
        if isinstance(raw, bool):
            return raw
        raise _expected(tp, raw, key, where)
    if tp is int:
        if isinstance(raw, bool):
            raise _expected(tp, raw, key, where)
        if isinstance(raw, int):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                raise _expected(tp, raw, key, where) from None
        raise _expected(tp, raw, key, where)
    if tp is float:
        number = _to_float(raw)
        if number is None:
            raise _expected(tp, raw, key, where)
        # No field means anything by nan or inf (null turns the optional ones off): nan would pass
        # every range check, since every comparison with it is false.
        if not math.isfinite(number):
            raise UserError(f"{where}: '{key}' must be a finite number, got {raw!r}")
        return number
    if tp is str:
        if from_cli:
            return raw
        if isinstance(raw, str):
            return raw
        raise _expected(tp, raw, key, where)
    raise TypeError(f"config field {key} has unsupported type {tp}")


def _to_float(raw: Any) -> float | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return float(raw) if abs(raw) < 2**1000 else math.inf  # float() of a bigger int overflows
    if isinstance(raw, float):
        return raw
    if isinstance(raw, str):  # PyYAML reads 1e-5 (no dot) as a string
        try:
            return float(raw.strip())
        except ValueError:
            return None
    return None
