"""The checkpoint registry: one JSON file per finished run, published atomically.

Layout under the root (``$RLHF_HOME`` or ``./rlhf_runs``)::

    entries/<id>.json          one file per published entry, never rewritten
    tags/<stage>/<tag>.json    the latest `tag`/`untag` of a tag (replaced whole by rename)
    removed/<id>.json          entries taken out by `Registry.remove` (moved here in one rename)
    runs/<id>/...              a run's artifacts (config, metrics, DeepSpeed checkpoints, HF folder)

There is no shared index and no locking (SQLite and fcntl locks are unsafe on NFS/Lustre): an
entry appears whole through a hard link (or a rename) of a fully written, fsynced temp file, and
ids carry a UTC time plus random hex so concurrent writers never collide. Readers list the
directory and skip dot-files and ``*.tmp``.

Tags are mutable, entries are not. A tag names at most one entry per stage (``sft:best`` and
``rm:best`` are different tags), like a W&B alias: each assignment has a time, and the newest wins.
The assignments are the tags an entry was published with (at its ``created`` time) and the tag
files that `tag`, `untag` and `remove` write (an untag names no entry). So a run published with
``run.tags=best`` takes ``best`` over from an earlier holder, `tag` moves it back, and a reader sees
the old or the new owner, never a half state. A tag whose newest assignment names an entry that no
longer exists names nothing.

This module is pure I/O on the standard library so that every stage and the CLI import it fast.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

from rlhf.errors import UserError
from rlhf.fileio import fsync_dir
from rlhf.start_record import record_problem

ADAPTER_KINDS = ("none", "merged", "adapter")
DATASET_FILES = {"bon": "train.jsonl", "samples": "samples.jsonl", "prefs": "train.jsonl"}
"""Stages whose entry is a dataset rather than a model, and the file their folder holds: best-of-N's SFT rows,
`rlhf sample`'s responses, `rlhf label`'s ranked lists."""

_STAGE_RE = re.compile(r"[a-z][a-z0-9_-]*")
# An entry id becomes a file name: no separators, no leading dot (readers skip dot-files).
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_REFERENCE_RE = re.compile(r"([a-z][a-z0-9_-]*):([^/]+)")
# The time part of an id made by `new_run_id`, used to order run folders.
_ID_TIME_RE = re.compile(r"-(\d{8}-\d{6})-[0-9a-f]+$")
# Tags given to `tag`: usable in `stage:tag` and as a file name.
_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# The time-and-hex core of a generated id (`new_run_id`, and companions such as `<id>-critic`).
_GENERATED_ID_CORE_RE = re.compile(r"(^|-)\d{8}-\d{6}-[0-9a-f]{8}(-|$)")
_LS_HINT = "run `rlhf registry ls` to see entries"


def default_root() -> Path:
    """``$RLHF_HOME`` if set, else ``rlhf_runs`` relative to the working directory."""
    return Path(os.environ.get("RLHF_HOME") or "rlhf_runs")


def now_iso() -> str:
    """The current UTC time as ISO-8601 with microseconds, the format of `Entry.created`."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def is_reference(text: str) -> bool:
    """True for ``stage:selector`` (e.g. ``sft:latest``); hub names and paths contain "/" and are not."""
    return _REFERENCE_RE.fullmatch(text) is not None


def is_entry_id(text: object) -> bool:
    """True for a usable entry or run id: a plain file name (no separator, no leading dot)."""
    return isinstance(text, str) and _ID_RE.fullmatch(text) is not None


def is_stage_name(text: object) -> bool:
    """True for a usable stage name: a lowercase word, also a folder name under ``tags/``."""
    return isinstance(text, str) and _STAGE_RE.fullmatch(text) is not None


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


def _check_name(kind: str, value: object) -> None:
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
        _check_name("id", d["id"])
        _check_name("stage", d["stage"])
        try:  # entries sort by it: a `created` that is not a time would order them by whatever it says
            datetime.fromisoformat(d["created"])
        except ValueError:
            raise ValueError(f"field 'created' is not an ISO time: {d['created'][:40]!r}") from None
        for kind, key in (("id", "parents"), ("tag", "tags")):
            for name in kwargs.get(key, ()):
                _check_name(kind, name)
            kwargs[key] = tuple(kwargs.get(key, ()))
        return cls(**kwargs)


