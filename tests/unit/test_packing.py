"""Padding-free batches (data.packing): the packing plan, and packed against unpacked loss and
per-parameter gradients on every architecture of the matrix in fp32, eager and sdpa attention, for
SFT's language-model loss and the reward model's Bradley-Terry loss."""

from __future__ import annotations

import random

import pytest
import torch

from rlhf.algos.lm import masked_lm_loss
from rlhf.algos.reward import bradley_terry_loss
from rlhf.data.packing import check_packing_supported, collate_packed_sft, pack_rows, packed_forward_inputs
from rlhf.data.tokenize import RMExample, SFTExample
from rlhf.errors import UserError
from rlhf.model_loading import ScalarModel
from rlhf.stages.rm import micro_batch_rewards
from rlhf.stages.sft import micro_batch_loss
from rlhf.toy import build_tokenizer
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
