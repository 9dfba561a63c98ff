"""The state a stage carries across a resume: saved as plain values, restored with its type."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from rlhf.config import TrackingConfig
from rlhf.errors import UserError
from rlhf.training.run_keeper import LoopState, _restored
from rlhf.training.tracking import METRICS_FILE, Tracker


@dataclass
class WithBeta(LoopState):
    beta: float = 0.0
    negative_kl_steps: int = 0


def test_state_round_trips_through_plain_values():
    state = WithBeta(step=7, initial_eval={"eval/score": 0.25}, beta=0.031, negative_kl_steps=2)
    saved = dataclasses.asdict(state)
    assert all(isinstance(v, (int, float, dict)) for v in saved.values())  # what a weights_only load accepts
    restored = _restored(WithBeta, saved, Path("ckpt"))
    assert type(restored) is WithBeta
    assert restored == state


def test_state_a_stage_does_not_know_is_refused(tmp_path):
    saved = dataclasses.asdict(WithBeta(step=3, beta=0.1))
    with pytest.raises(UserError, match=r"checkpoints.*\(beta, negative_kl_steps\).*start a new run"):
        _restored(LoopState, saved, tmp_path / "checkpoints")


def test_a_checkpoint_without_a_newer_field_takes_its_default():
    restored = _restored(WithBeta, {"step": 4, "initial_eval": {}, "beta": 0.2}, Path("ckpt"))
    assert restored.negative_kl_steps == 0 and restored.step == 4


def test_a_resume_drops_the_metric_rows_past_its_checkpoint(tmp_path):
    """A run killed after step 10 resumes from its checkpoint of step 8: the rows of steps 9 and 10 are
    redone, so the old ones go and each step is logged once."""
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps({"step": s, "loss": 1 / (s + 1)}) + "\n" for s in (0, 4, 8, 9, 10)))
    tracker = Tracker(tmp_path, active=True, tracking=TrackingConfig(), config={}, run_id="sft-x", total_steps=12,
                      start_step=8, description="sft")
    tracker.log(9, {"loss": 0.5})
    tracker.close()
    rows = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 4, 8, 9] and rows[-1]["loss"] == 0.5


def test_a_cut_or_foreign_metrics_line_is_dropped_with_a_warning_not_a_traceback(tmp_path, capsys):
    """What a full disk or a kill mid-write leaves: the last line cut short. The resume goes on."""
    whole = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (0, 4, 8))
    (tmp_path / METRICS_FILE).write_text(whole + '["not a row"]\n' + '{"step": 9, "lo')
    tracker = Tracker(tmp_path, active=True, tracking=TrackingConfig(), config={}, run_id="sft-x", total_steps=12,
                      start_step=8, description="sft")
    tracker.close()
    assert (tmp_path / METRICS_FILE).read_text() == whole
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len(warned) == 2 and f"{METRICS_FILE}:5 is not a whole metrics row" in warned[1], warned


def test_the_final_evaluation_is_printed_as_such_and_logged_as_a_row_of_the_last_step(tmp_path, capsys):
    """Without a terminal (what the ranks' stdout is): the last step's line once, then a `final` line
    of the final evaluation's figures, not a second `step N/N` line with another eval/loss."""
    tracker = Tracker(tmp_path, active=True, tracking=TrackingConfig(), config={}, run_id="sft-x", total_steps=12,
                      start_step=0, description="sft")
    tracker.log(10, {"eval/loss": 1.668})
    tracker.log(12, {"loss": 1.25, "lr": 0.001})
    tracker.log(12, {"eval/loss": 1.581, "eval/oracle_score": 40.0}, final=True)
    tracker.close()
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2:] == ["step 12/12  loss=1.25  eval/loss=1.668  lr=0.001", "final  eval/loss=1.581  eval/oracle_score=40"]
    assert sum(line.startswith("step 12/12") for line in printed) == 1
    rows = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [{k: v for k, v in row.items() if k != "time"} for row in rows[-2:]] == [
        {"step": 12, "loss": 1.25, "lr": 0.001}, {"step": 12, "eval/loss": 1.581, "eval/oracle_score": 40.0},
    ]


@pytest.mark.parametrize("step, evaluated", [(4, True), (5, False), (12, False)])  # eval.every=4; step 12 of 12: the stage's final one
def test_finish_step_keeps_one_order_and_evaluates_only_when_due(step, evaluated):
    """end_step (the loss check and the step's metrics), then the periodic evaluation, then the checkpoint
    (where a stop signal stops the run): a stop never loses the step's figures."""
    from types import SimpleNamespace

    from rlhf.training.run_keeper import RunKeeper

    calls = []
    keeper = object.__new__(RunKeeper)
    keeper.cfg = SimpleNamespace(train=SimpleNamespace(eval_every=4, max_steps=12))
    keeper.end_step = lambda state, *, loss, metrics: calls.append(("end_step", state.step, loss, metrics))
    keeper.log = lambda at, metrics: calls.append(("log", at, metrics))
    keeper.checkpoint_due = lambda state: calls.append(("checkpoint_due", state.step))

    def evaluate():
        calls.append(("evaluate",))
        return {"eval/score": 1.5}

    keeper.finish_step(WithBeta(step=step), loss=0.25, metrics={"loss": 0.25}, evaluate=evaluate)
    middle = [("evaluate",), ("log", step, {"eval/score": 1.5})] if evaluated else []
    assert calls == [("end_step", step, 0.25, {"loss": 0.25}), *middle, ("checkpoint_due", step)]
