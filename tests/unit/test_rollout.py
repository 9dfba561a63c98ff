"""Rollouts: batched generation and scoring of left-padded prompts give what each row gives alone."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf.models.loading import ScalarModel
from rlhf.rollouts.generation import (
    RewardEnsemble,
    Sampling,
    generate,
    minibatch_rows,
    policy_logprobs,
    sample_rollout,
    sample_rollout_with_logprobs,
    sequence_scores,
    token_values,
)
from rlhf.rollouts.scoring import score_rollout
from rlhf.toy import ToyModelConfig, build_model, build_tokenizer
from tests.sequences import build_sequences


def gpt2_like(tokenizer):
    # Absolute position embeddings: a prompt shifted right by its padding would read wrong
    # positions unless generation derives them from the attention mask.
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_batch_matches_each_prompt_alone(family):
    tokenizer = build_tokenizer()
    model = build_model(ToyModelConfig(), tokenizer, seed=3).eval() if family == "llama" else gpt2_like(tokenizer)
    # A random model rarely emits EOS early, so every row runs the full length: a strict comparison.
    prompts = [tokenizer(text).input_ids for text in ("1+2=", "a much longer prompt, 45+67=", "9+9=")]
    greedy = Sampling(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=8, temperature=0.0)
    batched = generate(model, prompts, greedy)
    alone = [generate(model, [p], greedy)[0] for p in prompts]
    assert batched == alone
    assert all(len(r) >= 1 for r in batched)


def test_response_is_cut_after_the_first_eos():
    tokenizer = build_tokenizer()
    model = build_model(ToyModelConfig(), tokenizer, seed=3).eval()
    # A large bonus on the EOS logit makes it the certain next token, so the cut is deterministic.
    bonus = torch.zeros(len(tokenizer))
    bonus[tokenizer.eos_token_id] = 1e4
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + bonus)
    out = generate(model, [tokenizer("1+2=").input_ids],
                   Sampling(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=5, temperature=0.0))
    assert out == [[tokenizer.eos_token_id]]


def _rollout_batch(tokenizer, seed=5):
    """Prompts of different lengths and responses of different lengths (one with EOS)."""
    prompts = [tokenizer(t).input_ids for t in ("1+2=", "a longer prompt 45+67=", "9+9=")]
    eos = tokenizer.eos_token_id
    gen = torch.Generator().manual_seed(seed)
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    responses = [[digits[int(i)] for i in torch.randint(0, 10, (n,), generator=gen)] for n in (3, 1, 5)]
    responses[0].append(eos)
    return prompts, responses


def test_sequences_layout_and_masks():
    tokenizer = build_tokenizer()
    prompts, responses = _rollout_batch(tokenizer)
    seqs = build_sequences(prompts, responses, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    width = max(len(p) for p in prompts)
    assert seqs.prompt_width == width
    assert seqs.response_lengths.tolist() == [len(r) for r in responses]
    assert seqs.has_eos.tolist() == [True, False, False]
    for i, (p, r) in enumerate(zip(prompts, responses)):
        row = seqs.input_ids[i][seqs.attention_mask[i].bool()].tolist()
        assert row == p + r  # the real tokens, in order, are exactly prompt + response
        assert seqs.response_ids[i, : len(r)].tolist() == r
        # Positions count real tokens from 0, whatever the left padding.
        assert seqs.position_ids[i][seqs.attention_mask[i].bool()].tolist() == list(range(len(p) + len(r)))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_policy_logprobs_and_values_match_each_row_scored_alone(temperature):
    """Batched, padded scoring gives each response token the log-prob (at the sampling
    temperature) and the value that the unpadded row gives alone, computed in float64."""
    tokenizer = build_tokenizer()
    prompts, responses = _rollout_batch(tokenizer)
    actor = build_model(ToyModelConfig(), tokenizer, seed=3).eval()
    critic = ScalarModel(build_model(ToyModelConfig(), tokenizer, seed=4, head="scalar").eval())
    seqs = build_sequences(prompts, responses, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    with torch.no_grad():
        logp, entropy = policy_logprobs(actor, seqs, temperature=temperature, with_entropy=True)
        values = token_values(critic, seqs)
        actor64, critic64 = copy.deepcopy(actor).double(), copy.deepcopy(critic).double()
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([p + r])
            logits = actor64(input_ids=ids).logits[0] / temperature  # (T, V)
            scores = critic64(ids, torch.ones_like(ids))[0]
            for t, token in enumerate(r):
                position = len(p) - 1 + t  # the state before response token t
                expected = torch.log_softmax(logits[position], dim=-1)[token]
                assert abs(logp[i, t].item() - expected.item()) < 1e-4
                probs = torch.softmax(logits[position], dim=-1)
                assert abs(entropy[i, t].item() - (-(probs * probs.log()).sum()).item()) < 1e-4
                assert abs(values[i, t].item() - scores[position].item()) < 1e-4


def _eos_prone(model, tokenizer, bonus: float):
    """`model` with a bonus on the EOS logit, so sampled responses end at varied lengths."""
    shift = torch.zeros(len(tokenizer))
    shift[tokenizer.eos_token_id] = bonus
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + shift)
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sample_rollout_lays_out_what_generate_returns(family):
    """The tensor path PPO samples with gives the batch that build_sequences makes of generate's
    token lists, from the same random stream: same ids, masks, positions, EOS flags."""
    tokenizer = build_tokenizer()
    model = build_model(ToyModelConfig(), tokenizer, seed=3).eval() if family == "llama" else gpt2_like(tokenizer)
    model = _eos_prone(model, tokenizer, bonus=4.0)
    prompts = [tokenizer(t).input_ids for t in ("1+2=", "a much longer prompt, 45+67=", "9+9=", "12+34=")] * 4
    sampling = Sampling(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=6, temperature=1.0)
    torch.manual_seed(11)
    responses = generate(model, prompts, sampling)
    torch.manual_seed(11)
    seqs = sample_rollout(model, prompts, sampling)
    lengths = {len(r) for r in responses}
    assert len(lengths) > 1 and any(r[-1] == tokenizer.eos_token_id for r in responses)  # the case is not trivial
    expected = build_sequences(prompts, responses, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    for name in ("input_ids", "attention_mask", "position_ids", "response_mask", "has_eos"):
        assert torch.equal(getattr(seqs, name), getattr(expected, name)), name
    assert seqs.prompt_width == expected.prompt_width


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generation_logprobs_equal_the_scoring_forward(family, temperature):
    """PPO's old log-probs and entropies taken from generation's logits are the actor's forward over
    the rollout, scored in length-sorted chunks of 3, to float32 rounding: left padding of unequal
    prompts, responses cut at EOS at different lengths, temperature. Padding holds exact zeros, and
    the same random stream samples the same rollout either way."""
    tokenizer = build_tokenizer()
    model = build_model(ToyModelConfig(), tokenizer, seed=3).eval() if family == "llama" else gpt2_like(tokenizer)
    model = _eos_prone(model, tokenizer, bonus=4.0)
    prompts = [tokenizer(t).input_ids for t in ("1+2=", "a much longer prompt, 45+67=", "9+9=", "12+34=")] * 4
    sampling = Sampling(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=6, temperature=temperature)
    torch.manual_seed(11)
    plain = sample_rollout(model, prompts, sampling)
    torch.manual_seed(11)
    seqs, sampled = sample_rollout_with_logprobs(model, prompts, sampling)
    assert torch.equal(seqs.input_ids, plain.input_ids) and torch.equal(seqs.response_mask, plain.response_mask)
    mask = seqs.response_mask
    assert len(set(seqs.response_lengths.tolist())) > 1 and seqs.prompt_width > len(prompts[0])  # padding both ways
    scored = score_rollout(seqs, actor=model, reference=model, critic=None, reward=None, temperature=temperature, chunk=3)
    assert sampled.logprobs.shape == sampled.entropy.shape == mask.shape
    assert torch.allclose(sampled.logprobs[mask], scored.logprobs[mask], rtol=0, atol=2e-5)
    assert torch.allclose(sampled.entropy[mask], scored.entropy[mask], rtol=0, atol=2e-5)
    assert (sampled.logprobs[~mask] == 0).all() and (sampled.entropy[~mask] == 0).all()
    # Scoring with them skips the actor's forward and passes them through, row for row.
    reference, calls = copy.deepcopy(model), []
    model.lm_head.register_forward_hook(lambda module, inputs, output: calls.append(1))
    reused = score_rollout(seqs, actor=model, reference=reference, critic=None, reward=None,
                           temperature=temperature, chunk=3, sampled=sampled)
    assert calls == [] and torch.equal(reused.logprobs, sampled.logprobs) and torch.equal(reused.entropy, sampled.entropy)


def test_greedy_sampling_keeps_no_logprobs():
    tokenizer = build_tokenizer()
    model = build_model(ToyModelConfig(), tokenizer, seed=3).eval()
    greedy = Sampling(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=3, temperature=0.0)
    assert sample_rollout_with_logprobs(model, [tokenizer("1+2=").input_ids], greedy)[1] is None


def test_scoring_skips_padding_columns_and_prompt_logits():
    """A minibatch without the longest prompt or response is scored without the columns that are
    padding in all its rows, and the LM head sees only the response positions; the results are
    the rows' results in the whole batch, zero past each response."""
    tokenizer = build_tokenizer()
    prompts, responses = _rollout_batch(tokenizer)  # prompt 1 is the longest, response 2 the longest
    seqs = build_sequences(prompts, responses, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    actor = build_model(ToyModelConfig(), tokenizer, seed=3).eval()
    critic = ScalarModel(build_model(ToyModelConfig(), tokenizer, seed=4, head="scalar").eval())
    head_inputs = []
    actor.lm_head.register_forward_hook(lambda module, inputs, output: head_inputs.append(inputs[0].shape[1]))
    rows = torch.tensor([0, 2])
    with torch.no_grad():
        whole_logp, _ = policy_logprobs(actor, seqs, temperature=0.7)
        whole_values = token_values(critic, seqs)
        whole_scores = sequence_scores(critic, seqs)
        part = seqs.rows(rows)
        logp, _ = policy_logprobs(actor, part, temperature=0.7)
        values = token_values(critic, part)
        scores = sequence_scores(critic, part)
    trimmed = part.trimmed()
    assert trimmed.prompt_width == max(len(prompts[0]), len(prompts[2])) < seqs.prompt_width
    assert head_inputs == [seqs.response_width + 1, trimmed.response_width + 1]  # no logits over the prompt
    mask = part.response_mask
    assert logp.shape == values.shape == mask.shape
    assert torch.allclose(logp[mask], whole_logp[rows][mask], atol=1e-5)
    assert torch.allclose(values[mask], whole_values[rows][mask], atol=1e-5)
    assert torch.allclose(scores, whole_scores[rows], atol=1e-5)
    assert (logp[~mask] == 0).all() and (values[~mask] == 0).all()


def test_score_rollout_in_length_sorted_chunks_keeps_row_order():
    tokenizer = build_tokenizer()
    prompts, responses = _rollout_batch(tokenizer)
    seqs = build_sequences(prompts * 2, responses[::-1] + responses, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    actor = build_model(ToyModelConfig(), tokenizer, seed=3).eval()
    reference = build_model(ToyModelConfig(), tokenizer, seed=5).eval()
    critic = ScalarModel(build_model(ToyModelConfig(), tokenizer, seed=4, head="scalar").eval())
    kwargs = dict(actor=actor, reference=reference, critic=critic, reward=critic, temperature=1.0)
    whole = score_rollout(seqs, chunk=len(prompts) * 2, **kwargs)
    chunked = score_rollout(seqs, chunk=2, **kwargs)
    mask = seqs.response_mask
    for name in ("logprobs", "ref_logprobs", "values", "entropy"):
        assert torch.allclose(getattr(chunked, name)[mask], getattr(whole, name)[mask], atol=1e-5), name
    assert torch.allclose(chunked.scores, whole.scores, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_score_rollout_with_an_ensemble_scores_mean_minus_penalty_times_std_of_normalized_scores(seed):
    """PPO's learned score with reward_ensemble (and best-of-N's, through the same RewardEnsemble): each
    model's raw score normalized with its own statistics, then mean - penalty x population std, against
    the same formula in float64 Python on each model's scores of the whole batch."""
    tokenizer = build_tokenizer()
    prompts, responses = _rollout_batch(tokenizer, seed=seed)
    seqs = build_sequences(prompts * 2, responses[::-1] + responses, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    actor = build_model(ToyModelConfig(), tokenizer, seed=3).eval()
    rms = [ScalarModel(build_model(ToyModelConfig(), tokenizer, seed=10 * seed + k, head="scalar").eval()) for k in range(3)]
    g = torch.Generator().manual_seed(seed)
    stats = torch.stack([torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.1], dim=1).double()
    ensemble = RewardEnsemble(tuple(rms[1:]), stats, penalty=0.3 + seed)
    scored = score_rollout(seqs, actor=actor, reference=actor, critic=None, reward=rms[0], temperature=1.0, chunk=2,
                           ensemble=ensemble)
    with torch.no_grad():
        raw = [sequence_scores(rm, seqs).tolist() for rm in rms]
    for b in range(len(prompts) * 2):
        z = [(raw[m][b] - float(stats[m, 0])) / float(stats[m, 1]) for m in range(3)]
        mu = sum(z) / 3
        sd = (sum((v - mu) ** 2 for v in z) / 3) ** 0.5
        assert float(scored.ensemble_std[b]) == pytest.approx(sd, abs=1e-5) and sd > 1e-3
        assert float(scored.scores[b]) == pytest.approx(mu - ensemble.penalty * sd, abs=1e-5)
    assert scored.scores.dtype == torch.float32 and scored.ensemble_std.dtype == torch.float64
    assert score_rollout(seqs, actor=actor, reference=actor, critic=None, reward=rms[0], temperature=1.0, chunk=2).ensemble_std is None


@pytest.mark.parametrize("group_by_length", [False, True])
def test_minibatch_rows_partition_the_rollouts(group_by_length):
    lengths = torch.tensor([5, 1, 8, 8, 2, 7, 1, 3, 6, 4, 2, 8])
    torch.manual_seed(0)
    batches = minibatch_rows(lengths, micro_batch_size=4, group_by_length=group_by_length)
    assert [len(b) for b in batches] == [4, 4, 4]
    assert sorted(torch.cat(batches).tolist()) == list(range(len(lengths)))
    if group_by_length:
        # Each minibatch holds a contiguous band of the sorted lengths.
        bands = sorted((lengths[b].min().item(), lengths[b].max().item()) for b in batches)
        assert all(high <= next_low for (_, high), (next_low, _) in zip(bands, bands[1:]))


def test_sampling_ignores_the_checkpoints_generation_config():
    """PPO scores log-probs of softmax(logits / T): a processor from generation_config.json
    (repetition penalty, n-gram blocking, a minimum length, suppressed tokens, min_p) must not
    change what is sampled, or the scored distribution is not the sampled one."""
    tokenizer = build_tokenizer()
    model = build_model(ToyModelConfig(), tokenizer, seed=3).eval()
    prompts = [tokenizer(text).input_ids for text in ("1+2=", "45+67=", "9+9=", "12+3=")]
    sampling = Sampling(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=12, temperature=1.0)

    def sampled(m):
        torch.manual_seed(11)
        return generate(m, prompts, sampling)

    plain = sampled(model)
    hostile = copy.deepcopy(model)
    hostile.generation_config.update(repetition_penalty=1.3, no_repeat_ngram_size=1, min_new_tokens=4,
                                     suppress_tokens=[tokenizer.convert_tokens_to_ids("1")], min_p=0.2)
    assert sampled(hostile) == plain
    assert hostile.generation_config.repetition_penalty == 1.3  # the checkpoint's own settings are kept
