"""`rlhf`: the command line. Parses, resolves, checks inputs, then launches a stage program.

Imports no torch at module import so `rlhf --help` answers at once; heavy imports happen
inside the commands that need them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

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



def _config_or_preset(value: Path | None) -> Path | None:
    """A `-c` value: a file, or the name of a preset the package ships (rlhf.named_configs)."""
    from rlhf.named_configs import config_file

    return config_file(value)


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", callback=_config_or_preset,
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
        _start_or_resume(stage, LaunchChoice(num_gpus, launcher, hostfile, verbose), overrides or [], config=config, resume=resume,
                         run=run, registry=registry, dry_run=dry_run)

    command.__doc__ = summary
    app.command(stage, context_settings={"allow_extra_args": False})(command)


def _start_or_resume(stage: str, launch: LaunchChoice, overrides: list[str], *, config: Path | None, resume: bool, run: str | None,
                     registry: Path | None, dry_run: bool) -> None:
    if resume:
        _guard(lambda: _resume_stage(stage=stage, launch=launch, run_id=run, registry=registry, dry_run=dry_run,
                                     config=config, overrides=overrides))
    else:
        _guard(lambda: _launch_stage(stage=stage, launch=launch, overrides=overrides, config=config, run_id=run, dry_run=dry_run))


def _label_command(
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
        _guard(lambda: _label_by_human(by, overrides or [], human, registry=registry, run_id=run, machine=machine))
        return
    if human != HumanLabeling(None, "127.0.0.1", 0, None, False, False, False):
        _guard(lambda: _refuse("--labeler, --host, --port, --log, --open, --stats and --publish are for --by human"))
    _start_or_resume("label", LaunchChoice(num_gpus, launcher, hostfile, verbose), [*(overrides or []), *([f"by={by}"] if by else [])],
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
    """`rlhf label --by human`: serve the labeling page (rlhf.label_web) until Ctrl-C; --stats and --publish read its log instead."""
    from rlhf.label_web import JudgmentLog, check_labeler, default_log_path, publish_human, samples_digest, samples_file, serve, stats_lines
    from rlhf.labelers import read_samples
    from rlhf.registry import Registry, default_root

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


_stage_command("sft", "Supervised fine-tuning on demonstrations (loss on response tokens only).")
_stage_command("rm", "Reward model on comparisons (Bradley-Terry; ranked lists give all their pairs), from sft:latest by default.")
_stage_command("ppo", "PPO against the reward model with a KL penalty to the SFT policy (actor sft:latest, critic and reward rm:latest).")
_stage_command("dpo", "Direct preference optimization of sft:latest on comparisons, no reward model (dpo, ipo, kto, simpo, orpo).")
_stage_command("bon", "Best-of-N: N samples per prompt from sft:latest, the reward's best kept as an SFT dataset, and the best-of-n curve.")
_stage_command("sample", "K responses per prompt from sft:latest (ids, log-probs, seeds) for a labeler to rank: samples:<id>.")
app.command("label", context_settings={"allow_extra_args": False})(_label_command)


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
        from rlhf.memory_estimates import parse_memory
        from rlhf.memory_plan import plan_stage, render, smallest_fit
        from rlhf.memory_shapes import TRAINED_STAGES, model_shapes
        from rlhf.registry import Registry, default_root
        from rlhf.tracking import console, quiet_libraries

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

    _guard(estimate)


@app.command("report")
def show_report(
    ref: Annotated[str, typer.Argument(help="Registry entry: an id, a tag, or a reference such as ppo:latest.")],
    out: Annotated[Optional[Path], typer.Option("--out",
        help="Folder for report.md and the PNG plots (default: the entry's run folder/report).")] = None,
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

        from rlhf.compare import chosen_methods, compare
        from rlhf.registry import default_root
        from rlhf.tracking import console

        chosen = chosen_methods(methods, quick=quick)  # a wrong name stops before anything is made
        folder = (out or Path(default_root()) / f"compare-{time.strftime('%Y%m%d-%H%M%S')}").expanduser().resolve()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            from rlhf.registry import not_a_folder

            raise UserError(f"--out {folder}: {not_a_folder(folder, '--out')}") from None
        if (folder / "registry").exists():
            raise UserError(f"--out {folder} already holds a comparison (registry/); give another folder")
        compare(folder, folder / "registry", quick=quick, say=console.print, chosen=chosen)
        console.print((folder / "compare.md").read_text())
        typer.echo(f"compare: {folder}")

    _guard(run)


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


SftConfigOpt = Annotated[Optional[Path], typer.Option("--sft-config", callback=_config_or_preset,
    help="YAML config of the sft stage (default: the embedded default).")]
RmConfigOpt = Annotated[Optional[Path], typer.Option("--rm-config", callback=_config_or_preset,
    help="YAML config of the rm stage (default: the embedded default).")]
PpoConfigOpt = Annotated[Optional[Path], typer.Option("--ppo-config", callback=_config_or_preset,
    help="YAML config of the ppo stage (default: the embedded default).")]
DpoConfigOpt = Annotated[Optional[Path], typer.Option("--dpo-config", callback=_config_or_preset,
    help="YAML config of the dpo stage (default: the embedded default).")]
StagesOpt = Annotated[Optional[str], typer.Option("--stages",
    help="The stages to chain, comma-separated, e.g. sft,dpo (default: sft,rm,ppo). Each starts from the runs before it.",
    show_default=False)]
PipelineOverridesArg = Annotated[Optional[list[str]], typer.Argument(
    help="Config overrides: key=value for every stage, or stage:key=value for one (e.g. rm:train.max_steps=100).",
    show_default=False,
)]


@app.command("pipeline")
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
        from rlhf.pipeline import parse_stages, split_stage_overrides, with_parents

        if rounds is not None or label_by is not None:
            _run_rounds(rounds, label_by, stages=stages, overrides=overrides or [], report=report,
                        configs={"sft": sft_config, "rm": rm_config, "ppo": ppo_config, "dpo": dpo_config},
                        launch=LaunchChoice(num_gpus, launcher, None, verbose))
            return
        chain = parse_stages(stages)
        configs = _stage_configs(chain, {"sft": sft_config, "rm": rm_config, "ppo": ppo_config, "dpo": dpo_config})
        per_stage = split_stage_overrides(overrides or [], chain)
        run_ids: dict[str, str] = {}
        for stage in chain:
            run_dir = _launch_stage(stage=stage, launch=LaunchChoice(num_gpus, launcher, None, verbose),
                                    overrides=with_parents(stage, per_stage[stage], run_ids), config=configs.get(stage))
            run_ids[stage] = run_dir.name
        if report:
            _pipeline_summary(run_dir.parent.parent, run_ids[chain[-1]])

    _guard(run_all)


def _run_rounds(rounds: int | None, label_by: str | None, *, stages: str | None, overrides: list[str], report: bool,
                configs: dict[str, Path | None], launch: LaunchChoice) -> None:
    """`rlhf pipeline --rounds N --label-by X`: SFT once, then N rounds (rlhf.pipeline.round_overrides), every entry chained."""
    from rlhf.config import STAGE_CONFIGS, load_config
    from rlhf.pipeline import ROUND_STAGES, round_overrides, split_stage_overrides
    from rlhf.tracking import console

    _check_rounds(rounds, label_by, stages)
    chain = ("sft", *ROUND_STAGES)
    config_files = _stage_configs(chain, configs)
    per_stage = split_stage_overrides(overrides, chain)
    for stage in chain:  # every stage's keys and values, before the first run starts (its references come later)
        load_config(STAGE_CONFIGS[stage], config_files.get(stage), per_stage[stage])
    sft_dir = _launch_stage(stage="sft", launch=launch, overrides=per_stage["sft"], config=config_files.get("sft"))
    previous: dict[str, str] = {}
    for number in range(1, rounds + 1):
        current: dict[str, str] = {}
        for stage in ROUND_STAGES:
            args = round_overrides(stage, per_stage[stage], sft=sft_dir.name, previous=previous, current=current, label_by=label_by)
            current[stage] = _launch_stage(stage=stage, launch=launch, overrides=args, config=config_files.get(stage)).name
        console.print(f"[bold]round {number} of {rounds}[/]: " + ", ".join(f"{stage} {run}" for stage, run in current.items()))
        previous = current
    if report:
        _pipeline_summary(sft_dir.parent.parent, previous["ppo"])


def _loaded_config(stage: str, file: str | None, overrides: list[str]) -> Any:
    """A stage's config checked (keys, values) with its registry made absolute, references left unresolved."""
    import dataclasses

    from rlhf.config import STAGE_CONFIGS, load_config
    from rlhf.registry import default_root

    cfg = load_config(STAGE_CONFIGS[stage], file, overrides)
    root = Path(cfg.run.registry or default_root()).expanduser().resolve()
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, registry=str(root)))


