"""`rlhf`: the command line. Parses, resolves, checks inputs, then launches a stage program.

Imports no torch at module import so `rlhf --help` answers at once; heavy imports happen
inside the commands that need them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from rlhf.cli_registry import app as registry_app
from rlhf.errors import EXIT_USER_ERROR, UserError

app = typer.Typer(
    name="rlhf",
    help="InstructGPT-style RLHF: sft -> rm -> ppo on DeepSpeed, from a laptop CPU to a GPU cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(registry_app, name="registry")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config; default: the embedded default (tiny local model, synthetic task).")]
NumGpusOpt = Annotated[int, typer.Option("--num-gpus", "-n", help="Ranks per node (GPUs; on a CPU-only machine, processes).")]
HostfileOpt = Annotated[Optional[Path], typer.Option("--hostfile", help="DeepSpeed hostfile for several nodes.")]
LauncherOpt = Annotated[str, typer.Option("--launcher", help="deepspeed | torchrun | python (one rank).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the newest unfinished run of this stage (or --run) from its last checkpoint.")]
RunOpt = Annotated[Optional[str], typer.Option("--run", help="With --resume: the run id to continue.")]
RegistryOpt = Annotated[Optional[Path], typer.Option("--registry", help="Registry root for --resume (default: $RLHF_HOME or ./rlhf_runs).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and the launch command; run nothing.")]
OverridesArg = Annotated[Optional[list[str]], typer.Argument(help="Config overrides as dotted key=value, e.g. optim.lr=1e-4 engine.zero_stage=3.", show_default=False)]


def _stage_command(stage: str, summary: str) -> None:
    """Register `rlhf <stage>`: every stage command takes the same options and launches its program."""

    def command(
        overrides: OverridesArg = None,
        config: ConfigOpt = None,
        num_gpus: NumGpusOpt = 1,
        hostfile: HostfileOpt = None,
        launcher: LauncherOpt = "deepspeed",
        resume: ResumeOpt = False,
        run: RunOpt = None,
        registry: RegistryOpt = None,
        dry_run: DryRunOpt = False,
    ) -> None:
        _guard(lambda: _launch_stage(stage, overrides or [], config, num_gpus, hostfile, launcher, resume, run, registry, dry_run))

    command.__doc__ = summary
    app.command(stage, context_settings={"allow_extra_args": False})(command)


_stage_command("sft", "Supervised fine-tuning on demonstrations (loss on response tokens only).")
_stage_command("rm", "Reward model on comparisons (Bradley-Terry; ranked lists give all their pairs), from sft:latest by default.")
_stage_command("ppo", "PPO against the reward model with a KL penalty to the SFT policy (actor sft:latest, critic and reward rm:latest).")


@app.command("config")
def show_config(
    stage: Annotated[str, typer.Argument(help="Stage whose config to show: sft, rm, ppo.")],
    overrides: OverridesArg = None,
    config: ConfigOpt = None,
    docs: Annotated[bool, typer.Option("--docs", help="List every key with its documentation instead.")] = False,
) -> None:
    """Print a stage's resolved config (defaults + file + overrides), or document every key."""

    def show() -> None:
        import yaml

        from rlhf.config import STAGE_CONFIGS, field_docs, leaf_keys, to_dict
        from rlhf.runs import resolve_config

        if stage not in STAGE_CONFIGS:
            raise UserError(f"unknown stage '{stage}'; choose one of {', '.join(STAGE_CONFIGS)}")
        if docs:
            described = field_docs(STAGE_CONFIGS[stage])
            for key in leaf_keys(STAGE_CONFIGS[stage]):
                typer.echo(f"{key}: {described.get(key, '')}")
            return
        typer.echo(yaml.safe_dump(to_dict(resolve_config(stage, config, overrides or [])), sort_keys=False), nl=False)

    _guard(show)


