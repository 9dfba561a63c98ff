"""`rlhf report` and the pipeline's summary: lineage, curves read from metrics.jsonl, the oracle's
scores from the entries, PNGs and markdown, and the one-line errors. No stage is launched: the
entries and metrics.jsonl rows below have the keys and shapes rlhf/stages/*.py write."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from rich.console import Console
from typer.testing import CliRunner

from rlhf.cli import app
from rlhf.cli.report import STAGE_PLOTS, lineage, plot_figure, read_metrics, series, summary_table, write_report
from rlhf.errors import UserError
from rlhf.store.entry import Entry
from rlhf.store.registry import Registry

SFT = "sft-20260101-000001-aaaa0001"
RM = "rm-20260101-000002-bbbb0002"
PPO = "ppo-20260101-000003-cccc0003"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# metrics.jsonl rows as RunKeeper and the stages log them: the step-0 eval of the starting model,
# training rows every log_every steps, the periodic eval, the final eval at the last step.
SFT_ROWS = [
    {"step": 0, "time": 1.0, "eval/loss": 4.5, "eval/oracle_score": 3.5, "eval/oracle_greedy": 1.25},
    {"step": 10, "time": 2.0, "loss": 2.25, "lr": 0.003, "grad_norm": 1.5, "tokens_per_s": 9000.0},
    {"step": 20, "time": 3.0, "loss": 1.75, "lr": 0.002, "grad_norm": 1.1, "tokens_per_s": 9100.0},
    {"step": 20, "time": 3.5, "eval/loss": 1.875, "eval/oracle_score": 40.5, "eval/oracle_greedy": 52.25},
    {"step": 30, "time": 4.0, "loss": 1.5, "lr": 0.0, "grad_norm": 0.9, "tokens_per_s": 9200.0},
    {"step": 30, "time": 4.5, "eval/loss": 1.625, "eval/oracle_score": 61.5, "eval/oracle_greedy": 70.75},
]
RM_ROWS = [
    {"step": 0, "time": 1.0, "eval/accuracy": 0.5, "eval/margin": 0.01, "eval/loss": 0.69, "eval/reward_mean": -0.5,
     "eval/reward_std": 0.1, "eval/oracle_agreement": 0.53},
    {"step": 10, "time": 2.0, "loss": 0.6, "accuracy": 0.625, "margin": 0.2, "lr": 3e-4, "grad_norm": 0.7, "sequences_per_s": 600.0},
    {"step": 20, "time": 3.0, "loss": 0.45, "accuracy": 0.8125, "margin": 1.4, "lr": 0.0, "grad_norm": 0.4, "sequences_per_s": 650.0},
    {"step": 20, "time": 3.5, "eval/accuracy": 0.875, "eval/margin": 1.7, "eval/loss": 0.36, "eval/reward_mean": -2.7,
     "eval/reward_std": 1.5, "eval/oracle_agreement": 0.8625, "train/reward_mean": -2.75, "train/reward_std": 1.625,
     "train/accuracy": 0.8},
]
PPO_ROWS = [
    {"step": 0, "time": 1.0, "eval/score": 0.625, "eval/score_std": 0.65, "eval/kl": 0.0, "eval/response_length": 3.8,
     "eval/no_eos_fraction": 0.0, "eval/oracle_score": 60.25, "eval/oracle_greedy": 69.5},
    {"step": 1, "time": 2.0, "score": 0.5, "score_std": 0.6, "rm_score": -1.7, "kl": 0.0, "beta": 0.05, "entropy": 1.5,
     "policy_loss": -0.01, "value_loss": 0.35, "lr": 1e-5, "critic_lr": 1e-5},
    # The tracker writes a non-finite float as a string; the curve keeps the step as a gap.
    {"step": 2, "time": 3.0, "score": 0.75, "kl": "nan", "beta": 0.05},
    {"step": 2, "time": 3.5, "eval/score": 0.875, "eval/kl": 0.125, "eval/oracle_score": 66.5, "eval/oracle_greedy": 71.0},
    {"step": 3, "time": 4.0, "score": 1.25, "kl": 0.375, "beta": 0.05},
    {"step": 3, "time": 4.5, "eval/score": 1.125, "eval/kl": 0.25, "eval/oracle_score": 72.75, "eval/oracle_greedy": 80.5},
]
# Entry metrics as RunKeeper.publish_model stores them: final eval unprefixed, the step-0 eval as initial_*.
SFT_METRICS = {"train_loss": 1.5, "loss": 1.625, "oracle_score": 61.5, "oracle_greedy": 70.75, "initial_loss": 4.5,
               "initial_oracle_score": 3.5, "initial_oracle_greedy": 1.25, "steps": 30, "wall_time_s": 4.1}
RM_METRICS = {"train_loss": 0.45, "accuracy": 0.875, "margin": 1.7, "loss": 0.36, "oracle_agreement": 0.8625,
              "initial_accuracy": 0.5, "initial_oracle_agreement": 0.53, "train_accuracy": 0.8, "steps": 20, "wall_time_s": 38.2}
PPO_METRICS = {"score": 1.125, "kl": 0.25, "oracle_score": 72.75, "oracle_greedy": 80.5, "initial_score": 0.625,
               "initial_kl": 0.0, "initial_oracle_score": 60.25, "initial_oracle_greedy": 69.5, "steps": 3, "beta": 0.05,
               "train_score": 1.25, "train_kl": 0.375, "critic": f"{PPO}-critic", "wall_time_s": 1.2}

runner = CliRunner()


def publish(reg: Registry, entry_id: str, *, stage: str, created: int, rows: list[dict] | None, metrics: dict,
            parents: tuple[str, ...] = (), run_id: str | None = None, model: str = "toy") -> Entry:
    """Publish an entry whose run folder holds `rows` as metrics.jsonl (none when `rows` is None)."""
    run_dir = reg.run_dir(run_id or entry_id)
    final = run_dir / ("critic" if stage == "critic" else "final")
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    if rows is not None:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return reg.publish(Entry(
        id=entry_id, stage=stage, status="completed", created=f"2026-01-01T00:00:{created:02d}.000000+00:00",
        path=str(final), run_dir=str(run_dir), config={"model": {"name_or_path": model}}, parents=parents,
        base_model="toy-llama-h128-l2-357fae49", metrics=metrics,
    ))


@pytest.fixture()
def reg(tmp_path: Path) -> Registry:
    """A finished sft -> rm -> ppo pipeline, plus the critic that ppo publishes beside its actor."""
    reg = Registry(tmp_path / "home")
    publish(reg, SFT, stage="sft", created=1, rows=SFT_ROWS, metrics=SFT_METRICS)
    publish(reg, RM, stage="rm", created=2, rows=RM_ROWS, metrics=RM_METRICS, parents=(SFT,), model=f"sft:{SFT}")
    publish(reg, PPO, stage="ppo", created=3, rows=PPO_ROWS, metrics=PPO_METRICS, parents=(SFT, RM), model=f"sft:{SFT}")
    publish(reg, f"{PPO}-critic", stage="critic", created=4, rows=None, run_id=PPO, parents=(RM,),
            metrics={"value_loss": 0.35, "explained_variance": 0.01})
    return reg


def pixels(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return imread(path)


def lines_of(rows: list[dict], stage: str, name: str) -> dict[str, tuple[list, list]]:
    """{legend label: (x, y)} of the curves plot_figure draws for one of a stage's plots."""
    plot = next(p for p in STAGE_PLOTS[stage] if p.name == name)
    figure = plot_figure(rows, plot)
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in figure.axes[0].get_lines()}


