"""Run folders: where a stage run keeps its resolved config, metrics, checkpoints and final model. The CLI prepares the folder before
launching (so config mistakes surface before any rank starts); a stage program started directly with `--config` prepares its own.
Layout of `<registry>/runs/<id>/`: `config.yaml` (resolved), `start_record.json` (what the run started with, sealed by its owner:
see rlhf.store.start_record), `launch.json` (ranks, launcher, hostfile: what `--resume` reuses), `lock.json` (while a process runs
it), `ranks/` (each rank's pid and exit status, for naming a rank that died), `started.json` (the stage got past loading: from
then on the run is resumable, before it a failed start is cleaned away), `metrics.jsonl`, `checkpoints/` (resumable), `final/`
(save_pretrained), `wandb/` when enabled.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generic, TypeVar

from rlhf.config import STAGE_CONFIGS, StageConfig, leaf_keys, load_config, save_config, to_dict
from rlhf.errors import EXIT_STOPPED, EXIT_USER_ERROR, StoppedBySignal, UserError
from rlhf.store.entry import DATASET_FILES, Entry, is_reference
from rlhf.store.fileio import atomic_write_text
from rlhf.store.registry import Registry, default_root
from rlhf.store.start_record import START_FILE, check_same_config, record_problem, source_digests, verified_record, write_start_record
from rlhf.store.trust import resume_command
from rlhf.toy import TOY
from rlhf.training.tracking import print_error

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Section = TypeVar("Section", bound="DataclassInstance")
Config = TypeVar("Config", bound=StageConfig, covariant=True)

CONFIG_FILE = "config.yaml"
LAUNCH_FILE = "launch.json"
STARTED_FILE = "started.json"
RANKS_DIR = "ranks"
# A run id is a folder name under runs/: no separators, no leading dot, nothing a shell reads twice.
_RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


@dataclass(frozen=True)
class Run(Generic[Config]):
    stage: str
    run_id: str
    run_dir: Path
    config: Config  # STAGE_CONFIGS[stage]: a stage program's main takes Run[its config class]
    registry: Registry

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def final_dir(self) -> Path:
        return self.run_dir / "final"

    def publish(self, entry: Entry) -> Entry:
        """Publish `entry`, unless the `rlhf` that launched this rank is gone: its ranks outlive it by
        up to a second, and a run resumed in that second would find its own id already taken."""
        stop_if_orphaned()
        return self.registry.publish(entry)


def resolve_config(stage: str, config_file: str | Path | None, overrides: list[str] | tuple[str, ...]) -> StageConfig:
    """Load and validate a stage config, with the registry root made absolute."""
    cfg = load_config(STAGE_CONFIGS[stage], config_file, overrides)
    root = Path(cfg.run.registry or default_root()).expanduser().resolve()
    # The saved config must mean the same from any directory (a resume, a batch job).
    located = {name: _absolute_paths(getattr(cfg, name)) for name in MODEL_AND_DATA_SECTIONS if hasattr(cfg, name)}
    located["data"] = _dataset_references(located["data"], Registry(root))
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, registry=str(root)), **located)


REGISTRY_ONLY = ("samples", "include")


def _dataset_references(data: Section, registry: Registry) -> Section:
    """`data` with each registry reference to a dataset entry (`prefs:latest`, `samples:<id>`) replaced by its file:
    the saved config then names the exact rows the run read, whatever `latest` means by the time it resumes."""
    changes = {}
    for f in dataclasses.fields(data):
        value = getattr(data, f.name)
        # data.samples and data.include take registry entries only; elsewhere `name:split` may be a hub dataset.
        if isinstance(value, str) and is_reference(value) and (value.split(":", 1)[0] in DATASET_FILES or f.name in REGISTRY_ONLY):
            changes[f.name] = str(registry.dataset_file(value, key=f"data.{f.name}"))
    return dataclasses.replace(data, **changes)


MODEL_AND_DATA_SECTIONS = ("model", "data", "critic", "reference", "reward")
"""Config sections whose strings may name local files or folders."""


def _absolute_paths(section: Section) -> Section:
    """`section` with every string field that names an existing local file or folder made absolute."""
    changes = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        # 'toy' is the embedded default even if a folder of that name happens to be here.
        if isinstance(value, str) and value not in ("", TOY) and Path(value).expanduser().exists():
            changes[f.name] = str(Path(value).expanduser().resolve())
    return dataclasses.replace(section, **changes)


def check_run_id(run_id: str, stage: str) -> None:
    """Refuse an id that is not a plain folder name: `--run ../../x` never leaves `runs/`."""
    if not _RUN_ID_RE.fullmatch(run_id):
        raise UserError(f"--run {run_id!r} is not a run id (a plain name such as {stage}-20261123-120000-1a2b3c4d)")


def create_run(stage: str, cfg: StageConfig, run_id: str | None = None) -> Run[StageConfig]:
    """A new run folder holding the resolved config; `run_id` is given when `rlhf submit` chose it
    at submission, so the batch job's log already sits in the folder."""
    assert cfg.run.registry is not None  # resolve_config sets it
    registry = Registry(cfg.run.registry)
    if run_id is None:
        run_id = registry.new_run_id(stage)
    check_run_id(run_id, stage)
    run_dir = registry.run_dir(run_id)
    if (run_dir / CONFIG_FILE).exists():
        raise UserError(f"run {run_id} has already started in {run_dir}; continue it with `rlhf {stage} --resume --run {run_id}`")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create the run folder {run_dir}: {exc.strerror or exc}; point RLHF_HOME (or run.registry) "
            "at a folder you can write"
        ) from None
    save_config(cfg, run_dir / CONFIG_FILE)
    write_start_record(run_dir, run_id=run_id, stage=stage, registry=registry.root.resolve(), config=to_dict(cfg),
                       sources=model_source_digests(cfg, registry))
    return Run(stage, run_id, run_dir, cfg, registry)