@app.command("report")
def show_report(
    ref: Annotated[str, typer.Argument(help="Registry entry: an id, a tag, or a reference such as ppo:latest.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for report.md and the PNG plots (default: the entry's run folder/report).")] = None,
    registry: Annotated[Optional[Path], typer.Option("--registry", help="Registry root (default: $RLHF_HOME or ./rlhf_runs).")] = None,
) -> None:
    """Write a run's report (markdown and training-curve PNGs for it and its whole lineage) and print its summary."""

    def write() -> None:
        from rlhf.registry import Registry, default_root
        from rlhf.report import summary_table, write_report
        from rlhf.tracking import console

        reg = Registry(registry or default_root())
        entry = reg.resolve(ref)
        path = write_report(reg, entry, out)
        console.print(summary_table(reg, entry))
        typer.echo(f"report: {path}")

    _guard(write)


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

    _guard(write)


def _launch_stage(
    stage: str,
    overrides: list[str],
    config: Path | None,
    num_gpus: int,
    hostfile: Path | None,
    launcher: str,
    resume: bool,
    run_id: str | None,
    registry: Path | None,
    dry_run: bool,
) -> None:
    import yaml

    from rlhf.config import to_dict
    from rlhf.launch import LaunchSpec, build_command, format_command, launch_env, run_command, stage_program
    from rlhf.runs import create_run, find_resumable, resolve_config
    from rlhf.tracking import console

    if resume:
        if overrides or config:
            raise UserError("--resume continues a run with its saved config; drop --config and the overrides")
        run_dir = find_resumable(stage, registry, run_id)
    else:
        if run_id:
            raise UserError("--run names the run to continue and needs --resume")
        cfg = resolve_config(stage, config, overrides)
        _check_inputs(stage, cfg)
        if dry_run:
            typer.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False), nl=False)
            run_dir = Path(cfg.run.registry) / "runs" / f"{stage}-<new id>"
        else:
            run_dir = create_run(stage, cfg).run_dir
    spec = LaunchSpec(
        program=stage_program(stage),
        program_args=("--run-dir", str(run_dir)),
        num_procs=num_gpus,
        launcher=launcher,  # type: ignore[arg-type]
        hostfile=hostfile,
    )
    env = launch_env(num_gpus)
    cmd = build_command(spec)
    if dry_run:
        typer.echo(format_command(cmd, env))
        return
    console.print(f"[dim]{'resuming' if resume else 'run'} {run_dir.name}: {format_command(cmd, env)}[/]")
    code = run_command(cmd, env)
    if code != 0:
        raise typer.Exit(code)


def _check_inputs(stage: str, cfg) -> None:
    """Catch bad inputs before any rank starts (and before a cluster allocates GPUs for them).

    Model references resolve to a causal LM, the tokenizer is the parent entry's, and local data
    (files and the embedded default) goes through the very loading and tokenization the stage
    will run, so a malformed row, an empty file or a prompt longer than the context stops here
    with one line. Hub datasets are checked by the stage itself, where they are downloaded once.
    """
    from rlhf.data.load import STAGE_EXAMPLES
    from rlhf.data.sources import FILE_SUFFIXES
    from rlhf.models import check_causal_lm, load_tokenizer, ppo_sources, resolve_model, reward_stats
    from rlhf.registry import Registry
    from rlhf.toy import TOY

    registry = Registry(cfg.run.registry)
    source = resolve_model(cfg.model.name_or_path, registry)
    check_causal_lm(source)
    local = [
        (key, split, data)
        for key, split, data in (("data.train", "train", cfg.data.train), ("data.eval", "eval", cfg.data.eval))
        if data and (data == TOY or data.endswith(FILE_SUFFIXES) or Path(data).expanduser().exists())
    ]
    if local or source.entry is not None or stage == "ppo":
        tokenizer = load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code, name_or_path=cfg.model.tokenizer)
        if stage == "ppo":
            # The critic and reward are reward models that read the actor's token ids.
            reward = ppo_sources(cfg, registry, source, tokenizer).reward
            if cfg.ppo.normalize_score and reward.kind in ("registry", "path"):
                reward_stats(reward)
        for key, split, data in local:
            STAGE_EXAMPLES[stage](data, split=split, tokenizer=tokenizer, data=cfg.data, key=key)


def _guard(action) -> None:
    """Run a command body; a UserError becomes one red line on stderr and exit code 2."""
    try:
        action()
    except UserError as exc:
        from rlhf.tracking import print_error

        print_error(str(exc))
        raise typer.Exit(EXIT_USER_ERROR) from None


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
