"""The registry's files on disk: listing a folder as readers see it, writing a file whole (an fsynced dot-file linked or
renamed in), and reading a tag file back. No shared index, no locks (see rlhf.store.registry).
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import sys
from pathlib import Path
from typing import NamedTuple

from rlhf.errors import UserError
from rlhf.store.entry import check_name


class TagAssignment(NamedTuple):
    when: str
    by_file: bool
    """A tag file (`tag`, `untag`, `remove`) beats a publish-time tag of the same instant."""
    entry_id: str
    """"" when the tag was taken off."""


def read_tag_file(file: Path) -> tuple[tuple[str, str], TagAssignment] | None:
    """The (stage, tag) a tag file assigns and the assignment; None if it vanished meanwhile."""
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        d = json.loads(text)
        stage, tag, entry_id, when = d["stage"], d["tag"], d["entry"] or "", d["tagged"]
        check_name("stage", stage)
        check_name("tag", tag)
        if entry_id:
            check_name("id", entry_id)
        if not isinstance(when, str):
            raise ValueError(f"field 'tagged' must be a string, not {type(when).__name__}")
    except (ValueError, TypeError, KeyError) as e:
        said = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise UserError(f"corrupt registry tag file {file}: {said}; remove the file and tag again") from None
    return (stage, tag), TagAssignment(when, True, entry_id)


def warn(message: str) -> None:
    """One line on stderr, as rlhf.training.tracking.print_warning writes it, without importing rich here."""
    sys.stderr.write(f"warning: {message}\n")


def list_json(directory: Path) -> list[str]:
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


def list_dirs(directory: Path) -> list[Path]:
    try:
        return [directory / n for n in os.listdir(directory) if not n.startswith(".") and (directory / n).is_dir()]
    except FileNotFoundError:
        return []


def durable_temp(folder: Path, stem: str, data: bytes) -> Path:
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


def duplicate_entry(entry_id: str, final: Path) -> UserError:
    return UserError(
        f"registry entry {entry_id} already exists ({final}); a run publishes once, so start a "
        f"new run with a fresh id (Registry.new_run_id) instead of publishing this id again"
    )


def link_or_rename(tmp: Path, final: Path, entry_id: str) -> None:
    """Make `tmp` appear as `final` in one step, never replacing an existing entry.

    A hard link fails if `final` exists, even across NFS clients, which makes it the
    no-overwrite primitive; filesystems without hard links fall back to rename, where the
    random part of the id is what keeps writers apart.
    """
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise duplicate_entry(entry_id, final) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        if final.exists():
            raise duplicate_entry(entry_id, final) from None
        os.rename(tmp, final)
