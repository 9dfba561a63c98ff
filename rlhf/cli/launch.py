"""Launching a stage program for `rlhf <stage>`, `rlhf label` and `rlhf pipeline`: check, create the run, run its ranks
under the run's lock, and report how they ended; or resume an unfinished run.

Imports no torch (see rlhf.cli).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer

from rlhf.cli.common import guard
from rlhf.errors import UserError


def start_or_resume(stage: str, launch: LaunchChoice, overrides: list[str], *, config: Path | None, resume: bool, run: str | None,
                     registry: Path | None, dry_run: bool) -> None:
    if resume:
        guard(lambda: _resume_stage(stage=stage, launch=launch, run_id=run, registry=registry, dry_run=dry_run,
                                     config=config, overrides=overrides))
    else:
        guard(lambda: launch_stage(stage=stage, launch=launch, overrides=overrides, config=config, run_id=run, dry_run=dry_run))

@dataclass(frozen=True)
class LaunchChoice:
    """What the user said about ranks, launcher and console; None = the default (or, on resume, the run's own)."""

    num_gpus: int | None
    launcher: str | None
    hostfile: Path | None
    verbose: bool = False


def launch_stage(*, stage: str, launch: LaunchChoice, overrides: list[str], config: Path | None,
                  run_id: str | None = None, dry_run: bool = False) -> Path | None:
    """Check everything, then create the run and launch it; the run folder once it finished, None for --dry-run.

    Every check that can run before a rank starts runs before the run folder exists, so a mistake
    leaves nothing behind; a start that fails inside the stage (before it loaded its models and
    data) is cleaned away too, so no run looks resumable that never trained.
    """
    from rlhf.config import PPOConfig
    from rlhf.launcher.command import LaunchSpec, build_command
    from rlhf.launcher.memory_check import warn_before_launch
    from rlhf.launcher.preflight import check_inputs
    from rlhf.launcher.reward_hacking import unanchored_policy_warning
    from rlhf.store.registry import Registry
    from rlhf.store.runs import LaunchRecord, check_run_id, create_run, resolve_config, save_launch
    from rlhf.training.tracking import print_warning, quiet_libraries

    cfg = resolve_config(stage, config, overrides)
    quiet_libraries(verbose=launch.verbose)  # the checks load tokenizers and data
    check_inputs(stage, cfg)
    assert cfg.run.registry is not None  # resolve_config sets it
    registry = Registry(cfg.run.registry)
    if run_id is not None:
        check_run_id(run_id, stage)
    run_id = run_id or registry.new_run_id(stage)
    record = LaunchRecord(num_gpus=1 if launch.num_gpus is None else launch.num_gpus, launcher=launch.launcher or "deepspeed",
                          hostfile=str(launch.hostfile.resolve()) if launch.hostfile else None)
    spec = LaunchSpec(program=_program(stage), program_args=("--run-dir", str(registry.run_dir(run_id))),
                      num_procs=record.num_gpus, launcher=record.launcher, hostfile=launch.hostfile,  # type: ignore[arg-type]
                      verbose=launch.verbose)
    cmd = build_command(spec)  # refuses bad ranks, launchers and hostfiles before anything exists
    # Not on --resume: a resumed run keeps its config, so the advice could not be taken there.
    warn_before_launch(stage, cfg, per_node=record.num_gpus, launcher=record.launcher, hostfile=launch.hostfile,
                       plan_args=[*(["-c", str(config)] if config else []), *overrides], verbose=launch.verbose)
    if isinstance(cfg, PPOConfig) and (hacking := unanchored_policy_warning(cfg)):
        print_warning(hacking)
    if dry_run:
        import yaml

        from rlhf.config import to_dict

        typer.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False), nl=False)
        _print_command(cmd, record.num_gpus, verbose=launch.verbose)
        return None
    run = create_run(stage, cfg, run_id)
    save_launch(run.run_dir, record)
    return _run_locked(stage, run.run_dir, cmd, record, fresh=True, verbose=launch.verbose)


