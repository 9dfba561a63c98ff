"""masked_lm_loss against a float64 loop over tokens."""

from __future__ import annotations

import math

import torch

from rlhf.algos.lm import masked_lm_loss


def reference_loss(logits, input_ids, response_mask, num_tokens=None):
    logits = logits.double()
    total, count = 0.0, 0
    batch, length, _ = logits.shape
    for b in range(batch):
        for t in range(1, length):
            if response_mask[b, t]:
                row = logits[b, t - 1]
                log_z = math.log(sum(math.exp(v) for v in row.tolist()))
                total += log_z - row[input_ids[b, t]].item()
                count += 1
    return total / (num_tokens if num_tokens is not None else max(count, 1))


def random_case(seed):
    g = torch.Generator().manual_seed(seed)
    batch, length, vocab = 3, 7, 11
    logits = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64)
    input_ids = torch.randint(0, vocab, (batch, length), generator=g)
    # Random prompt length then response, then right padding: the mask pattern a batch really has.
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        start = int(torch.randint(1, length - 1, (1,), generator=g))
        end = int(torch.randint(start + 1, length + 1, (1,), generator=g))
        mask[b, start:end] = True
    return logits, input_ids, mask


def test_matches_float64_loop_on_random_masks():
    for seed in range(20):
        logits, input_ids, mask = random_case(seed)
        got = masked_lm_loss(logits=logits, input_ids=input_ids, response_mask=mask).item()
        assert math.isclose(got, reference_loss(logits, input_ids, mask), rel_tol=1e-6)


def test_explicit_denominator_sums_then_divides():
    logits, input_ids, mask = random_case(3)
    got = masked_lm_loss(logits=logits, input_ids=input_ids, response_mask=mask, num_tokens=40.0).item()
    assert math.isclose(got, reference_loss(logits, input_ids, mask, num_tokens=40.0), rel_tol=1e-6)


def test_tokens_outside_the_mask_change_nothing():
    logits, input_ids, mask = random_case(5)
    before = masked_lm_loss(logits=logits, input_ids=input_ids, response_mask=mask)
    noisy_ids = torch.where(mask, input_ids, torch.randint(0, 11, input_ids.shape))
    # Logits at position t score token t+1, so only positions whose next token is masked out may change.
    free = ~mask[:, 1:]
    noisy_logits = logits.clone()
    noisy_logits[:, :-1][free] = torch.randn_like(noisy_logits[:, :-1][free]) * 10
    after = masked_lm_loss(logits=noisy_logits, input_ids=noisy_ids, response_mask=mask)
    assert torch.allclose(before, after)
