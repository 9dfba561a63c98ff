"""The plots of `rlhf compare`: one bar chart per figure across methods, and along each RL run the
oracle's and the reward model's scores against the KL to the SFT policy."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from rlhf.cli.compare import Measured

BARS = (("oracle_sampled", "oracle score, sampled (0-100)"), ("oracle_greedy", "oracle score, greedy (0-100)"),
        ("kl", "KL to the SFT policy (nats per response)"), ("wall_s", "wall time (s)"), ("peak_mib", "peak memory (MiB)"))


def write_plots(out: Path, rows: list[Measured], home: Path, *, rlhf: str) -> None:
    for field, label in BARS:
        _save(_bars(rows, field, label), out / f"compare-{field}.png")
    runs = [(r.method, Path(home) / "runs" / r.entry) for r in rows if r.stage == "ppo"]
    _save(_along_runs(runs, "eval/oracle_score", "oracle score of sampled answers (0-100)"), out / "compare-oracle-vs-kl.png")
    _save(_along_runs(runs, "eval/score", "reward model's score (shaped)"), out / "compare-rm-vs-kl.png")


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.2, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def _bars(rows: list[Measured], field: str, label: str) -> Figure:
    shown = [(r.method, getattr(r, field)) for r in rows if getattr(r, field) is not None]
    figure, axes = _figure(label, "", label)
    axes.barh([name for name, _ in shown][::-1], [value for _, value in shown][::-1])
    return figure


def _along_runs(runs: list[tuple[str, Path]], key: str, label: str) -> Figure:
    """`key` against eval/kl at each held-out evaluation of each run (step 0 = the SFT policy, KL 0)."""
    from rlhf.cli.report import read_metrics

    figure, axes = _figure(f"{label} against KL, along each RL run", "KL to the SFT policy (nats per response)", label)
    for name, run_dir in runs:
        rows = [r for r in read_metrics(run_dir) or [] if key in r and "eval/kl" in r]
        if rows:
            axes.plot([r["eval/kl"] for r in rows], [r[key] for r in rows], marker="o", markersize=3, label=name)
    axes.legend()
    return figure


def _save(figure: Figure, path: Path) -> None:
    figure.savefig(path)