def test_ppo_lineage_is_the_whole_pipeline_in_order(reg):
    chain, missing = lineage(reg, reg.get(PPO))
    assert [e.id for e in chain] == [SFT, RM, PPO]  # both parents followed, sft once
    assert missing == {}
    assert [e.id for e in lineage(reg, reg.get(SFT))[0]] == [SFT]


def test_curves_are_the_logged_series(reg):
    assert lines_of(SFT_ROWS, "sft", "loss") == {"train": ([10, 20, 30], [2.25, 1.75, 1.5]),
                                                 "held-out": ([0, 20, 30], [4.5, 1.875, 1.625])}
    assert lines_of(SFT_ROWS, "sft", "oracle") == {"sampled": ([0, 20, 30], [3.5, 40.5, 61.5]),
                                                   "greedy": ([0, 20, 30], [1.25, 52.25, 70.75])}
    assert lines_of(RM_ROWS, "rm", "accuracy") == {
        "train batches": ([10, 20], [0.625, 0.8125]),  # train/accuracy (measured once, on other rows) is not this curve
        "held-out": ([0, 20], [0.5, 0.875]),
        "agreement with the oracle": ([0, 20], [0.53, 0.8625]),
    }
    assert lines_of(PPO_ROWS, "ppo", "score") == {"rollouts": ([1, 2, 3], [0.5, 0.75, 1.25]),
                                                  "held-out": ([0, 2, 3], [0.625, 0.875, 1.125])}
    kl = lines_of(PPO_ROWS, "ppo", "kl")
    assert kl["held-out"] == ([0, 2, 3], [0.0, 0.125, 0.25])
    assert kl["rollouts"][0] == [1, 2, 3]
    assert kl["rollouts"][1][0] == 0.0 and math.isnan(kl["rollouts"][1][1]) and kl["rollouts"][1][2] == 0.375
    # A run that never logged a plot's metrics (no oracle off the embedded default) gets no plot.
    assert plot_figure([{"step": 1, "loss": 1.0}], STAGE_PLOTS["ppo"][2]) is None


