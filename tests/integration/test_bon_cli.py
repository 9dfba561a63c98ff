"""`rlhf bon` (best-of-N) through the CLI from the session pipeline's SFT and RM entries: the SFT
dataset it writes, its best-of-n curve, a killed ZeRO-3 run resumed to the same dataset, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import ONE_PROCESS, RLHF, assert_ok, cli_env, entries, home_with_entries_of, metric_rows, rlhf, rlhf_here
from tests.integration.test_sft_errors import assert_user_error

pytestmark = pytest.mark.slow

SMALL = ("sampling.n=4", "data.max_prompts=96", "sampling.shard_prompts=32", "eval.max_rows=64")


@pytest.fixture
def home(default_rm_home, tmp_path) -> Path:
    """The session pipeline's SFT and RM entries, in a registry of this test's own."""
    return home_with_entries_of(default_rm_home, tmp_path / "home")


def bon_entry(home: Path) -> dict:
    [entry] = [e for e in entries(home) if e["stage"] == "bon"]
    return entry


def dataset(entry: dict) -> list[dict]:
    return [json.loads(line) for line in (Path(entry["path"]) / "train.jsonl").read_text().splitlines()]


def test_oracle_best_of_n_writes_an_sft_dataset_and_a_curve_that_rises_with_n(home):
    from transformers import AutoTokenizer

    from rlhf.config import BestOfNDataConfig, SFTDataConfig
    from rlhf.data.load import ppo_examples, sft_examples
    from rlhf.toy import oracle_score

    result = rlhf("bon", *ONE_PROCESS, "reward.name_or_path=oracle", *SMALL, home=home)
    assert_ok(result)
    entry = bon_entry(home)
    sft = next(e for e in entries(home) if e["stage"] == "sft")
    assert entry["parents"] == [sft["id"]]  # the oracle is no entry
    rows = dataset(entry)
    assert 0 < len(rows) <= 96 and entry["metrics"]["dataset_rows"] == len(rows)
    # Each kept response carries the reward that picked it: here the oracle's own score.
    for row in rows:
        assert row["reward"] == pytest.approx(oracle_score(row["prompt"], row["response"]))
    # The curve: picking by the oracle, best of 4 scores above one sample (per prompt the pick's
    # reward never falls with n among responses that ended: tests/unit/test_best_of_n.py).
    m = entry["metrics"]
    curve = [m[f"best_of_{n}_oracle_score"] for n in (1, 2, 4)]
    assert curve[2] > curve[0] + 5, m
    assert [m[f"best_of_{n}_reward"] * 100 for n in (1, 2, 4)] == pytest.approx(curve)
    assert m["best_of_1_kl_bound"] == 0.0 and m["best_of_4_kl_bound"] > m["best_of_2_kl_bound"]
    assert any("best_reward" in r for r in metric_rows(entry))
    assert f"data.train={entry['path']}/train.jsonl" in result.stdout

    # `rlhf sft` reads the file back to the very prompt ids the policy was sampled from.
    tokenizer = AutoTokenizer.from_pretrained(sft["path"])
    data = SFTDataConfig(max_length=64)
    examples, _ = sft_examples(str(Path(entry["path"]) / "train.jsonl"), split="train", tokenizer=tokenizer, data=data,
                               key="data.train")
    prompts, _ = ppo_examples("toy", split="train", tokenizer=tokenizer, data=BestOfNDataConfig(), key="data.train")
    sampled = set(map(tuple, prompts[:96]))
    for ex in examples:
        prompt = tuple(i for i, r in zip(ex.input_ids, ex.response_mask) if not r)
        assert prompt in sampled


def wait_for_shard(proc: subprocess.Popen, home: Path) -> Path:
    deadline = time.time() + 300
    while time.time() < deadline:
        found = list(home.glob("runs/bon-*/shards/00000.jsonl"))
        if found:
            return found[0].parent.parent
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    raise AssertionError("no shard written in time")


# One rank (DeepSpeed's launcher, killed) in `make test`; two in `make test-full`.
@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.full)])
def test_zero3_killed_run_resumes_to_the_dataset_an_uninterrupted_run_writes(home, tmp_path, ranks):
    # 40 shards of a fraction of a second each: the kill lands long before the last.
    args = ["-n", str(ranks), "engine.zero_stage=3", "sampling.n=2", "data.max_prompts=640", "sampling.shard_prompts=16",
            "data.eval=null"]
    proc = subprocess.Popen([RLHF, "bon", *args], env=cli_env(home), cwd=home, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        run_dir = wait_for_shard(proc, home)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run_dir / "final").exists() and run_dir.name in rlhf("registry", "ls", home=home).stdout
    launch = ONE_PROCESS if ranks == 1 else ()  # resumed in a fork: the kill was the launcher's test
    resumed = rlhf("bon", "--resume", *launch, home=home)
    assert_ok(resumed)
    assert f"resumed {run_dir.name} at shard " in resumed.stdout
    killed = bon_entry(home)

    again = home_with_entries_of(home, tmp_path / "again", ("sft", "rm"))
    assert_ok(rlhf("bon", *args, *launch, home=again))
    whole = bon_entry(again)
    assert killed["parents"] == whole["parents"] and len(killed["parents"]) == 2  # the SFT policy and the RM
    assert dataset(killed) == dataset(whole) and len(dataset(whole)) > 0


def test_bad_input_stops_before_anything_is_created(home):
    cases = [
        (("reward.name_or_path=oracle", "data.train=prompts.jsonl"), ("oracle",)),
        (("sampling.n=0",), ("sampling.n",)),
        (("model.lora.enabled=true",), ("model.lora.enabled",)),
        (("reward.name_or_path=python:no_such_module_here:score",), ("no_such_module_here",)),
    ]
    (home / "prompts.jsonl").write_text(json.dumps({"prompt": "1+1="}) + "\n")
    for args, fragments in cases:
        assert_user_error(rlhf_here("bon", *args, home=home), *fragments)
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())


def test_a_reward_ensemble_picks_by_mean_minus_penalty_times_std(home):
    """Two reward models: each kept response's reward is the mean - k x std of their normalized scores, as the two
    models loaded with transformers alone give it for that text in float64."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tests.integration.conftest import RM_QUICK

    first = next(e for e in entries(home) if e["stage"] == "rm")
    assert_ok(rlhf("rm", *ONE_PROCESS, "-c", RM_QUICK, "train.max_steps=20", "optim.warmup_steps=2", "train.seed=7",
                   "eval.max_rows=8", "eval.reward_stats_rows=16", home=home))
    second = next(e for e in entries(home) if e["stage"] == "rm" and e["id"] != first["id"])
    result = rlhf("bon", *ONE_PROCESS, f"reward.name_or_path=rm:{first['id']}", f"reward_ensemble.name_or_path=[rm:{second['id']}]",
                  "reward_ensemble.penalty=0.5", "sampling.n=4", "data.max_prompts=12", "data.eval=null", home=home)
    assert_ok(result)
    assert "with 1 more: mean - 0.5 x std" in result.stdout
    entry = bon_entry(home)
    assert {first["id"], second["id"]} <= set(entry["parents"])
    tokenizer = AutoTokenizer.from_pretrained(first["path"])
    models = [AutoModelForSequenceClassification.from_pretrained(e["path"]).double().eval() for e in (first, second)]
    stats = [json.loads((Path(e["path"]) / "reward_stats.json").read_text()) for e in (first, second)]
    rows = dataset(entry)
    assert rows
    for row in rows:  # every kept response ended: prompt ids, response ids, EOS
        ids = tokenizer(row["prompt"])["input_ids"] + tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        ids.append(tokenizer.eos_token_id)
        with torch.no_grad():
            z = [(float(m(torch.tensor([ids])).logits[0, 0]) - s["mean"]) / s["std"] for m, s in zip(models, stats)]
        mean = sum(z) / 2
        assert row["reward"] == pytest.approx(mean - 0.5 * abs(z[0] - z[1]) / 2, abs=1e-4)