def _resume_stage(*, stage: str, launch: LaunchChoice, run_id: str | None, registry: Path | None,
                  dry_run: bool, config: Path | None, overrides: list[str]) -> Path | None:
    """Continue a run from its last checkpoint, launched as it was unless told otherwise. Overrides may
    only repeat the run's values: those that run code must be (rlhf.store.trust)."""
    from rlhf.launcher.command import LaunchSpec, build_command
    from rlhf.store.runs import CONFIG_FILE, LaunchRecord, find_resumable, load_launch, model_source_digests, open_run
    from rlhf.store.start_record import check_same_sources, verified_record
    from rlhf.store.trust import check_resume_overrides

    if config:
        raise UserError("--resume continues a run with its saved config; drop --config")
    run_dir = find_resumable(stage, registry, run_id)
    # A damaged, planted or edited run folder, or one outside its registry, stops here (rlhf.store.start_record).
    run = open_run(stage, run_dir)
    check_same_sources(run_dir, verified_record(run_dir, stage=stage, registry=run.registry.root.resolve()),
                       model_source_digests(run.config, run.registry))
    check_resume_overrides(stage, run_dir / CONFIG_FILE, run.config, overrides)
    saved = load_launch(run_dir) or LaunchRecord(num_gpus=1, launcher="deepspeed")
    hostfile = launch.hostfile or (Path(saved.hostfile) if saved.hostfile else None)
    record = LaunchRecord(num_gpus=saved.num_gpus if launch.num_gpus is None else launch.num_gpus,
                          launcher=launch.launcher or saved.launcher,
                          hostfile=str(hostfile) if hostfile else None)
    spec = LaunchSpec(program=_program(stage), program_args=("--run-dir", str(run_dir)), num_procs=record.num_gpus,
                      launcher=record.launcher, hostfile=hostfile, verbose=launch.verbose)  # type: ignore[arg-type]
    cmd = build_command(spec)
    if dry_run:
        _print_command(cmd, record.num_gpus, verbose=launch.verbose)
        return None
    return _run_locked(stage, run_dir, cmd, record, fresh=False, verbose=launch.verbose)


def _program(stage: str) -> str:
    from rlhf.launcher.command import stage_program

    return stage_program(stage)


def _print_command(cmd: list[str], num_gpus: int, *, verbose: bool) -> None:
    from rlhf.launcher.command import format_command, launch_env

    typer.echo(format_command(cmd, launch_env(num_gpus, verbose=verbose)))


def _run_locked(stage: str, run_dir: Path, cmd: list[str], record, *, fresh: bool, verbose: bool) -> Path:
    """Launch the ranks while holding the run's lock; report how they ended."""
    from rlhf.launcher.command import format_command, launch_env, run_supervised
    from rlhf.store.runlock import RunLock
    from rlhf.store.runs import SUPERVISED_ENV, clear_rank_records, discard_failed_start, supervisor_value
    from rlhf.training.tracking import console

    env = {**launch_env(record.num_gpus, verbose=verbose), SUPERVISED_ENV: supervisor_value()}
    try:
        with RunLock(run_dir):
            clear_rank_records(run_dir)
            console.print(f"[dim]{'run' if fresh else 'resuming'} {run_dir.name}: {format_command(cmd, env)}[/]")
            outcome = run_supervised(cmd, env)
    except UserError:
        if fresh:
            discard_failed_start(run_dir)
        raise
    if outcome.code == 0:
        return run_dir
    code = _report_failure(stage, run_dir, outcome, fresh=fresh)
    raise typer.Exit(code)


def _report_failure(stage: str, run_dir: Path, outcome, *, fresh: bool) -> int:
    """One line for what the ranks cannot say themselves; the exit status `rlhf` ends with."""
    from rlhf.errors import EXIT_STOPPED
    from rlhf.store.runs import discard_failed_start, rank_exits
    from rlhf.training.tracking import print_error

    exits = rank_exits(run_dir)
    if outcome.stop_signals:
        return EXIT_STOPPED  # the ranks saved and said so; a start that was stopped keeps its folder
    vanished = [e for e in exits if e.code is None]
    # A start that failed before the stage loaded its models and data trained nothing: keep nothing.
    discarded = fresh and discard_failed_start(run_dir)
    if vanished:
        names = ", ".join(f"rank {e.rank} (pid {e.pid} on {e.host})" for e in vanished)
        after = "nothing was trained yet, so nothing was kept" if discarded else \
            f"resume with `rlhf {stage} --resume --run {run_dir.name}`"
        print_error(f"{names} died without an error (killed, out of memory, or its node lost); the other ranks stopped; {after}")
    elif not exits:
        print_error(f"the launcher exited with status {outcome.code} before any rank started; "
                    "check --launcher, --hostfile and the launcher's output above")
    codes = [e.code for e in exits if e.code]
    return codes[0] if codes else (outcome.code if outcome.code > 0 else 1)