def test_ppo_report_has_every_stage_plot_and_the_figures(reg, tmp_path):
    out = tmp_path / "report"
    path = write_report(reg, reg.get(PPO), out)
    assert path == out / "report.md"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["ppo-kl.png", "ppo-oracle.png", "ppo-overoptimization.png", "ppo-score.png", "rm-accuracy.png", "sft-loss.png",
                    "sft-oracle.png"]

    # Each file is the figure of its own curves: the same plot redrawn gives the same pixels,
    # another plot does not, and the image is not blank.
    for stage, rows in (("sft", SFT_ROWS), ("rm", RM_ROWS), ("ppo", PPO_ROWS)):
        for plot in STAGE_PLOTS[stage]:
            if plot_figure(rows, plot) is None:  # a series this run did not log (eval.gold): no file
                assert not (out / f"{stage}-{plot.name}.png").exists()
                continue
            saved = pixels(out / f"{stage}-{plot.name}.png")
            assert saved.shape == (360, 640, 4)
            assert saved[..., :3].std() > 0.05
            plot_figure(rows, plot).savefig(tmp_path / "redrawn.png")
            np.testing.assert_array_equal(saved, pixels(tmp_path / "redrawn.png"))
    assert not np.array_equal(pixels(out / "ppo-kl.png"), pixels(out / "ppo-score.png"))

    text = path.read_text()
    for entry in (reg.get(SFT), reg.get(RM), reg.get(PPO)):
        assert f"| {entry.stage} | `{entry.id}` |" in text
        assert f"`{entry.path}`" in text and f"`{entry.run_dir}`" in text
    assert f"| ppo | `{PPO}` | `{SFT}`, `{RM}` |" in text
    # The oracle's scores, each with the run and step that measured it.
    assert f"| untrained (random init) | 3.5 | 1.25 | {SFT} at step 0 |" in text
    assert f"| SFT | 61.5 | 70.75 | {SFT} after step 30 |" in text
    assert f"| SFT, as PPO's start | 60.25 | 69.5 | {PPO} at step 0 |" in text
    assert f"| PPO | 72.75 | 80.5 | {PPO} after step 3 |" in text
    # Each stage's key metrics from its entry.
    for row in ("| held-out loss | 1.625 |", "| oracle agreement | 0.8625 |", "| held-out accuracy | 0.875 |",
                "| train KL | 0.375 |", "| held-out KL | 0.25 |", "| oracle score | 72.75 |"):
        assert row in text
    # Every plot is embedded by a relative path that exists beside the markdown.
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(linked) == pngs


def test_sft_report_shows_only_sft(reg, tmp_path):
    path = write_report(reg, reg.get(SFT))
    assert path == Path(reg.get(SFT).run_dir) / "report" / "report.md"  # default folder
    assert sorted(p.name for p in path.parent.glob("*.png")) == ["sft-loss.png", "sft-oracle.png"]
    text = path.read_text()
    assert RM not in text and PPO not in text
    assert f"| untrained (random init) | 3.5 | 1.25 | {SFT} at step 0 |" in text
    assert f"; model folder `{reg.get(SFT).path}`." in text
    assert "PPO" not in text


