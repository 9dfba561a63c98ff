"""The checkpoint registry: one JSON file per finished run, published atomically.

Layout under the root (``$RLHF_HOME`` or ``./rlhf_runs``)::

    entries/<id>.json   one file per published entry, never rewritten
    runs/<id>/...       a run's artifacts (config, metrics, DeepSpeed checkpoints, HF folder)

There is no shared index and no locking (SQLite and fcntl locks are unsafe on NFS/Lustre): an
entry appears whole through a hard link (or a rename) of a fully written, fsynced temp file, and
ids carry a UTC time plus random hex so concurrent writers never collide. Readers list the
directory and skip dot-files and ``*.tmp``.

This module is pure I/O on the standard library so that every stage and the CLI import it fast.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path

from rlhf.errors import UserError

ADAPTER_KINDS = ("none", "merged", "adapter")

_STAGE_RE = re.compile(r"[a-z][a-z0-9_-]*")
# An entry id becomes a file name: no separators, no leading dot (readers skip dot-files).
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_REFERENCE_RE = re.compile(r"([a-z][a-z0-9_-]*):([^/]+)")
# The time part of an id made by `new_run_id`, used to order run folders.
_ID_TIME_RE = re.compile(r"-(\d{8}-\d{6})-[0-9a-f]+$")
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
    """Free-form labels; a tag is also a reference (``best`` or ``sft:best``)."""

    def to_json(self) -> dict:
        """A JSON-ready dict (tuples become lists)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["parents"] = list(self.parents)
        out["tags"] = list(self.tags)
        return out

    @classmethod
    def from_json(cls, d: dict) -> Entry:
        """The inverse of `to_json`; unknown keys are ignored so newer files stay readable."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        required = ("id", "stage", "status", "created", "path", "run_dir", "config")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"missing field(s) {', '.join(missing)}")
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["parents"] = tuple(d.get("parents", ()))
        kwargs["tags"] = tuple(d.get("tags", ()))
        return cls(**kwargs)


class Registry:
    """Entries and run folders under one root; nothing is created until a run needs it."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

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
        """The folder of a run's artifacts (not created here)."""
        return self.root / "runs" / run_id

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
        entry = replace(entry, path=os.path.abspath(entry.path), run_dir=os.path.abspath(entry.run_dir))
        # A peft adapter folder holds adapter_config.json instead of the model's config.json.
        marker = "adapter_config.json" if entry.adapter == "adapter" else "config.json"
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

        self._entries_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._entries_dir / f".{entry.id}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            _link_or_rename(tmp, final, entry.id)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self._entries_dir)
        return entry

    def entries(self, stage: str | None = None) -> list[Entry]:
        """Published entries (of one stage if given), oldest first by ``created``."""
        try:
            names = os.listdir(self._entries_dir)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            if name.startswith(".") or not name.endswith(".json"):
                continue  # temp files of a publish in progress, or stray files
            entry = self._read(self._entries_dir / name)
            if entry is not None and (stage is None or entry.stage == stage):
                found.append(entry)
        return sorted(found, key=lambda e: (e.created, e.id))

    def get(self, entry_id: str) -> Entry:
        """The entry with exactly this id."""
        entry = None
        if _ID_RE.fullmatch(entry_id):
            entry = self._read(self._entries_dir / f"{entry_id}.json")
        if entry is None:
            raise UserError(f"no registry entry {entry_id!r} in {self.root} ({_LS_HINT})")
        return entry

    def resolve(self, ref: str) -> Entry:
        """The entry a reference names.

        ``stage:latest`` is the newest completed entry of the stage; ``stage:<sel>`` is the entry
        whose id is ``sel`` or ``stage-sel``, else the newest of the stage tagged ``sel``, else the
        one entry whose id starts with ``sel`` or ``stage-sel`` (an exact tag beats a fuzzy
        prefix). A bare id or tag works without the stage. Paths are the caller's to check.
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
            tagged = [e for e in candidates if sel in e.tags]
            if tagged:
                return tagged[-1]
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
            if tagged:
                return tagged[-1]
            what = "no entry"
        raise UserError(
            f"unknown registry reference {ref!r} in {self.root}: {what} with that id or tag ({_LS_HINT})"
        )

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

    def incomplete_runs(self, stage: str | None = None) -> list[Path]:
        """Run folders with no published entry (killed runs that can resume), newest first."""
        try:
            names = os.listdir(self.root / "runs")
        except FileNotFoundError:
            return []
        published = {e.id for e in self.entries()}
        runs = [
            self.run_dir(name)
            for name in names
            if not name.startswith(".")
            and name not in published
            and (stage is None or name.startswith(f"{stage}-"))
            and self.run_dir(name).is_dir()
        ]

        def newest_key(p: Path) -> tuple[str, float]:
            # The id's own UTC time orders runs across hosts; mtime breaks ties within a second.
            m = _ID_TIME_RE.search(p.name)
            return (m.group(1) if m else "", p.stat().st_mtime)

        return sorted(runs, key=newest_key, reverse=True)

    def _read(self, file: Path) -> Entry | None:
        """The entry in `file`, None if it does not exist; a corrupt file is the user's to fix."""
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            return Entry.from_json(json.loads(text))
        except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise UserError(
                f"corrupt registry entry {file}: {e}; fix the JSON or remove the file"
            ) from None


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


def _fsync_dir(directory: Path) -> None:
    """Persist the new directory entry; some OSes and filesystems cannot open or fsync a folder."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
