"""A registry entry (`Entry`, one finished run as ``entries/<id>.json`` holds it), read back as data, never trusted;
and the naming rules of ids, stages, tags and ``stage:selector`` references that every file name and reference obeys.

Pure standard library (see rlhf.store.registry).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone

from rlhf.errors import UserError

ADAPTER_KINDS = ("none", "merged", "adapter")
DATASET_FILES = {"bon": "train.jsonl", "samples": "samples.jsonl", "prefs": "train.jsonl"}
"""Stages whose entry is a dataset rather than a model, and the file their folder holds: best-of-N's SFT rows,
`rlhf sample`'s responses, `rlhf label`'s ranked lists."""

STAGE_RE = re.compile(r"[a-z][a-z0-9_-]*")
# An entry id becomes a file name: no separators, no leading dot (readers skip dot-files).
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_REFERENCE_RE = re.compile(r"([a-z][a-z0-9_-]*):([^/]+)")
# Tags given to `tag`: usable in `stage:tag` and as a file name.
_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# The time-and-hex core of a generated id (`new_run_id`, and companions such as `<id>-critic`).
_GENERATED_ID_CORE_RE = re.compile(r"(^|-)\d{8}-\d{6}-[0-9a-f]{8}(-|$)")


def now_iso() -> str:
    """The current UTC time as ISO-8601 with microseconds, the format of `Entry.created`."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def is_reference(text: str) -> bool:
    """True for ``stage:selector`` (e.g. ``sft:latest``); hub names and paths contain "/" and are not."""
    return _REFERENCE_RE.fullmatch(text) is not None


def is_entry_id(text: object) -> bool:
    """True for a usable entry or run id: a plain file name (no separator, no leading dot)."""
    return isinstance(text, str) and ID_RE.fullmatch(text) is not None


def is_stage_name(text: object) -> bool:
    """True for a usable stage name: a lowercase word, also a folder name under ``tags/``."""
    return isinstance(text, str) and STAGE_RE.fullmatch(text) is not None


def check_tags(tags: Iterable[str], stage: str, ids: Collection[str] = ()) -> None:
    """Refuse (UserError) a tag that `stage:tag` could not name, or that an id would shadow.

    What `Registry.tag` and `Registry.publish` apply; call it on ``run.tags`` before a run starts,
    since the run publishes (and would only then be refused) at its very end. `ids` are the
    existing entry ids (`Registry.entry_ids`); a tag shaped like a generated id is refused anyway.
    """
    for tag in [tags] if isinstance(tags, str) else tags:
        problem = _tag_name_problem(tag)
        # References try ids before tags, so such a tag would be shadowed now or by a later run.
        if problem is None and (tag in ids or f"{stage}-{tag}" in ids or _GENERATED_ID_CORE_RE.search(tag)):
            problem = "it looks like an entry id; choose another name"
        if problem:
            raise UserError(f"invalid tag {tag!r}: {problem}")


def _tag_name_problem(tag: object) -> str | None:
    """Why `tag` cannot be a tag (None if it can), whoever wrote it: it becomes a file name and a reference."""
    if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag):
        return "use up to 100 letters, digits, '.', '_' or '-', starting with a letter or digit"
    if tag == "latest":
        return "`stage:latest` always means the newest entry; choose another name"
    return None


def check_name(kind: str, value: object) -> None:
    """ValueError unless `value` is a valid `kind` ("id", "stage", "tag"): names read from files
    become paths and references, so a hand-edited or planted one is refused, never used."""
    if kind == "tag":
        problem = _tag_name_problem(value)
    else:
        valid, rule = {"id": (is_entry_id, "letters, digits, '.', '_', '-'; not starting with '.'"),
                       "stage": (is_stage_name, "a lowercase word, [a-z][a-z0-9_-]*")}[kind]
        problem = None if valid(value) else f"must be a plain name ({rule})"
    if problem:
        raise ValueError(f"invalid {kind} {value!r}: {problem}")


@dataclass(frozen=True)
class Entry:
    """One finished run, as stored in ``entries/<id>.json``."""

    id: str
    """Unique id, e.g. ``sft-20261123-004512-a1b2c3d4`` (stage, UTC time, random hex)."""
    stage: str
    """The stage that produced it: "sft", "rm", "ppo" (any lowercase word)."""
    status: str
    """"completed" for every published entry."""
    created: str
    """ISO-8601 UTC timestamp with microseconds (see `now_iso`); entries are ordered by it."""
    path: str
    """Absolute path of the Hugging Face ``save_pretrained`` folder."""
    run_dir: str
    """Absolute path of the run folder (config, metrics, checkpoints)."""
    config: dict
    """The resolved config the run used."""
    parents: tuple[str, ...] = ()
    """Ids of the entries this run started from (first = the one it was initialized from)."""
    base_model: str = ""
    """Identity of the base model: hub name, path, or toy id."""
    tokenizer: dict = field(default_factory=dict)
    """Tokenizer identity, e.g. ``{"name": ..., "fingerprint": ...}``."""
    metrics: dict = field(default_factory=dict)
    """Summary metrics of the run."""
    adapter: str = "none"
    """How LoRA weights are stored: "none", "merged" into the weights, or a peft "adapter"."""
    tags: tuple[str, ...] = ()
    """Labels that are also references (``best`` or ``sft:best``). The file keeps the tags given at
    publish; `Registry` readers return the tags the entry holds now (see the module docstring)."""

    def to_json(self) -> dict:
        """A JSON-ready dict (tuples become lists)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["parents"] = list(self.parents)
        out["tags"] = list(self.tags)
        return out

    @classmethod
    def from_json(cls, d: dict) -> Entry:
        """The inverse of `to_json`; unknown keys are ignored so newer files stay readable.

        A file is data, not trusted code: a field of the wrong type, or an id, stage, parent or tag
        that breaks its naming rule (say a stage of "../x", later a path) is a ValueError.
        """
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        required = ("id", "stage", "status", "created", "path", "run_dir", "config")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"missing field(s) {', '.join(missing)}")
        kwargs = {k: v for k, v in d.items() if k in names}
        for key, value in kwargs.items():
            kind = _FIELD_TYPES.get(key)
            if kind is not None and not isinstance(value, kind):
                raise ValueError(f"field {key!r} must be a {_JSON_TYPE_NAMES[kind]}, not {type(value).__name__}")
        check_name("id", d["id"])
        check_name("stage", d["stage"])
        try:  # entries sort by it: a `created` that is not a time would order them by whatever it says
            datetime.fromisoformat(d["created"])
        except ValueError:
            raise ValueError(f"field 'created' is not an ISO time: {d['created'][:40]!r}") from None
        for what, key in (("id", "parents"), ("tag", "tags")):
            for name in kwargs.get(key, ()):
                check_name(what, name)
            kwargs[key] = tuple(kwargs.get(key, ()))
        return cls(**kwargs)


# The JSON type each stored field must have (id and stage are checked by their naming rules).
_FIELD_TYPES = {
    "status": str, "created": str, "path": str, "run_dir": str, "config": dict, "parents": list,
    "base_model": str, "tokenizer": dict, "metrics": dict, "adapter": str, "tags": list,
}
_JSON_TYPE_NAMES = {str: "string", dict: "JSON object", list: "JSON list"}
