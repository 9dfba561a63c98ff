"""`scripts/bench.py` keeps working: its tiny case runs the three stage programs and the reference
measurements in a real worker, prints the table and writes one complete JSON line. The figures
themselves are not judged (they depend on the machine)."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.full]

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import bench  # noqa: E402  (scripts/ is not a package)


def test_quick_case_prints_the_table_and_writes_one_json_line(tmp_path):
    out = tmp_path / "bench.jsonl"
    env = {**os.environ, "RLHF_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    [line] = out.read_text().splitlines()
    result = json.loads(line)
    assert (result["model"], result["ranks"], result["zero_stage"]) == ("tiny", 1, 0)

    # The parameter count read from the saved SFT model is the tiny shape's own.
    from rlhf.toy import ToyModelConfig, build_model, build_tokenizer

    model = build_model(ToyModelConfig(**bench.MODEL_SHAPES["tiny"]), build_tokenizer(), seed=0)
    assert result["parameters"] == sum(p.numel() for p in model.parameters())

    for stage in ("sft", "rm", "ppo"):
        figures = result[stage]
        for key in ("samples_per_s", "tokens_per_s", "peak_memory_mb", "step_s"):
            assert math.isfinite(figures[key]) and figures[key] > 0, (stage, key, figures[key])
        # Real tokens per sample: a toy sequence ("12+34=46" and its specials) is 5 to 32 tokens.
        assert 5 <= figures["tokens_per_s"] / figures["samples_per_s"] <= 32, (stage, figures)
    ppo = result["ppo"]
    assert 1 <= ppo["response_length"] <= result["budget"]["max_new_tokens"]
    assert math.isclose(sum(ppo["split"].values()), 1.0, abs_tol=1e-6) and min(ppo["split"].values()) >= 0
    for key in ("a_rollout_vs_plain_generate", "b_ppo_step_vs_parts", "c_sft_vs_plain_loop", *bench.PHASE_RATIOS):
        assert math.isfinite(result["ratios"][key]) and result["ratios"][key] > 0, key
    # Each phase ratio is the median of the rounds where the stage's step and the plain parts took turns.
    paired = result["reference"]["paired_phase_ratios"]
    assert {k: len(v) for k, v in paired.items()} == {k: result["budget"]["paired_rounds"] for k in ("generate", "score", "train")}
    assert result["ratios"]["b_score_vs_forwards"] == statistics.median(paired["score"])

    # The Markdown table names every stage of the case, and where the line went.
    for stage in ("sft", "rm", "ppo"):
        assert f"| tiny (0.02M) | 1 | {stage} |" in proc.stdout
    assert "(a) rollout generation / plain generate" in proc.stdout and "(b) per phase" in proc.stdout
    assert str(out) in proc.stdout