def _check_rounds(rounds: int | None, label_by: str | None, stages: str | None) -> None:
    from rlhf.labelers import parse_labeler

    if rounds is None or label_by is None:
        raise UserError("--rounds N and --label-by LABELER go together (e.g. --rounds 3 --label-by oracle)")
    if not 1 <= rounds <= 100:
        raise UserError(f"--rounds must be between 1 and 100, got {rounds}")
    if stages is not None:
        raise UserError("--rounds runs sft then sample, label, rm, ppo each round; drop --stages")
    parse_labeler(label_by, key="--label-by")


def _stage_configs(chain: tuple[str, ...], given: dict[str, Path | None]) -> dict[str, Path | None]:
    """The --<stage>-config files of the stages in `chain`; a file for a stage left out is a mistake."""
    unused = [f"--{stage}-config" for stage, path in given.items() if path and stage not in chain]
    if unused:
        raise UserError(f"{', '.join(unused)} names a stage this pipeline does not run ({','.join(chain)}); "
                        "drop it or add the stage to --stages")
    return {stage: given.get(stage) for stage in chain}


def _pipeline_summary(registry_root: Path, last_id: str) -> None:
    from rlhf.registry import Registry
    from rlhf.report import summary_table, write_report
    from rlhf.tracking import console

    registry = Registry(registry_root)
    entry = registry.get(last_id)
    console.print(summary_table(registry, entry))
    folder = write_report(registry, entry, Path(entry.run_dir) / "report")
    console.print(f"report: {folder}")