def test_critic_report_does_not_overwrite_its_ppo_run_report(reg):
    ppo_report = write_report(reg, reg.get(PPO))
    critic_report = write_report(reg, reg.get(f"{PPO}-critic"))
    assert critic_report.parent == Path(reg.get(PPO).run_dir) / "report-critic"
    assert f"rlhf report: {PPO}\n" in ppo_report.read_text()  # still the ppo report
    text = critic_report.read_text()
    assert f"rlhf report: {PPO}-critic\n" in text and "| value_loss | 0.35 |" in text
    assert [e.id for e in lineage(reg, reg.get(f"{PPO}-critic"))[0]] == [SFT, RM, f"{PPO}-critic"]


def test_summary_table_names_ids_paths_metrics_and_oracle_scores(reg):
    console = Console(record=True, width=300)
    console.print(summary_table(reg, reg.get(PPO)))
    text = console.export_text()
    for entry_id in (SFT, RM, PPO):
        entry = reg.get(entry_id)
        assert entry.id in text and f"model {entry.path}" in text and f"run {entry.run_dir}" in text
    for metric in ("held-out loss 1.625", "oracle agreement 0.8625", "train score 1.25", "held-out KL 0.25", "oracle score 72.75"):
        assert metric in text
    oracle = [line for line in text.splitlines() if "oracle " in line and "measured by" in line]
    assert len(oracle) == 4
    assert "untrained (random init)" in oracle[0] and "sampled 3.5" in oracle[0] and f"{SFT} at step 0" in oracle[0]
    assert "SFT" in oracle[1] and "sampled 61.5" in oracle[1] and f"{SFT} after step 30" in oracle[1]
    assert "PPO's start" in oracle[2] and "sampled 60.25" in oracle[2] and f"{PPO} at step 0" in oracle[2]
    assert "PPO" in oracle[3] and "sampled 72.75" in oracle[3] and f"{PPO} after step 3" in oracle[3]


def test_off_the_embedded_default_there_is_no_oracle(tmp_path):
    reg = Registry(tmp_path / "home")
    rows = [{k: v for k, v in row.items() if "oracle" not in k} for row in SFT_ROWS]
    metrics = {k: v for k, v in SFT_METRICS.items() if "oracle" not in k}
    entry = publish(reg, SFT, stage="sft", created=1, rows=rows, metrics=metrics, model="facebook/opt-350m")
    path = write_report(reg, entry, tmp_path / "out")
    assert sorted(p.name for p in path.parent.glob("*.png")) == ["sft-loss.png"]
    assert "Oracle" not in path.read_text()
    console = Console(record=True, width=300)
    console.print(summary_table(reg, entry))
    assert "measured by" not in console.export_text()


def test_ancestor_without_metrics_or_entry_is_noted_not_fatal(reg, tmp_path):
    (Path(reg.get(SFT).run_dir) / "metrics.jsonl").unlink()
    orphan = publish(reg, "ppo-20260101-000009-dddd0009", stage="ppo", created=9, rows=PPO_ROWS, metrics=PPO_METRICS,
                     parents=("sft-20250101-000000-gone0000", RM))
    text = write_report(reg, orphan, tmp_path / "out").read_text()
    assert f"No metrics.jsonl in `{reg.get(SFT).run_dir}`: no curves." in text
    assert "Ancestors with no registry entry, not shown: `sft-20250101-000000-gone0000` (missing)." in text
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        "ppo-kl.png", "ppo-oracle.png", "ppo-overoptimization.png", "ppo-score.png", "rm-accuracy.png"]


def test_removed_parent_is_said_removed(reg, tmp_path):
    reg.remove(RM, force=True)  # ppo still names it
    chain, missing = lineage(reg, reg.get(PPO))
    assert [e.id for e in chain] == [SFT, PPO] and missing == {RM: "removed"}
    text = write_report(reg, reg.get(PPO), tmp_path / "out").read_text()
    assert f"`{RM}` (removed)" in text
    console = Console(record=True, width=300)
    console.print(summary_table(reg, reg.get(PPO)))
    assert re.search(rf"{RM}\s+│ no registry entry \(removed\)", console.export_text())


def test_malformed_metrics_row_names_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": \n')
    with pytest.raises(UserError, match=r"metrics\.jsonl:2: not a JSON row"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"loss": 1.0}\n')
    with pytest.raises(UserError, match=r'metrics\.jsonl:1: a metrics row needs an integer "step"'):
        read_metrics(tmp_path)


