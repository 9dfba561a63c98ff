"""What `Registry.remove` may take away: an entry no other entry names as parent (unless forced), and with --purge
only its own run's folder, inside the registry's ``runs/`` and shared with no other entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rlhf.errors import UserError
from rlhf.store.entry import Entry
from rlhf.store.start_record import record_problem


@dataclass(frozen=True)
class Removal:
    """What `Registry.remove` takes away, checked by `Registry.plan_removal` before anything changes."""

    entry: Entry
    children: tuple[str, ...]
    """Ids of entries that name it as a parent; they keep naming it (shown as removed) when forced."""
    purge_dir: Path | None
    """The run folder that is deleted after the entry is gone; None unless purging."""


def plan_removal(entry: Entry, entries: Sequence[Entry], root: Path, *, force: bool = False, purge: bool = False) -> Removal:
    """What removing `entry` from the registry at `root` (whose published `entries` these are) would do; refuses
    (UserError) an entry that others name as parent unless `force`, and a purge of a run folder outside ``runs/``
    or shared with another entry."""
    others = [e for e in entries if e.id != entry.id]
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
        runs = (root / "runs").resolve()
        if purge_dir == runs or not purge_dir.is_relative_to(runs):
            raise UserError(
                f"cannot purge {entry.id}: its run folder {purge_dir} is not inside {runs}; "
                f"remove it without --purge and delete the folder yourself"
            )
        _check_own_run(entry, purge_dir, root.resolve())
        # PPO's critic entry lives in the PPO run's folder: deleting it would orphan the other.
        sharing = [e.id for e in others if _inside(e.run_dir, purge_dir) or _inside(e.path, purge_dir)]
        if sharing:
            raise UserError(
                f"cannot purge {entry.id}: its run folder {purge_dir} also holds "
                f"{', '.join(sharing)}; remove {'that' if len(sharing) == 1 else 'those'} first "
                f"(`rlhf registry rm ID`), or drop --purge"
            )
    return Removal(entry, children, purge_dir)


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

