"""The report of a finished run: its lineage, each stage's key metrics, the oracle's scores on the
embedded default, and the training curves, as a markdown folder with PNG plots and as a terminal
table.

Everything comes from what the stages already record: the registry entries (summary metrics,
parents, paths) and each run's metrics.jsonl. Nothing is re-measured and no torch is imported, so
`rlhf report` answers in a second; matplotlib is imported only when plots are drawn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

from rlhf.errors import UserError
from rlhf.store.entry import DATASET_FILES, Entry
from rlhf.store.lineage import LineageNode
from rlhf.store.registry import Registry
from rlhf.toy import TOY
from rlhf.training.tracking import METRICS_FILE

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_FILE = "report.md"


@dataclass(frozen=True)
class Plot:
    """One PNG: some metrics.jsonl series of one run against the optimizer step (or another logged metric)."""

    name: str
    """File-name part, e.g. "loss" -> ``sft-loss.png``."""
    title: str
    ylabel: str
    series: tuple[tuple[str, str], ...]
    """(metrics.jsonl key, legend label) pairs; a series the run never logged is left out."""
    x: str = "step"
    """The metrics.jsonl key on the x axis; rows without it are left out."""
    xlabel: str = "step"
    right: tuple[tuple[str, str, str], ...] = ()
    """(key, legend label, axis label) of series on a second y axis, for a quantity on another scale."""


# The curves of each stage, under the keys rlhf/stages/*.py log. Held-out ("eval/") series start at
# step 0, measured before any training: the untrained model for sft, the starting policy for ppo.
STAGE_PLOTS: dict[str, tuple[Plot, ...]] = {
    "sft": (
        Plot("loss", "SFT loss on response tokens", "loss", (("loss", "train"), ("eval/loss", "held-out"))),
        Plot("oracle", "SFT: oracle score of held-out answers", "oracle score (0-100)",
             (("eval/oracle_score", "sampled"), ("eval/oracle_greedy", "greedy"))),
    ),
    "rm": (
        Plot("accuracy", "Reward model: pair accuracy", "accuracy",
             (("accuracy", "train batches"), ("eval/accuracy", "held-out"), ("eval/oracle_agreement", "agreement with the oracle"))),
    ),
    "ppo": (
        Plot("score", "PPO: reward-model score (shaped)", "score", (("score", "rollouts"), ("eval/score", "held-out"))),
        Plot("kl", "PPO: KL to the reference, per response", "KL (nats)", (("kl", "rollouts"), ("eval/kl", "held-out"))),
        Plot("oracle", "PPO: oracle score of held-out answers", "oracle score (0-100)",
             (("eval/oracle_score", "sampled"), ("eval/oracle_greedy", "greedy"))),
        # Gao et al. (2023): the proxy keeps rising with KL while the gold score turns down once the policy exploits it.
        Plot("overoptimization", "PPO: gold (oracle) and proxy (reward) score against KL", "oracle score (0-100)",
             (("eval/oracle_score", "gold: oracle score"),), x="eval/kl", xlabel="KL to the reference (nats)",
             right=(("eval/score", "proxy: reward (shaped)", "reward"),)),
        Plot("gold", "PPO: gold (eval.gold) and proxy (reward) score against KL", "gold score",
             (("eval/gold_score", "gold: eval.gold"),), x="eval/kl", xlabel="KL to the reference (nats)",
             right=(("eval/score", "proxy: reward (shaped)", "reward"),)),
    ),
    "dpo": (
        Plot("loss", "DPO-family loss", "loss", (("loss", "train"), ("eval/loss", "held-out"))),
        Plot("rewards", "DPO: implicit reward margin (chosen - rejected)", "margin",
             (("margin", "train batches"), ("eval/margin", "held-out"))),
        Plot("kl", "DPO: KL to the reference of sampled held-out answers, per response", "KL (nats)", (("eval/kl", "held-out"),)),
        Plot("oracle", "DPO: oracle score of held-out answers", "oracle score (0-100)",
             (("eval/oracle_score", "sampled"), ("eval/oracle_greedy", "greedy"))),
    ),
}

# The registry-entry metrics worth a line per stage, in this order; a stage not named shows all.
KEY_METRICS: dict[str, tuple[tuple[str, str], ...]] = {
    "sft": (("train_loss", "train loss"), ("loss", "held-out loss"), ("oracle_score", "oracle score"),
            ("oracle_greedy", "oracle score, greedy"), ("steps", "steps"), ("wall_time_s", "wall time (s)")),
    "rm": (("train_loss", "train loss"), ("accuracy", "held-out accuracy"), ("oracle_agreement", "oracle agreement"),
           ("margin", "held-out margin"), ("train_accuracy", "train accuracy"), ("steps", "steps"), ("wall_time_s", "wall time (s)")),
    "ppo": (("train_score", "train score"), ("train_kl", "train KL"), ("score", "held-out score"), ("kl", "held-out KL"),
            ("oracle_score", "oracle score"), ("oracle_greedy", "oracle score, greedy"), ("beta", "beta"),
            ("steps", "steps"), ("wall_time_s", "wall time (s)")),
    "dpo": (("objective", "loss"), ("beta", "beta"), ("train_loss", "train loss"), ("loss", "held-out loss"),
            ("accuracy", "held-out reward accuracy"), ("margin", "held-out reward margin"), ("kl", "held-out KL"),
            ("oracle_score", "oracle score"), ("oracle_greedy", "oracle score, greedy"), ("steps", "steps"),
            ("wall_time_s", "wall time (s)")),
}


@dataclass(frozen=True)
class OracleRow:
    """The oracle's mean score (0-100) of one model, and which run measured it when."""

    model: str
    sampled: float
    greedy: float | None
    measured_by: str


