"""Reading a config file: a YAML mapping with the line of every dotted key (for errors that say `file.yaml:12`),
aliases bounded and tags refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from rlhf.config.presets import missing_hint
from rlhf.errors import UserError

MAX_YAML_VALUES = 100_000
"""Values a config file may hold once its aliases are expanded: a config has a few hundred; a file of
nested aliases (a "billion laughs") would otherwise take minutes and gigabytes to read."""


def read_yaml_file(path: Path) -> dict[str, Any]:
    """A YAML mapping as a config file is read (aliases bounded, tags refused); UserError otherwise."""
    return _read_yaml(path)[0]


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse a YAML mapping, remembering the line of every dotted key for error messages."""
    if path.is_dir():
        raise UserError(f"config file {path} is a folder; give -c a YAML file")
    if not path.is_file():
        raise UserError(f"config file not found: {path}{missing_hint(path)}")
    text = _read_text(path)
    try:
        root = yaml.compose(text)
        if root is not None:
            _check_expanded_size(root, path)
    except yaml.YAMLError as exc:
        position = getattr(exc, "position", None)  # a ReaderError (a control character) has no mark
        raise _yaml_error(path, exc, line=text.count("\n", 0, position) + 1 if position is not None else None) from None
    except RecursionError:
        raise UserError(f"{path}: nested too deep to be a config; fix the YAML") from None
    if root is None:
        return {}, {}
    if not isinstance(root, yaml.MappingNode):
        raise UserError(f"{path}:1: a config file must be a mapping of keys (model:, data:, ...)")
    lines: dict[str, int] = {}

    def convert(node: yaml.Node, prefix: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            return convert_collection(node, prefix)
        try:
            return yaml.safe_load(yaml.serialize(node))
        except yaml.YAMLError as exc:  # a tag safe_load refuses, e.g. !!python/object
            raise _yaml_error(path, exc, line=node.start_mark.line + 1) from None

    def convert_collection(node: yaml.Node, prefix: str) -> Any:
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                line = key_node.start_mark.line + 1
                if not isinstance(key_node, yaml.ScalarNode):
                    raise UserError(f"{path}:{line}: a key must be a plain name, not a list or mapping; fix the YAML")
                key = str(key_node.value)
                if key in out:  # YAML would silently keep the last one
                    raise UserError(f"{path}:{line}: '{prefix}{key}' is set twice (first on line {lines[prefix + key]}); keep one")
                lines[prefix + key] = line
                out[key] = convert(value_node, f"{prefix}{key}.")
            return out
        return [convert(item, prefix) for item in node.value]

    return convert(root, ""), lines


def _check_expanded_size(root: yaml.Node, path: Path) -> None:
    """Refuse a file whose aliases contain themselves or expand past MAX_YAML_VALUES values, counting
    each shared node once (so a "billion laughs" is measured in milliseconds, never built)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        if isinstance(node, yaml.ScalarNode):
            return 1
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise UserError(f"{path}:{node.start_mark.line + 1}: a YAML alias that contains itself; write the values out")
        open_nodes.add(id(node))
        children = [v for pair in node.value for v in pair] if isinstance(node, yaml.MappingNode) else node.value
        sizes[id(node)] = min(MAX_YAML_VALUES + 1, 1 + sum(size(child) for child in children))
        open_nodes.discard(id(node))
        return sizes[id(node)]

    if size(root) > MAX_YAML_VALUES:
        raise UserError(f"{path}: more than {MAX_YAML_VALUES:,} values once its YAML aliases are expanded "
                        "(an alias bomb?); write the values out")


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"config file {path}: cannot read it ({exc.strerror}); check its permissions") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); re-encode the file as UTF-8") from None


def _yaml_error(path: Path, exc: yaml.YAMLError, *, line: int | None = None) -> UserError:
    mark = getattr(exc, "problem_mark", None)
    if line is None and mark is not None:
        line = mark.line + 1
    where = f"{path}:{line}" if line else str(path)
    problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or "invalid YAML"
    return UserError(f"{where}: {problem}; fix the YAML syntax")
