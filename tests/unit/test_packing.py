"""Padding-free batches (data.packing): the packing plan, and packed against unpacked loss and
per-parameter gradients on every architecture of the matrix in fp32, eager and sdpa attention, for
SFT's language-model loss, the reward model's Bradley-Terry loss, and each loss of `rlhf dpo`
(dpo, ipo, kto, simpo, orpo) with its per-sequence log-probs and rewards."""

from __future__ import annotations

import random

import pytest
import torch

from rlhf.algos.lm import masked_lm_loss
from rlhf.algos.reward import bradley_terry_loss
from rlhf.config import DPOConfig, load_config
from rlhf.data.packing import (
    check_packing_supported,
    collate_packed_responses,
    collate_packed_sft,
    pack_rows,
    packed_forward_inputs,
)
from rlhf.data.tokenize import PairExample, RMExample, SFTExample, UnpairedExample
from rlhf.errors import UserError
from rlhf.models.loading import ScalarModel
from rlhf.stages.dpo_batches import Reference, batch_loss, make_batch
from rlhf.stages.dpo_scoring import reference_sums
from rlhf.stages.rm import micro_batch_rewards
from rlhf.stages.sft import micro_batch_loss
from rlhf.toy import build_tokenizer
from rlhf.training.engine import Dist
from tests.unit.test_architectures import ARCHITECTURES, causal_lm, scalar_model


