"""An architecture through sft -> rm -> ppo with the real CLI and launcher: a tiny random model of
it (from transformers' config class, dropout configured on) with the toy tokenizer, a few steps of
each stage on the embedded default's data.

Checked per architecture: PPO's first minibatch, before any update, has ratio 1 and approx_kl 0
(dropout off in the actor, the rollout's log-probs scored as sampled); the held-out KL to the
reference is 0 at step 0; the reward model and the critic folders reload with transformers alone
as sequence classifiers of their architecture. The math of each invariant is in tests/unit/test_architectures.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.integration.conftest import PPO_QUICK, QUICK, RM_QUICK, assert_ok, entries, metric_rows, rlhf
from tests.unit.test_architectures import ARCHITECTURES, causal_lm

pytestmark = pytest.mark.slow


def tiny_model_folder(arch: str, folder: Path) -> Path:
    from rlhf.toy import build_tokenizer

    tokenizer = build_tokenizer()
    model = causal_lm(arch, tokenizer)
    config = ARCHITECTURES[arch](len(tokenizer))  # dropout back on in the saved config: PPO must turn it off
    for name, value in config.to_dict().items():
        if "dropout" in name or name.endswith("pdrop"):
            setattr(model.config, name, value)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# One process per stage (`--launcher python`, the same stage program without the launcher's two
# extra interpreters; OPT under the DeepSpeed launcher is tests/integration/test_presets.py). About
# 55 s each here, nearly all of it starting processes: `make test` runs OPT (the architecture of
# the presets) and `make test-matrix` all nine, within the test suite's budget.
@pytest.mark.parametrize("arch", [a if a == "opt" else pytest.param(a, marks=pytest.mark.matrix) for a in ARCHITECTURES])
def test_sft_rm_ppo(arch, tmp_path):
    home = tmp_path / "home"
    folder = tiny_model_folder(arch, tmp_path / arch)
    result = rlhf(
        "pipeline", "--no-report", "--launcher", "python", "--sft-config", QUICK, "--rm-config", RM_QUICK, "--ppo-config", PPO_QUICK,
        f"sft:model.name_or_path={folder}", "sft:train.max_steps=4", "sft:optim.warmup_steps=1", "sft:eval.max_rows=8",
        # What the shipped presets set (tests/integration/test_presets.py runs them in `make test-full`).
        *(("sft:engine.precision=bf16", "sft:model.attn_implementation=sdpa", "sft:model.gradient_checkpointing=true",
           "rm:model.gradient_checkpointing=true") if arch == "opt" else ()),
        "rm:train.max_steps=4", "rm:optim.warmup_steps=1", "rm:eval.max_rows=8", "rm:eval.reward_stats_rows=16",
        # One minibatch per step, one epoch: the first minibatch is the whole first update.
        "ppo:train.max_steps=2", "ppo:ppo.epochs=1", "ppo:rollout.batch_size=8", "ppo:engine.micro_batch_size=8",
        "ppo:eval.max_rows=8", "ppo:eval.batch_size=8", "ppo:train.eval_every=0",
        "train.save_every=0", "train.log_every=1",
        home=home, timeout=900,
    )
    assert_ok(result)
    by_stage = {e["stage"]: e for e in entries(home)}
    assert set(by_stage) == {"sft", "rm", "ppo", "critic"}
    # One `rlhf pipeline` points each stage at the exact runs it just made, not at `latest`.
    sft, rm = by_stage["sft"]["id"], by_stage["rm"]["id"]
    assert by_stage["rm"]["config"]["model"]["name_or_path"] == f"sft:{sft}"
    assert by_stage["ppo"]["config"]["critic"]["name_or_path"] == f"rm:{rm}"
    assert by_stage["ppo"]["parents"] == [sft, rm]
    rows = metric_rows(by_stage["ppo"])
    first = next(r for r in rows if "policy_loss" in r)
    # Up to float rounding: scoring and the update batch the same rows differently.
    assert first["step"] == 1 and abs(first["ratio_mean"] - 1) < 1e-5 and abs(first["approx_kl"]) < 1e-6, first
    assert first["policy_clipfrac"] == 0.0, first
    assert rows[0]["step"] == 0 and abs(rows[0]["eval/kl"]) < 1e-6, rows[0]
    saved_scalar_models_reload(by_stage, arch)


def saved_scalar_models_reload(by_stage: dict, arch: str) -> None:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(by_stage["rm"]["path"])("12+34=46", return_tensors="pt").input_ids
    for stage in ("rm", "critic"):
        assert AutoConfig.from_pretrained(by_stage[stage]["path"]).model_type == ARCHITECTURES[arch](8).model_type
        model = AutoModelForSequenceClassification.from_pretrained(by_stage[stage]["path"]).eval()
        with torch.no_grad():
            score = model(input_ids=ids).logits
        assert score.shape == (1, 1) and torch.isfinite(score).all()
