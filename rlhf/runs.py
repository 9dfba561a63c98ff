"""Run folders: where a stage run keeps its resolved config, metrics, checkpoints and final model.

The CLI prepares the folder before launching (so config mistakes surface before any rank starts);
a stage program started directly with `--config` prepares its own. Layout of `<registry>/runs/<id>/`:
`config.yaml` (resolved), `metrics.jsonl`, `checkpoints/` (resumable), `final/` (save_pretrained),
`wandb/` when enabled.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rlhf.config import STAGE_CONFIGS, load_config, save_config
from rlhf.errors import EXIT_STOPPED, EXIT_USER_ERROR, StoppedBySignal, UserError
from rlhf.registry import Registry, default_root
from rlhf.toy import TOY
from rlhf.tracking import print_error

CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class Run:
    stage: str
    run_id: str
    run_dir: Path
    config: Any
    registry: Registry

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def final_dir(self) -> Path:
        return self.run_dir / "final"


def resolve_config(stage: str, config_file: str | Path | None, overrides: list[str] | tuple[str, ...]) -> Any:
    """Load and validate a stage config, with the registry root made absolute."""
    cfg = load_config(STAGE_CONFIGS[stage], config_file, overrides)
    root = Path(cfg.run.registry or default_root()).expanduser().resolve()
    # The saved config must mean the same from any directory (a resume, a batch job).
    located = {name: _absolute_paths(getattr(cfg, name)) for name in MODEL_AND_DATA_SECTIONS if hasattr(cfg, name)}
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, registry=str(root)), **located)


MODEL_AND_DATA_SECTIONS = ("model", "data", "critic", "reference", "reward")
"""Config sections whose strings may name local files or folders."""


def _absolute_paths(section: Any) -> Any:
    """`section` with every string field that names an existing local file or folder made absolute."""
    changes = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        # 'toy' is the embedded default even if a folder of that name happens to be here.
        if isinstance(value, str) and value not in ("", TOY) and Path(value).expanduser().exists():
            changes[f.name] = str(Path(value).expanduser().resolve())
    return dataclasses.replace(section, **changes)


def create_run(stage: str, cfg: Any, run_id: str | None = None) -> Run:
    """A new run folder holding the resolved config; `run_id` is given when `rlhf submit` chose it
    at submission, so the batch job's log already sits in the folder."""
    registry = Registry(cfg.run.registry)
    if run_id is None:
        run_id = registry.new_run_id(stage)
    elif Path(run_id).name != run_id or run_id.startswith("."):
        raise UserError(f"--run {run_id!r} is not a run id (a plain name such as {stage}-20261123-120000-1a2b3c4d)")
    run_dir = registry.run_dir(run_id)
    if (run_dir / CONFIG_FILE).exists():
        raise UserError(f"run {run_id} has already started in {run_dir}; continue it with `rlhf {stage} --resume --run {run_id}`")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG_FILE)
    return Run(stage, run_id, run_dir, cfg, registry)


def open_run(stage: str, run_dir: str | Path) -> Run:
    """A run folder made earlier (by the CLI, or a run being resumed)."""
    run_dir = Path(run_dir).resolve()
    config_file = run_dir / CONFIG_FILE
    if not config_file.is_file():
        raise UserError(f"{run_dir} is not a run folder (no {CONFIG_FILE})")
    cfg = load_config(STAGE_CONFIGS[stage], config_file)
    return Run(stage, run_dir.name, run_dir, cfg, Registry(cfg.run.registry or default_root()))


def find_resumable(stage: str, registry_root: str | Path | None, run_id: str | None) -> Path:
    """The run folder to continue: the one named, or the newest unfinished run of this stage."""
    registry = Registry(Path(registry_root or default_root()).expanduser().resolve())
    if run_id:
        run_dir = registry.run_dir(run_id)
        if not (run_dir / CONFIG_FILE).is_file():
            raise UserError(f"no run '{run_id}' in {registry.root}/runs (rlhf registry ls lists runs)")
        if any(e.id == run_id for e in registry.entries()):
            raise UserError(f"run '{run_id}' already finished and is in the registry; nothing to resume")
        if run_id in registry.removed_ids():
            raise UserError(f"run '{run_id}' finished and was removed with `rlhf registry rm`; nothing to resume")
        return run_dir
    candidates = [p for p in registry.incomplete_runs(stage) if (p / CONFIG_FILE).is_file()]
    if not candidates:
        raise UserError(
            f"no unfinished {stage} run to resume in {registry.root} (start one with `rlhf {stage}`)"
        )
    return candidates[0]


def is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def stage_entrypoint(stage: str, main: Callable[[Run], None]) -> None:
    """Parse a stage program's arguments, open or create its run, run `main`, report user errors.

    `--run-dir DIR` continues a folder the CLI prepared (or resumes it); `--config FILE [k=v ...]`
    lets the program run on its own (one rank, e.g. `python stages/sft.py`).
    """
    parser = argparse.ArgumentParser(prog=f"stages/{stage}.py", description=f"rlhf {stage} stage program")
    parser.add_argument("--run-dir", help="run folder prepared by `rlhf` (holds config.yaml)")
    parser.add_argument("--config", help="config YAML when started without `rlhf`")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (with --config)")
    args = parser.parse_args()
    # Our own progress bar reports the run; transformers' per-load bars would interleave with it.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        if args.run_dir:
            if args.config or args.overrides:
                raise UserError("--run-dir takes its config from the run folder; drop --config and overrides")
            run = open_run(stage, args.run_dir)
        else:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise UserError(f"several ranks need one shared run folder: start them with `rlhf {stage}`")
            run = create_run(stage, resolve_config(stage, args.config, args.overrides))
        main(run)
    except UserError as exc:
        if is_rank_zero():
            print_error(str(exc))
        sys.exit(EXIT_USER_ERROR)
    except StoppedBySignal:
        sys.exit(EXIT_STOPPED)