def random_rows(vocab: int, *, n: int, max_length: int, seed: int) -> list[SFTExample]:
    """Rows of 2..max_length tokens, each a prompt of 1..len-1 tokens then a response (some with an empty prompt)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(2, max_length)
        prompt = rng.randint(0, length - 1)
        rows.append(SFTExample(input_ids=[rng.randrange(3, vocab) for _ in range(length)],
                               response_mask=[t >= prompt for t in range(length)]))
    return rows


@pytest.mark.parametrize("seed", range(20))
def test_the_plan_puts_every_row_in_exactly_one_bin_within_the_budget(seed):
    rng = random.Random(seed)
    capacity = rng.randint(1, 40)
    lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 30))]
    bins = pack_rows(lengths, capacity=capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    assert bins == pack_rows(lengths, capacity=capacity)  # deterministic
    # First fit: a bin's shortest row did not fit in any earlier bin's room when it was placed, so no
    # two bins together hold at most `capacity` tokens.
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert all(a + b > capacity for j, a in enumerate(loads) for b in loads[j + 1:])


def test_the_plan_by_hand():
    # Longest first: 5 -> bin 0 (room 1), 4 -> bin 1 (room 2), 3 -> bin 2 (room 3), 2 -> bin 1, 1 -> bin 0.
    assert pack_rows([3, 5, 1, 4, 2], capacity=6) == [[1, 2], [3, 4], [0]]
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([7], capacity=6)


def test_the_packed_layout_by_hand():
    rows = [SFTExample([5, 6, 7], [False, True, True]), SFTExample([8, 9], [True, True]), SFTExample([4, 4, 4, 4], [False] * 3 + [True])]
    batch = collate_packed_sft(rows, pad_id=0, capacity=6)
    # Longest first: row 2 (4 tokens) opens bin 0, row 0 (3) opens bin 1, row 1 (2) fills bin 0; bin 1 ends in 3 pads
    # with positions of their own.
    assert batch["input_ids"].tolist() == [[8, 9, 4, 4, 4, 4], [5, 6, 7, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 3], [0, 1, 2, 0, 1, 2]]
    # Each row's first token is no target (the token before it is another row's), even when it is a response token.
    assert batch["response_mask"].tolist() == [[False, True, False, False, False, True], [False, True, True, False, False, False]]
    assert int(batch["num_tokens"]) == 9


def with_attention(model, attention):
    try:
        model.set_attn_implementation(attention)
    except ValueError as exc:  # Gemma 2 has no sdpa attention in transformers
        pytest.skip(str(exc)[:80])
    return model


def _loss_and_grads(model, rows, *, packing_tokens, num_tokens, pad_id):
    model.zero_grad()
    loss, _ = micro_batch_loss(model, rows, pad_id=pad_id, packing_tokens=packing_tokens, num_tokens=num_tokens, device=torch.device("cpu"))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_loss_and_gradients_equal_unpacked(arch, attention):
    """fp32, within 1e-5: the sum over rows of response-token NLL does not depend on the layout.
    Sliding window 8 (Mistral, Gemma 2) is shorter than the rows, so windows inside packed rows are checked."""
    tokenizer = build_tokenizer()
    model = with_attention(causal_lm(arch, tokenizer).float(), attention)
    rows = random_rows(len(tokenizer), n=7, max_length=20, seed=1)
    num_tokens = float(sum(r.num_targets for r in rows))
    pad = tokenizer.pad_token_id
    plain_loss, plain = _loss_and_grads(model, rows, packing_tokens=None, num_tokens=num_tokens, pad_id=pad)
    diffs = []
    for capacity in (20, 48, 200):  # several bins, a few, all in one
        loss, grads = _loss_and_grads(model, rows, packing_tokens=capacity, num_tokens=num_tokens, pad_id=pad)
        assert loss == pytest.approx(plain_loss, abs=1e-5)
        assert grads.keys() == plain.keys()
        diffs.append(abs(loss - plain_loss))
        for name, g in grads.items():
            assert torch.allclose(g, plain[name], atol=1e-5, rtol=0), name
            diffs.append((g - plain[name]).abs().max().item())
    print(f"sft {arch}/{attention}: max abs diff {max(diffs):.2e}")


def random_groups(vocab: int, *, n: int, max_length: int, seed: int) -> list[RMExample]:
    """Preference groups of 2..4 responses to one prompt, all ranked (every pair), sequences of 3..max_length tokens."""
    rng = random.Random(seed)
    groups = []
    for _ in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(1, max_length // 2))]
        k = rng.randint(2, 4)
        seqs = [prompt + [rng.randrange(3, vocab) for _ in range(rng.randint(1, max_length - len(prompt)))] for _ in range(k)]
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        groups.append(RMExample(seqs, pairs, [rng.choice([0.0, 0.5]) for _ in pairs]))
    return groups


def _rm_loss_and_grads(model, groups, *, packing_tokens, pad_id):
    model.zero_grad()
    batch, rewards = micro_batch_rewards(model, groups, pad_id=pad_id, packing_tokens=packing_tokens, device=torch.device("cpu"))
    loss = bradley_terry_loss(rewards, batch["better"], batch["worse"], batch["weights"], batch["margins"])
    loss.backward()
    return rewards.detach(), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_rewards_loss_and_gradients_equal_unpacked(arch, attention):
    """The reward model reads each sequence's score at its last token; packed, that token sits at
    start + length - 1 of the flattened rows."""
    tokenizer = build_tokenizer()
    model = ScalarModel(with_attention(scalar_model(arch, tokenizer).float(), attention))
    groups = random_groups(len(tokenizer), n=4, max_length=20, seed=2)
    pad = tokenizer.pad_token_id
    plain_rewards, plain_loss, plain = _rm_loss_and_grads(model, groups, packing_tokens=None, pad_id=pad)
    diffs = []
    for capacity in (20, 64, 400):
        rewards, loss, grads = _rm_loss_and_grads(model, groups, packing_tokens=capacity, pad_id=pad)
        assert torch.allclose(rewards, plain_rewards, atol=1e-5, rtol=0)
        assert loss == pytest.approx(plain_loss, abs=1e-5)
        assert grads.keys() == plain.keys()
        diffs += [(rewards - plain_rewards).abs().max().item(), abs(loss - plain_loss)]
        for name, g in grads.items():
            assert torch.allclose(g, plain[name], atol=1e-5, rtol=0), name
            diffs.append((g - plain[name]).abs().max().item())
    print(f"rm {arch}/{attention}: max abs diff {max(diffs):.2e}")


def test_packing_refuses_an_unchecked_architecture_or_attention():
    class Config:
        model_type, _attn_implementation = "bloom", "eager"

    with pytest.raises(UserError, match="not checked for model_type 'bloom'"):
        check_packing_supported(Config())
    Config.model_type, Config._attn_implementation = "llama", "flex_attention"
    with pytest.raises(UserError, match="attn_implementation"):
        check_packing_supported(Config())
    Config._attn_implementation = "sdpa"
    check_packing_supported(Config())


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral"])
def test_the_flash_attention_layout_is_one_row_that_keeps_the_sequences_apart(arch):
    """flash_attention_2's varlen path (not runnable here: no GPU) takes one row whose position ids
    restart at each sequence. That row, run through sdpa (which reads the same restarts), gives the
    unpacked loss: the flattening joins no two sequences, pads included."""
    tokenizer = build_tokenizer()
    model = with_attention(causal_lm(arch, tokenizer).float(), "sdpa")
    rows = random_rows(len(tokenizer), n=7, max_length=20, seed=3)
    num_tokens = float(sum(r.num_targets for r in rows))
    batch = collate_packed_sft(rows, pad_id=tokenizer.pad_token_id, capacity=24)
    assert batch["input_ids"].shape[0] > 1 and (batch["position_ids"][:, -1] < batch["position_ids"].shape[1] - 1).any()

    class FlashConfig:
        model_type, _attn_implementation = arch, "flash_attention_2"

    input_ids, inputs = packed_forward_inputs(FlashConfig(), batch["input_ids"], batch["position_ids"], dtype=torch.float32)
    assert input_ids.shape == (1, batch["input_ids"].numel()) and inputs.keys() == {"position_ids"}
    logits = model(input_ids=input_ids, use_cache=False, **inputs).logits
    response_mask = batch["response_mask"].view_as(input_ids)
    flat = masked_lm_loss(logits=logits, input_ids=input_ids, response_mask=response_mask, num_tokens=num_tokens)
    plain, _ = micro_batch_loss(model, rows, pad_id=tokenizer.pad_token_id, packing_tokens=None, num_tokens=num_tokens,
                                device=torch.device("cpu"))
    assert flat.item() == pytest.approx(plain.item(), abs=1e-5)


def test_the_packed_responses_layout_by_hand():
    # Longest first: sequence 1 (5 tokens) opens row 0, sequence 0 (3) opens row 1, sequence 2 (2) fills row 0.
    packed = collate_packed_responses([[5], [6, 7], [8]], [[9, 9], [1, 2, 3], [4]], pad_id=0, capacity=7)
    assert packed.input_ids.tolist() == [[6, 7, 1, 2, 3, 8, 4], [5, 9, 9, 0, 0, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 0, 1, 2, 3]]
    assert packed.targets.tolist() == [8, 9, 2, 3, 4, 6] and packed.owners.tolist() == [0, 0, 1, 1, 1, 2]
    assert packed.response_lengths.tolist() == [2, 3, 1]
    with pytest.raises(ValueError, match="at least one token"):
        collate_packed_responses([[]], [[1]], pad_id=0, capacity=4)


DPO_MAX_LENGTH = 20


def preference_rows(vocab: int, *, loss: str, n: int, seed: int) -> list:
    """Pairs (or KTO's unpaired rows, half desirable) of prompts of 1..8 tokens and responses of 1.. tokens
    within DPO_MAX_LENGTH; chosen and rejected of different lengths."""
    rng = random.Random(seed)

    def tokens(k: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(k)]

    rows = []
    for i in range(n):
        prompt = tokens(rng.randint(1, 8))
        room = DPO_MAX_LENGTH - len(prompt)
        if loss == "kto":
            rows.append(UnpairedExample(prompt, tokens(rng.randint(1, room)), desirable=i % 2 == 0))
        else:
            rows.append(PairExample(prompt, tokens(rng.randint(1, room)), tokens(rng.randint(1, room))))
    return rows


def _dpo_loss_and_grads(model, reference, rows, cfg, tokenizer):
    model.zero_grad()
    dist = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    batch = make_batch(rows, list(range(len(rows))), cfg, tokenizer, dist, None)
    loss, stats = batch_loss(model, Reference(model=reference, adapters_off=False), batch, cfg, dist)
    loss.backward()
    per_sequence = {k: v for k, v in stats._asdict().items() if v.dtype.is_floating_point}  # log-probs, rewards, losses
    return per_sequence, loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_preference_losses_and_gradients_equal_unpacked(arch, attention):
    """Through the stage's own make_batch and batch_loss: each loss of the family, its per-sequence
    log-probs and rewards (the reference, another model, scored packed too) and its gradients, within
    1e-5 in fp32; KTO's mismatched KL rows are packed as well."""
    tokenizer = build_tokenizer()
    model = with_attention(causal_lm(arch, tokenizer).float(), attention)
    reference = with_attention(causal_lm(arch, tokenizer, seed=1).float(), attention)
    diffs = []
    # Packed rows of max_length (several rows), 48 tokens (a few) and 400 (one).
    for loss_name, capacity in zip(("dpo", "ipo", "kto", "simpo", "orpo"), (0, 48, 400, 0, 48)):
        rows = preference_rows(len(tokenizer), loss=loss_name, n=4, seed=4)
        plain_cfg, packed_cfg = (load_config(DPOConfig, None, [f"dpo.loss={loss_name}", f"data.max_length={DPO_MAX_LENGTH}",
                                                                f"data.packing={packing}", f"data.packing_tokens={capacity}"])
                                 for packing in ("false", "true"))
        plain_stats, plain_loss, plain = _dpo_loss_and_grads(model, reference, rows, plain_cfg, tokenizer)
        stats, loss, grads = _dpo_loss_and_grads(model, reference, rows, packed_cfg, tokenizer)
        assert loss == pytest.approx(plain_loss, abs=1e-5), loss_name
        assert stats.keys() == plain_stats.keys() and grads.keys() == plain.keys()
        diffs.append(abs(loss - plain_loss))
        for name, g in grads.items():
            assert torch.allclose(g, plain[name], atol=1e-5, rtol=0), (loss_name, name)
            diffs.append((g - plain[name]).abs().max().item())
        # A sum of ~20 token log-probs reaches ~75 (an IPO pair's loss ~25), where float32's spacing is
        # 7.6e-6 (1.9e-6): 1e-5 there is one or two roundings of the sum, so 1e-6 relative is allowed on top.
        for name, value in stats.items():
            assert torch.allclose(value, plain_stats[name], atol=1e-5, rtol=1e-6), (loss_name, name)
    print(f"dpo family {arch}/{attention}: max abs diff {max(diffs):.2e}")


@pytest.mark.parametrize("arch", ["gpt2", "mistral", "gemma2"])
def test_packed_response_log_probs_equal_each_sequence_alone_in_float64(arch):
    """The packed sums against a float64 forward of each prompt + response alone (no padding, no
    packing), summing log_softmax at the response tokens: absolute positions (GPT-2), sliding windows
    (Mistral, Gemma 2, window 8 < the rows), soft-capping (Gemma 2)."""
    from rlhf.stages.dpo_scoring import packed_logps

    tokenizer = build_tokenizer()
    model = causal_lm(arch, tokenizer).double()
    rows = preference_rows(len(tokenizer), loss="dpo", n=4, seed=6)
    prompts, responses = [r.prompt for r in rows] * 2, [r.chosen for r in rows] + [r.rejected for r in rows]
    with torch.no_grad():
        packed = packed_logps(model, collate_packed_responses(prompts, responses, pad_id=tokenizer.pad_token_id, capacity=48))
        alone = []
        for p, r in zip(prompts, responses):
            logits = model(input_ids=torch.tensor([p + r]), use_cache=False).logits[0, len(p) - 1 : -1]  # (len(r), V)
            alone.append(torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(r)[:, None]).sum())
    assert packed.dtype == torch.float64
    # Measured: 1e-14 on GPT-2; 3e-9 (Mistral) and 3e-8 (Gemma 2), whose rotary angles transformers computes
    # in float32 whatever the model's dtype (and their rounding depends on the batch's shape).
    assert torch.allclose(packed, torch.stack(alone), atol=1e-7, rtol=0)


