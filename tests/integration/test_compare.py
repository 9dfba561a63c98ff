"""`rlhf compare --quick` end to end: the methods run from one SFT and RM, one table, the plots.
`make test` runs three of them (`--methods`); `make test-full` every one."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import assert_ok, rlhf, rlhf_here

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS = {"SFT alone", "best-of-4", "PPO (gae)", "GRPO", "RLOO", "REINFORCE++", "DPO (dpo)", "DPO (ipo)", "DPO (kto)",
           "DPO (simpo)", "DPO (orpo)"}


@pytest.mark.parametrize("methods, expected", [
    # SFT alone is PPO's step-0 evaluation.
    (("--methods", "bon,ppo,kto"), {"SFT alone", "best-of-4", "PPO (gae)", "DPO (kto)"}),
    pytest.param((), METHODS, marks=pytest.mark.full),
])
def test_quick_comparison_runs_the_methods_and_writes_the_table_and_plots(tmp_path, methods, expected):
    out = tmp_path / "cmp"
    result = rlhf("compare", "--quick", *methods, "--out", str(out), home=tmp_path / "home", timeout=1800)
    assert_ok(result)
    rows = json.loads((out / "compare.json").read_text())
    assert {r["method"] for r in rows} == expected
    by_method = {r["method"]: r for r in rows}
    for name, row in by_method.items():
        assert row["oracle_sampled"] is not None and 0 <= row["oracle_sampled"] <= 100, row
        if name not in ("SFT alone",):
            assert row["wall_s"] > 0 and row["peak_mib"] > 50, row  # measured, not left empty
    assert by_method["SFT alone"]["kl"] == 0.0
    if "best-of-4" in by_method:
        assert by_method["best-of-4"]["kl"] == pytest.approx(0.6363, abs=1e-3)
    # Every method started from the one SFT entry the comparison made (its own registry).
    registry = out / "registry" / "entries"
    made = [json.loads(p.read_text()) for p in registry.glob("*.json")]
    [sft] = [e for e in made if e["stage"] == "sft"]
    assert all(e["parents"][0] == sft["id"] for e in made if e["stage"] in ("ppo", "dpo", "bon", "rm"))
    table = (out / "compare.md").read_text()
    assert all(f"| {name} |" in table for name in expected)
    for plot in ("oracle_sampled", "oracle_greedy", "kl", "wall_s", "peak_mib", "oracle-vs-kl", "rm-vs-kl"):
        assert (out / f"compare-{plot}.png").read_bytes().startswith(PNG_MAGIC), plot
    assert result.stdout.count("compare: ") >= len(expected)


def test_an_unknown_method_stops_before_anything_is_made(tmp_path):
    result = rlhf_here("compare", "--quick", "--methods", "ppo,nosuch", "--out", str(tmp_path / "cmp"), home=tmp_path)
    assert result.code == 2 and "--methods 'ppo,nosuch': choose from bon, ppo," in result.stderr, result.output
    assert not (tmp_path / "cmp").exists()
