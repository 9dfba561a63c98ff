"""Reward-model math and batching, checked against straightforward float64 loops."""

from __future__ import annotations

import math
import random

import datasets
import pytest
import torch

from rlhf.algos.reward import bradley_terry_loss, last_token_index, ranked_pairs, sequence_rewards
from rlhf.config import ModelConfig
from rlhf.data.collate import collate_rm
from rlhf.data.formats import to_comparisons, to_ranked
from rlhf.data.sources import Records
from rlhf.data.tokenize import RMExample, tokenize_preferences
from rlhf.models.loading import ScalarModel, load_scalar_model
from rlhf.models.sources import ModelSource
from rlhf.toy import build_tokenizer


def padded_masks(lengths: list[int], width: int, side: str) -> torch.Tensor:
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, width - n :] = 1
    return mask


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("seed", range(5))
def test_reward_is_read_at_the_last_real_token(side, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = [int(n) for n in torch.randint(1, 12, (7,), generator=gen)]
    width = max(lengths) + int(torch.randint(0, 3, (1,), generator=gen))
    mask = padded_masks(lengths, width, side)
    scores = torch.randn(7, width, generator=gen)

    expected_index = [
        max(t for t in range(width) if mask[row, t] == 1) for row in range(7)
    ]
    assert last_token_index(mask).tolist() == expected_index
    rewards = sequence_rewards(scores, mask)
    for row in range(7):
        assert rewards[row].item() == scores[row, expected_index[row]].item()

    # Whatever sits at the padded positions changes nothing.
    noisy = torch.where(mask.bool(), scores, torch.randn(7, width, generator=gen) * 100)
    assert torch.equal(sequence_rewards(noisy, mask), rewards)


def test_ranked_pairs_are_every_better_worse_pair():
    for k in range(2, 7):
        pairs = ranked_pairs(k)
        assert len(pairs) == k * (k - 1) // 2
        assert len(set(pairs)) == len(pairs)
        assert all(0 <= i < j < k for i, j in pairs)  # the better one comes first in a ranking


def reference_loss(groups: list[tuple[list[float], list[tuple[int, int]], list[float]]]) -> float:
    """InstructGPT: mean over prompts of the mean over the prompt's pairs, in float64."""
    per_prompt = []
    for rewards, pairs, margins in groups:
        losses = []
        for (i, j), m in zip(pairs, margins):
            gap = rewards[i] - rewards[j] - m
            losses.append(math.log1p(math.exp(-gap)))  # -log sigmoid(gap)
        per_prompt.append(sum(losses) / len(losses))
    return sum(per_prompt) / len(per_prompt)


@pytest.mark.parametrize("seed", range(10))
def test_bradley_terry_k_way_matches_a_float64_loop(seed):
    rng = random.Random(seed)
    examples, groups = [], []
    for _ in range(rng.randint(1, 6)):
        k = rng.randint(2, 5)
        pairs = ranked_pairs(k)
        if rng.random() < 0.3:  # some pairs dropped, as identical-after-truncation ones are
            pairs = rng.sample(pairs, rng.randint(1, len(pairs)))
        margins = [rng.choice([0.0, rng.uniform(0, 2)]) for _ in pairs]
        seqs = [[rng.randrange(4, 50) for _ in range(rng.randint(1, 9))] for _ in range(k)]
        examples.append(RMExample(seqs, pairs, margins))
        groups.append(([rng.gauss(0, 3) for _ in range(k)], pairs, margins))
    batch = collate_rm(examples, pad_id=0)
    rewards = torch.tensor([r for g in groups for r in g[0]], dtype=torch.float64)

    assert batch["input_ids"].shape[0] == sum(len(e.sequences) for e in examples)  # each scored once
    loss = bradley_terry_loss(rewards, batch["better"], batch["worse"], batch["weights"].double(), batch["margins"].double())
    # collate_rm hands weights and margins over in float32, hence 1e-6 rather than 1e-12.
    assert loss.item() == pytest.approx(reference_loss(groups), rel=1e-6, abs=1e-9)


def test_bradley_terry_stays_finite_for_huge_gaps():
    rewards = torch.tensor([-200.0, 200.0])
    loss = bradley_terry_loss(rewards, torch.tensor([0]), torch.tensor([1]), torch.tensor([1.0]))
    assert loss.item() == pytest.approx(400.0)
    assert bradley_terry_loss(rewards, torch.tensor([1]), torch.tensor([0]), torch.tensor([1.0])).item() == 0.0


def records(rows: list[dict]) -> Records:
    return Records(rows=datasets.Dataset.from_list(rows), source="test.jsonl", line_numbers=list(range(1, len(rows) + 1)))


def test_ranked_list_tokenizes_into_all_its_pairs():
    tok = build_tokenizer()
    ranked = to_ranked(records([{"prompt": "12+34=", "responses": ["46", "45", "4", "x"]}]), tok)
    [example], stats = tokenize_preferences(ranked, tok, max_length=32)
    assert example.pairs == ranked_pairs(4) and example.margins == [0.0] * 6
    prompt = tok("12+34=").input_ids
    assert example.sequences[0] == prompt + tok("46", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert stats.identical_pairs == 0 and stats.kept == 1


def test_pairs_identical_after_truncation_are_dropped_and_counted():
    tok = build_tokenizer()
    rows = [
        {"prompt": "12+34=", "chosen": "4612", "rejected": "4699", "margin": 1.5},  # same first 2 tokens
        {"prompt": "12+34=", "chosen": "46", "rejected": "47", "margin": None},
    ]
    prompt_len = len(tok("12+34=").input_ids)
    examples, stats = tokenize_preferences(to_comparisons(records(rows), tok), tok, max_length=prompt_len + 2)
    # Room for two response tokens: every response here loses at least its EOS.
    assert stats.identical_pairs == 1 and stats.kept == 1 and stats.truncated_responses == 4
    assert examples[0].pairs == [(0, 1)] and examples[0].margins == [0.0]

    # A ranked list keeps its distinct pairs; only the pairs of identical responses go.
    ranked = to_ranked(records([{"prompt": "12+34=", "responses": ["4612", "4699", "5"]}]), tok)
    [example], stats = tokenize_preferences(ranked, tok, max_length=prompt_len + 2)
    assert example.pairs == [(0, 2), (1, 2)] and stats.identical_pairs == 1


def test_margins_are_used_only_when_asked():
    tok = build_tokenizer()
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3", "margin": 2.5}]
    [with_margin], _ = tokenize_preferences(to_comparisons(records(rows), tok), tok, max_length=16)
    [without], _ = tokenize_preferences(to_comparisons(records(rows), tok), tok, max_length=16, use_margin=False)
    assert with_margin.margins == [2.5] and without.margins == [0.0]


def test_no_usable_pair_is_a_clear_error():
    from rlhf.errors import UserError

    tok = build_tokenizer()
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "2"}]
    with pytest.raises(UserError, match="no usable comparison"):
        tokenize_preferences(to_comparisons(records(rows), tok), tok, max_length=16)