# The JSON type each stored field must have (id and stage are checked by their naming rules).
_FIELD_TYPES = {
    "status": str, "created": str, "path": str, "run_dir": str, "config": dict, "parents": list,
    "base_model": str, "tokenizer": dict, "metrics": dict, "adapter": str, "tags": list,
}
_JSON_TYPE_NAMES = {str: "string", dict: "JSON object", list: "JSON list"}


class TagChange(NamedTuple):
    """What `Registry.tag` did to one tag."""

    tag: str
    entry: str
    """The id of the entry it names now."""
    previous: str | None
    """The entry it named before (`entry` itself when nothing changed), or None."""


@dataclass(frozen=True)
class Removal:
    """What `Registry.remove` takes away, checked by `Registry.plan_removal` before anything changes."""

    entry: Entry
    children: tuple[str, ...]
    """Ids of entries that name it as a parent; they keep naming it (shown as removed) when forced."""
    purge_dir: Path | None
    """The run folder that is deleted after the entry is gone; None unless purging."""


@dataclass(frozen=True)
class LineageNode:
    """One id in a lineage tree; `branches` are its parents (ancestry) or its children (descendants)."""

    id: str
    entry: Entry | None
    """None when no entry has this id (`state` says why)."""
    state: str = "ok"
    """"ok"; "missing": no entry has the id; "removed": taken out by `Registry.remove`; "cycle": it is
    already on the path above (a hand-edited parent list); "repeat": its branches appear earlier in
    the tree and are not drawn again."""
    branches: tuple[LineageNode, ...] = ()


@dataclass(frozen=True)
class FamilyTree:
    """An entry's ancestry (all parents, transitively) and descendants (entries that name it)."""

    entry: Entry
    ancestry: LineageNode
    descendants: LineageNode


class _Assignment(NamedTuple):
    when: str
    by_file: bool
    """A tag file (`tag`, `untag`, `remove`) beats a publish-time tag of the same instant."""
    entry_id: str
    """"" when the tag was taken off."""


