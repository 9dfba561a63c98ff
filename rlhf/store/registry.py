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

This module is pure I/O on the standard library so that every stage and the CLI import it fast. Its parts:
`rlhf.store.entry` (`Entry` and the naming rules), `rlhf.store.files` (listing, durable writes, tag
files), `rlhf.store.lineage` (parents and descendants), `rlhf.store.removal` (what `remove` may take).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

from rlhf.errors import UserError
from rlhf.store.entry import (
    ADAPTER_KINDS,
    DATASET_FILES,
    ID_RE,
    STAGE_RE,
    Entry,
    check_name,
    check_tags,
    is_entry_id,
    is_reference,
    now_iso,
)
from rlhf.store.fileio import fsync_dir
from rlhf.store.files import TagAssignment, duplicate_entry, durable_temp, link_or_rename, list_dirs, list_json, read_tag_file, warn
from rlhf.store.lineage import FamilyTree, family_tree, first_parents
from rlhf.store.removal import Removal, plan_removal

# The time part of an id made by `new_run_id`, used to order run folders.
_ID_TIME_RE = re.compile(r"-(\d{8}-\d{6})-[0-9a-f]+$")
_LS_HINT = "run `rlhf registry ls` to see entries"


def default_root() -> Path:
    """``$RLHF_HOME`` if set, else ``rlhf_runs`` relative to the working directory."""
    return Path(os.environ.get("RLHF_HOME") or "rlhf_runs")


class TagChange(NamedTuple):
    """What `Registry.tag` did to one tag."""

    tag: str
    entry: str
    """The id of the entry it names now."""
    previous: str | None
    """The entry it named before (`entry` itself when nothing changed), or None."""



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
        if not STAGE_RE.fullmatch(stage):
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
        return {name[: -len(".json")] for name in list_json(self._entries_dir)}

    def publish(self, entry: Entry) -> Entry:
        """Write `entry` atomically and return it as stored (``path``/``run_dir`` made absolute).

        Refuses an existing id and a ``path`` without a finished Hugging Face save, so no entry
        ever points at a half-written checkpoint: stages save first, then publish.
        """
        if not ID_RE.fullmatch(entry.id):
            raise ValueError(f"entry id {entry.id!r} is not a valid file name")
        if not STAGE_RE.fullmatch(entry.stage):
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
            raise duplicate_entry(entry.id, final)
        # Serialize before touching the disk so an unserializable config leaves nothing behind.
        data = (json.dumps(entry.to_json(), indent=2) + "\n").encode()

        tmp = durable_temp(self._entries_dir, entry.id, data)
        try:
            link_or_rename(tmp, final, entry.id)
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
        if ID_RE.fullmatch(entry_id):
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
        return plan_removal(entry, self.entries(), self.root, force=force, purge=purge)

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
        return {name[: -len(".json")] for name in list_json(self.root / "removed")}

    # --- lineage ------------------------------------------------------------------------------

    def lineage(self, ref: str) -> list[Entry]:
        """The entry, then its first parent, grandparent, ...; stops at a missing parent or a cycle."""
        entries = self.entries()
        return first_parents(self.resolve(ref), entries)

    def family_tree(self, ref: str) -> FamilyTree:
        """The entry's ancestors through all parents and its descendants (entries naming it as a
        parent, transitively), as trees; missing and removed ids and cycles become marked leaves."""
        entry = self.resolve(ref)
        return family_tree(entry, self.entries(), self.removed_ids())

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
        for name in list_json(self._entries_dir):
            try:
                found.append(self._read(self._entries_dir / name))
            except UserError as exc:
                if name not in self._warned:
                    self._warned.add(name)
                    warn(f"{exc}; skipped")
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

    def _newest_assignments(self, stored: list[Entry]) -> dict[tuple[str, str], TagAssignment]:
        """The newest assignment of each (stage, tag): publish-time tags and tag files."""
        newest: dict[tuple[str, str], TagAssignment] = {}

        def offer(key: tuple[str, str], assignment: TagAssignment) -> None:
            if key not in newest or assignment > newest[key]:
                newest[key] = assignment

        for e in stored:
            for tag in e.tags:
                offer((e.stage, tag), TagAssignment(e.created, False, e.id))
        for stage_dir in list_dirs(self.root / "tags"):
            for name in list_json(stage_dir):
                found = read_tag_file(stage_dir / name)
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
        check_name("stage", stage)
        check_name("tag", tag)
        if entry_id:
            check_name("id", entry_id)
        folder = self.root / "tags" / stage
        name = quote(tag, safe="")
        name = "%2E" + name[1:] if name.startswith(".") else name  # never a dot-file readers skip
        record = {"stage": stage, "tag": tag, "entry": entry_id or None, "tagged": max(now_iso(), not_before)}
        tmp = durable_temp(folder, name, (json.dumps(record, indent=2) + "\n").encode())
        try:
            os.replace(tmp, folder / f"{name}.json")  # atomic, also over an existing file
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(folder)


def _holding(entry: Entry, owners: dict[tuple[str, str], str]) -> Entry:
    """`entry` with the tags it holds now: its publish-time ones still held, then the others by name."""
    held = [t for t in entry.tags if owners.get((entry.stage, t)) == entry.id]
    later = sorted(t for (stage, t), owner in owners.items() if owner == entry.id and stage == entry.stage)
    return replace(entry, tags=tuple(dict.fromkeys(held + later)))