def model_source_digests(cfg: StageConfig, registry: Registry) -> dict[str, str]:
    """Each model source of `cfg` pinned by content (see rlhf.store.start_record.source_digests)."""

    def resolve_entry(text: str) -> tuple[str, str] | None:
        if not is_reference(text):
            return None
        try:
            entry = registry.resolve(text)
        except UserError:
            return None  # gone since: pinned as written, so a resume names the change
        return entry.id, entry.path

    return source_digests(to_dict(cfg), resolve_entry)


def open_run(stage: str, run_dir: str | Path) -> Run:
    """A run folder made earlier (by the CLI, or a run being resumed), its config checked whole."""
    run_dir = Path(run_dir).resolve()
    config_file = run_dir / CONFIG_FILE
    if not config_file.is_file():
        raise UserError(f"{run_dir} is not a run folder (no {CONFIG_FILE})")
    _refuse_links(run_dir)
    _check_complete(config_file, STAGE_CONFIGS[stage])
    cfg = load_config(STAGE_CONFIGS[stage], config_file)
    registry = Registry(cfg.run.registry or default_root())
    if registry.run_dir(run_dir.name).resolve() != run_dir:
        # A copied or planted folder would publish into whatever registry its config names.
        raise UserError(
            f"{run_dir} is not inside the registry its {CONFIG_FILE} names ({registry.root}); "
            "resume runs in place, under <registry>/runs/"
        )
    # Sealed at start by the run's owner: a planted folder, or a config edited since, stops here.
    record = verified_record(run_dir, stage=stage, registry=registry.root.resolve())
    check_same_config(run_dir, record, to_dict(cfg))
    return Run(stage, run_dir.name, run_dir, cfg, registry)


def _refuse_links(run_dir: Path) -> None:
    """A run writes and reads only its own files: a symlink planted in its folder (its config, metrics,
    final model or a checkpoint) would send a resume's reads or writes somewhere else."""
    checkpoints = run_dir / "checkpoints"
    inside = list(checkpoints.iterdir()) if checkpoints.is_dir() and not checkpoints.is_symlink() else []
    for path in (run_dir / CONFIG_FILE, run_dir / LAUNCH_FILE, run_dir / "metrics.jsonl", run_dir / "final", checkpoints, *inside):
        if path.is_symlink():
            raise UserError(f"{path} is a symbolic link; a run folder holds only its own files: remove the link to resume")


def _check_complete(config_file: Path, cls: type) -> None:
    """A saved config names every key (save_config writes them all): a truncated or emptied file
    would otherwise resume with defaults for what it lost."""
    from rlhf.config import read_yaml_file

    try:
        data = read_yaml_file(config_file)
    except UserError as exc:
        raise UserError(f"{config_file} is damaged ({exc}); this run cannot be resumed, start a new one") from None
    present = set(_dotted_keys(data)) if isinstance(data, dict) else set()
    missing = [key for key in leaf_keys(cls) if key not in present]
    if missing:
        raise UserError(
            f"{config_file} is incomplete ({len(missing)} key(s) missing, e.g. {missing[0]}); it was truncated "
            "or edited, so this run cannot be resumed as it ran: start a new run"
        )


