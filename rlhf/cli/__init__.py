"""`rlhf`, the command line: the typer app (`main`, the entry point) with one module per command beside it (`label`,
`launch` for starting or resuming a stage, `local_pipeline`, `slurm_submit` with the sbatch scripts of `slurm`,
`registry`, `report`, `compare`) and what only commands use (`common` options, the pipeline's `chaining`). Imports
no torch at module import, so `rlhf --help` answers at once; heavy imports happen inside the commands that need
them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from rlhf.cli.common import (
    ConfigOpt,
    DryRunOpt,
    HostfileOpt,
    LauncherOpt,
    NumGpusOpt,
    OverridesArg,
    RegistryOpt,
    ResumeOpt,
    RunOpt,
    VerboseOpt,
    guard,
)
from rlhf.cli.label import label_command
from rlhf.cli.launch import LaunchChoice, start_or_resume
from rlhf.cli.local_pipeline import pipeline
from rlhf.cli.registry import app as registry_app
from rlhf.cli.slurm_submit import submit
from rlhf.errors import EXIT_USER_ERROR, UserError

app = typer.Typer(
    name="rlhf",
    help="InstructGPT-style RLHF: sft -> rm -> ppo on DeepSpeed, from a laptop CPU to a GPU cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(registry_app, name="registry")


def _stage_command(stage: str, summary: str) -> None:
    """Register `rlhf <stage>`: every stage command takes the same options and launches its program."""

    def command(
        overrides: OverridesArg = None,
        config: ConfigOpt = None,
        num_gpus: NumGpusOpt = None,
        hostfile: HostfileOpt = None,
        launcher: LauncherOpt = None,
        resume: ResumeOpt = False,
        run: RunOpt = None,
        registry: RegistryOpt = None,
        dry_run: DryRunOpt = False,
        verbose: VerboseOpt = False,
    ) -> None:
        start_or_resume(stage, LaunchChoice(num_gpus, launcher, hostfile, verbose), overrides or [], config=config, resume=resume,
                         run=run, registry=registry, dry_run=dry_run)

    command.__doc__ = summary
    app.command(stage, context_settings={"allow_extra_args": False})(command)


_stage_command("sft", "Supervised fine-tuning on demonstrations (loss on response tokens only).")
_stage_command("rm", "Reward model on comparisons (Bradley-Terry; ranked lists give all their pairs), from sft:latest by default.")
_stage_command("ppo", "PPO against the reward model with a KL penalty to the SFT policy (actor sft:latest, critic and reward rm:latest).")
_stage_command("dpo", "Direct preference optimization of sft:latest on comparisons, no reward model (dpo, ipo, kto, simpo, orpo).")
_stage_command("bon", "Best-of-N: N samples per prompt from sft:latest, the reward's best kept as an SFT dataset, and the best-of-n curve.")
_stage_command("sample", "K responses per prompt from sft:latest (ids, log-probs, seeds) for a labeler to rank: samples:<id>.")
app.command("label", context_settings={"allow_extra_args": False})(label_command)


@app.command("config")
def show_config(
    stage: Annotated[str, typer.Argument(help="Stage whose config to show: sft, rm, ppo, dpo, bon.")],
    overrides: OverridesArg = None,
    config: ConfigOpt = None,
    docs: Annotated[bool, typer.Option("--docs", help="List every key with its documentation instead.")] = False,
) -> None:
    """Print a stage's resolved config (defaults + file + overrides), or document every key."""

    def show() -> None:
        import yaml

        from rlhf.config import STAGE_CONFIGS, field_docs, leaf_keys, to_dict
        from rlhf.store.runs import resolve_config

        if stage not in STAGE_CONFIGS:
            raise UserError(f"unknown stage '{stage}'; choose one of {', '.join(STAGE_CONFIGS)}")
        if docs:
            described = field_docs(STAGE_CONFIGS[stage])
            for key in leaf_keys(STAGE_CONFIGS[stage]):
                typer.echo(f"{key}: {described.get(key, '')}")
            return
        typer.echo(yaml.safe_dump(to_dict(resolve_config(stage, config, overrides or [])), sort_keys=False), nl=False)

    guard(show)


