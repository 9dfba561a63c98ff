"""Pieces every `rlhf` command module shares: the common options, `-c`'s preset lookup and the error guard.

Imports no torch (see rlhf.cli).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rlhf.errors import EXIT_USER_ERROR, UserError


def config_or_preset(value: Path | None) -> Path | None:
    """A `-c` value: a file, or the name of a preset the package ships (rlhf.config.presets)."""
    from rlhf.config.presets import config_file

    return config_file(value)


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", callback=config_or_preset,
    help="YAML config file, or a preset's name (e.g. ppo-opt-1.3b); default: the embedded default (tiny local model, synthetic task).")]
NumGpusOpt = Annotated[Optional[int], typer.Option("--num-gpus", "-n",
    help="Ranks per node (GPUs; on a CPU-only machine, processes). Default 1; with --resume, the run's own.", show_default=False)]
HostfileOpt = Annotated[Optional[Path], typer.Option("--hostfile", help="DeepSpeed hostfile for several nodes.")]
LauncherOpt = Annotated[Optional[str], typer.Option("--launcher",
    help="deepspeed | torchrun | python (one rank) | srun (inside a SLURM job; what `rlhf submit` uses). Default deepspeed; with "
    "--resume, the run's own.", show_default=False)]
ResumeOpt = Annotated[bool, typer.Option("--resume",
    help="Continue the newest unfinished run of this stage (or --run) from its last checkpoint.")]
RunOpt = Annotated[Optional[str], typer.Option("--run",
    help="With --resume: the run id to continue; without: the id of the new run (rlhf submit picks ids at submission).")]
RegistryOpt = Annotated[Optional[Path], typer.Option("--registry", help="Registry root for --resume (default: $RLHF_HOME or ./rlhf_runs).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and the launch command; run nothing.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v",
    help="Show the libraries' own logging too (DeepSpeed's launcher and engine, transformers, datasets).")]
OverridesArg = Annotated[Optional[list[str]], typer.Argument(
    help="Config overrides as dotted key=value, e.g. optim.lr=1e-4 engine.zero_stage=3.", show_default=False)]

SftConfigOpt = Annotated[Optional[Path], typer.Option("--sft-config", callback=config_or_preset,
    help="YAML config of the sft stage (default: the embedded default).")]
RmConfigOpt = Annotated[Optional[Path], typer.Option("--rm-config", callback=config_or_preset,
    help="YAML config of the rm stage (default: the embedded default).")]
PpoConfigOpt = Annotated[Optional[Path], typer.Option("--ppo-config", callback=config_or_preset,
    help="YAML config of the ppo stage (default: the embedded default).")]
DpoConfigOpt = Annotated[Optional[Path], typer.Option("--dpo-config", callback=config_or_preset,
    help="YAML config of the dpo stage (default: the embedded default).")]
StagesOpt = Annotated[Optional[str], typer.Option("--stages",
    help="The stages to chain, comma-separated, e.g. sft,dpo (default: sft,rm,ppo). Each starts from the runs before it.",
    show_default=False)]
PipelineOverridesArg = Annotated[Optional[list[str]], typer.Argument(
    help="Config overrides: key=value for every stage, or stage:key=value for one (e.g. rm:train.max_steps=100).",
    show_default=False,
)]


def guard(action) -> None:
    """Run a command body; a UserError becomes one red line on stderr and exit code 2."""
    try:
        action()
    except UserError as exc:
        from rlhf.training.tracking import print_error

        print_error(str(exc))
        raise typer.Exit(EXIT_USER_ERROR) from None