def write_report(registry: Registry, entry: Entry, out_dir: Path | str | None = None) -> Path:
    """Write ``report.md`` and its PNG plots for `entry` and every ancestor into `out_dir`
    (default: `default_report_dir`); return the path of ``report.md``.

    An ancestor whose run folder lost its metrics.jsonl is reported without curves; the entry's
    own missing metrics.jsonl is an error, since there would be nothing to plot.
    """
    chain, missing = lineage(registry, entry)
    runs = {e.id: read_metrics(Path(e.run_dir), required=e.id == entry.id) for e in chain}
    out = Path(out_dir) if out_dir is not None else default_report_dir(entry)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the report into {out}: {e.strerror}; pick another folder with --out") from None

    # A stage seen twice in the lineage (sft continued from sft) names its older plots by entry id.
    stages = [e.stage for e in chain]
    images: dict[str, list[tuple[str, str]]] = {}  # entry id -> (file name, title)
    for link in chain:
        prefix = link.stage if stages.count(link.stage) == 1 else link.id
        for plot in STAGE_PLOTS.get(link.stage, ()):
            figure = plot_figure(runs[link.id] or [], plot)
            if figure is not None:
                name = f"{prefix}-{plot.name}.png"
                figure.savefig(out / name)
                images.setdefault(link.id, []).append((name, plot.title))

    path = out / REPORT_FILE
    path.write_text(_markdown(entry, chain, missing, runs, images), encoding="utf-8")
    return path


def default_report_dir(entry: Entry) -> Path:
    """``<run_dir>/report``; ``<run_dir>/report-<stage>`` for a second entry of the same run (ppo's
    critic), so its report does not overwrite the run's own."""
    run_dir = Path(entry.run_dir)
    return run_dir / ("report" if run_dir.name == entry.id else f"report-{entry.stage}")


def summary_table(registry: Registry, entry: Entry) -> Table:
    """A terminal table of `entry` and its ancestors: each stage's id, key metrics and paths, then
    the oracle's scores of the untrained, SFT and PPO models where the runs measured them."""
    chain, missing = lineage(registry, entry)
    table = Table(title=f"rlhf report: {escape(entry.id)}")
    table.add_column("stage", no_wrap=True)
    table.add_column("entry", no_wrap=True)  # ids stay whole: they are what users copy
    table.add_column("metrics")
    table.add_column("where", overflow="fold")
    for e in chain:
        metrics = "\n".join(f"{label} {_fmt(value)}" for label, value in key_metrics(e))
        where = f"model {e.path}\nrun {e.run_dir}"
        table.add_row(escape(e.stage), escape(e.id), escape(metrics) or "-", escape(where))
    for parent, why in missing.items():
        table.add_row("?", escape(parent), f"no registry entry ({why})", "-")
    oracle = oracle_rows(chain)
    if oracle:
        table.add_section()
        for row in oracle:
            score = f"sampled {_fmt(row.sampled)}" + (f"\ngreedy {_fmt(row.greedy)}" if row.greedy is not None else "")
            table.add_row("oracle", escape(row.model), score, escape(f"measured by {row.measured_by}"))
    return table