@app.command("plan")
def plan_memory(
    stage: Annotated[str, typer.Argument(help="Stage to estimate: sft, rm, dpo, ppo, bon.")],
    overrides: OverridesArg = None,
    config: ConfigOpt = None,
    ranks: Annotated[int, typer.Option("--ranks", help="Ranks (GPUs) the models are partitioned over.")] = 1,
    memory: Annotated[str, typer.Option("--memory", help="Memory per device, e.g. 80GiB, 40GB, 24576MiB.")] = "80GiB",
    as_json: Annotated[bool, typer.Option("--json", help="Print the numbers (bytes per rank) as JSON.")] = False,
) -> None:
    """Estimate each rank's memory for a stage (model states by ZeRO stage and offload, activations, logits, KV cache)
    from the models' configs, without loading weights; if it does not fit, the smallest change that does (exit 0 either way)."""

    def estimate() -> None:
        import json

        from rlhf.config import STAGE_CONFIGS, load_config
        from rlhf.launcher.memory_estimates import parse_memory
        from rlhf.launcher.memory_plan import plan_stage, render, smallest_fit
        from rlhf.launcher.memory_shapes import TRAINED_STAGES, model_shapes
        from rlhf.store.registry import Registry, default_root
        from rlhf.training.tracking import console, quiet_libraries

        if stage not in TRAINED_STAGES:
            raise UserError(f"rlhf plan estimates {', '.join(TRAINED_STAGES)}, not {stage!r}")
        if ranks < 1:
            raise UserError(f"--ranks must be at least 1, got {ranks}")
        budget = parse_memory(memory)
        cfg = load_config(STAGE_CONFIGS[stage], config, overrides or [])
        quiet_libraries(verbose=False)
        shapes = model_shapes(stage, cfg, Registry(cfg.run.registry or default_root()))
        plan = plan_stage(stage, cfg, shapes, ranks=ranks, memory=budget)
        fix = None if plan.fits else smallest_fit(stage, cfg, shapes, ranks=ranks, memory=budget)
        if as_json:
            typer.echo(json.dumps({**plan.as_dict(), "suggestion": fix[0] if fix else None,
                                   "suggestion_total_bytes": fix[1].total if fix else None}, indent=1))
            return
        for part in render(plan, fix):
            console.print(part)

    guard(estimate)


@app.command("report")
def show_report(
    ref: Annotated[str, typer.Argument(help="Registry entry: an id, a tag, or a reference such as ppo:latest.")],
    out: Annotated[Optional[Path], typer.Option("--out",
        help="Folder for report.md and the PNG plots (default: the entry's run folder/report).")] = None,
    registry: Annotated[Optional[Path], typer.Option("--registry", help="Registry root (default: $RLHF_HOME or ./rlhf_runs).")] = None,
) -> None:
    """Write a run's report (markdown and training-curve PNGs for it and its whole lineage) and print its summary."""

    def write() -> None:
        from rlhf.cli.report import summary_table, write_report
        from rlhf.store.registry import Registry, default_root
        from rlhf.training.tracking import console

        reg = Registry(registry or default_root())
        entry = reg.resolve(ref)
        path = write_report(reg, entry, out)
        console.print(summary_table(reg, entry))
        typer.echo(f"report: {path}")

    guard(write)


@app.command("compare")
def compare_methods(
    out: Annotated[Optional[Path], typer.Option("--out",
        help="Folder for compare.md, compare.json, the PNG plots and the runs' own registry (default: $RLHF_HOME/compare-<time>).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Quick configs, a few steps each: for tests, not a measurement.")] = False,
    methods: Annotated[Optional[str], typer.Option("--methods",
        help="Only these, comma-separated: bon, ppo, grpo, rloo, reinforce_pp, dpo, ipo, kto, simpo, orpo (default: all).")] = None,
) -> None:
    """Every method (SFT, best-of-N, PPO, GRPO, RLOO, REINFORCE++, the DPO losses) on the embedded default,
    from the same SFT and RM entries, in one table ranked on the oracle's score, with plots."""

    def run() -> None:
        import time

        from rlhf.cli.compare import chosen_methods, compare
        from rlhf.store.registry import default_root
        from rlhf.training.tracking import console

        chosen = chosen_methods(methods, quick=quick)  # a wrong name stops before anything is made
        folder = (out or Path(default_root()) / f"compare-{time.strftime('%Y%m%d-%H%M%S')}").expanduser().resolve()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            from rlhf.store.files import not_a_folder

            raise UserError(f"--out {folder}: {not_a_folder(folder, '--out')}") from None
        if (folder / "registry").exists():
            raise UserError(f"--out {folder} already holds a comparison (registry/); give another folder")
        compare(folder, folder / "registry", quick=quick, say=console.print, chosen=chosen)
        console.print((folder / "compare.md").read_text())
        typer.echo(f"compare: {folder}")

    guard(run)


@app.command("toy-data")
def toy_data(
    out: Annotated[Path, typer.Option("--out", help="Folder for the JSONL files.")] = Path("toy_data"),
    overrides: OverridesArg = None,
) -> None:
    """Write the embedded default's synthetic datasets as JSONL (to see the formats, or edit them)."""

    def write() -> None:
        from rlhf.config import load_config
        from rlhf.toy import ToyTask, ToyTaskConfig

        task_cfg = load_config(ToyTaskConfig, None, overrides or [])
        for name, path in ToyTask(task_cfg).write(out).items():
            typer.echo(f"{name}: {path}")

    guard(write)


app.command("pipeline")(pipeline)
app.command("submit")(submit)


def main() -> None:
    """The console script: typer's own usage errors (an unknown option, `-n two`) become our one
    line too, instead of a boxed usage screen. (typer 0.29 carries its own copy of click.)"""
    from typer import Abort
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError

    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError as exc:
        exc.show()  # `rlhf` alone: the help
        sys.exit(0)
    except UsageError as exc:
        from rlhf.training.tracking import print_error

        command = exc.ctx.command_path if exc.ctx else "rlhf"
        print_error(f"{exc.format_message()}; see `{command} --help`")
        sys.exit(EXIT_USER_ERROR)
    except ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except Abort:
        sys.exit(130)  # Ctrl-C
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()  # exits with the command's status itself