def test_the_packed_reference_without_adapters_is_the_unpacked_one():
    """With LoRA and no named reference, the reference is the policy with its adapters off, packed too."""
    from peft import LoraConfig, get_peft_model

    from rlhf.rollouts.generation import pack_sequences

    tokenizer = build_tokenizer()
    model = get_peft_model(with_attention(causal_lm("llama", tokenizer).float(), "sdpa"),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    rows = preference_rows(len(tokenizer), loss="dpo", n=4, seed=5)
    prompts, responses = [r.prompt for r in rows] * 2, [r.chosen for r in rows] + [r.rejected for r in rows]
    plain = reference_sums(None, model, pack_sequences(prompts, responses, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id))
    packed = reference_sums(None, model, collate_packed_responses(prompts, responses, pad_id=tokenizer.pad_token_id, capacity=48))
    assert torch.allclose(packed, plain, atol=1e-5, rtol=0)
    with model.disable_adapter():
        base = reference_sums(model, model, collate_packed_responses(prompts, responses, pad_id=tokenizer.pad_token_id, capacity=48))
    assert torch.allclose(packed, base, atol=1e-6, rtol=0)
    # The adapters are on again, and change the scores (init_lora_weights=False: they are not zero).
    on = reference_sums(model, model, collate_packed_responses(prompts, responses, pad_id=tokenizer.pad_token_id, capacity=48))
    assert (on - packed).abs().max() > 1e-4