def lineage(registry: Registry, entry: Entry) -> tuple[list[Entry], dict[str, str]]:
    """`entry` and all its ancestors, oldest first, and the ancestor ids with no entry, each with
    why ("missing", or "removed" by `rlhf registry rm`).

    Every parent is followed, not only the first: a ppo entry's parents are its sft (actor) and
    its rm (critic, reward), and the report of one ppo run should show the whole pipeline.
    """
    found: dict[str, Entry] = {}
    absent: dict[str, str] = {}

    def walk(node: LineageNode) -> None:
        if node.entry is None:
            absent[node.id] = node.state
            return
        found[node.id] = node.entry
        for parent in node.branches:
            walk(parent)

    walk(registry.family_tree(entry.id).ancestry)
    # A parent is always published before its children, so creation time is pipeline order.
    return sorted(found.values(), key=lambda e: (e.created, e.id)), absent


def read_metrics(run_dir: Path, *, required: bool = True) -> list[dict[str, Any]] | None:
    """The rows of a run's metrics.jsonl; None when it is absent and not `required`."""
    path = run_dir / METRICS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if not required:
            return None
        raise UserError(
            f"no {METRICS_FILE} in the run folder {run_dir}: the curves of this run are gone (moved or "
            f"deleted); restore the folder, or report another entry (`rlhf registry ls`)"
        ) from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not a JSON row ({e.msg}); fix or delete that line") from None
        if not isinstance(row, dict) or type(row.get("step")) is not int:
            raise UserError(f'{path}:{number}: a metrics row needs an integer "step"; fix or delete that line')
        rows.append(row)
    return rows


