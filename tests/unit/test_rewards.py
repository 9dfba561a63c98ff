"""Reward sources (rlhf/rollouts/rewards.py): parsing and refusals, imports, the weighted combination
against a plain float64 loop, the checks on what a function returns, and the rollout's texts."""

from __future__ import annotations

import pytest
import torch

from rlhf.algos.ppo import shape_scores
from rlhf.config import PPOConfig, load_config
from rlhf.errors import UserError
from rlhf.rollouts.rewards import (
    Reward,
    RewardSource,
    checked_scores,
    describe,
    learned_source,
    load_function,
    parse_sources,
    rollout_texts,
)
from rlhf.toy import build_tokenizer, oracle_score
from tests.sequences import build_sequences

FUNCS = "python:tests.reward_functions"


def test_sources_parse_by_kind_in_order_with_weights():
    sources = parse_sources(["rm:latest", f"{FUNCS}:response_length", "oracle"], [1.0, -0.5, 2])
    assert [(s.kind, s.weight) for s in sources] == [("learned", 1.0), ("python", -0.5), ("oracle", 2.0)]
    assert (sources[1].module, sources[1].function) == ("tests.reward_functions", "response_length")
    assert learned_source(sources).text == "rm:latest"
    assert learned_source(parse_sources(["oracle"], None)) is None
    assert describe(sources) == f"1 x rm:latest + -0.5 x {FUNCS}:response_length + 2 x oracle"


@pytest.mark.parametrize("text", [
    "python:/home/me/reward.py:score",  # a file path: never
    "python:~/reward:score",
    "python:my-rewards:score",
    "python:pkg.mod",  # no function
    "python:pkg..mod:fn",
    "python:1pkg:fn",
    "python:pkg.mod:fn:extra",
    "python:pkg.mod:fn()",
    "python::fn",
])
def test_python_source_that_is_not_a_dotted_module_and_function_is_refused(text):
    with pytest.raises(UserError, match=r"reward.name_or_path: .* is not python:package.module:function"):
        parse_sources([text], None)


@pytest.mark.parametrize(("names", "weights", "message"), [
    (["rm:latest", "oracle"], [1.0], r"reward.weights has 1 weight\(s\) for 2 source\(s\)"),
    (["oracle", "oracle"], None, "names a source twice"),
    (["rm:latest", "rm:abc"], None, "names 2 reward models"),
    ([], None, "reward.name_or_path is empty"),
])
def test_reward_lists_that_cannot_combine_are_refused(names, weights, message):
    with pytest.raises(UserError, match=message):
        parse_sources(names, weights)


def test_config_reads_one_source_or_several_with_weights(tmp_path):
    assert load_config(PPOConfig).reward.name_or_path == ["rm:latest"]
    cfg = load_config(PPOConfig, overrides=[f"reward.name_or_path=rm:latest,{FUNCS}:response_length", "reward.weights=[1, 0.25]"])
    assert cfg.reward.name_or_path == ["rm:latest", f"{FUNCS}:response_length"] and cfg.reward.weights == [1.0, 0.25]
    # A YAML file (or a saved run's config) may name one source without a list.
    path = tmp_path / "ppo.yaml"
    path.write_text("reward:\n  name_or_path: oracle\n")
    assert load_config(PPOConfig, path).reward.name_or_path == ["oracle"]


@pytest.mark.parametrize("overrides", [["data.train=prompts.jsonl"], ["data.eval=prompts.jsonl"]])
def test_oracle_needs_the_embedded_default_data(overrides):
    with pytest.raises(UserError, match="reward.name_or_path=oracle grades the embedded default's task only"):
        load_config(PPOConfig, overrides=["reward.name_or_path=oracle", *overrides])
    assert load_config(PPOConfig, overrides=["reward.name_or_path=oracle", "data.eval=null"]).reward.name_or_path == ["oracle"]


def test_config_refuses_a_weights_mismatch_and_a_file_path():
    with pytest.raises(UserError, match="reward.weights has 2 weight"):
        load_config(PPOConfig, overrides=["reward.name_or_path=oracle", "reward.weights=[1,2]"])
    with pytest.raises(UserError, match="is not python:package.module:function"):
        load_config(PPOConfig, overrides=["reward.name_or_path=python:./my_reward.py:score"])


@pytest.mark.parametrize(("function", "message"), [
    ("python:tests.no_such_module:f", r"cannot import module 'tests.no_such_module' \(No module named"),
    (f"{FUNCS}:missing", "module 'tests.reward_functions' has no attribute 'missing'"),
    (f"{FUNCS}:NOT_A_FUNCTION", "tests.reward_functions.NOT_A_FUNCTION is a int, not a function"),
])
def test_function_that_cannot_be_loaded_is_named(function, message):
    [source] = parse_sources([function], None)
    with pytest.raises(UserError, match=message) as caught:
        load_function(source)
    assert "\n" not in str(caught.value) and function in str(caught.value)


