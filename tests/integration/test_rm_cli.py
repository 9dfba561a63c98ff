"""`rlhf rm` end to end through the CLI and the real DeepSpeed launcher, on the CPU, from an SFT
registry entry made here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf.store.registry import Registry
from tests.integration.conftest import (
    ONE_PROCESS,
    RM_QUICK,
    assert_ok,
    entries,
    home_with_entries_of,
    metric_rows,
    rlhf,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def sft_home(default_sft_home) -> Path:
    return default_sft_home


def fresh_home(sft_home: Path, tmp_path: Path) -> Path:
    """A registry of its own that holds the shared SFT entry, so each test sees only its own RM."""
    return home_with_entries_of(sft_home, tmp_path / "home")


def scored_with_transformers_alone(path: str) -> float:
    """Pair accuracy on the toy's held-out pairs using nothing but transformers: the saved folder's
    tokenizer, right padding and AutoModelForSequenceClassification's own last-token pooling."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.toy import ToyTask, ToyTaskConfig

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = ToyTask(ToyTaskConfig()).comparisons("eval")[:100]
    correct = 0
    for row in rows:
        texts = [row["prompt"] + row[side] + tokenizer.eos_token for side in ("chosen", "rejected")]
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            chosen, rejected = model(**batch).logits[:, 0].tolist()
        correct += chosen > rejected
    return correct / len(rows)


def test_embedded_default_agrees_with_the_oracle(default_rm_home):
    """`rlhf rm` with every default but its length (800 of 2000 steps: conftest's SHORTER), as `make
    pipeline` runs it after `rlhf sft` (the session's shared run, which PPO's tests start from too)."""
    [rm] = [e for e in entries(default_rm_home) if e["stage"] == "rm"]
    metrics = rm["metrics"]
    # Agreement on 1000 fresh held-out pairs, and accuracy on the held-out pairs file. Measured with
    # the same code and seed at 800 steps: 0.936 / 0.935 here (0.968 / 0.98 at the default 2000); the
    # earlier 4,000 lists gave 0.92 on one 2-core machine and 0.897 on another (float rounding differs
    # between CPUs and the steps amplify it), hence the room.
    assert metrics["oracle_agreement"] >= 0.90, metrics
    assert metrics["accuracy"] >= 0.90, metrics
    assert metrics["initial_oracle_agreement"] < 0.65, metrics  # a new head ranks at about chance


# ZeRO-3 on one rank in `make test` (two-rank ZeRO-3 is SFT's and PPO's there); on two in `make test-full`.
@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.full)])
def test_zero3_from_an_sft_entry(sft_home, tmp_path, ranks):
    home = fresh_home(sft_home, tmp_path)
    launch = ONE_PROCESS if ranks == 1 else ("-n", "2", "engine.micro_batch_size=16")
    result = rlhf("rm", *launch, "-c", RM_QUICK, "engine.zero_stage=3", home=home)
    assert_ok(result)
    [sft] = [e for e in entries(home) if e["stage"] == "sft"]
    [rm] = [e for e in entries(home) if e["stage"] == "rm"]
    assert rm["status"] == "completed" and rm["config"]["engine"]["zero_stage"] == 3

    # Lineage sft -> rm, the base model and tokenizer carried over.
    assert rm["parents"] == [sft["id"]]
    assert [e.id for e in Registry(home).lineage(rm["id"])] == [rm["id"], sft["id"]]
    assert rm["base_model"] == sft["base_model"]
    assert {k: v for k, v in rm["tokenizer"].items() if k != "name"} == {k: v for k, v in sft["tokenizer"].items() if k != "name"}

    # Held-out accuracy rises well above chance, from near chance before training.
    metrics = rm["metrics"]
    assert metrics["accuracy"] >= 0.75 and metrics["accuracy"] > metrics["initial_accuracy"] + 0.15, metrics
    assert metrics["oracle_agreement"] >= 0.75, metrics
    losses = [row["loss"] for row in metric_rows(rm) if "loss" in row and "accuracy" in row]
    assert losses[-1] < losses[0], losses

    # The folder loads with transformers alone and ranks the held-out pairs as the stage measured.
    assert scored_with_transformers_alone(rm["path"]) >= 0.75
    stats = json.loads((Path(rm["path"]) / "reward_stats.json").read_text())
    assert stats["mean"] == pytest.approx(metrics["reward_mean"]) and stats["std"] == pytest.approx(metrics["reward_std"])
    assert stats["std"] > 0


def test_lora_reward_model_with_offload_saves_merged_with_its_head(sft_home, tmp_path):
    home = fresh_home(sft_home, tmp_path)
    result = rlhf("rm", *ONE_PROCESS, "-c", RM_QUICK, "model.lora.enabled=true", "optim.lr=3e-3", "train.max_steps=60",
                  "data.toy_format=pairs", "engine.zero_stage=2", "engine.offload_optimizer=true", home=home)
    assert_ok(result)
    [rm] = [e for e in entries(home) if e["stage"] == "rm"]
    assert rm["adapter"] == "merged"
    assert rm["metrics"]["accuracy"] > rm["metrics"]["initial_accuracy"] + 0.1, rm["metrics"]
    # The trained head went into the merged folder: transformers alone reproduces the ranking.
    assert scored_with_transformers_alone(rm["path"]) >= rm["metrics"]["accuracy"] - 0.1
