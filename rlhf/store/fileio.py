"""Writing files so that a reader, or a crash mid-write, never sees half of one."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to a hidden temp file beside `path`, fsync it, then rename it over `path`.

    A rename within one folder is atomic on POSIX filesystems, NFS and Lustre included; the pid in
    the temp name keeps two writers (two ranks, two runs) from sharing one temp file.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def fsync_dir(directory: Path) -> None:
    """Persist a new file's directory entry; some OSes and filesystems cannot open or fsync a folder."""
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