class Registry:
    """Entries and run folders under one root; nothing is created until a run needs it."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._warned: set[str] = set()  # damaged entry files already named: once per command, not per read

    @property
    def _entries_dir(self) -> Path:
        return self.root / "entries"

    def new_run_id(self, stage: str) -> str:
        """A fresh id ``<stage>-<YYYYmmdd-HHMMSS UTC>-<8 hex>``: unique across hosts without locks."""
        if not _STAGE_RE.fullmatch(stage):
            raise ValueError(f"stage {stage!r} must be a lowercase word ([a-z][a-z0-9_-]*)")
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        return f"{stage}-{stamp}-{secrets.token_hex(4)}"

    def run_dir(self, run_id: str) -> Path:
        """The folder of a run's artifacts (not created here); refuses an id that is not a plain name."""
        if not is_entry_id(run_id):
            raise UserError(
                f"run id {run_id!r} is not a plain name: use letters, digits, '.', '_' or '-', not "
                f"starting with '.' (e.g. sft-20261123-120000-1a2b3c4d)"
            )
        return self.root / "runs" / run_id

    def entry_ids(self) -> set[str]:
        """Ids of the published entries, from the file names alone (no file is read)."""
        return {name[: -len(".json")] for name in _list_json(self._entries_dir)}

    def publish(self, entry: Entry) -> Entry:
        """Write `entry` atomically and return it as stored (``path``/``run_dir`` made absolute).

        Refuses an existing id and a ``path`` without a finished Hugging Face save, so no entry
        ever points at a half-written checkpoint: stages save first, then publish.
        """
        if not _ID_RE.fullmatch(entry.id):
            raise ValueError(f"entry id {entry.id!r} is not a valid file name")
        if not _STAGE_RE.fullmatch(entry.stage):
            raise ValueError(f"stage {entry.stage!r} must be a lowercase word")
        if entry.adapter not in ADAPTER_KINDS:
            raise ValueError(f"adapter {entry.adapter!r} must be one of {ADAPTER_KINDS}")
        # The rule `rlhf registry tag` applies: a publish-time tag is as much an assignment.
        try:
            check_tags(entry.tags, entry.stage, self.entry_ids() | {entry.id})
        except UserError as e:
            raise UserError(f"cannot publish {entry.id} with its tags (run.tags): {e}") from None
        entry = replace(entry, path=os.path.abspath(entry.path), run_dir=os.path.abspath(entry.run_dir))
        # A peft adapter folder holds adapter_config.json instead of the model's config.json; a
        # dataset stage's folder holds its data file.
        marker = DATASET_FILES.get(entry.stage) or ("adapter_config.json" if entry.adapter == "adapter" else "config.json")
        if not (Path(entry.path) / marker).is_file():
            raise UserError(
                f"cannot publish {entry.id}: {entry.path} has no {marker} (checkpoint missing or "
                f"half-written); finish save_pretrained into that folder before publishing"
            )
        final = self._entries_dir / f"{entry.id}.json"
        if final.exists():
            raise _duplicate(entry.id, final)
        # Serialize before touching the disk so an unserializable config leaves nothing behind.
        data = (json.dumps(entry.to_json(), indent=2) + "\n").encode()

        tmp = _durable_temp(self._entries_dir, entry.id, data)
        try:
            _link_or_rename(tmp, final, entry.id)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self._entries_dir)
        return entry

    def entries(self, stage: str | None = None) -> list[Entry]:
        """Published entries (of one stage if given), oldest first by ``created``, with their tags now."""
        stored = self._stored_entries()
        return [e for e in self._with_current_tags(stored) if stage is None or e.stage == stage]

    def get(self, entry_id: str) -> Entry:
        """The entry with exactly this id."""
        entry = None
        if _ID_RE.fullmatch(entry_id):
            entry = self._read(self._entries_dir / f"{entry_id}.json")
        if entry is None:
            raise UserError(f"no registry entry {entry_id!r} in {self.root} ({_LS_HINT})")
        owners = self._tag_owners(self._stored_entries())
        return _holding(entry, owners)

    def resolve(self, ref: str) -> Entry:
        """The entry a reference names.

        ``stage:latest`` is the newest completed entry of the stage; ``stage:<sel>`` is the entry
        whose id is ``sel`` or ``stage-sel``, else the one of the stage tagged ``sel``, else the
        one entry whose id starts with ``sel`` or ``stage-sel`` (an exact tag beats a fuzzy
        prefix). A bare id or tag works without the stage, a tag only while one stage has it.
        Paths are the caller's to check.
        """
        if is_reference(ref):
            stage, sel = ref.split(":", 1)
            candidates = self.entries(stage)
            if sel == "latest":
                done = [e for e in candidates if e.status == "completed"]
                if done:
                    return done[-1]
                raise UserError(
                    f"unknown registry reference {ref!r} in {self.root}: no completed {stage} entry "
                    f"yet (run `rlhf {stage}` to make one, or {_LS_HINT})"
                )
            ids = (sel, f"{stage}-{sel}")
            exact = [e for e in candidates if e.id in ids]
            if exact:
                return exact[0]
            tagged = [e for e in candidates if sel in e.tags]  # a tag names one entry per stage
            if tagged:
                return tagged[0]
            prefixed = [e for e in candidates if e.id.startswith(ids)]
            if len(prefixed) == 1:
                return prefixed[0]
            if prefixed:
                shown = ", ".join(e.id for e in prefixed[:5]) + (", ..." if len(prefixed) > 5 else "")
                raise UserError(
                    f"ambiguous registry reference {ref!r} in {self.root}: {len(prefixed)} {stage} "
                    f"entries match ({shown}); give more of the id"
                )
            what = f"no {stage} entry"
        else:
            candidates = self.entries()
            exact = [e for e in candidates if e.id == ref]
            if exact:
                return exact[0]
            tagged = [e for e in candidates if ref in e.tags]
            if len(tagged) == 1:
                return tagged[0]
            if tagged:
                shown = ", ".join(f"{e.stage}:{ref} = {e.id}" for e in tagged)
                raise UserError(
                    f"ambiguous registry reference {ref!r} in {self.root}: entries of {len(tagged)} "
                    f"stages carry that tag ({shown}); name the stage, e.g. {tagged[-1].stage}:{ref}"
                )
            what = "no entry"
        raise UserError(
            f"unknown registry reference {ref!r} in {self.root}: {what} with that id or tag ({_LS_HINT})"
        )

    # --- tags ---------------------------------------------------------------------------------

    def tag(self, ref: str, tags: Sequence[str]) -> list[TagChange]:
        """Point each tag (within the entry's stage) at the entry `ref` names, moving it from the
        entry that held it. Every name is checked before any tag is written; each write is atomic."""
        entry = self.resolve(ref)
        stored = self._stored_entries()
        ids = {e.id for e in stored}
        check_tags(tags, entry.stage, ids)
        newest = self._newest_assignments(stored)
        changes = []
        for tag in dict.fromkeys(tags):
            before = newest.get((entry.stage, tag))
            holder = before.entry_id if before and before.entry_id in ids else None
            if holder != entry.id:
                self._write_tag(entry.stage, tag, entry.id, not_before=before.when if before else "")
            changes.append(TagChange(tag, entry.id, holder))
        return changes

    def untag(self, ref: str, tags: Sequence[str]) -> Entry:
        """Take tags off the entry `ref` names (all or none: each must be on it); return the entry."""
        entry = self.resolve(ref)
        newest = self._newest_assignments(self._stored_entries())
        for tag in tags:
            if tag not in entry.tags:
                held = ", ".join(entry.tags) or "none"
                raise UserError(
                    f"{entry.id} has no tag {tag!r} (its tags: {held}); `rlhf registry ls` shows "
                    f"which entry holds a tag"
                )
        for tag in dict.fromkeys(tags):
            self._write_tag(entry.stage, tag, "", not_before=newest[(entry.stage, tag)].when)
        return entry

    def entry_holding(self, path: str | Path) -> Entry | None:
        """The entry whose folder holds `path` (a dataset entry's file given by its path), for lineage; None if none does."""
        target = Path(path).resolve()
        for entry in reversed(self.entries()):
            if target == Path(entry.path).resolve() or target.is_relative_to(Path(entry.path).resolve()):
                return entry
        return None

    def dataset_file(self, ref: str, *, key: str) -> Path:
        """The file of the dataset entry `ref` names (`prefs:latest` -> its folder's train.jsonl), or one line."""
        try:
            entry = self.resolve(ref)
        except UserError as error:
            raise UserError(f"{key}={ref}: {error}") from None
        if entry.stage not in DATASET_FILES:
            raise UserError(f"{key}={ref} is a {entry.stage} entry (a model), not a dataset; give a "
                            f"{', '.join(DATASET_FILES)} entry or a data file")
        return Path(entry.path) / DATASET_FILES[entry.stage]

    # --- removal ------------------------------------------------------------------------------

    def plan_removal(self, ref: str, *, force: bool = False, purge: bool = False) -> Removal:
        """What removing `ref` would do; refuses (UserError) an entry that others name as parent
        unless `force`, and a purge of a run folder outside ``runs/`` or shared with another entry."""
        entry = self.resolve(ref)
        others = [e for e in self.entries() if e.id != entry.id]
        children = tuple(e.id for e in others if entry.id in e.parents)
        if children and not force:
            raise UserError(
                f"cannot remove {entry.id}: {_count(children, 'entry names', 'entries name')} it as "
                f"parent ({', '.join(children)}); remove {'it' if len(children) == 1 else 'them'} "
                f"first, or pass --force to leave {'it' if len(children) == 1 else 'them'} with a "
                f"removed parent"
            )
        purge_dir = None
        if purge:
            purge_dir = Path(entry.run_dir).resolve()
            runs = (self.root / "runs").resolve()
            if purge_dir == runs or not purge_dir.is_relative_to(runs):
                raise UserError(
                    f"cannot purge {entry.id}: its run folder {purge_dir} is not inside {runs}; "
                    f"remove it without --purge and delete the folder yourself"
                )
            _check_own_run(entry, purge_dir, self.root.resolve())
            # PPO's critic entry lives in the PPO run's folder: deleting it would orphan the other.
            sharing = [e.id for e in others if _inside(e.run_dir, purge_dir) or _inside(e.path, purge_dir)]
            if sharing:
                raise UserError(
                    f"cannot purge {entry.id}: its run folder {purge_dir} also holds "
                    f"{', '.join(sharing)}; remove {'that' if len(sharing) == 1 else 'those'} first "
                    f"(`rlhf registry rm ID`), or drop --purge"
                )
        return Removal(entry, children, purge_dir)

    def remove(self, ref: str, *, force: bool = False, purge: bool = False) -> Removal:
        """Take the entry out of the registry in one rename (into ``removed/``, where moving the file
        back restores it), dropping its tags; with `purge`, delete its run folder afterwards.

        Checks as `plan_removal`. Give an id rather than ``stage:latest`` when confirming a plan
        first: another run may publish in between.
        """
        plan = self.plan_removal(ref, force=force, purge=purge)
        entry = plan.entry
        # Drop its tags before the file goes: once it is gone, its publish-time tags would no
        # longer count and an older entry published with the same tag would take them over.
        newest = self._newest_assignments(self._stored_entries())
        for tag in entry.tags:
            self._write_tag(entry.stage, tag, "", not_before=newest[(entry.stage, tag)].when)
        removed_dir = self.root / "removed"
        removed_dir.mkdir(parents=True, exist_ok=True)
        try:
            # One rename: readers see the entry or its absence, and `stage:latest` falls back.
            os.replace(self._entries_dir / f"{entry.id}.json", removed_dir / f"{entry.id}.json")
        except FileNotFoundError:
            raise UserError(f"registry entry {entry.id} was removed by someone else meanwhile") from None
        fsync_dir(self._entries_dir)
        fsync_dir(removed_dir)
        if plan.purge_dir is not None and plan.purge_dir.exists():
            try:
                shutil.rmtree(plan.purge_dir)
            except OSError as e:
                raise UserError(
                    f"removed {entry.id}, but could not delete its run folder {plan.purge_dir}: {e}; "
                    f"delete it by hand"
                ) from None
        return plan

    def removed_ids(self) -> set[str]:
        """Ids of entries taken out by `remove`."""
        return {name[: -len(".json")] for name in _list_json(self.root / "removed")}

    # --- lineage ------------------------------------------------------------------------------

    def lineage(self, ref: str) -> list[Entry]:
        """The entry, then its first parent, grandparent, ...; stops at a missing parent or a cycle."""
        by_id = {e.id: e for e in self.entries()}
        chain = [self.resolve(ref)]
        seen = {chain[0].id}
        while chain[-1].parents:
            parent = by_id.get(chain[-1].parents[0])
            if parent is None or parent.id in seen:
                break
            chain.append(parent)
            seen.add(parent.id)
        return chain

    def family_tree(self, ref: str) -> FamilyTree:
        """The entry's ancestors through all parents and its descendants (entries naming it as a
        parent, transitively), as trees; missing and removed ids and cycles become marked leaves."""
        entry = self.resolve(ref)
        entries = self.entries()
        by_id = {e.id: e for e in entries}
        children: dict[str, list[str]] = {}
        for e in entries:  # oldest first, so children are listed in the order they were made
            for parent in dict.fromkeys(e.parents):
                children.setdefault(parent, []).append(e.id)
        removed = self.removed_ids()

        def tree(branch_ids: Callable[[Entry], Iterable[str]]) -> LineageNode:
            expanded: set[str] = set()

            def grow(node_id: str, path: frozenset[str]) -> LineageNode:
                node = by_id.get(node_id)
                if node is None:
                    return LineageNode(node_id, None, "removed" if node_id in removed else "missing")
                if node_id in path:
                    return LineageNode(node_id, node, "cycle")
                branches = list(dict.fromkeys(branch_ids(node)))
                # A DAG (ppo <- rm <- sft and ppo <- sft) reaches a node twice: draw its subtree once.
                if node_id in expanded and branches:
                    return LineageNode(node_id, node, "repeat")
                expanded.add(node_id)
                return LineageNode(node_id, node, "ok", tuple(grow(b, path | {node_id}) for b in branches))

            return grow(entry.id, frozenset())

        return FamilyTree(entry, tree(lambda e: e.parents), tree(lambda e: children.get(e.id, ())))

    def incomplete_runs(self, stage: str | None = None) -> list[Path]:
        """Run folders with no published entry (killed runs that can resume), newest first.

        Folders of removed entries are finished runs, not resumable ones, and are left out."""
        try:
            names = os.listdir(self.root / "runs")
        except FileNotFoundError:
            return []
        finished = {e.id for e in self._stored_entries()} | self.removed_ids()
        runs = [
            self.run_dir(name)
            for name in names
            if is_entry_id(name)  # also skips dot-folders
            and name not in finished
            and (stage is None or name.startswith(f"{stage}-"))
            and self.run_dir(name).is_dir()
        ]

        def newest_key(p: Path) -> tuple[str, float]:
            # The id's own UTC time orders runs across hosts; mtime breaks ties within a second.
            m = _ID_TIME_RE.search(p.name)
            return (m.group(1) if m else "", p.stat().st_mtime)

        return sorted(runs, key=newest_key, reverse=True)

    # --- storage ------------------------------------------------------------------------------

    def _stored_entries(self) -> list[Entry]:
        """Entries as their files hold them (publish-time tags), oldest first. A damaged file is
        skipped with a warning: one bad file (or a planted one) must not stop every registry command."""
        found = []
        for name in _list_json(self._entries_dir):
            try:
                found.append(self._read(self._entries_dir / name))
            except UserError as exc:
                if name not in self._warned:
                    self._warned.add(name)
                    _warn(f"{exc}; skipped")
        return sorted((e for e in found if e is not None), key=lambda e: (e.created, e.id))

    def _read(self, file: Path) -> Entry | None:
        """The entry in `file`, None if it does not exist; a corrupt file is the user's to fix."""
        try:
            entry = Entry.from_json(json.loads(file.read_text(encoding="utf-8")))
            if entry.id != file.stem:  # `remove` and `get` find an entry by its id's file name
                raise ValueError(f"its id {entry.id!r} is not its file name")
        except FileNotFoundError:
            return None  # removed between listing and reading
        # JSONDecodeError and UnicodeDecodeError are ValueErrors; a folder named *.json is an
        # OSError; JSON nested thousands deep is a RecursionError.
        except (ValueError, TypeError, OSError, RecursionError) as e:
            said = "nested too deep" if isinstance(e, RecursionError) else (e.strerror if isinstance(e, OSError) else str(e))
            raise UserError(f"corrupt registry entry {file}: {said}; fix the JSON or remove the file") from None
        return entry

    def _newest_assignments(self, stored: list[Entry]) -> dict[tuple[str, str], _Assignment]:
        """The newest assignment of each (stage, tag): publish-time tags and tag files."""
        newest: dict[tuple[str, str], _Assignment] = {}

        def offer(key: tuple[str, str], assignment: _Assignment) -> None:
            if key not in newest or assignment > newest[key]:
                newest[key] = assignment

        for e in stored:
            for tag in e.tags:
                offer((e.stage, tag), _Assignment(e.created, False, e.id))
        for stage_dir in _list_dirs(self.root / "tags"):
            for name in _list_json(stage_dir):
                found = _read_tag_file(stage_dir / name)
                if found is not None:
                    offer(*found)
        return newest

    def _tag_owners(self, stored: list[Entry]) -> dict[tuple[str, str], str]:
        """(stage, tag) -> the id of the entry it names now."""
        ids = {e.id for e in stored}
        return {key: a.entry_id for key, a in self._newest_assignments(stored).items() if a.entry_id in ids}

    def _with_current_tags(self, stored: list[Entry]) -> list[Entry]:
        owners = self._tag_owners(stored)
        return [_holding(e, owners) for e in stored]

    def _write_tag(self, stage: str, tag: str, entry_id: str, *, not_before: str) -> None:
        """Replace the tag's file in one rename; `entry_id` "" takes the tag off.

        Its time is at least `not_before`, the newest assignment it overrides, so a host whose
        clock is behind the one that published still moves the tag.
        """
        # Callers pass names read through the same checks; a bad one here is a bug, not a path.
        _check_name("stage", stage)
        _check_name("tag", tag)
        if entry_id:
            _check_name("id", entry_id)
        folder = self.root / "tags" / stage
        name = quote(tag, safe="")
        name = "%2E" + name[1:] if name.startswith(".") else name  # never a dot-file readers skip
        record = {"stage": stage, "tag": tag, "entry": entry_id or None, "tagged": max(now_iso(), not_before)}
        tmp = _durable_temp(folder, name, (json.dumps(record, indent=2) + "\n").encode())
        try:
            os.replace(tmp, folder / f"{name}.json")  # atomic, also over an existing file
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(folder)