@app.command("submit")
def submit(
    target: Annotated[str, typer.Argument(help="sft, rm, ppo, dpo, or pipeline (one job per stage, chained with afterok).")],
    overrides: PipelineOverridesArg = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", callback=_config_or_preset,
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

    _guard(run)


def _submit(target: str, overrides: list[str], config: Path | None, stage_configs: dict[str, Path | None],
            dry_run: bool, *, stages: str | None = None, rounds: int | None = None, label_by: str | None = None, **resources) -> None:
    import shlex
    import shutil

    from rlhf.pipeline import ROUND_STAGES, STAGES, parse_stages, split_stage_overrides
    from rlhf.registry import Registry
    from rlhf.runs import resolve_config
    from rlhf.slurm import Resources, check_script_value, dry_run_listing, render_script, round_jobs, sbatch_path, stage_jobs, submit_script
    from rlhf.tracking import console
    from rlhf.trust import as_override, code_running_settings

    if target not in (*STAGES, "pipeline"):
        raise UserError(f"rlhf submit takes {', '.join(STAGES)} or pipeline, not {target!r}")
    if target != "pipeline" and stages is not None:
        raise UserError("--stages chooses the stages of `rlhf submit pipeline`; drop it, or submit pipeline")
    if (rounds is not None or label_by is not None) and target != "pipeline":
        raise UserError("--rounds and --label-by are for `rlhf submit pipeline`")
    if rounds is not None or label_by is not None:
        _check_rounds(rounds, label_by, stages)
        chain: tuple[str, ...] = ("sft", *ROUND_STAGES)
    else:
        chain = parse_stages(stages) if target == "pipeline" else (target,)
    if target == "pipeline" and config:
        raise UserError("--config names one stage's file; with pipeline use --sft-config, --rm-config, --ppo-config, --dpo-config")
    if target == "pipeline":
        stage_configs = _stage_configs(chain, stage_configs)
    else:
        other = [f"--{s}-config" for s, path in stage_configs.items() if path]
        if other:
            raise UserError(f"{', '.join(other)} is for `rlhf submit pipeline`; give one stage's file with --config")
        stage_configs = {target: config}
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
    stage_args = {stage: ([ "-c", files[stage]] if stage in files else []) + per_stage[stage] for stage in chain}
    # Config mistakes (unknown keys, bad values) surface now; references resolve when each job starts (a round's
    # samples and labels do not exist yet, so its stages are only loaded here, with the labeler they will use).
    if rounds is not None:
        resolved = {s: _loaded_config(s, files.get(s), per_stage[s] + ([f"by={label_by}"] if s == "label" else [])) for s in chain}
    else:
        resolved = {stage: resolve_config(stage, files.get(stage), per_stage[stage]) for stage in chain}
    roots = {Path(cfg.run.registry) for cfg in resolved.values()}
    if len(roots) > 1:
        raise UserError(f"the stages would use different registries ({', '.join(map(str, sorted(roots)))}); set run.registry for all")
    registry = Registry(roots.pop())
    # What the user's config lets run as code is confirmed again on a requeue's resume (rlhf.trust).
    trusted = {stage: [as_override(k, v) for k, v in code_running_settings(cfg).items()] for stage, cfg in resolved.items()}
    if rounds is not None:
        jobs = round_jobs(rounds, label_by or "", registry_root=registry.root, new_run_id=registry.new_run_id, stage_args=stage_args,
                          resume_args=trusted)
    else:
        jobs = stage_jobs(chain, registry_root=registry.root, new_run_id=registry.new_run_id, stage_args=stage_args,
                          resume_args=trusted)
    rlhf_exe = shutil.which("rlhf") or str(Path(sys.executable).with_name("rlhf"))
    command_line = shlex.join(["rlhf", "submit", *sys.argv[2:]]) if len(sys.argv) > 1 else "rlhf submit"
    scripts = {job.run_id: render_script(job, res, registry_root=registry.root, workdir=Path.cwd(), rlhf_exe=rlhf_exe,
                                         command_line=command_line) for job in jobs}
    if dry_run:
        typer.echo(dry_run_listing(jobs, scripts, sbatch=shutil.which("sbatch") or "sbatch"))
        return

    submitted: list[tuple[str, object]] = []
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


@dataclass(frozen=True)
class LaunchChoice:
    """What the user said about ranks, launcher and console; None = the default (or, on resume, the run's own)."""

    num_gpus: int | None
    launcher: str | None
    hostfile: Path | None
    verbose: bool = False


def _launch_stage(*, stage: str, launch: LaunchChoice, overrides: list[str], config: Path | None,
                  run_id: str | None = None, dry_run: bool = False) -> Path | None:
    """Check everything, then create the run and launch it; the run folder once it finished, None for --dry-run.

    Every check that can run before a rank starts runs before the run folder exists, so a mistake
    leaves nothing behind; a start that fails inside the stage (before it loaded its models and
    data) is cleaned away too, so no run looks resumable that never trained.
    """
    from rlhf.launch import LaunchSpec, build_command
    from rlhf.memory_check import warn_before_launch
    from rlhf.preflight import check_inputs
    from rlhf.registry import Registry
    from rlhf.runs import LaunchRecord, check_run_id, create_run, resolve_config, save_launch
    from rlhf.tracking import quiet_libraries

    cfg = resolve_config(stage, config, overrides)
    quiet_libraries(verbose=launch.verbose)  # the checks load tokenizers and data
    check_inputs(stage, cfg)
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
    only repeat the run's values: those that run code must be (rlhf.trust)."""
    from rlhf.launch import LaunchSpec, build_command
    from rlhf.runs import CONFIG_FILE, LaunchRecord, find_resumable, load_launch, model_source_digests, open_run
    from rlhf.start_record import check_same_sources, verified_record
    from rlhf.trust import check_resume_overrides

    if config:
        raise UserError("--resume continues a run with its saved config; drop --config")
    run_dir = find_resumable(stage, registry, run_id)
    # A damaged, planted or edited run folder, or one outside its registry, stops here (rlhf.start_record).
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


def _program(stage: str) -> Path:
    from rlhf.launch import stage_program

    return stage_program(stage)


def _print_command(cmd: list[str], num_gpus: int, *, verbose: bool) -> None:
    from rlhf.launch import format_command, launch_env

    typer.echo(format_command(cmd, launch_env(num_gpus, verbose=verbose)))


def _run_locked(stage: str, run_dir: Path, cmd: list[str], record, *, fresh: bool, verbose: bool) -> Path:
    """Launch the ranks while holding the run's lock; report how they ended."""
    from rlhf.launch import format_command, launch_env, run_supervised
    from rlhf.runlock import RunLock
    from rlhf.runs import SUPERVISED_ENV, clear_rank_records, discard_failed_start, supervisor_value
    from rlhf.tracking import console

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
    from rlhf.runs import discard_failed_start, rank_exits
    from rlhf.tracking import print_error

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


def _guard(action) -> None:
    """Run a command body; a UserError becomes one red line on stderr and exit code 2."""
    try:
        action()
    except UserError as exc:
        from rlhf.tracking import print_error

        print_error(str(exc))
        raise typer.Exit(EXIT_USER_ERROR) from None


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
        from rlhf.tracking import print_error

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
    sys.exit(main())