def test_weighted_sum_matches_a_float64_loop():
    """Reward model normalized with its statistics, functions as they are, then the weights."""
    gen = torch.Generator().manual_seed(0)
    batch = 7
    learned = torch.randn(batch, generator=gen) * 3 + 1
    responses = ["".join("7" for _ in range(int(n))) for n in torch.randint(0, 6, (batch,), generator=gen)]
    prompts = [f"{a}+{b}=" for a, b in torch.randint(0, 50, (batch, 2), generator=gen).tolist()]
    responses[2] = str(sum(int(x) for x in prompts[2].rstrip("=").split("+")))  # one exact answer
    names, weights = ["rm:latest", f"{FUNCS}:response_length", "oracle"], [0.7, -0.3, 2.5]
    mean, std = 0.4, 1.9
    got = Reward(parse_sources(names, weights), mean=mean, std=std, normalize=True).scores(prompts, responses, learned=learned)

    for i in range(batch):
        expected = weights[0] * (float(learned[i]) - mean) / std + weights[1] * len(responses[i]) \
            + weights[2] * oracle_score(prompts[i], responses[i])
        assert abs(float(got.total[i]) - expected) < 1e-5, i
    assert got.total.dtype == torch.float32 and got.total.shape == (batch,)
    assert torch.equal(got.parts["rm:latest"], learned)  # the component as it came, before normalization
    assert got.parts["oracle"][2] == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_lone_reward_model_gives_todays_shaped_score_bit_for_bit(dtype):
    learned = (torch.randn(16, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    has_eos = torch.arange(16) % 3 != 0
    today = shape_scores(learned, has_eos, mean=0.3, std=1.7, normalize=True, clip=5.0, no_eos_score=-1.0)
    reward = Reward(parse_sources(["rm:latest"], None), mean=0.3, std=1.7, normalize=True)
    total = reward.scores([], [], learned=learned).total
    now = shape_scores(total, has_eos, normalize=False, clip=5.0, no_eos_score=-1.0)
    assert now.dtype == dtype and torch.equal(now, today)
    assert not reward.needs_text


@pytest.mark.parametrize(("function", "message"), [
    ("raises", "python:tests.reward_functions:raises raised RuntimeError: reward server unreachable"),
    ("one_too_few", r"python:tests.reward_functions:one_too_few returned 2 score\(s\) for 3 responses \(\[0.0, 0.0\]\)"),
    ("not_finite", "python:tests.reward_functions:not_finite returned nan among its scores"),
    ("strings", r"python:tests.reward_functions:strings returned a str \('12'\) among its scores"),
])
def test_a_function_that_fails_stops_in_one_line_naming_it(function, message):
    reward = Reward(parse_sources([f"{FUNCS}:{function}"], None))
    with pytest.raises(UserError, match=message) as caught:
        reward.scores(["1+2=", "3+4=", "5+6="], ["12", "7", ""])
    assert "\n" not in str(caught.value)


def test_learned_scores_are_required_exactly_when_a_reward_model_takes_part():
    with pytest.raises(ValueError):
        Reward(parse_sources(["rm:latest"], None)).scores([], [])
    with pytest.raises(ValueError):
        Reward(parse_sources(["oracle"], None)).scores(["1+2="], ["3"], learned=torch.zeros(1))


def test_rollout_texts_are_unpadded_prompts_and_responses_without_eos():
    tokenizer = build_tokenizer()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    texts = ["12+34=", "5+6=", "123+4="]
    answers = ["46", "11", "7"]  # 123+4=127: the last one has only its units digit right
    prompts = [tokenizer(t).input_ids for t in texts]
    responses = [tokenizer(a, add_special_tokens=False).input_ids + [eos] for a in answers]
    responses[2] = responses[2][:-1]  # cut by max_new_tokens: no EOS
    seqs = build_sequences(prompts, responses, pad_id=pad, eos_id=eos)
    got_prompts, got_responses = rollout_texts(seqs, tokenizer)
    assert got_prompts == texts and got_responses == answers
    scores = Reward([RewardSource("oracle", "oracle")]).scores(got_prompts, got_responses).total
    assert scores.tolist() == [1.0, 1.0, pytest.approx(1 / 3)]


def test_numpy_and_tensor_results_are_accepted_as_floats():
    import numpy as np

    source = RewardSource(f"{FUNCS}:any", "python")
    assert checked_scores(source, [np.float32(0.5), np.int64(2)], 2) == [0.5, 2.0]
    assert checked_scores(source, torch.tensor([0.25, -1.0]), 2) == [0.25, -1.0]
    assert checked_scores(source, np.array([3.0]), 1) == [3.0]
    with pytest.raises(UserError, match=r"returned a dict \(\{'a': 1\}\), not a list of 1 floats"):
        checked_scores(source, {"a": 1}, 1)
    with pytest.raises(UserError, match="returned a bool"):
        checked_scores(source, [True], 1)
