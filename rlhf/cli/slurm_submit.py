"""`rlhf submit`: a stage, or the pipeline, as SLURM batch jobs chained with afterok (rlhf.cli.slurm writes the scripts).

Imports no torch (see rlhf.cli).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from rlhf.cli.common import (
    DpoConfigOpt,
    PipelineOverridesArg,
    PpoConfigOpt,
    RmConfigOpt,
    SftConfigOpt,
    StagesOpt,
    config_or_preset,
    guard,
)
from rlhf.cli.local_pipeline import check_rounds, loaded_config, stage_config_files
from rlhf.errors import UserError

if TYPE_CHECKING:
    from rlhf.cli.slurm import StageJob


def submit(
    target: Annotated[str, typer.Argument(help="sft, rm, ppo, dpo, or pipeline (one job per stage, chained with afterok).")],
    overrides: PipelineOverridesArg = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", callback=config_or_preset,
        help="YAML config of the stage, or a preset's name (not with pipeline: use --<stage>-config).")] = None,
    sft_config: SftConfigOpt = None,
    rm_config: RmConfigOpt = None,
    ppo_config: PpoConfigOpt = None,
    dpo_config: DpoConfigOpt = None,
    stages: StagesOpt = None,
    nodes: Annotated[int, typer.Option("--nodes", help="Nodes per job.")] = 1,
    gpus_per_node: Annotated[int, typer.Option("--gpus-per-node", help="GPUs per node (0: CPU nodes).")] = 0,
    ranks_per_node: Annotated[Optional[int], typer.Option("--ranks-per-node",
        help="Ranks per node (default: one per GPU, or 1 on CPU nodes).")] = None,
    cpus_per_task: Annotated[Optional[int], typer.Option("--cpus-per-task", help="CPUs for each node's launcher and its ranks.")] = None,
    partition: Annotated[Optional[str], typer.Option("--partition", "-p", help="SLURM partition.")] = None,
    time_limit: Annotated[Optional[str], typer.Option("--time", "-t", help="Time limit per job, e.g. 04:00:00.")] = None,
    account: Annotated[Optional[str], typer.Option("--account", "-A", help="SLURM account to charge.")] = None,
    requeue: Annotated[bool, typer.Option("--requeue", help="On preemption or near the time limit: checkpoint, requeue, resume.")] = False,
    sbatch_arg: Annotated[Optional[list[str]], typer.Option("--sbatch-arg",
        help="Extra sbatch option, repeatable, e.g. --sbatch-arg=--qos=high.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the sbatch scripts; submit nothing.")] = False,
    rounds: Annotated[Optional[int], typer.Option("--rounds", help="pipeline: sft, then N feedback rounds (sample, label, rm, ppo).",
                                                  show_default=False)] = None,
    label_by: Annotated[Optional[str], typer.Option("--label-by", help="With --rounds: the labeler (oracle, python:pkg.mod:fn, "
                                                    "judge:<model>).", show_default=False)] = None,
) -> None:
    """Submit a stage, or the whole pipeline, to SLURM as batch jobs (sbatch)."""

    def run() -> None:
        _submit(target, overrides or [], config, {"sft": sft_config, "rm": rm_config, "ppo": ppo_config, "dpo": dpo_config}, dry_run,
                stages=stages, rounds=rounds, label_by=label_by,
                nodes=nodes, gpus_per_node=gpus_per_node, ranks_per_node=ranks_per_node, cpus_per_task=cpus_per_task,
                partition=partition, time=time_limit, account=account, requeue=requeue, sbatch_args=tuple(sbatch_arg or ()))

    guard(run)


def _submit(target: str, overrides: list[str], config: Path | None, stage_configs: dict[str, Path | None],
            dry_run: bool, *, stages: str | None = None, rounds: int | None = None, label_by: str | None = None, **resources) -> None:
    """Check everything, write one job script per stage (run folders made only when submitting), then sbatch them in a chain."""
    import shlex
    import shutil

    from rlhf.cli.chaining import split_stage_overrides
    from rlhf.cli.slurm import Resources, check_script_value, dry_run_listing, render_script, sbatch_path

    chain, stage_configs = _chain_and_configs(target, config, stage_configs, stages=stages, rounds=rounds, label_by=label_by)
    res = Resources(**resources)
    res.check()
    # Each of these ends up in a job script: refuse what could break out of it before reading anything.
    for stage, path in stage_configs.items():
        if path:
            check_script_value("--config" if target != "pipeline" else f"--{stage}-config", str(path))
    for item in overrides:
        check_script_value("override", item)
    sbatch = None if dry_run else sbatch_path()
    per_stage = split_stage_overrides(overrides, chain)
    files = {stage: str(Path(path).resolve()) for stage, path in stage_configs.items() if path}
    registry_root, jobs = _jobs(chain, files, per_stage, rounds=rounds, label_by=label_by)
    rlhf_exe = shutil.which("rlhf") or str(Path(sys.executable).with_name("rlhf"))
    command_line = shlex.join(["rlhf", "submit", *sys.argv[2:]]) if len(sys.argv) > 1 else "rlhf submit"
    scripts = {job.run_id: render_script(job, res, registry_root=registry_root, workdir=Path.cwd(), rlhf_exe=rlhf_exe,
                                         command_line=command_line) for job in jobs}
    if dry_run:
        typer.echo(dry_run_listing(jobs, scripts, sbatch=shutil.which("sbatch") or "sbatch"))
        return
    assert sbatch is not None  # found above unless dry_run
    _queue(jobs, scripts, sbatch)


def _chain_and_configs(target: str, config: Path | None, stage_configs: dict[str, Path | None], *, stages: str | None,
                       rounds: int | None, label_by: str | None) -> tuple[tuple[str, ...], dict[str, Path | None]]:
    """The stages `rlhf submit <target>` runs, and the config file of each (None: the embedded default)."""
    from rlhf.cli.chaining import ROUND_STAGES, STAGES, parse_stages

    if target not in (*STAGES, "pipeline"):
        raise UserError(f"rlhf submit takes {', '.join(STAGES)} or pipeline, not {target!r}")
    if target != "pipeline" and stages is not None:
        raise UserError("--stages chooses the stages of `rlhf submit pipeline`; drop it, or submit pipeline")
    if (rounds is not None or label_by is not None) and target != "pipeline":
        raise UserError("--rounds and --label-by are for `rlhf submit pipeline`")
    if rounds is not None or label_by is not None:
        check_rounds(rounds, label_by, stages)
        chain: tuple[str, ...] = ("sft", *ROUND_STAGES)
    else:
        chain = parse_stages(stages) if target == "pipeline" else (target,)
    if target == "pipeline" and config:
        raise UserError("--config names one stage's file; with pipeline use --sft-config, --rm-config, --ppo-config, --dpo-config")
    if target == "pipeline":
        return chain, stage_config_files(chain, stage_configs)
    other = [f"--{s}-config" for s, path in stage_configs.items() if path]
    if other:
        raise UserError(f"{', '.join(other)} is for `rlhf submit pipeline`; give one stage's file with --config")
    return chain, {target: config}


def _jobs(chain: tuple[str, ...], files: dict[str, str], per_stage: dict[str, list[str]], *, rounds: int | None,
          label_by: str | None) -> tuple[Path, list]:
    """The stages' configs checked, then their jobs (rlhf.cli.slurm) with fresh run ids: (the registry root, the jobs)."""
    from rlhf.cli.slurm import round_jobs, stage_jobs
    from rlhf.store.registry import Registry
    from rlhf.store.runs import resolve_config
    from rlhf.store.trust import as_override, code_running_settings

    stage_args = {stage: ([ "-c", files[stage]] if stage in files else []) + per_stage[stage] for stage in chain}
    # Config mistakes (unknown keys, bad values) surface now; references resolve when each job starts (a round's
    # samples and labels do not exist yet, so its stages are only loaded here, with the labeler they will use).
    if rounds is not None:
        resolved = {s: loaded_config(s, files.get(s), per_stage[s] + ([f"by={label_by}"] if s == "label" else [])) for s in chain}
    else:
        resolved = {stage: resolve_config(stage, files.get(stage), per_stage[stage]) for stage in chain}
    roots = set()
    for cfg in resolved.values():
        assert cfg.run.registry is not None  # loaded_config and resolve_config set it
        roots.add(Path(cfg.run.registry))
    if len(roots) > 1:
        raise UserError(f"the stages would use different registries ({', '.join(map(str, sorted(roots)))}); set run.registry for all")
    registry = Registry(roots.pop())
    # What the user's config lets run as code is confirmed again on a requeue's resume (rlhf.store.trust).
    trusted = {stage: [as_override(k, v) for k, v in code_running_settings(cfg).items()] for stage, cfg in resolved.items()}
    if rounds is not None:
        jobs = round_jobs(rounds, label_by or "", registry_root=registry.root, new_run_id=registry.new_run_id, stage_args=stage_args,
                          resume_args=trusted)
    else:
        jobs = stage_jobs(chain, registry_root=registry.root, new_run_id=registry.new_run_id, stage_args=stage_args,
                          resume_args=trusted)
    return registry.root, jobs


def _queue(jobs: list[StageJob], scripts: dict[str, str], sbatch: str) -> None:
    """Make each job's run folder and script and sbatch it after the one before; on a refusal, undo them all."""
    import shutil

    from rlhf.cli.slurm import submit_script
    from rlhf.training.tracking import console

    submitted: list[tuple[str, StageJob]] = []
    try:
        for job in jobs:
            job.run_dir.mkdir(parents=True, exist_ok=False)
            job.script_path.write_text(scripts[job.run_id])
            after = submitted[-1][0] if submitted else None
            submitted.append((submit_script(job.script_path, sbatch=sbatch, after=after), job))
    except UserError:
        # Nothing half-submitted: cancel the jobs already queued and drop the folders made for them.
        if submitted:
            import subprocess

            subprocess.run(["scancel", *[job_id for job_id, _ in submitted]], capture_output=True)
        for job in jobs:
            if job.run_dir.is_dir() and not (job.run_dir / "config.yaml").exists():
                shutil.rmtree(job.run_dir, ignore_errors=True)
        raise
    for job_id, job in submitted:
        console.print(f"submitted {job.stage}: job {job_id}, run {job.run_id}, log {str(job.log_pattern).replace('%j', job_id)}")