def _dotted_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            keys += _dotted_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def find_resumable(stage: str, registry_root: str | Path | None, run_id: str | None) -> Path:
    """The run folder to continue: the one named, or the newest unfinished run of this stage."""
    registry = Registry(Path(registry_root or default_root()).expanduser().resolve())
    if run_id is not None:  # `--run ''` is a mistake, not "the newest"
        check_run_id(run_id, stage)
        run_dir = registry.run_dir(run_id)
        if not (run_dir / CONFIG_FILE).is_file():
            raise UserError(f"no run '{run_id}' in {registry.root}/runs (rlhf registry ls lists runs)")
        if any(e.id == run_id for e in registry.entries()):
            raise UserError(f"run '{run_id}' already finished and is in the registry; nothing to resume")
        if run_id in registry.removed_ids():
            raise UserError(f"run '{run_id}' finished and was removed with `rlhf registry rm`; nothing to resume")
        return run_dir
    unfinished = [p for p in registry.incomplete_runs(stage) if (p / CONFIG_FILE).is_file() and _RUN_ID_RE.fullmatch(p.name)]
    # Only runs this user started in this registry: a folder anyone could plant is never "the newest".
    candidates = [p for p in unfinished if record_problem(p, stage=stage, registry=registry.root) is None]
    if len(candidates) < len(unfinished):
        from rlhf.training.tracking import console

        skipped = [p.name for p in unfinished if p not in candidates]
        console.print(f"[yellow]skipped {len(skipped)} unfinished {stage} run(s) without a start record sealed by you "
                      f"({', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}); resume one by --run to see why[/]")
    if not candidates:
        raise UserError(
            f"no unfinished {stage} run to resume in {registry.root} (start one with `rlhf {stage}`)"
        )
    return candidates[0]


@dataclass(frozen=True)
class LaunchRecord:
    """How a run was launched, so `--resume` starts it the same way (ZeRO partitions and the global
    batch belong to the rank count)."""

    num_gpus: int
    launcher: str
    hostfile: str | None = None


def save_launch(run_dir: Path, record: LaunchRecord) -> None:
    atomic_write_text(run_dir / LAUNCH_FILE, json.dumps(dataclasses.asdict(record)))


def load_launch(run_dir: Path) -> LaunchRecord | None:
    """The recorded launch; None for a run made before launches were recorded (or by a stage program alone)."""
    try:
        data = json.loads((run_dir / LAUNCH_FILE).read_text())
        return LaunchRecord(num_gpus=int(data["num_gpus"]), launcher=str(data["launcher"]), hostfile=data.get("hostfile"))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{run_dir / LAUNCH_FILE} is damaged; resume with -n N --launcher L given explicitly") from None


def mark_started(run: Run) -> None:
    """The stage loaded its models and data: from now on a failure leaves a resumable run."""
    atomic_write_text(run.run_dir / STARTED_FILE, json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S")}))


def discard_failed_start(run_dir: Path) -> bool:
    """Remove what a start that failed before training left (a config and nothing else worth
    resuming); True if removed. Files others put there (a SLURM log, the job script) stay."""
    if (run_dir / STARTED_FILE).exists():
        return False
    ours = (CONFIG_FILE, START_FILE, LAUNCH_FILE, RANKS_DIR, "checkpoints", "metrics.jsonl", "wandb")
    for name in ours:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    try:
        run_dir.rmdir()  # only when nothing else is in it
    except OSError:
        pass
    return True


@dataclass(frozen=True)
class RankExit:
    rank: int
    pid: int
    host: str
    code: int | None
    """None: the rank never reported an exit (killed by a signal, out of memory, a lost node)."""


def record_rank(run_dir: Path, *, code: int | None) -> None:
    """This rank's pid and host at start (code None), then its exit code: `rlhf` names a rank that vanished."""
    rank = int(os.environ.get("RANK", "0"))
    folder = run_dir / RANKS_DIR
    folder.mkdir(exist_ok=True)
    record = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "code": code}
    atomic_write_text(folder / f"rank-{rank}.json", json.dumps(record))


