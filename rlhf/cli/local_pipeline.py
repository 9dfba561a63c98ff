"""`rlhf pipeline`: the stages chained on this machine, each starting from the runs before it; or, with --rounds,
SFT then feedback rounds (sample, label, rm, ppo).

Imports no torch (see rlhf.cli).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from rlhf.cli.common import (
    DpoConfigOpt,
    LauncherOpt,
    NumGpusOpt,
    PipelineOverridesArg,
    PpoConfigOpt,
    RmConfigOpt,
    SftConfigOpt,
    StagesOpt,
    VerboseOpt,
    guard,
)
from rlhf.cli.launch import LaunchChoice, launch_stage
from rlhf.errors import UserError

if TYPE_CHECKING:
    from rlhf.config import StageConfig


def pipeline(
    overrides: PipelineOverridesArg = None,
    sft_config: SftConfigOpt = None,
    rm_config: RmConfigOpt = None,
    ppo_config: PpoConfigOpt = None,
    dpo_config: DpoConfigOpt = None,
    stages: StagesOpt = None,
    num_gpus: NumGpusOpt = None,
    launcher: LauncherOpt = None,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Write the report folder (markdown and plots) at the end.")] = True,
    rounds: Annotated[Optional[int], typer.Option("--rounds", help="Feedback rounds after SFT: each samples the newest policy, "
        "labels (--label-by), trains the reward model on all comparisons so far, then PPO.", show_default=False)] = None,
    label_by: Annotated[Optional[str], typer.Option("--label-by", help="With --rounds: the labeler (oracle, python:pkg.mod:fn, "
        "judge:<model>).", show_default=False)] = None,
    verbose: VerboseOpt = False,
) -> None:
    """sft -> rm -> ppo (or the --stages given, e.g. sft,dpo), each stage its own program; each later
    stage starts from the runs before it (by registry reference), then a summary table and a report
    of the last run and its lineage. With --rounds N: sft, then N rounds of sample, label, rm, ppo."""

    def run_all() -> None:
        from rlhf.cli.chaining import parse_stages, split_stage_overrides, with_parents

        if rounds is not None or label_by is not None:
            _run_rounds(rounds, label_by, stages=stages, overrides=overrides or [], report=report,
                        configs={"sft": sft_config, "rm": rm_config, "ppo": ppo_config, "dpo": dpo_config},
                        launch=LaunchChoice(num_gpus, launcher, None, verbose))
            return
        chain = parse_stages(stages)
        configs = stage_config_files(chain, {"sft": sft_config, "rm": rm_config, "ppo": ppo_config, "dpo": dpo_config})
        per_stage = split_stage_overrides(overrides or [], chain)
        run_ids: dict[str, str] = {}
        for stage in chain:
            run_dir = _launched(stage=stage, launch=LaunchChoice(num_gpus, launcher, None, verbose),
                                overrides=with_parents(stage, per_stage[stage], run_ids), config=configs.get(stage))
            run_ids[stage] = run_dir.name
        if report:
            _pipeline_summary(run_dir.parent.parent, run_ids[chain[-1]])

    guard(run_all)


def _run_rounds(rounds: int | None, label_by: str | None, *, stages: str | None, overrides: list[str], report: bool,
                configs: dict[str, Path | None], launch: LaunchChoice) -> None:
    """`rlhf pipeline --rounds N --label-by X`: SFT once, then N rounds (rlhf.cli.chaining.round_overrides), every entry chained."""
    from rlhf.cli.chaining import ROUND_STAGES, round_overrides, split_stage_overrides
    from rlhf.config import STAGE_CONFIGS, load_config
    from rlhf.training.tracking import console

    check_rounds(rounds, label_by, stages)
    assert rounds is not None and label_by is not None  # check_rounds stops otherwise
    chain = ("sft", *ROUND_STAGES)
    config_files = stage_config_files(chain, configs)
    per_stage = split_stage_overrides(overrides, chain)
    for stage in chain:  # every stage's keys and values, before the first run starts (its references come later)
        load_config(STAGE_CONFIGS[stage], config_files.get(stage), per_stage[stage])
    sft_dir = _launched(stage="sft", launch=launch, overrides=per_stage["sft"], config=config_files.get("sft"))
    previous: dict[str, str] = {}
    for number in range(1, rounds + 1):
        current: dict[str, str] = {}
        for stage in ROUND_STAGES:
            args = round_overrides(stage, per_stage[stage], sft=sft_dir.name, previous=previous, current=current, label_by=label_by)
            current[stage] = _launched(stage=stage, launch=launch, overrides=args, config=config_files.get(stage)).name
        console.print(f"[bold]round {number} of {rounds}[/]: " + ", ".join(f"{stage} {run}" for stage, run in current.items()))
        previous = current
    if report:
        _pipeline_summary(sft_dir.parent.parent, previous["ppo"])


def _launched(*, stage: str, launch: LaunchChoice, overrides: list[str], config: Path | None) -> Path:
    """launch_stage's run folder: never None here, where no launch is a dry run."""
    run_dir = launch_stage(stage=stage, launch=launch, overrides=overrides, config=config)
    assert run_dir is not None
    return run_dir


def loaded_config(stage: str, file: str | None, overrides: list[str]) -> StageConfig:
    """A stage's config checked (keys, values) with its registry made absolute, references left unresolved."""
    import dataclasses

    from rlhf.config import STAGE_CONFIGS, load_config
    from rlhf.store.registry import default_root

    cfg = load_config(STAGE_CONFIGS[stage], file, overrides)
    root = Path(cfg.run.registry or default_root()).expanduser().resolve()
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, registry=str(root)))


def check_rounds(rounds: int | None, label_by: str | None, stages: str | None) -> None:
    from rlhf.feedback.labelers import parse_labeler

    if rounds is None or label_by is None:
        raise UserError("--rounds N and --label-by LABELER go together (e.g. --rounds 3 --label-by oracle)")
    if not 1 <= rounds <= 100:
        raise UserError(f"--rounds must be between 1 and 100, got {rounds}")
    if stages is not None:
        raise UserError("--rounds runs sft then sample, label, rm, ppo each round; drop --stages")
    parse_labeler(label_by, key="--label-by")


def stage_config_files(chain: tuple[str, ...], given: dict[str, Path | None]) -> dict[str, Path | None]:
    """The --<stage>-config files of the stages in `chain`; a file for a stage left out is a mistake."""
    unused = [f"--{stage}-config" for stage, path in given.items() if path and stage not in chain]
    if unused:
        raise UserError(f"{', '.join(unused)} names a stage this pipeline does not run ({','.join(chain)}); "
                        "drop it or add the stage to --stages")
    return {stage: given.get(stage) for stage in chain}


def _pipeline_summary(registry_root: Path, last_id: str) -> None:
    from rlhf.cli.report import summary_table, write_report
    from rlhf.store.registry import Registry
    from rlhf.training.tracking import console

    registry = Registry(registry_root)
    entry = registry.get(last_id)
    console.print(summary_table(registry, entry))
    folder = write_report(registry, entry, Path(entry.run_dir) / "report")
    console.print(f"report: {folder}")

