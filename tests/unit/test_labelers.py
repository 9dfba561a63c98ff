"""rlhf.feedback.labelers, rlhf.feedback.judge and ties in ranked lists: rankings with ties against a plain count, the
judge's both-orders preference against an unbatched float64 computation, the pairs a tie leaves out,
and how pipeline rounds tie each stage to the runs before it."""

from __future__ import annotations

import random

import pytest
import torch

from rlhf.cli.chaining import round_overrides
from rlhf.config import JudgeConfig
from rlhf.data.formats import Ranked, to_ranked
from rlhf.data.sources import Records
from rlhf.data.tokenize import tokenize_preferences
from rlhf.errors import UserError
from rlhf.feedback.judge import load_judge
from rlhf.feedback.labelers import parse_labeler, rank
from rlhf.store.registry import Registry
from rlhf.toy import build_tokenizer


@pytest.mark.parametrize("seed", range(20))
def test_rank_orders_best_first_and_ties_equal_scores(seed):
    rng = random.Random(seed)
    scores = [float(rng.choice([0, 0.25, 0.5, 1])) if seed % 2 else rng.random() for _ in range(rng.randint(2, 8))]
    order, ranks = rank(scores)
    assert sorted(order) == list(range(len(scores)))
    assert [scores[i] for i in order] == sorted(scores, reverse=True)
    # Independent: a response's rank is how many scored strictly higher; equal scores keep their order.
    assert ranks == [sum(s > scores[i] for s in scores) for i in order]
    for a, b in zip(order, order[1:]):
        assert scores[a] > scores[b] or a < b


def test_a_tolerance_ties_near_equal_scores_to_the_best_of_their_run():
    order, ranks = rank([0.50, 0.95, 1.0, 0.2, 0.96], tolerance=0.06)
    assert order == [2, 4, 1, 0, 3] and ranks == [0, 0, 0, 3, 4]


def test_parse_labeler_names_what_it_takes():
    assert parse_labeler("oracle").kind == "oracle"
    assert parse_labeler("python:pkg.mod:fn").kind == "python"
    assert parse_labeler("judge:sft:latest").target == "sft:latest"
    for bad, message in (("judge:", "is not a labeler"), ("python:a/b:fn", "is not python:"), ("gpt4", "is not a labeler"),
                         ("human", "use `rlhf label --by human`")):
        with pytest.raises(UserError, match=message):
            parse_labeler(bad)


def ranked_records(rows: list[dict]) -> Records:
    import datasets

    return Records(rows=datasets.Dataset.from_list(rows), source="prefs.jsonl", line_numbers=list(range(1, len(rows) + 1)))


def test_ties_give_no_pair_and_bad_ranks_are_one_line():
    tokenizer = build_tokenizer()
    rows = [{"prompt": "1+2=", "responses": ["3", "4", "5", "6"], "ranks": [0, 1, 1, 3]},
            {"prompt": "2+2=", "responses": ["4", "5"], "ranks": [0, 0]}]
    groups = to_ranked(ranked_records(rows), tokenizer)
    assert groups[0].ranks == (0, 1, 1, 3) and groups[1].ranks == (0, 0)
    examples, stats = tokenize_preferences(groups, tokenizer, max_length=16)
    assert len(examples) == 1 and stats.tied_pairs == 2  # (1, 2) in the first list, the whole second list
    assert examples[0].pairs == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    # A labeled sample may be empty (the policy ended at once); a ranked list without ranks may not.
    assert to_ranked(ranked_records([{**rows[0], "responses": ["3", "", "5", "6"]}]), tokenizer)[0].responses[1] == ""
    with pytest.raises(UserError, match="'responses\\[1\\]' is empty"):
        to_ranked(ranked_records([{"prompt": "1+2=", "responses": ["3", ""]}]), tokenizer)
    strict, _ = tokenize_preferences([Ranked("1+2=", ("3", "4", "5"), "x")], tokenizer, max_length=16)
    assert strict[0].pairs == [(0, 1), (0, 2), (1, 2)]
    for ranks in ([1, 1, 2, 3], [0, 2, 1, 3], [0, 1], [0, 1, 1, 2.0], "0123"):
        with pytest.raises(UserError, match="prefs.jsonl:1: 'ranks' must be 4 whole numbers from 0, never falling"):
            to_ranked(ranked_records([{**rows[0], "ranks": ranks}]), tokenizer)


def test_the_judge_prefers_by_both_orders_as_an_unbatched_float64_computation(tmp_path):
    cfg = JudgeConfig(template="{prompt}|{a}|{b}?", choices=["A", "B"], batch_size=3)
    judge = load_judge("toy", cfg, Registry(tmp_path / "home"))
    prompt, responses = "12+30=", ["42", "41", "7", "42"]
    scores, better = judge.scores(prompt, responses)
    model = judge.model.double()
    a, b = judge.choice_ids

    def first(x: str, y: str) -> float:
        ids = torch.tensor([judge.tokenizer(f"{prompt}|{x}|{y}?")["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), dim=-1)
        return float(torch.exp(logp[a]) / (torch.exp(logp[a]) + torch.exp(logp[b])))

    for i in range(4):
        for j in range(4):
            if i != j:
                expected = (first(responses[i], responses[j]) + 1 - first(responses[j], responses[i])) / 2
                assert better[i][j] == pytest.approx(expected, abs=1e-5)
                assert better[i][j] + better[j][i] == pytest.approx(1.0, abs=1e-6)
        assert scores[i] == pytest.approx(sum(better[i][j] for j in range(4) if j != i) / 3, abs=1e-9)
    assert better[0][3] == pytest.approx(0.5, abs=1e-5)  # the same text in both places: no preference


def test_rounds_tie_each_stage_to_this_round_and_the_last():
    first = round_overrides("sample", [], sft="sft-1", previous={}, current={}, label_by="oracle")
    assert first == ["model.name_or_path=sft:sft-1"]
    previous = {"sample": "sample-1", "label": "label-1", "rm": "rm-1", "ppo": "ppo-1"}
    assert round_overrides("sample", [], sft="sft-1", previous=previous, current={}, label_by="oracle") == ["model.name_or_path=ppo:ppo-1"]
    label = round_overrides("label", ["by=python:a.b:c"], sft="sft-1", previous=previous, current={"sample": "sample-2"},
                            label_by="oracle")
    assert label == ["by=python:a.b:c", "data.samples=samples:sample-2", "data.include=prefs:label-1"]  # the user's by wins
    rm = round_overrides("rm", [], sft="sft-1", previous=previous, current={"sample": "s", "label": "label-2"}, label_by="oracle")
    assert rm == ["model.name_or_path=sft:sft-1", "data.train=prefs:label-2"]
    ppo = round_overrides("ppo", [], sft="sft-1", previous=previous, current={"rm": "rm-2"}, label_by="oracle")
    assert ppo == ["model.name_or_path=ppo:ppo-1", "reference.name_or_path=sft:sft-1", "critic.name_or_path=rm:rm-2",
                   "reward.name_or_path=rm:rm-2"]