def series(rows: list[dict[str, Any]], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """The x values (steps by default) and values of one metric, in file order (the tracker writes steps in order)."""
    steps, values = [], []
    for row in rows:
        value, at = _number(row.get(key)), _number(row.get(x))
        if value is not None and at is not None:
            steps.append(row["step"] if x == "step" else at)
            values.append(value)
    return steps, values


def _number(value: Any) -> float | None:
    if isinstance(value, str):
        try:  # the tracker writes non-finite floats as "nan", "inf", "-inf"
            value = float(value)
        except ValueError:
            return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def plot_figure(rows: list[dict[str, Any]], plot: Plot) -> Figure | None:
    """A matplotlib Figure (Agg canvas, no pyplot state) of `plot`'s series in `rows`; None when
    the run logged none of them (e.g. no oracle off the embedded default)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    drawn = [(label, *series(rows, key, plot.x)) for key, label in plot.series]
    drawn = [(label, steps, values) for label, steps, values in drawn if steps]
    if not drawn:
        return None
    figure = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, steps, values in drawn:
        # Held-out series have a handful of points: markers show where they were measured.
        axes.plot(steps, values, label=label, marker="o" if len(steps) <= 25 else None, markersize=3)
    axes.set(title=plot.title, xlabel=plot.xlabel, ylabel=plot.ylabel)
    if plot.x == "step":
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 0.5 ticks on short runs
    axes.grid(alpha=0.3)
    handles, labels = axes.get_legend_handles_labels()
    for key, label, ylabel in plot.right:
        xs, values = series(rows, key, plot.x)
        if xs:
            other = axes.twinx()
            other.plot(xs, values, label=label, color="tab:red", linestyle="--", marker="s", markersize=3)
            other.set_ylabel(ylabel)
            more = other.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
    axes.legend(handles, labels)
    return figure


def key_metrics(entry: Entry) -> list[tuple[str, Any]]:
    """(label, value) of the entry's summary metrics that matter for its stage, in order."""
    wanted = KEY_METRICS.get(entry.stage)
    if wanted is None:
        return [(name, value) for name, value in entry.metrics.items() if value is not None]
    return [(label, entry.metrics[name]) for name, label in wanted if entry.metrics.get(name) is not None]


def oracle_rows(chain: list[Entry]) -> list[OracleRow]:
    """The oracle's scores recorded by the lineage's sft, ppo and dpo runs (embedded default only).

    Each run measures at step 0, before training, and at the end: the sft run grades the
    untrained model and the SFT model, the ppo run its starting policy and the PPO model. Each run
    uses its own held-out prompts and sampling temperature, so compare rows of the same run.
    """
    rows: list[OracleRow] = []
    sft = next((e for e in reversed(chain) if e.stage == "sft"), None)
    if sft is not None:
        from_toy = sft.config.get("model", {}).get("name_or_path") == TOY
        before = "untrained (random init)" if from_toy else f"before SFT ({sft.parents[0] if sft.parents else sft.base_model})"
        rows += _oracle_row(before, sft, initial=True)
        rows += _oracle_row("SFT", sft, initial=False)
    for stage, name in (("ppo", "PPO"), ("dpo", "DPO")):
        tuned = next((e for e in reversed(chain) if e.stage == stage), None)
        if tuned is None:
            continue
        started_from_sft = sft is not None and tuned.parents[:1] == (sft.id,)
        rows += _oracle_row(f"SFT, as {name}'s start" if started_from_sft else f"{name}'s starting policy", tuned, initial=True)
        rows += _oracle_row(name if stage == "ppo" else f"DPO ({tuned.metrics.get('objective', 'dpo')})", tuned, initial=False)
    return rows


def _oracle_row(model: str, entry: Entry, *, initial: bool) -> list[OracleRow]:
    prefix = "initial_" if initial else ""
    sampled, greedy = entry.metrics.get(f"{prefix}oracle_score"), entry.metrics.get(f"{prefix}oracle_greedy")
    if not isinstance(sampled, (int, float)):
        return []  # not the embedded default: there is no oracle
    when = "at step 0" if initial else f"after step {entry.metrics.get('steps', '?')}"
    return [OracleRow(model, float(sampled), float(greedy) if isinstance(greedy, (int, float)) else None, f"{entry.id} {when}")]


def _folder_kind(entry: Entry) -> str:
    return "dataset folder" if entry.stage in DATASET_FILES else "model folder"


def _markdown(entry: Entry, chain: list[Entry], missing: dict[str, str], runs: dict[str, list | None],
              images: dict[str, list[tuple[str, str]]]) -> str:
    lines = [
        f"# rlhf report: {entry.id}",
        "",
        f"{entry.stage} entry `{entry.id}`, created {entry.created}; {_folder_kind(entry)} `{entry.path}`.",
        "",
        "## Lineage",
        "",
        "| stage | id | parents | model or dataset folder | run folder |",
        "|---|---|---|---|---|",
    ]
    for e in chain:
        parents = ", ".join(f"`{p}`" for p in e.parents) or "-"
        lines.append(f"| {e.stage} | `{e.id}` | {parents} | `{e.path}` | `{e.run_dir}` |")
    if missing:
        lines += ["", "Ancestors with no registry entry, not shown: " + ", ".join(f"`{p}` ({why})" for p, why in missing.items()) + "."]

    oracle = oracle_rows(chain)
    if oracle:
        lines += [
            "",
            "## Oracle score (0-100) on the embedded default",
            "",
            "| model | sampled | greedy | measured by |",
            "|---|---|---|---|",
        ]
        for row in oracle:
            greedy = _fmt(row.greedy) if row.greedy is not None else "-"
            lines.append(f"| {row.model} | {_fmt(row.sampled)} | {greedy} | {row.measured_by} |")
        lines += ["", "Each run grades its own held-out prompts at its own sampling temperature: compare rows "
                      "measured by the same run."]

    for e in chain:
        lines += ["", f"## {e.stage} `{e.id}`", ""]
        metrics = key_metrics(e)
        if metrics:
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {label} | {_fmt(value)} |" for label, value in metrics]
        if runs[e.id] is None:
            lines += ["", f"No {METRICS_FILE} in `{e.run_dir}`: no curves."]
        for name, title in images.get(e.id, []):
            lines += ["", f"![{title}]({name})"]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
