"""The feedback loop through the real CLI: `rlhf sample` from the SFT entry, `rlhf label` by the oracle,
a python: function and a judge model, `rlhf rm data.train=prefs:latest` on the result, iterated rounds
with `rlhf pipeline --rounds`, and the bad input of each."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlhf.toy import build_tokenizer, oracle_score
from tests.integration.conftest import ONE_PROCESS, PPO_QUICK, QUICK, RM_QUICK, assert_ok, entries, home_with_entries_of, rlhf

pytestmark = pytest.mark.slow

SAMPLE = ("sampling.k=4", "data.max_prompts=24", "sampling.batch_size=8", "sampling.shard_prompts=16")


@pytest.fixture(scope="module")
def sampled(default_sft_home, tmp_path_factory) -> Path:
    """A registry with the SFT entry and 24 prompts x 4 samples of it."""
    home = home_with_entries_of(default_sft_home, tmp_path_factory.mktemp("sampled"), ("sft",))
    assert_ok(rlhf("sample", *ONE_PROCESS, *SAMPLE, home=home))
    return home


def by_stage(home: Path, stage: str) -> list[dict]:
    return [e for e in entries(home) if e["stage"] == stage]


def rows(entry: dict, name: str) -> list[dict]:
    return [json.loads(line) for line in (Path(entry["path"]) / name).read_text().splitlines()]


def test_samples_keep_ids_logprobs_and_seeds_and_name_the_policy(sampled):
    [sft], [samples] = by_stage(sampled, "sft"), by_stage(sampled, "samples")
    assert samples["parents"] == [sft["id"]] and samples["metrics"]["prompts"] == 24
    tokenizer = build_tokenizer()
    found = rows(samples, "samples.jsonl")
    assert len(found) == 24 and {row["shard"] for row in found} == {0, 1}
    assert {row["seed"] for row in found} == {42, 43}  # sampling.seed + the shard's index
    for row in found:
        assert len(row["responses"]) == 4 and tokenizer.decode(row["prompt_ids"], skip_special_tokens=True) == row["prompt"]
        for response in row["responses"]:
            assert len(response["logprobs"]) == len(response["ids"]) and all(lp <= 0 for lp in response["logprobs"])
            assert response["ended"] == (response["ids"][-1] == tokenizer.eos_token_id)
            assert tokenizer.decode(response["ids"], skip_special_tokens=True) == response["text"]
    # A trained SFT model answers most of them: the responses are mostly sums that ended.
    assert sum(r["ended"] for row in found for r in row["responses"]) > 0.8 * 96


def test_oracle_labels_rank_by_the_oracle_with_ties_and_the_reward_model_trains_on_them(sampled, tmp_path):
    home = home_with_entries_of(sampled, tmp_path / "home", ("sft", "samples"))
    assert_ok(rlhf("label", *ONE_PROCESS, "--by", "oracle", home=home))
    [samples], [prefs] = by_stage(home, "samples"), by_stage(home, "prefs")
    assert prefs["parents"] == [samples["id"]]
    labeled, sampled_rows = rows(prefs, "train.jsonl"), rows(samples, "samples.jsonl")
    ties = 0
    for row, source in zip(labeled, sampled_rows):
        truth = [oracle_score(source["prompt"], r["text"]) for r in source["responses"]]
        assert row["responses"] == [source["responses"][i]["text"] for i in row["sample_index"]]
        assert row["scores"] == [truth[i] for i in row["sample_index"]] and row["scores"] == sorted(truth, reverse=True)
        for a in range(4):  # an independent reading of the ranks: how many scored strictly higher
            assert row["ranks"][a] == sum(s > row["scores"][a] for s in row["scores"])
        ties += sum(row["ranks"][a] == row["ranks"][b] for a in range(4) for b in range(a + 1, 4))
    assert prefs["metrics"]["tied_pairs"] == ties > 0 and prefs["metrics"]["oracle_agreement"] == 1.0
    result = rlhf("rm", *ONE_PROCESS, "-c", RM_QUICK, "data.train=prefs:latest", "train.max_steps=4", "optim.warmup_steps=0",
                  "engine.micro_batch_size=8",
                  "eval.max_rows=16", "eval.reward_stats_rows=8", home=home)
    assert_ok(result)
    pairs = 6 * len(labeled) - ties
    assert f"{pairs} pairs (0 identical and {ties} tied pairs dropped" in result.stdout.replace("\n", " ")
    [rm] = by_stage(home, "rm")
    assert set(rm["parents"]) == {by_stage(home, "sft")[0]["id"], prefs["id"]}
    assert rm["config"]["data"]["train"] == str(Path(prefs["path"]) / "train.jsonl")  # pinned, not "latest"
    assert 0.0 <= rm["metrics"]["oracle_agreement"] <= 1.0  # still the embedded default's task: the oracle measures it


def test_a_python_labeler_and_a_judge_label_in_one_line_each(sampled, tmp_path):
    home = home_with_entries_of(sampled, tmp_path / "home", ("sft", "samples"))
    assert_ok(rlhf("label", *ONE_PROCESS, "--by", "python:tests.reward_functions:response_length", home=home))
    [longest] = by_stage(home, "prefs")
    for row in rows(longest, "train.jsonl"):
        assert [len(r) for r in row["responses"]] == sorted((len(r) for r in row["responses"]), reverse=True)
    # A judge: the embedded default's (SFT) model reads the plain-text question; its choices " A"/" B" are
    # not one token of its tokenizer, "A"/"B" are.
    refused = rlhf("label", *ONE_PROCESS, "--by", f"judge:sft:{by_stage(home, 'sft')[0]['id']}", home=home)
    assert refused.code == 2 and "judge.choices: ' A' is 2 tokens for the judge's tokenizer, not one" in refused.stderr
    judged = rlhf("label", *ONE_PROCESS, "--by", "judge:sft:latest", "judge.choices=[A, B]", home=home)
    assert_ok(judged)
    prefs = max(by_stage(home, "prefs"), key=lambda e: e["created"])
    assert set(prefs["parents"]) == {by_stage(home, "samples")[0]["id"], by_stage(home, "sft")[0]["id"]}
    for row in rows(prefs, "train.jsonl"):
        assert all(0.0 <= s <= 1.0 for s in row["scores"]) and row["scores"] == sorted(row["scores"], reverse=True)
    assert 0.0 <= prefs["metrics"]["oracle_agreement"] <= 1.0 and math.isfinite(prefs["metrics"]["oracle_pairs"])


@pytest.mark.parametrize("args, expected", [
    (("sample", "sampling.k=1"), "sampling.k must be at least 2, got 1"),
    (("sample", "sampling.temperature=0"), "sampling.temperature must be positive"),
    (("sample", "data.train={empty}"), "empty.jsonl"),
    (("sample", "model.name_or_path=samples:latest"), "model.name_or_path=samples:latest is a samples entry (a dataset), not a model"),
    (("label", "--by", "judge:sft:latest", "judge.template=Which is better?"), "judge.template lacks {prompt}, {a}, {b}"),
    (("label", "by=human"), "by=human: people label on a web page, not in a stage run: use `rlhf label --by human`"),
    (("label", "--by", "python:../evil:fn"), "is not python:package.module:function"),
    (("label", "--by", "oracle\x1b[2J"), "is not a labeler"),
    (("label", "data.samples=sft:latest"), "data.samples=sft:latest is a sft entry (a model), not a dataset"),
    (("label", "data.samples={edited}"), "was changed after `rlhf sample` wrote it"),
    (("rm", "data.train=samples:latest"), "samples.jsonl:1: 'responses[0]' must be a string, got dict"),
])
def test_bad_input_is_one_line_and_leaves_nothing(sampled, tmp_path, args, expected):
    home = home_with_entries_of(sampled, tmp_path / "home", ("sft", "samples"))
    (tmp_path / "empty.jsonl").write_text("")
    [samples] = by_stage(home, "samples")
    edited = tmp_path / "copy" / "samples.jsonl"
    edited.parent.mkdir()
    text = (Path(samples["path"]) / "samples.jsonl").read_text()
    edited.write_text(text.replace('"ended": false', '"ended": true', 1) if '"ended": false' in text else text + "\n{}\n")
    (edited.parent / "manifest.json").write_text((Path(samples["path"]) / "manifest.json").read_text())
    runs_before = sorted(p.name for p in (home / "runs").glob("*"))
    result = rlhf(*(a.format(empty=tmp_path / "empty.jsonl", edited=edited) for a in args), *ONE_PROCESS, home=home)
    assert result.code == 2, result.output[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in result.output, result.stderr[-2000:]
    assert sorted(p.name for p in (home / "runs").glob("*")) == runs_before


def test_rounds_sample_the_newest_policy_and_keep_every_comparison(tmp_path):
    home = tmp_path / "home"
    result = rlhf("pipeline", "--rounds", "2", "--label-by", "oracle", "--no-report", "--launcher", "python",
                  "--sft-config", QUICK, "--rm-config", RM_QUICK, "--ppo-config", PPO_QUICK,
                  "sft:train.max_steps=30", "sft:optim.warmup_steps=1", "sft:eval.max_rows=8",
                  "sample:data.max_prompts=16", "sample:sampling.shard_prompts=16",
                  "rm:train.max_steps=4", "rm:optim.warmup_steps=1", "rm:engine.micro_batch_size=2", "rm:eval.max_rows=8",
                  "rm:eval.reward_stats_rows=8",
                  "ppo:train.max_steps=1", "ppo:eval.max_rows=8", *(f"{s}:train.save_every=0" for s in ("sft", "rm", "ppo")),
                  home=home, timeout=900)
    assert_ok(result)
    found = {stage: sorted(by_stage(home, stage), key=lambda e: e["created"]) for stage in ("sft", "samples", "prefs", "rm", "ppo")}
    assert [len(found[s]) for s in found] == [1, 2, 2, 2, 2]
    [sft] = found["sft"]
    (s1, s2), (p1, p2), (_, r2), (ppo1, ppo2) = found["samples"], found["prefs"], found["rm"], found["ppo"]
    assert s1["parents"] == [sft["id"]] and s2["parents"] == [ppo1["id"]]  # round 2 samples round 1's policy
    assert p1["parents"] == [s1["id"]] and set(p2["parents"]) == {s2["id"], p1["id"]}
    assert p2["metrics"]["ranked_lists"] == p1["metrics"]["ranked_lists"] + p2["metrics"]["prompts"] == 32
    assert set(r2["parents"]) == {sft["id"], p2["id"]}  # each round's reward model starts from the SFT
    assert ppo2["config"]["model"]["name_or_path"] == f"ppo:{ppo1['id']}" or ppo1["id"] in ppo2["parents"]
    assert r2["id"] in ppo2["parents"] and sft["id"] in ppo2["parents"]  # reward from this round, KL to the SFT
    assert "round 2 of 2" in result.stdout


def test_human_judgments_give_stats_and_a_prefs_entry_through_the_cli(sampled, tmp_path):
    """The log the labeling page writes (rlhf.feedback.judgment_log; the page itself: test_label_web.py), read back by
    `rlhf label --by human --stats` and published by `--publish` as an entry `rlhf rm` and `registry rm --purge` take."""
    from rlhf.feedback.judgment_log import JudgmentLog, samples_digest
    from rlhf.feedback.label_web import default_log_path
    from rlhf.store.registry import Registry

    home = home_with_entries_of(sampled, tmp_path / "home", ("sft", "samples"))
    [samples] = by_stage(home, "samples")
    path = Path(samples["path"]) / "samples.jsonl"
    log = JudgmentLog(default_log_path(Registry(home), path), samples_digest(path))
    log.judge("alice", 0, [2, 0, 1, 3], [0, 1, 1, 3])
    log.judge("bob", 0, [2, 1, 0, 3], [0, 1, 2, 3])
    log.skip("alice", 1)
    stats = rlhf("label", "--by", "human", "--stats", home=home)
    assert_ok(stats)
    # Pairs both ordered strictly: alice ties 0 and 1, so 5 of the 6 pairs count; bob agrees on all 5.
    assert "agreement 1.000 over 5 pairs" in stats.stdout and "alice 1 ranked, 1 skipped" in stats.stdout
    published = rlhf("label", "--by", "human", "--publish", home=home)
    assert_ok(published)
    [prefs] = by_stage(home, "prefs")
    assert prefs["parents"] == [samples["id"]] and prefs["metrics"]["labelers"] == 2
    [row] = rows(prefs, "train.jsonl")
    texts = [r["text"] for r in rows(samples, "samples.jsonl")[0]["responses"]]
    assert row["responses"][0] == texts[2] and row["responses"][-1] == texts[3] and row["ranks"][0] == 0
    for args, expected in ((("--by", "human", "-n", "2"), "launches no stage program: drop --num-gpus"),
                           (("--by", "oracle", "--labeler", "ann"), "are for --by human"),
                           (("--by", "human", "--labeler", "a/b"), "a/b")):
        refused = rlhf("label", *args, home=home)
        assert refused.code == 2 and expected in refused.stderr and "Traceback" not in refused.output, refused.output[-1500:]
    assert_ok(rlhf("registry", "rm", prefs["id"], "--purge", "--yes", home=home))  # its folder is sealed as its own
    assert not Path(prefs["run_dir"]).exists()
