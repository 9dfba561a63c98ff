"""Resumable checkpoints: written by DeepSpeed, sealed by a manifest, read back without pickle code.

Layout of `<run>/checkpoints/`:

    step-0000040/<engine name>/...   DeepSpeed's files for each engine (the actor and critic in PPO)
    step-0000040/rng_rank<R>.pt      each rank's RNG streams (tensors and ints only)
    step-0000040/manifest.json       size and SHA-256 of every file above, written last
    resume.json                      the newest sealed step (for people and scripts; never trusted)

A checkpoint counts only once its manifest exists and every file still matches it, so a kill in
the middle of a save, a truncated file or a deleted folder makes the previous checkpoint the one
resumed (with a warning), never a traceback. The files sit on shared storage where others may
write: every `torch.load` while resuming runs with `weights_only=True`, and only the few plain
classes DeepSpeed stores in its optimizer states are allowed, so a planted pickle payload is
refused in one line instead of running as whoever resumes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import pickle
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from rlhf.errors import UserError, first_line
from rlhf.protocols import TrainEngine
from rlhf.store.fileio import atomic_write_text
from rlhf.training.engine import Dist

Engines = TrainEngine[object] | Mapping[str, TrainEngine[object]]
"""One DeepSpeed engine, or {name: engine} (PPO's actor and critic), checkpointed together."""

RESUME_FILE = "resume.json"
MANIFEST_FILE = "manifest.json"
CLIENT_KEY = "rlhf"
TAG_PREFIX = "step-"


def tag_of(step: int) -> str:
    return f"{TAG_PREFIX}{step:07d}"


def save_checkpoint(
    engines: Engines, ckpt_dir: Path, *, step: int, client_state: dict[str, Any], keep: int, dist: Dist
) -> None:
    """Save one engine, or a {name: engine} dict (PPO's actor and critic), as the checkpoint of `step`."""
    folder = ckpt_dir / tag_of(step)
    for name, engine in _named(engines).items():
        # Under one key of our own: DeepSpeed adds reserved keys to the state it hands back on load.
        engine.save_checkpoint(str(folder), tag=name, client_state={CLIENT_KEY: client_state}, save_latest=False)
    # Each rank's RNG, so sampling and dropout continue exactly after a resume.
    torch.save(_rng_state(), folder / f"rng_rank{dist.rank}.pt")
    torch.distributed.barrier()
    # Every rank hashes its share of the files, rank 0 seals the folder: hashing a large model's
    # optimizer states on one rank alone would stall every save.
    files = _files_of(folder)
    mine = {name: _digest(folder / name) for i, name in enumerate(files) if i % dist.world_size == dist.rank}
    atomic_write_text(folder / f".{MANIFEST_FILE}.rank{dist.rank}", json.dumps(mine))
    torch.distributed.barrier()
    if dist.is_main:
        _seal(folder, step=step, world_size=dist.world_size)
        atomic_write_text(ckpt_dir / RESUME_FILE, json.dumps({"tag": folder.name, "step": step, "world_size": dist.world_size}))
        kept = sorted(p for p in ckpt_dir.glob(f"{TAG_PREFIX}*") if p.is_dir())
        for old in kept[: max(0, len(kept) - keep)]:
            if old.name != folder.name:
                shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()


def _seal(folder: Path, *, step: int, world_size: int) -> None:
    """Merge the ranks' digests into the manifest, the last file written: its presence means complete."""
    digests: dict[str, Any] = {}
    for part in sorted(folder.glob(f".{MANIFEST_FILE}.rank*")):
        digests.update(json.loads(part.read_text()))
        part.unlink()
    manifest = {"step": step, "world_size": world_size, "files": dict(sorted(digests.items()))}
    atomic_write_text(folder / MANIFEST_FILE, json.dumps(manifest, indent=1))


def load_checkpoint(engines: Engines, ckpt_dir: Path, *, dist: Dist, warn: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Restore the newest checkpoint that verifies; returns its client state, or None if there is none.

    A save that never finished (no manifest) is passed over; a damaged one is skipped with a warning
    (rank 0), and if nothing older verifies the run stops in one line rather than start over. Every
    rank takes the same decision: each verifies a share of the files and the verdicts are all-reduced.
    """
    damaged: list[str] = []
    for folder in sorted((p for p in ckpt_dir.glob(f"{TAG_PREFIX}*") if p.is_dir()), reverse=True):
        problem, manifest = _verify_on_all_ranks(folder, dist)
        if problem == INCOMPLETE:
            continue
        if problem:
            damaged.append(f"{folder.name}: {problem}")
            if dist.is_main:
                warn(f"checkpoint {folder.name} is damaged ({problem}); trying an older one")
            continue
        ranks = manifest["world_size"]
        if ranks != dist.world_size:
            # ZeRO's optimizer (and under ZeRO-3 parameter) partitions belong to the ranks that saved them.
            raise UserError(f"this run was checkpointed on {ranks} rank(s), not {dist.world_size}; resume it with -n {ranks}")
        return _restore(engines, folder, dist)
    if damaged:
        raise UserError(
            f"no usable checkpoint in {ckpt_dir} ({damaged[0]}); delete that folder to train this run "
            "again from step 0, or start a new run"
        )
    return None


INCOMPLETE = "no manifest: the save did not finish"


def _verify_on_all_ranks(folder: Path, dist: Dist) -> tuple[str | None, dict[str, Any]]:
    """(None, manifest) when `folder` is a complete, unaltered checkpoint on every rank's view."""
    problem, manifest = None, {}
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        files: dict[str, Any] = manifest["files"]
        int(manifest["step"]), int(manifest["world_size"])
        problem = _check_files(folder, files, rank=dist.rank, world_size=dist.world_size)
    except FileNotFoundError:
        problem = INCOMPLETE
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        problem = f"unreadable manifest: {first_line(exc, 80)}"
    bad = torch.tensor([0 if problem is None else 1], dtype=torch.int32, device=dist.device)
    torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if bad.item() and problem is None:
        problem = "another rank found a damaged file"
    return problem, manifest


def _check_files(folder: Path, files: dict[str, Any], *, rank: int, world_size: int) -> str | None:
    present = _files_of(folder)
    extra = sorted(set(present) - set(files) - {MANIFEST_FILE})
    if extra:
        return f"{extra[0]} is not in its manifest"
    for i, (name, expected) in enumerate(sorted(files.items())):
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"manifest names {name!r} outside the checkpoint"
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['size']}"
        if i % world_size == rank and _digest(path)["sha256"] != expected["sha256"]:
            return f"{name} changed after it was saved (SHA-256 differs)"
    return None


def _restore(engines: Engines, folder: Path, dist: Dist) -> dict[str, Any]:
    client_state: dict[str, Any] = {}
    with _weights_only_loads(folder):
        for name, engine in _named(engines).items():
            _, client_state = engine.load_checkpoint(str(folder), tag=name)
        _set_rng_state(torch.load(folder / f"rng_rank{dist.rank}.pt", weights_only=True))
    return client_state[CLIENT_KEY]


def _safe_globals() -> list[Callable[..., Any] | tuple[Callable[..., Any], str]]:  # torch.serialization.safe_globals
    """Plain data classes DeepSpeed pickles into its optimizer states: an enum, the loss scaler's
    fields, a fragment's (start, numel) address. None of them runs code when rebuilt."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def _weights_only_loads(folder: Path) -> Iterator[None]:
    """Every torch.load in this block (DeepSpeed's included) refuses pickled code."""
    original = torch.load

    @functools.wraps(original)
    def weights_only_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(f, *args, **kwargs)

    torch.load = weights_only_load
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            yield
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"refused to load checkpoint {folder}: a file holds pickled objects other than tensors "
            f"({_refused_global(exc)}), which could run code. Unless you wrote it yourself, someone "
            "else did: delete that checkpoint folder and resume from an older one, or start a new run"
        ) from None
    finally:
        torch.load = original


def _refused_global(exc: Exception) -> str:
    for line in str(exc).splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.strip()[:160]
    return first_line(exc, 160)


def _files_of(folder: Path) -> list[str]:
    """Files under `folder` (relative, sorted), without the manifest and its pieces.

    A piece may still be in its temp file (`..manifest.json.rank1.<pid>.tmp`) while another rank
    lists the folder: it is one of ours whatever its dots, and it vanishes at the rename.
    """
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*")
        if p.is_file() and not p.name.lstrip(".").startswith(MANIFEST_FILE)
    )


def _digest(path: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            sha.update(block)
    return {"size": path.stat().st_size, "sha256": sha.hexdigest()}


def _named(engines: Engines) -> Mapping[str, TrainEngine[object]]:
    return engines if isinstance(engines, Mapping) else {"model": engines}


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
