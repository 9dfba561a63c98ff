"""The start record: what a run was started with, sealed with its owner's key, so a resume continues
that run and nothing else.

A shared registry is writable by others, so a run folder's files prove nothing by themselves. At
start `start_record.json` records the run's id, stage, registry, resolved config and a digest of each model
source (the registry entry it resolved to and its folder's content, a folder's content, a `.gguf`
file's SHA-256), sealed with an HMAC under a key kept outside the registry: `$RLHF_SEAL_KEY`, else
`$XDG_CONFIG_HOME/rlhf/seal.key` (default `~/.config/rlhf/seal.key`), made on first use, 0600,
owned by the user. Only its owner can write a record that verifies, so a planted or edited run
folder, a config edited after the start, or a model source that changed stops a resume in one line.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Callable

from rlhf.errors import UserError
from rlhf.store.fileio import atomic_write_text

KEY_ENV = "RLHF_SEAL_KEY"
START_FILE = "start_record.json"
_VERSION = 1
_KEY_HEX_LEN = 64


def key_file() -> Path:
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "rlhf" / "seal.key"


def _read_key(path: Path) -> bytes:
    """The key, if only its owner (this user) can read or replace it: a key others could read or swap forges records."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO) or not stat.S_ISREG(info.st_mode):
            raise UserError(f"the seal key {path} must be a file of yours that only you can read (chmod 600 {path}); "
                            f"run records sealed with a key others can read or replace prove nothing")
        text = fh.read(_KEY_HEX_LEN + 2).decode("ascii", "replace").strip()
    if len(text) != _KEY_HEX_LEN or any(c not in "0123456789abcdef" for c in text):
        raise UserError(f"the seal key {path} is damaged; runs it sealed cannot be resumed: move it away and start new runs")
    return bytes.fromhex(text)


def load_key(*, create: bool) -> bytes | None:
    """This user's seal key; made on first use when `create` (None when absent and not `create`)."""
    path = key_file()
    try:
        return _read_key(path)
    except FileNotFoundError:
        if not create:
            return None
    except OSError as exc:
        raise UserError(f"cannot read the seal key {path}: {exc.strerror or exc}; set {KEY_ENV} to a file of yours") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(_KEY_HEX_LEN // 2) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except FileExistsError:
        pass  # another process made it first: use theirs
    except OSError as exc:
        raise UserError(f"cannot create the seal key {path}: {exc.strerror or exc}; set {KEY_ENV} to a file you can write") from None
    return _read_key(path)


def _canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _seal(key: bytes, payload: dict[str, Any]) -> str:
    return hmac.new(key, _canonical(payload), hashlib.sha256).hexdigest()


def write_start_record(run_dir: Path, *, run_id: str, stage: str, registry: Path, config: dict[str, Any],
                       sources: dict[str, str]) -> None:
    payload = {"version": _VERSION, "run_id": run_id, "stage": stage, "registry": str(registry),
               "config": config, "sources": sources}
    key = load_key(create=True)
    assert key is not None
    atomic_write_text(run_dir / START_FILE, json.dumps({**payload, "seal": _seal(key, payload)}, indent=1))


def record_problem(run_dir: Path, *, stage: str | None, registry: Path) -> str | None:
    """Why `run_dir`'s start record does not show a run (of `stage`, unless None) started in
    `registry` by this user (None: it does); the reason reads after "run <id> ..."."""
    try:
        data = json.loads((run_dir / START_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"has no start record ({START_FILE}): rlhf did not start it here (or a version before start records did)"
    except (OSError, ValueError):
        return f"has a damaged start record ({START_FILE})"
    key = load_key(create=False)
    seal = data.pop("seal", None) if isinstance(data, dict) else None
    if key is None or not isinstance(seal, str) or not hmac.compare_digest(seal, _seal(key, data)):
        return (f"has a start record ({START_FILE}) that your seal key ({key_file()}) did not seal: "
                "another user started it, or the record was edited")
    if data.get("version") != _VERSION or data.get("run_id") != run_dir.name or stage not in (None, data.get("stage")):
        return f"has a start record for another run ({data.get('stage')} run {data.get('run_id')})"
    if data.get("registry") != str(registry):
        return f"was started in the registry {data.get('registry')}, not in {registry}"
    return None


def verified_record(run_dir: Path, *, stage: str, registry: Path) -> dict[str, Any]:
    """The start record, sealed by this user's key; one line (UserError) when it is not."""
    problem = record_problem(run_dir, stage=stage, registry=registry)
    if problem:
        raise UserError(f"run {run_dir.name} {problem}; it cannot be resumed: start a new run")
    return json.loads((run_dir / START_FILE).read_text(encoding="utf-8"))


def check_same_config(run_dir: Path, record: dict[str, Any], config: dict[str, Any]) -> None:
    """The run folder's config is the one the run started with, or one line naming the first difference."""
    started, now = _flat(record["config"]), _flat(config)
    for key in sorted(set(started) | set(now)):
        if started.get(key) != now.get(key):
            raise UserError(f"{run_dir / 'config.yaml'} sets {key} to {now.get(key)!r}, but run {run_dir.name} started with "
                            f"{started.get(key)!r}: the file was edited; restore it, or start a new run")


def check_same_sources(run_dir: Path, record: dict[str, Any], sources: dict[str, str]) -> None:
    started = record.get("sources", {})
    for key in sorted(set(started) | set(sources)):
        if started.get(key) != sources.get(key):
            raise UserError(f"{key} is not what run {run_dir.name} started from (then {started.get(key)}, now {sources.get(key)}); "
                            "a resume continues on the same models: restore it, or start a new run")


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


SOURCE_KEYS = ("name_or_path", "tokenizer")
"""Config fields (in any section) that name where a model or tokenizer comes from."""


def source_digests(config: dict[str, Any], resolve_entry: Callable[[str], tuple[str, str] | None]) -> dict[str, str]:
    """{dotted key: what it names, pinned}: a registry reference as the entry id it resolves to and
    its folder's digest, a local folder or file by content; hub names and reward names as written.
    `resolve_entry(text)` gives (entry id, folder) for a registry reference, None for anything else."""
    found = {}
    for key, value in _flat(config).items():
        if key.rsplit(".", 1)[-1] not in SOURCE_KEYS or value is None:
            continue
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            found[f"{key}[{i}]" if isinstance(value, list) else key] = _pin(str(item), resolve_entry)
    return found


def _pin(text: str, resolve_entry: Callable[[str], tuple[str, str] | None]) -> str:
    entry = resolve_entry(text)
    if entry is not None:
        entry_id, folder = entry
        return f"{entry_id} {content_digest(Path(folder))}"
    path = Path(text).expanduser()
    if text.startswith("/") and path.exists():
        return content_digest(path)
    return text


def content_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's relative names and file contents (symlinks followed)."""
    if path.is_file():
        return "sha256:" + _file_sha256(path)
    total = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        total.update(f"{file.relative_to(path).as_posix()}\0{_file_sha256(file)}\0".encode())
    return "sha256:" + total.hexdigest()


def _file_sha256(path: Path) -> str:
    # hashlib.file_digest is Python 3.11+; the package supports 3.10 (mypy checks against it).
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
