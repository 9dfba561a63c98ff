"""The dpo stage's pieces that run without DeepSpeed: its config checks, its rows (paired and KTO's
unpaired), the layout its log-probs are taken in, KTO's fixed KL partners and `--stages`."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from rlhf.cli.chaining import PIPELINE, parse_stages
from rlhf.config import DPOConfig, load_config, loss_beta
from rlhf.data.load import DPOReading, dpo_examples
from rlhf.data.tokenize import PairExample, UnpairedExample
from rlhf.errors import UserError
from rlhf.rollouts.generation import pack_sequences, policy_logprobs
from rlhf.toy import TOY, ToyModelConfig, build_model, build_tokenizer

REPO = Path(__file__).resolve().parents[2]


def reading(cfg: DPOConfig) -> DPOReading:
    return DPOReading.of(cfg)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---- config ---------------------------------------------------------------------------------


def test_beta_defaults_to_the_losss_usual_value():
    assert loss_beta(load_config(DPOConfig).dpo) == 0.1
    assert loss_beta(load_config(DPOConfig, None, ["dpo.loss=simpo"]).dpo) == 2.0
    assert loss_beta(load_config(DPOConfig, None, ["dpo.loss=orpo"]).dpo) is None
    assert loss_beta(load_config(DPOConfig, None, ["dpo.loss=ipo", "dpo.beta=0.5"]).dpo) == 0.5


@pytest.mark.parametrize("overrides, expect", [
    (["dpo.loss=ipo", "dpo.label_smoothing=0.1"], "dpo.label_smoothing is read by dpo.loss=dpo only"),
    (["dpo.desirable_weight=2"], "dpo.desirable_weight is read by dpo.loss=kto only"),
    (["dpo.loss=orpo", "dpo.beta=0.1"], "dpo.beta has no part in dpo.loss=orpo"),
    (["dpo.beta=0"], "dpo.beta must be positive"),
    (["dpo.label_smoothing=0.5"], "dpo.label_smoothing must be in [0, 0.5)"),
    (["dpo.loss=simpo", "dpo.precompute_reference=true"], "dpo.precompute_reference: dpo.loss=simpo uses no reference"),
    (["dpo.loss=orpo", "eval.kl=false", "reference.name_or_path=sft:latest"], "reference.name_or_path would be unused"),
    (["eval.temperature=0"], "eval.kl samples answers"),
    (["dpo.loss=rlhf"], "'dpo.loss' must be one of"),
])
def test_bad_dpo_settings_are_refused_with_the_key(overrides, expect):
    with pytest.raises(UserError, match=None) as caught:
        load_config(DPOConfig, None, overrides)
    assert expect in str(caught.value)


def test_the_reference_free_losses_agree_with_the_math_module():
    # rlhf.config imports no torch: both names come from rlhf.algos.variants (torch-free), one list.
    from rlhf.algos.preference import REFERENCE_FREE_LOSSES as MATH
    from rlhf.config import REFERENCE_FREE_LOSSES

    assert REFERENCE_FREE_LOSSES == MATH


# ---- rows -----------------------------------------------------------------------------------


def test_a_ranked_list_gives_all_its_pairs_split_at_the_prompt(tmp_path):
    tokenizer = build_tokenizer()
    path = write_jsonl(tmp_path / "ranked.jsonl", [{"prompt": "12+34=", "responses": ["46", "47", "4"]}])
    cfg = load_config(DPOConfig, None, [f"data.train={path}"])
    pairs, stats = dpo_examples(path, split="train", tokenizer=tokenizer, data=reading(cfg), key="data.train")
    eos = tokenizer.eos_token_id
    prompt = tokenizer("12+34=", add_special_tokens=True).input_ids
    ids = {t: tokenizer(t, add_special_tokens=False).input_ids + [eos] for t in ("46", "47", "4")}
    assert [(p.chosen, p.rejected) for p in pairs] == [(ids["46"], ids["47"]), (ids["46"], ids["4"]), (ids["47"], ids["4"])]
    assert all(p.prompt == prompt for p in pairs)
    assert stats.rows == 1 and stats.truncated_responses == 0


def test_comparisons_with_a_margin_and_hh_rlhf_texts_read_as_pairs(tmp_path):
    tokenizer = build_tokenizer()
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"chosen": "Human: 1+2= Assistant: 3", "rejected": "Human: 1+2= Assistant: 4"},
    ])
    cfg = load_config(DPOConfig)
    [pair], _ = dpo_examples(path, split="train", tokenizer=tokenizer, data=reading(cfg), key="data.train")
    assert tokenizer.decode(pair.prompt, skip_special_tokens=True) == "Human: 1+2= Assistant:"
    assert tokenizer.decode(pair.chosen, skip_special_tokens=True) == " 3"


def test_kto_reads_unpaired_rows_and_refuses_a_label_that_is_not_a_bool(tmp_path):
    tokenizer = build_tokenizer()
    cfg = load_config(DPOConfig, None, ["dpo.loss=kto"])
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "1+2=", "completion": "3", "label": True},
                                                 {"prompt": "1+2=", "completion": "5", "label": False}])
    rows, _ = dpo_examples(good, split="train", tokenizer=tokenizer, data=reading(cfg), key="data.train")
    assert [r.desirable for r in rows] == [True, False]
    assert rows[1].completion == tokenizer("5", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+2=", "completion": "3", "label": True},
                                               {"prompt": "1+2=", "completion": "5", "label": "no"}])
    with pytest.raises(UserError) as caught:
        dpo_examples(bad, split="train", tokenizer=tokenizer, data=reading(cfg), key="data.train")
    assert "bad.jsonl" in str(caught.value)
    # Pairs given to kto name the layout it reads.
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "1+2=", "chosen": "3", "rejected": "4"}])
    with pytest.raises(UserError, match="prompt\\+completion\\+label"):
        dpo_examples(pairs, split="train", tokenizer=tokenizer, data=reading(cfg), key="data.train")


def test_the_embedded_default_gives_pairs_and_the_oracles_feedback():
    tokenizer = build_tokenizer()
    paired, _ = dpo_examples(TOY, split="eval", tokenizer=tokenizer, data=reading(load_config(DPOConfig)), key="data.eval")
    assert isinstance(paired[0], PairExample) and len(paired) == 800
    unpaired, _ = dpo_examples(TOY, split="train", tokenizer=tokenizer,
                               data=reading(load_config(DPOConfig, None, ["dpo.loss=kto"])), key="data.train")
    assert isinstance(unpaired[0], UnpairedExample) and 0.45 < sum(r.desirable for r in unpaired) / len(unpaired) < 0.55


# ---- the log-prob layout --------------------------------------------------------------------


def test_packed_pairs_score_as_each_sequence_alone_in_float64():
    """Summed response log-probs from the stage's layout (left-padded prompts, right-padded
    responses) against a float64 loop over each unpadded sequence on its own."""
    tokenizer = build_tokenizer()
    model = build_model(ToyModelConfig(), tokenizer, seed=7).eval()
    prompts = [tokenizer(t).input_ids for t in ("1+2=", "a longer prompt 45+67=")]
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    responses = [[digits[3], tokenizer.eos_token_id], [digits[1], digits[1], digits[2], digits[5]]]
    seqs = pack_sequences(prompts, responses, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    with torch.no_grad():
        packed = policy_logprobs(model, seqs, temperature=1.0)[0].sum(dim=1)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([p + r])
            logits = model(input_ids=ids).logits[0].double()
            expected = 0.0
            for t in range(len(r)):
                row = logits[len(p) - 1 + t]  # the position before response token t predicts it
                expected += float(row[r[t]] - torch.logsumexp(row, dim=0))
            assert math.isclose(float(packed[i]), expected, rel_tol=1e-4, abs_tol=1e-4), (i, float(packed[i]), expected)
    assert seqs.response_lengths.tolist() == [2, 4] and seqs.has_eos.tolist() == [True, False]


def test_kto_kl_partners_are_mismatched_and_fixed():
    sys.path.insert(0, str(REPO))
    from rlhf.stages.dpo_batches import kl_partner

    for n in (2, 3, 10, 4000):
        partners = [kl_partner(i, n) for i in range(n)]
        assert all(j != i for i, j in enumerate(partners))
        assert sorted(partners) == list(range(n))  # every completion is some prompt's partner once


# ---- the pipeline's stages ------------------------------------------------------------------


def test_stages_option():
    assert parse_stages(None) == PIPELINE == ("sft", "rm", "ppo")
    assert parse_stages("sft,dpo") == ("sft", "dpo")
    assert parse_stages(" dpo ") == ("dpo",)  # from sft:latest
    for text, expect in (("dpo,sft", "sft must come before it"), ("sft,sft", "twice"), ("sft,xyz", "'xyz' is not a stage"),
                         (",", "names no stage")):
        with pytest.raises(UserError, match=expect):
            parse_stages(text)