def rank_exits(run_dir: Path) -> list[RankExit]:
    found = []
    for path in sorted((run_dir / RANKS_DIR).glob("rank-*.json")):
        try:
            d = json.loads(path.read_text())
            found.append(RankExit(int(d["rank"]), int(d["pid"]), str(d["host"]), None if d["code"] is None else int(d["code"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def clear_rank_records(run_dir: Path) -> None:
    shutil.rmtree(run_dir / RANKS_DIR, ignore_errors=True)


def is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def stage_entrypoint(stage: str, main: Callable[[Run], None]) -> None:
    """Parse a stage program's arguments, open or create its run, run `main`, report user errors.

    `--run-dir DIR` continues a folder the CLI prepared (or resumes it); `--config FILE [k=v ...]`
    lets the program run on its own (one rank, e.g. `python -m rlhf.stages.sft`).
    """
    parser = argparse.ArgumentParser(prog=f"python -m rlhf.stages.{stage}", description=f"rlhf {stage} stage program")
    parser.add_argument("--run-dir", help="run folder prepared by `rlhf` (holds config.yaml)")
    parser.add_argument("--config", help="config YAML when started without `rlhf`")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (with --config)")
    args = parser.parse_args()
    # Our own progress bar reports the run; transformers' per-load bars would interleave with it.
    from transformers.utils import logging as hf_logging

    from rlhf.training.tracking import VERBOSE_ENV, quiet_libraries

    hf_logging.disable_progress_bar()
    quiet_libraries(verbose=os.environ.get(VERBOSE_ENV) == "1")
    try:
        if args.run_dir:
            if args.config or args.overrides:
                raise UserError("--run-dir takes its config from the run folder; drop --config and overrides")
            run = open_run(stage, args.run_dir)
        else:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise UserError(f"several ranks need one shared run folder: start them with `rlhf {stage}`")
            run = create_run(stage, resolve_config(stage, args.config, args.overrides))
    except UserError as exc:
        if is_rank_zero():
            print_error(str(exc))
        sys.exit(EXIT_USER_ERROR)
    sys.exit(_run_rank(run, main))


EXIT_PEER_LOST = 3
"""A rank whose peer vanished: `rlhf` names the rank that died (see `rank_exits`)."""
SUPERVISED_ENV = "RLHF_SUPERVISED"
"""Set by `rlhf` for the ranks it launches, to "<host>:<pid>" of itself: it reports a dead peer in one
line, and a rank on its host stops when it is gone."""


def supervisor_value() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _follow_supervisor() -> None:
    """Die with the `rlhf` process that launched this rank (the ranks run in a process group of their
    own, so a SIGKILL to `rlhf` no longer reaches them): a rank that trained on without it would
    hold no lock and could publish beside a resumed copy of itself. Killed, not stopped: exactly
    what a lost node leaves, which the checkpoints are made for."""
    host, _, pid = os.environ.get(SUPERVISED_ENV, "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return  # not launched by `rlhf`, or by one on another node (that node's launcher ends the rank)
    import threading

    def watch() -> None:
        while True:
            time.sleep(1.0)
            stop_if_orphaned()

    threading.Thread(target=watch, name="rlhf-supervisor-watch", daemon=True).start()


def stop_if_orphaned() -> None:
    """SIGKILL this rank when the `rlhf` on its host that launched it has exited (see `_follow_supervisor`)."""
    import signal

    host, _, pid = os.environ.get(SUPERVISED_ENV, "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        os.kill(os.getpid(), signal.SIGKILL)
    except PermissionError:
        pass


def _run_rank(run: Run, main: Callable[[Run], None]) -> int:
    """Run `main` on this rank and record how it ended; returns the exit code."""
    _follow_supervisor()
    record_rank(run.run_dir, code=None)
    code = 1
    try:
        main(run)
        code = 0
    except UserError as exc:
        if is_rank_zero():
            print_error(str(exc))
        code = EXIT_USER_ERROR
    except StoppedBySignal:
        code = EXIT_STOPPED
    except Exception as exc:
        if not _lost_peer(exc):
            raise  # a bug in rlhf: keep the traceback
        code = EXIT_PEER_LOST
        if not os.environ.get(SUPERVISED_ENV):
            print_error(f"rank {os.environ.get('RANK', '0')} lost contact with another rank ({_first(exc)}); "
                        f"the run stopped: resume it with `{resume_command(run.stage, run.run_id, run.config)}`")
    finally:
        record_rank(run.run_dir, code=code)
    return code


# What gloo and NCCL say when the rank at the other end is gone (its process died, its node is lost).
_PEER_LOST_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def _lost_peer(exc: BaseException) -> bool:
    import torch.distributed

    text = str(exc)
    return isinstance(exc, torch.distributed.DistError) or any(m in text for m in _PEER_LOST_MARKERS)


def _first(exc: BaseException) -> str:
    from rlhf.errors import first_line

    return first_line(exc, 120)