def test_cli_writes_the_report_and_prints_the_summary(reg, tmp_path):
    out = tmp_path / "cli-report"
    result = runner.invoke(app, ["report", "ppo:latest", "--out", str(out)], env={"RLHF_HOME": str(reg.root), "COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert f"report: {out / 'report.md'}" in result.output
    assert SFT in result.output and RM in result.output and "sampled 72.75" in result.output
    assert len(list(out.glob("*.png"))) == 7

    # --registry instead of $RLHF_HOME; the default folder is the run's own.
    result = runner.invoke(app, ["report", f"sft:{SFT}", "--registry", str(reg.root)], env={"RLHF_HOME": str(tmp_path / "elsewhere")})
    assert result.exit_code == 0, result.output
    assert (Path(reg.get(SFT).run_dir) / "report" / "sft-loss.png").is_file()


@pytest.mark.parametrize(
    ("ref", "damage", "message"),
    [
        ("ppo:nope", None, "error: unknown registry reference 'ppo:nope'"),
        (PPO, "delete", "error: no metrics.jsonl in the run folder"),
        (PPO, "corrupt", "metrics.jsonl:1: not a JSON row"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(reg, tmp_path, ref, damage, message):
    metrics = Path(reg.get(PPO).run_dir) / "metrics.jsonl"
    if damage == "delete":
        metrics.unlink()
    elif damage == "corrupt":
        metrics.write_text("{not json\n")
    result = runner.invoke(app, ["report", ref], env={"RLHF_HOME": str(reg.root), "COLUMNS": "1000"})
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert not (Path(reg.get(PPO).run_dir) / "report").exists()  # nothing written on an error


def test_a_best_of_n_entry_names_its_dataset_folder(reg, tmp_path):
    run_dir = reg.run_dir("bon-20260101-000005-eeee0005")
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "final" / "train.jsonl").write_text('{"prompt": "1+2=", "response": "3", "reward": 1.0}\n')
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "kept": 1}\n')
    bon = reg.publish(Entry(
        id="bon-20260101-000005-eeee0005", stage="bon", status="completed", created="2026-01-01T00:00:05.000000+00:00",
        path=str(run_dir / "final"), run_dir=str(run_dir), config={}, parents=(SFT, RM), base_model="toy-llama-h128-l2-357fae49",
        metrics={"kept": 1},
    ))
    text = write_report(reg, bon, tmp_path / "out").read_text()
    assert f"; dataset folder `{bon.path}`." in text and "model folder" not in text.split("## Lineage")[0]


def test_the_overoptimization_plot_draws_gold_and_proxy_against_kl():
    rows = [{"step": 0, "eval/kl": 0.0, "eval/oracle_score": 60.0, "eval/score": 0.1}, {"step": 1, "kl": 0.2},
            {"step": 2, "eval/kl": 1.5, "eval/oracle_score": 80.0, "eval/score": 1.0},
            {"step": 4, "eval/kl": 4.0, "eval/oracle_score": 70.0, "eval/score": 2.5}]
    plot = next(p for p in STAGE_PLOTS["ppo"] if p.name == "overoptimization")
    assert series(rows, "eval/oracle_score", plot.x) == ([0.0, 1.5, 4.0], [60.0, 80.0, 70.0])
    figure = plot_figure(rows, plot)
    left, right = figure.axes
    assert left.get_xlabel() == "KL to the reference (nats)" and right.get_ylabel() == "reward"
    assert list(left.lines[0].get_xdata()) == [0.0, 1.5, 4.0] and list(right.lines[0].get_ydata()) == [0.1, 1.0, 2.5]
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["gold: oracle score", "proxy: reward (shaped)"]


def test_the_gold_plot_draws_eval_gold_and_proxy_against_kl_and_only_when_logged():
    rows = [{"step": 0, "eval/kl": 0.0, "eval/gold_score": 0.5, "eval/score": 0.1},
            {"step": 3, "eval/kl": 0.75, "eval/gold_score": 0.625, "eval/score": 1.0}]
    plot = next(p for p in STAGE_PLOTS["ppo"] if p.name == "gold")
    left, right = plot_figure(rows, plot).axes
    assert list(left.lines[0].get_xdata()) == [0.0, 0.75] and list(left.lines[0].get_ydata()) == [0.5, 0.625]
    assert list(right.lines[0].get_ydata()) == [0.1, 1.0]
    assert plot_figure(PPO_ROWS, plot) is None  # a run without eval.gold has no gold plot
