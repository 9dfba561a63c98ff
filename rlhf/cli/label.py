"""`rlhf label`: a labeler ranks sampled responses, launched as a stage; or, `--by human`, people on a local web page.

Imports no torch (see rlhf.cli).
"""

from __future__ import annotations

from dataclasses import dataclass
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
from rlhf.cli.launch import LaunchChoice, start_or_resume
from rlhf.errors import UserError


def label_command(
    overrides: OverridesArg = None,
    by: Annotated[Optional[str], typer.Option("--by", help="Who ranks: oracle, python:pkg.mod:fn or judge:<model> (the key `by`), "
                                              "or human: people, on a local web page.", show_default=False)] = None,
    labeler: Annotated[Optional[str], typer.Option("--labeler", help="--by human: your name on the judgments (fills in the page's).",
                                                   show_default=False)] = None,
    host: Annotated[str, typer.Option("--host", help="--by human: the address to serve on; 127.0.0.1 is this machine only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="--by human: the port; 0 is any free one.")] = 0,
    log: Annotated[Optional[Path], typer.Option(
        "--log", help="--by human: the judgments file (default <registry>/labels/<samples id>.jsonl).", show_default=False)] = None,
    stats: Annotated[bool, typer.Option("--stats", help="--by human: each labeler's counts and their agreement; serves nothing.")] = False,
    publish: Annotated[bool, typer.Option("--publish", help="--by human: the judgments so far as a prefs entry; serves nothing.")] = False,
    open_browser: Annotated[bool, typer.Option("--open", help="--by human: open the page in this machine's browser.")] = False,
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
    """Rank each prompt's sampled responses (samples:latest) by the oracle, a python: function, a judge model or people: prefs:<id>."""
    human = HumanLabeling(labeler, host, port, log, stats, publish, open_browser)
    if by == "human" or stats or publish:
        machine = [name for name, given in (("--config", config), ("--num-gpus", num_gpus), ("--hostfile", hostfile),
                                            ("--launcher", launcher), ("--resume", resume), ("--dry-run", dry_run)) if given]
        guard(lambda: _label_by_human(by, overrides or [], human, registry=registry, run_id=run, machine=machine))
        return
    if human != HumanLabeling(None, "127.0.0.1", 0, None, False, False, False):
        guard(lambda: _refuse("--labeler, --host, --port, --log, --open, --stats and --publish are for --by human"))
    start_or_resume("label", LaunchChoice(num_gpus, launcher, hostfile, verbose), [*(overrides or []), *([f"by={by}"] if by else [])],
                     config=config, resume=resume, run=run, registry=registry, dry_run=dry_run)


@dataclass(frozen=True)
class HumanLabeling:
    """`rlhf label --by human`'s options."""

    labeler: str | None
    host: str
    port: int
    log: Path | None
    stats: bool
    publish: bool
    open_browser: bool


def _refuse(message: str) -> None:
    raise UserError(message)


def _label_by_human(by: str | None, overrides: list[str], human: HumanLabeling, *, registry: Path | None, run_id: str | None,
                    machine: list[str]) -> None:
    """`rlhf label --by human`: serve the labeling page (rlhf.feedback.label_web) until Ctrl-C; --stats, --publish read its log instead."""
    from rlhf.feedback.judgment_log import JudgmentLog, check_labeler, samples_digest, stats_lines
    from rlhf.feedback.label_web import default_log_path, publish_human, samples_file, serve
    from rlhf.feedback.labelers import read_samples
    from rlhf.store.registry import Registry, default_root

    if by not in (None, "human"):
        raise UserError(f"--stats and --publish read the judgments of --by human, not --by {by}")
    if machine:
        raise UserError(f"--by human serves a web page and launches no stage program: drop {', '.join(machine)}")
    if human.stats and human.publish:
        raise UserError("--stats and --publish go one at a time")
    if run_id and not human.publish:
        raise UserError("--run names the entry --publish makes; drop it, or add --publish")
    samples_ref = "samples:latest"
    for item in overrides:
        key, sep, value = item.partition("=")
        if key != "data.samples" or not sep or not value:
            raise UserError(f"--by human takes one override, data.samples=<samples entry or samples.jsonl>, not {item!r}")
        samples_ref = value
    reg = Registry(registry or default_root())
    samples = samples_file(reg, samples_ref)
    log = human.log or default_log_path(reg, samples)
    if human.publish:
        entry = publish_human(reg, samples, log, run_id)
        typer.echo(f"published {entry.id}: {int(entry.metrics['prompts'])} ranked lists by {len(entry.config['labelers'])} labeler(s) -> "
                   f"{Path(entry.path) / 'train.jsonl'}; train a reward model on them with `rlhf rm data.train=prefs:{entry.id}`")
    elif human.stats:
        for line in stats_lines(JudgmentLog(log, samples_digest(samples)).stats(len(read_samples(samples)))):
            typer.echo(line)
    else:
        serve(samples, log, labeler_hint=human.labeler and check_labeler(human.labeler), host=human.host, port=human.port,
              open_browser=human.open_browser)