def _read_tag_file(file: Path) -> tuple[tuple[str, str], _Assignment] | None:
    """The (stage, tag) a tag file assigns and the assignment; None if it vanished meanwhile."""
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        d = json.loads(text)
        stage, tag, entry_id, when = d["stage"], d["tag"], d["entry"] or "", d["tagged"]
        _check_name("stage", stage)
        _check_name("tag", tag)
        if entry_id:
            _check_name("id", entry_id)
        if not isinstance(when, str):
            raise ValueError(f"field 'tagged' must be a string, not {type(when).__name__}")
    except (ValueError, TypeError, KeyError) as e:
        said = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise UserError(f"corrupt registry tag file {file}: {said}; remove the file and tag again") from None
    return (stage, tag), _Assignment(when, True, entry_id)


def _holding(entry: Entry, owners: dict[tuple[str, str], str]) -> Entry:
    """`entry` with the tags it holds now: its publish-time ones still held, then the others by name."""
    held = [t for t in entry.tags if owners.get((entry.stage, t)) == entry.id]
    later = sorted(t for (stage, t), owner in owners.items() if owner == entry.id and stage == entry.stage)
    return replace(entry, tags=tuple(dict.fromkeys(held + later)))


def _check_own_run(entry: Entry, run_dir: Path, root: Path) -> None:
    """Purge only the folder of the run that made `entry` (its id, or its `<id>-critic` companion), as its
    start record sealed by this user says: an entry crafted to point at another run's folder deletes nothing."""
    problem = record_problem(run_dir, stage=None, registry=root)
    if problem is None and entry.id not in (run_dir.name, f"{run_dir.name}-critic"):
        problem = f"was not started for {entry.id}"
    if problem:
        raise UserError(f"cannot purge {entry.id}: run {run_dir.name} {problem}; remove the entry without --purge "
                        "and delete the folder yourself if it is yours")


