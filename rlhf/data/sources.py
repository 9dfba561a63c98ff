"""Where rows come from: local JSONL / JSON / Parquet files, or a hub dataset.

`load_records` turns what the user wrote in the config (`data.train`, ...) into a `Records`: a
`datasets.Dataset` plus enough provenance to point at the exact file line (JSONL) or row of any
later error. JSON and JSONL are parsed here, not by `datasets`, so a malformed row is reported as
`file.jsonl:LINE` instead of a pyarrow traceback.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from rlhf.errors import UserError, first_line

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class Records:
    """Rows of one data source, with where each row came from.

    `line_numbers[i]` is the 1-based file line of row i for JSONL-style files; None otherwise.
    `hub_split` is set for hub datasets so that `where` reads `org/name[train] row 18`.
    `key` is the config key the source was given under, for error messages downstream.
    """

    rows: datasets.Dataset
    source: str
    line_numbers: list[int] | None
    hub_split: str | None = None
    key: str | None = None

    def where(self, i: int) -> str:
        """Human-readable location of row `i` (0-based): `path.jsonl:17` or `... row 18`."""
        if self.line_numbers is not None:
            return f"{self.source}:{self.line_numbers[i]}"
        if self.hub_split is not None:
            return f"{self.source.partition(':')[0]}[{self.hub_split}] row {i + 1}"
        return f"{self.source} row {i + 1}"

    def __len__(self) -> int:
        return len(self.rows)


def _looks_like_path(source: str) -> bool:
    """True when the user clearly meant a local file rather than a hub dataset name.

    Hub ids are `name` or `org/name` (one slash), so a single "/" alone is not enough to call a
    source a path; a data suffix, an explicit ./ ../ / ~ prefix, or a deeper path is.
    """
    if source.lower().endswith(FILE_SUFFIXES):
        return True
    if source.startswith(("./", "../", "/", "~")):
        return True
    if os.sep != "/" and os.sep in source:
        return True
    return source.count("/") >= 2


def _error(msg: str, key: str | None) -> UserError:
    return UserError(f"{msg} ({key})" if key else msg)


def load_records(source: str, *, split: str = "train", key: str = "data.train") -> Records:
    """Load `source` (a local .jsonl/.json/.parquet path, or a hub `name[:split]`) as `Records`.

    Raises `UserError` (one line: what, where, fix) for a missing file, malformed or non-object
    rows, mixed column types, an empty source, or a hub dataset that cannot be loaded.
    """
    if not isinstance(source, str) or not source.strip():
        raise _error(f"data source is empty: {source!r}; set it to a .jsonl/.json/.parquet path or a hub dataset name", key)
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            records = _load_json_lines(path, source, key)
        elif suffix == ".json":
            records = _load_json(path, source, key)
        elif suffix == ".parquet":
            records = _load_parquet(path, source, key)
        else:
            raise _error(
                f"{source}: unsupported file type {suffix or '(none)'!r}; use .jsonl, .json or .parquet", key
            )
    elif path.is_dir():
        raise _error(f"{source}: is a directory; point it at a .jsonl, .json or .parquet file", key)
    elif _looks_like_path(source):
        raise UserError(f"data file not found: {source} ({key}); check the path")
    else:
        records = _load_hub(source, split, key)
    if len(records.rows) == 0:
        raise UserError(f"{records.source}: no rows ({key}); add rows or point {key} at another source")
    return records


def _read_text(path: Path, source: str, key: str | None) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise _error(f"{source}: not UTF-8 text ({e.reason} at byte {e.start}); re-encode the file as UTF-8", key) from None
    except OSError as e:
        raise _error(f"{source}: cannot read ({e.strerror}); check the file's permissions", key) from None


def _parse_lines(text: str, source: str, key: str | None, first_line: int = 1) -> tuple[list[dict], list[int]]:
    """Parse one JSON object per non-blank line; returns the rows and their 1-based line numbers."""
    rows: list[dict] = []
    lines: list[int] = []
    for n, line in enumerate(text.splitlines(), start=first_line):
        if not line.strip():
            continue  # blank lines (often a trailing newline or two) are not rows
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _error(f"{source}:{n}: not valid JSON ({e.msg}: column {e.colno}); fix the row or remove it", key) from None
        if not isinstance(obj, dict):
            raise _error(
                f"{source}:{n}: expected a JSON object, got {_json_type(obj)}; make each line one {{...}} object", key
            )
        rows.append(obj)
        lines.append(n)
    return rows, lines


def _json_type(obj: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(obj), "null" if obj is None else type(obj).__name__
    )


def _load_json_lines(path: Path, source: str, key: str | None) -> Records:
    rows, lines = _parse_lines(_read_text(path, source, key), source, key)
    return Records(rows=_to_dataset(rows, source, key, lines), source=source, line_numbers=lines, key=key)


def _load_json(path: Path, source: str, key: str | None) -> Records:
    """A .json file is either one array of objects, or JSON lines under a .json name."""
    text = _read_text(path, source, key)
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise _error(f"{source}:{e.lineno}: not valid JSON ({e.msg}: column {e.colno}); fix the file", key) from None
        for i, obj in enumerate(data):
            if not isinstance(obj, dict):
                raise _error(
                    f"{source} row {i + 1}: expected a JSON object, got {_json_type(obj)}; "
                    "make the file an array of {...} objects",
                    key,
                )
        return Records(rows=_to_dataset(data, source, key, None), source=source, line_numbers=None, key=key)
    return _load_json_lines(path, source, key)


def _load_parquet(path: Path, source: str, key: str | None) -> Records:
    # Read with pyarrow and wrap in a Dataset: no cache directory is written beside the user's
    # home for a local file, and a damaged file gives one clear line instead of a builder trace.
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for damaged files
        raise _error(f"{source}: not a readable Parquet file ({first_line(e)}); rewrite or replace it", key) from None
    return Records(rows=datasets.Dataset(table), source=source, line_numbers=None, key=key)


def _load_hub(source: str, split: str, key: str | None) -> Records:
    name, _, explicit_split = source.partition(":")
    split = explicit_split or split
    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, missing repo, bad split, offline mode: all the user's to fix
        raise _error(
            f"{source}: neither a local file nor a loadable hub dataset ({type(e).__name__}: {first_line(e)}); "
            "check the path, or the dataset name and split (hub access may be unavailable here)",
            key,
        ) from None
    return Records(rows=rows, source=source, line_numbers=None, hub_split=split, key=key)


def _to_dataset(rows: list[dict], source: str, key: str | None, lines: list[int] | None) -> datasets.Dataset:
    """Rows -> Dataset over the union of all rows' keys (absent keys become None).

    `Dataset.from_list` takes the columns from the first row only and silently drops the rest;
    building the column dict ourselves keeps every key and lets us name a row whose value has a
    different type than the rest of its column.
    """
    columns: dict[str, None] = {}
    for row in rows:
        for k in row:
            columns.setdefault(k, None)
    data = {k: [row.get(k) for row in rows] for k in columns}
    try:
        return datasets.Dataset.from_dict(data)
    except Exception as e:  # pyarrow.ArrowInvalid / ArrowTypeError on mixed types
        col, i = _first_mismatch(data)
        where = (f"{source}:{lines[i]}" if lines else f"{source} row {i + 1}") if i is not None else source
        what = f"column {col!r} changes type here" if col is not None else "columns have mixed types"
        raise _error(f"{where}: {what} ({first_line(e)}); give every row the same types", key) from None


def _first_mismatch(data: dict[str, list]) -> tuple[str | None, int | None]:
    """The first (column, row) whose JSON type differs from the column's first non-null value."""

    def kind(v: Any) -> str:
        # ints and floats share an Arrow column, so they are one kind here
        return "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__

    for col, values in data.items():
        first = next((kind(v) for v in values if v is not None), None)
        for i, v in enumerate(values):
            if v is not None and kind(v) != first:
                return col, i
    return None, None
