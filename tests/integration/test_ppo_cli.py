"""`rlhf ppo` end to end through the CLI and the real DeepSpeed launcher, on the CPU, from the SFT
and RM entries of the embedded default (made once per test session by `rlhf pipeline`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import (
    ONE_PROCESS,
    PPO_QUICK,
    assert_ok,
    entries,
    home_with_entries_of,
    kill_after_checkpoint,
    metric_rows,
    resume_and_check,
    rlhf,
)

pytestmark = pytest.mark.slow

# What every logged PPO step must report (the list, under our names).
STEP_METRICS = (
    "score", "score_std", "rm_score", "kl", "beta", "entropy", "policy_loss", "value_loss", "policy_clipfrac",
    "value_clipfrac", "approx_kl", "ratio_mean", "explained_variance", "response_length", "no_eos_fraction",
    "time_generate_s", "time_score_s", "time_train_s", "lr", "critic_lr",
)


@pytest.fixture
def home(default_rm_home, tmp_path) -> Path:
    return home_with_entries_of(default_rm_home, tmp_path / "home")


def lineage(home: Path) -> dict[str, dict]:
    by_stage = {e["stage"]: e for e in entries(home)}
    assert set(by_stage) == {"sft", "rm", "ppo", "critic"}, by_stage.keys()
    return by_stage


def check_lineage(home: Path) -> dict[str, dict]:
    """The actor's entry descends from the SFT and RM entries; the critic's from the RM entry."""
    e = lineage(home)
    assert e["ppo"]["parents"] == [e["sft"]["id"], e["rm"]["id"]]
    assert e["critic"]["parents"] == [e["rm"]["id"]]
    assert e["ppo"]["base_model"] == e["sft"]["base_model"]
    assert e["ppo"]["metrics"]["critic"] == e["critic"]["id"]
    return e


def test_embedded_default_raises_the_oracle_score_at_bounded_kl(default_pipeline):
    """`rlhf ppo` with every default, as `make pipeline` runs it (the session's `rlhf pipeline`): the
    oracle grades held-out answers of the SFT policy (step 0) and of the PPO policy."""
    home = default_pipeline.home
    metrics = check_lineage(home)["ppo"]["metrics"]
    assert metrics["oracle_score"] >= metrics["initial_oracle_score"] + 10, metrics
    # The actor starts as the reference. Zero up to float rounding: the actor's weights sit in
    # DeepSpeed's buffers, the reference's in their own, and on some CPUs (AVX-512 here) the
    # matmul kernels round differently by alignment (-4e-9 nats seen), so not bitwise.
    assert abs(metrics["initial_kl"]) < 1e-6
    assert 0 < metrics["kl"] < metrics["max_kl"], metrics
    rows = [r for r in metric_rows(check_lineage(home)["ppo"]) if "policy_loss" in r]
    assert [r["step"] for r in rows] == list(range(1, metrics["steps"] + 1))  # every step logged
    for row in rows:
        assert all(k in row for k in STEP_METRICS), set(STEP_METRICS) - set(row)
    assert abs(rows[0]["kl"]) < 1e-6  # no update yet when the first batch is sampled


def saved_models_load_with_transformers_alone(e: dict[str, dict]) -> None:
    """The actor's folder is a plain causal LM, the critic's a plain sequence classifier, both
    trained away from where they started."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    actor = AutoModelForCausalLM.from_pretrained(e["ppo"]["path"]).eval()
    sft = AutoModelForCausalLM.from_pretrained(e["sft"]["path"]).eval()
    critic = AutoModelForSequenceClassification.from_pretrained(e["critic"]["path"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(e["ppo"]["path"])
    ids = tokenizer(["12+34="], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(actor(**ids).logits).all() and torch.isfinite(critic(**ids).logits).all()
    moved = [n for n, p in actor.state_dict().items() if not torch.equal(p, sft.state_dict()[n])]
    assert moved, "the actor's weights never changed"


def test_two_ranks_zero3_with_ptx_and_adaptive_beta(home):
    result = rlhf("ppo", "-n", "2", "-c", PPO_QUICK, "engine.zero_stage=3", "ppo.ptx_coef=0.5", "data.ptx=toy",
                  "ppo.kl_target=0.1", "ppo.kl_horizon=100", home=home)
    assert_ok(result)
    e = check_lineage(home)
    assert e["ppo"]["config"]["engine"]["zero_stage"] == 3
    rows = [r for r in metric_rows(e["ppo"]) if "policy_loss" in r]
    assert all(r["ptx_loss"] > 0 for r in rows)
    betas = [r["beta"] for r in rows]
    assert betas[0] == e["ppo"]["config"]["ppo"]["beta"] and betas[-1] != betas[0]  # the controller moved beta
    assert "rollouts x 2 rank(s)" in result.stdout and "ZeRO-3" in result.stdout
    saved_models_load_with_transformers_alone(e)


# `make test-full`: each loop's kill and resume is test_resume.py's, a two-rank resume refused on one
# rank test_run_safety.py's.
@pytest.mark.full
def test_two_ranks_zero2_killed_run_resumes(home):
    args = ["-n", "2", "-c", PPO_QUICK, "engine.zero_stage=2", "train.max_steps=6"]
    run_dir = kill_after_checkpoint("ppo", args, home=home, min_step=2)
    # ZeRO's optimizer partitions are per rank: other ranks are refused in one line; a plain
    # --resume relaunches the run on the ranks it was launched with.
    wrong = rlhf("ppo", "--resume", "-n", "1", home=home)
    assert wrong.code == 2 and "checkpointed on 2 rank(s), not 1; resume it with -n 2" in wrong.stderr, wrong.output[-2000:]
    entry = resume_and_check("ppo", run_dir, home=home, max_steps=6, loss_key="policy_loss")
    e = check_lineage(home)
    assert entry["config"]["engine"]["zero_stage"] == 2
    # Both engines were checkpointed together.
    [step_dir] = sorted((run_dir / "checkpoints").glob("step-*"))[-1:]
    assert {p.name for p in step_dir.iterdir() if p.is_dir()} == {"actor", "critic"}
    saved_models_load_with_transformers_alone(e)


def test_lora_actor_is_its_own_reference_without_adapters(home):
    result = rlhf("ppo", *ONE_PROCESS, "-c", PPO_QUICK, "model.lora.enabled=true", "model.lora.r=8", "optim.lr=3e-3", home=home)
    assert_ok(result)
    assert "reference = the actor without its LoRA adapters" in result.stdout
    e = check_lineage(home)
    assert e["ppo"]["adapter"] == "merged"
    rows = metric_rows(e["ppo"])
    # New adapters start as a no-op, so the actor and the adapter-free reference agree at first:
    # exactly in evaluation (both forwards), up to float32 rounding in training, whose old log-probs
    # come from generation's logits.
    assert rows[0]["eval/kl"] == 0.0 and abs([r for r in rows if "policy_loss" in r][0]["kl"]) < 1e-5
    assert e["ppo"]["metrics"]["kl"] != 0.0  # and part once the adapters train


def test_nonfinite_loss_stops_with_a_checkpoint(home):
    # An absurd learning rate blows the weights up after the first update.
    result = rlhf("ppo", *ONE_PROCESS, "-c", PPO_QUICK, "optim.lr=1e30", "optim.warmup_steps=0", home=home)
    assert result.code == 2, result.output[-3000:]
    assert "became NaN or inf in step 1" in result.stderr and "Traceback" not in result.output
    [run_dir] = list((home / "runs").glob("ppo-*"))
    assert json.loads((run_dir / "checkpoints" / "resume.json").read_text())["step"] == 0
    assert not (run_dir / "final").exists()
    assert not [e for e in entries(home) if e["stage"] in ("ppo", "critic")]