def _count(items: Sequence[str], one: str, many: str) -> str:
    return f"1 {one}" if len(items) == 1 else f"{len(items)} {many}"


def _inside(path: str, folder: Path) -> bool:
    resolved = Path(path).resolve()
    return resolved == folder or resolved.is_relative_to(folder)


def _warn(message: str) -> None:
    """One line on stderr, as rlhf.tracking.print_warning writes it, without importing rich here."""
    sys.stderr.write(f"warning: {message}\n")


def _list_json(directory: Path) -> list[str]:
    """Names of the ``*.json`` files in `directory`, skipping dot-files (temp files of a write in
    progress); none if it does not exist."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise UserError(not_a_folder(directory, "the registry (RLHF_HOME or --root)")) from None
    return [n for n in names if not n.startswith(".") and n.endswith(".json")]


def not_a_folder(path: Path, what: str) -> str:
    """The one line for a folder path that passes through a file: which file, and what must be a folder."""
    blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
    return f"{blocking} is a file, not a folder: {what} must name a folder"


def _list_dirs(directory: Path) -> list[Path]:
    try:
        return [directory / n for n in os.listdir(directory) if not n.startswith(".") and (directory / n).is_dir()]
    except FileNotFoundError:
        return []


def _durable_temp(folder: Path, stem: str, data: bytes) -> Path:
    """`data` in a new, fsynced dot-file of `folder` (readers skip it), to be linked or renamed in."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _duplicate(entry_id: str, final: Path) -> UserError:
    return UserError(
        f"registry entry {entry_id} already exists ({final}); a run publishes once, so start a "
        f"new run with a fresh id (Registry.new_run_id) instead of publishing this id again"
    )


def _link_or_rename(tmp: Path, final: Path, entry_id: str) -> None:
    """Make `tmp` appear as `final` in one step, never replacing an existing entry.

    A hard link fails if `final` exists, even across NFS clients, which makes it the
    no-overwrite primitive; filesystems without hard links fall back to rename, where the
    random part of the id is what keeps writers apart.
    """
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise _duplicate(entry_id, final) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        if final.exists():
            raise _duplicate(entry_id, final) from None
        os.rename(tmp, final)
