"""`rlhf pipeline` (what `make pipeline` runs) end to end on the embedded default, and `rlhf report`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import assert_ok, entries, rlhf

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_pipeline_chains_three_stages_and_writes_its_report(default_pipeline):
    home, result = default_pipeline.home, default_pipeline.result
    by_stage = {e["stage"]: e for e in entries(home)}
    assert set(by_stage) == {"sft", "rm", "ppo", "critic"}
    sft, rm, ppo = by_stage["sft"], by_stage["rm"], by_stage["ppo"]
    # Each stage started from the runs before it, found through the registry. (The session runs the
    # three as `--stages sft`, `rm`, `ppo` so dependent tests start early: each finds the one before
    # as `latest`; one `rlhf pipeline` naming each run by its id is test_architectures.py's.)
    assert rm["parents"] == [sft["id"]]
    assert ppo["parents"] == [sft["id"], rm["id"]]

    # The summary table: every run's id, and the oracle's score of the untrained, SFT and PPO models.
    for entry in (sft, rm, ppo):
        assert entry["id"] in result.stdout
    for row in ("untrained (random init)", "│ SFT ", "│ PPO "):
        assert row in result.stdout, result.stdout[-3000:]

    report = Path(ppo["run_dir"]) / "report"
    text = (report / "report.md").read_text()
    assert all(entry["id"] in text for entry in (sft, rm, ppo))
    for plot in ("sft-loss.png", "rm-accuracy.png", "ppo-score.png", "ppo-kl.png", "ppo-oracle.png"):
        assert (report / plot).read_bytes().startswith(PNG_MAGIC), plot
        assert f"]({plot})" in text  # embedded in the markdown


def test_report_renders_for_any_entry(default_pipeline, tmp_path):
    out = tmp_path / "rm-report"
    result = rlhf("report", "rm:latest", "--out", str(out), home=default_pipeline.home)
    assert_ok(result)
    [rm] = [e for e in entries(default_pipeline.home) if e["stage"] == "rm"]
    assert rm["id"] in (out / "report.md").read_text()
    assert (out / "rm-accuracy.png").read_bytes().startswith(PNG_MAGIC)
    assert not (out / "ppo-score.png").exists()  # an rm entry's report covers its own lineage only
