"""A DPO policy as a reward model (rlhf/rollouts/implicit_reward.py): its scores against a float64 sum per row over
each row's attended tokens alone, padded and packed, through PPO's rollout scoring; implicit_reward.json read back."""

from __future__ import annotations

import pytest
import torch

from rlhf.errors import UserError
from rlhf.models.sources import ModelSource
from rlhf.rollouts.implicit_reward import IMPLICIT_REWARD_FILE, ImplicitReward, implicit_reward_json, implicit_reward_spec
from rlhf.rollouts.scoring import Packing, score_rollout
from rlhf.toy import build_tokenizer
from tests.unit.test_architectures import causal_lm
from tests.unit.test_ppo_packing import random_rollout

BETA = 0.3


def float64_rewards(policy, reference, seqs) -> torch.Tensor:
    """beta * sum of log pi - log pi_ref over each row's response tokens, each row alone (no padding) in float64."""
    out = []
    for b in range(seqs.input_ids.shape[0]):
        ids = seqs.input_ids[b][seqs.attention_mask[b].bool()]
        prompt = int(seqs.attention_mask[b, : seqs.prompt_width].sum())
        total = 0.0
        for model, sign in ((policy, 1.0), (reference, -1.0)):
            logp = torch.log_softmax(model.double()(input_ids=ids[None], use_cache=False).logits[0], dim=-1)
            for t in seqs.response_mask[b].nonzero().flatten().tolist():  # response column t: attended column prompt + t
                total += sign * logp[prompt + t - 1, ids[prompt + t]].item()
        out.append(BETA * total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_scores_equal_a_float64_sum_per_row_padded_and_packed(arch):
    tokenizer = build_tokenizer()
    policy, reference = causal_lm(arch, tokenizer, seed=1).float(), causal_lm(arch, tokenizer, seed=2).float()
    seqs = random_rollout(len(tokenizer), n=7, seed=5, pad_id=tokenizer.pad_token_id)
    assert (seqs.response_mask.sum(1) < seqs.response_extents).any()  # environment tokens inside some responses
    reward = ImplicitReward(policy, reference, BETA)
    with torch.no_grad():
        kwargs = dict(actor=policy, reference=reference, critic=None, reward=reward, temperature=0.7, chunk=3)
        padded = score_rollout(seqs, **kwargs).scores
        packed = score_rollout(seqs, packing=Packing(tokenizer.pad_token_id, 40), **kwargs).scores
        expected = float64_rewards(policy, reference, seqs)
    assert padded is not None and packed is not None
    assert expected.abs().min() > 1e-3  # two different models: no row scores 0 by accident
    assert torch.allclose(padded.double(), expected, atol=1e-5, rtol=0), (padded, expected)
    assert torch.allclose(packed.double(), expected, atol=1e-5, rtol=0), (packed, expected)


def test_a_policy_scored_against_itself_gets_zero():
    tokenizer = build_tokenizer()
    policy = causal_lm("llama", tokenizer, seed=1).float()
    seqs = random_rollout(len(tokenizer), n=4, seed=6, pad_id=tokenizer.pad_token_id)
    assert torch.equal(ImplicitReward(policy, policy, BETA).scores(seqs), torch.zeros(4))


def spec_folder(tmp_path, text: str | None):
    folder = tmp_path / "dpo"
    folder.mkdir(parents=True)
    if text is not None:
        (folder / IMPLICIT_REWARD_FILE).write_text(text)
    return ModelSource("path", str(folder))


def test_the_spec_reads_back_as_written(tmp_path):
    spec = implicit_reward_spec(spec_folder(tmp_path, implicit_reward_json(0.1, "sft:sft-20261208-000000-00000000")))
    assert spec is not None and spec.beta == 0.1 and spec.reference == "sft:sft-20261208-000000-00000000"
    assert implicit_reward_spec(spec_folder(tmp_path / "none", None)) is None  # a scalar-head reward model's folder
    assert implicit_reward_spec(ModelSource("hub", "org/name")) is None


@pytest.mark.parametrize("text, said", [
    ("{not json", "unreadable implicit reward"),
    ('{"beta": 0.1}', "unreadable implicit reward"),
    ('{"beta": 0, "reference": "sft:latest"}', "beta must be positive"),
    ('{"beta": NaN, "reference": "sft:latest"}', "beta must be positive"),
    ('{"beta": 0.1, "reference": ""}', "the reference a model"),
    ('{"beta": 0.1, "reference": 7}', "the reference a model"),
    ('{"beta": 0.1, "reference": "sft:latest\\n"}', "control characters"),
])
def test_a_bad_spec_stops_in_one_line_naming_the_file(tmp_path, text, said):
    with pytest.raises(UserError) as error:
        implicit_reward_spec(spec_folder(tmp_path, text))
    message = str(error.value)
    assert said in message and IMPLICIT_REWARD_FILE in message and "\n" not in message, message