def tiny_gpt2(tok) -> ScalarModel:
    """GPT-2 has absolute position embeddings: left padding is only harmless with position ids from the mask."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=2, n_head=2, num_labels=1,
                        pad_token_id=tok.pad_token_id)
    return ScalarModel(GPT2ForSequenceClassification(config))


@pytest.mark.parametrize("arch", ["toy-llama", "gpt2"])
def test_scalar_model_scores_left_and_right_padding_alike(arch):
    """Through real models: padding side and pad ids change no reward."""
    tok = build_tokenizer()
    if arch == "gpt2":
        model = tiny_gpt2(tok).eval()
    else:
        model = load_scalar_model(ModelSource("toy", "toy"), ModelConfig(), tok, seed=3, dtype=torch.float32).eval()
    seqs = [tok(text).input_ids for text in ("12+34=46", "1+1=2", "99+99=198", "5+5=")]
    width = max(map(len, seqs)) + 2
    right = torch.zeros(len(seqs), width, dtype=torch.long)
    left = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, s in enumerate(seqs):
        right[row, : len(s)] = torch.tensor(s)
        left[row, width - len(s) :] = torch.tensor(s)
    right_mask = padded_masks([len(s) for s in seqs], width, "right")
    left_mask = padded_masks([len(s) for s in seqs], width, "left")
    with torch.no_grad():
        r_right = sequence_rewards(model(right, right_mask), right_mask)
        r_left = sequence_rewards(model(left, left_mask), left_mask)
        junk = torch.where(right_mask.bool(), right, torch.randint(4, 90, right.shape))
        r_junk = sequence_rewards(model(junk, right_mask), right_mask)
        ones = [torch.ones(1, len(s), dtype=torch.long) for s in seqs]
        alone = torch.stack([sequence_rewards(model(torch.tensor([s]), mask), mask)[0] for s, mask in zip(seqs, ones)])
    torch.testing.assert_close(r_left, r_right, rtol=0, atol=1e-5)
    torch.testing.assert_close(r_junk, r_right, rtol=0, atol=1e-5)
    torch.testing.assert_close(alone, r_right, rtol=0, atol=1e-5)
    assert r_right.std() > 0  # distinct sequences, distinct rewards: the check above can fail


def test_new_scalar_head_has_the_reward_model_init():
    tok = build_tokenizer()
    model = load_scalar_model(ModelSource("toy", "toy"), ModelConfig(), tok, seed=3, dtype=torch.float32)
    weight = model.hf_model.score.weight
    hidden = weight.shape[1]
    assert weight.shape == (1, hidden) and model.hf_model.score.bias is None
    # N(0, 1/sqrt(hidden + 1)): the sample std of 128 draws lies well within 30% of it.
    assert abs(weight.std().item() * math.sqrt(hidden + 1) - 1.0) < 0.3


def test_preference_eval_matches_a_direct_computation():
    """Held-out metrics through the real toy reward model, against a per-sequence float64 recount;
    uneven batch sizes and a ranked group check that batching and pair expansion change nothing."""
    from rlhf.training.engine import Dist
    from rlhf.training.evaluation import preference_eval

    tok = build_tokenizer()
    model = load_scalar_model(ModelSource("toy", "toy"), ModelConfig(), tok, seed=5, dtype=torch.float32)
    operands = [(1, 2), (13, 40), (7, 7), (50, 49)]
    rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1), "margin": 0.5} for a, b in operands]
    examples, _ = tokenize_preferences(to_comparisons(records(rows), tok), tok, max_length=16)
    ranked, _ = tokenize_preferences(to_ranked(records([{"prompt": "2+2=", "responses": ["4", "5", "x"]}]), tok), tok, max_length=16)
    examples += ranked
    dist = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

    got = preference_eval(model, examples, batch_size=2, pad_id=tok.pad_token_id, dist=dist)

    def reward(seq: list[int]) -> float:
        with torch.no_grad():
            return float(model(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))[0, -1])

    rewards, gaps, losses = [], [], []
    for ex in examples:
        r = [reward(s) for s in ex.sequences]
        rewards += r
        for (i, j), m in zip(ex.pairs, ex.margins):
            gaps.append(r[i] - r[j])
            losses.append(math.log1p(math.exp(-(r[i] - r[j] - m))))
    mean = sum(rewards) / len(rewards)
    assert len(gaps) == 4 + 3
    assert got["accuracy"] == pytest.approx(sum(g > 0 for g in gaps) / len(gaps))
    assert got["margin"] == pytest.approx(sum(gaps) / len(gaps), abs=1e-5)
    assert got["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-5)
    assert got["reward_mean"] == pytest.approx(mean, abs=1e-5)
    assert got["reward_std"] == pytest.approx(math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards)), abs=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_ensemble_score_is_the_penalized_mean_of_normalized_scores(seed):
    from rlhf.algos.reward import ensemble_score

    g = torch.Generator().manual_seed(seed)
    members, batch = 1 + seed % 4, 6
    scores = torch.randn(members, batch, generator=g, dtype=torch.float64) * 5 + 3
    mean, std = torch.randn(members, generator=g, dtype=torch.float64), torch.rand(members, generator=g, dtype=torch.float64) + 0.5
    got = ensemble_score(scores, mean, std, penalty=0.7)
    for b in range(batch):
        z = [(float(scores[m, b]) - float(mean[m])) / float(std[m]) for m in range(members)]
        mu = sum(z) / members
        sd = (sum((v - mu) ** 2 for v in z) / members) ** 0.5
        assert float(got[b]) == pytest.approx(mu - 0.7 * sd, abs=1e-12)
