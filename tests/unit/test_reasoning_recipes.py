"""DAPO's decoupled clip and overlong penalty, GSPO's sequence ratio and truncated importance sampling,
checked against straightforward float64 loops on random masked inputs (rows masked out whole
included); and their config keys, refused with one line naming the key."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rlhf.algos.critic_free import aggregate_token_losses
from rlhf.algos.ppo import clipped_surrogate
from rlhf.algos.reasoning import (
    mismatch_kl,
    overlong_penalty,
    sequence_advantages,
    sequence_clipped_surrogate,
    truncated_is_weights,
)
from rlhf.config import PPOConfig, clip_bounds, load_config
from rlhf.errors import UserError
from tests.masks import PATTERNS, random_mask

B, R = 6, 7
SEEDS = range(3)


def inputs(seed: int, pattern: str, *, spread: float = 0.3):
    """logp, old_logp, advantages (B, R), mask with row 1 masked out whole, all float64; garbage at padding."""
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(gen, pattern, rows=B, cols=R)
    mask[1] = False
    old = -torch.rand(B, R, generator=gen, dtype=torch.float64) * 3
    logp = old + spread * torch.randn(B, R, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, R, generator=gen, dtype=torch.float64)
    junk = 1e6 * torch.randn(B, R, generator=gen, dtype=torch.float64)
    return (torch.where(mask, logp, junk), torch.where(mask, old, -junk), torch.where(mask, adv, junk), mask)


def valid(mask: torch.Tensor, i: int) -> list[int]:
    return [t for t in range(mask.shape[1]) if mask[i, t]]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("low, high", [(0.2, 0.28), (0.1, 0.5), (0.2, 0.2)])
def test_decoupled_clip_matches_loop(seed, pattern, low, high):
    logp, old, adv, mask = inputs(seed, pattern)
    losses, stats = clipped_surrogate(logp, old, adv, mask, clip=low, clip_high=high)
    clipped_count, count = 0, 0
    for i in range(B):
        for t in range(R):
            if not mask[i, t]:
                assert losses[i, t] == 0
                continue
            ratio = math.exp(logp[i, t].item() - old[i, t].item())
            a = adv[i, t].item()
            unclipped, clipped = -a * ratio, -a * min(max(ratio, 1 - low), 1 + high)
            assert losses[i, t].item() == pytest.approx(max(unclipped, clipped), rel=1e-12, abs=1e-12)
            clipped_count, count = clipped_count + (clipped > unclipped), count + 1
    assert stats["clipfrac"].item() == pytest.approx(clipped_count / count)
    assert 0 < clipped_count < count  # the inputs reach past both bounds: the check above tests the clamp


def test_clip_high_none_is_the_symmetric_clip_bit_for_bit():
    logp, old, adv, mask = inputs(0, "holes", spread=1.0)
    assert torch.equal(clipped_surrogate(logp, old, adv, mask, clip=0.2)[0],
                       clipped_surrogate(logp, old, adv, mask, clip=0.2, clip_high=0.2)[0])
    assert not torch.equal(clipped_surrogate(logp, old, adv, mask, clip=0.2)[0],
                           clipped_surrogate(logp, old, adv, mask, clip=0.2, clip_high=0.28)[0])


def penalty_by_hand(length: int, max_length: int, buffer: int, scale: float) -> float:
    start = max_length - buffer
    if length <= start:
        return 0.0
    if length <= max_length:
        return scale * (start - length) / buffer
    return -scale


@pytest.mark.parametrize("max_length, buffer", [(8, 4), (8, 1), (8, 8), (16, 5)])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_overlong_penalty_matches_its_piecewise_definition(max_length, buffer, scale):
    lengths = torch.arange(0, max_length + 4)
    got = overlong_penalty(lengths, max_length=max_length, buffer=buffer, scale=scale)
    for length, value in zip(lengths.tolist(), got.tolist()):
        assert value == pytest.approx(penalty_by_hand(length, max_length, buffer, scale), abs=1e-15), length


def test_overlong_penalty_edges():
    got = overlong_penalty(torch.tensor([4, 5, 6, 8, 9]), max_length=8, buffer=4).tolist()
    assert got == [0.0, -0.25, -0.5, -1.0, -1.0]  # 0 at the buffer's start, -1 at L_max and beyond


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_sequence_surrogate_matches_loop(seed, pattern):
    logp, old, adv, mask = inputs(seed, pattern, spread=0.4)
    seq_adv = sequence_advantages(adv, mask)
    logp = logp.clone().requires_grad_(True)
    losses, stats = sequence_clipped_surrogate(logp, old, seq_adv, mask, clip_low=0.02, clip_high=0.03)
    losses.sum().backward()
    clipped_rows, ratios = 0, []
    for i in range(B):
        ts = valid(mask, i)
        if not ts:
            assert seq_adv[i] == 0 and losses[i] == 0 and logp.grad[i].abs().sum() == 0
            continue
        a = sum(adv[i, t].item() for t in ts) / len(ts)
        s = math.exp(sum(logp[i, t].item() - old[i, t].item() for t in ts) / len(ts))
        unclipped, clipped = -a * s, -a * min(max(s, 0.98), 1.03)
        assert seq_adv[i].item() == pytest.approx(a, rel=1e-12)
        assert losses[i].item() == pytest.approx(max(unclipped, clipped), rel=1e-12)
        # d/d logp_t of -a * s is -a * s / |y|; nothing flows where the clipped term wins.
        grad = 0.0 if clipped > unclipped else -a * s / len(ts)
        for t in range(R):
            assert logp.grad[i, t].item() == pytest.approx(grad if t in ts else 0.0, rel=1e-9, abs=1e-12)
        clipped_rows += clipped > unclipped
        ratios.append(s)
    assert stats["clipfrac"].item() == pytest.approx(clipped_rows / len(ratios))  # over the non-empty rows
    assert stats["ratio_mean"].item() == pytest.approx(sum(ratios) / len(ratios), rel=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("cap", [1.0, 2.0])
def test_tis_weights_and_mismatch_kl_match_loop(seed, pattern, cap):
    train, sample, _, mask = inputs(seed, pattern, spread=1.0)
    weights = truncated_is_weights(train, sample, mask, cap=cap)
    kl = mismatch_kl(train, sample, mask)
    assert not weights.requires_grad
    capped = 0
    for i in range(B):
        for t in range(R):
            if not mask[i, t]:
                assert weights[i, t] == 0 and kl[i, t] == 0
                continue
            d = train[i, t].item() - sample[i, t].item()
            assert weights[i, t].item() == pytest.approx(min(math.exp(d), cap), rel=1e-12)
            assert kl[i, t].item() == pytest.approx(math.exp(d) - 1 - d, rel=1e-9, abs=1e-15)
            assert kl[i, t].item() >= 0
            capped += math.exp(d) > cap
    assert capped > 0  # the cap is exercised


@pytest.mark.parametrize("seed", SEEDS)
def test_sequence_mean_skips_rows_masked_out_whole(seed):
    _, _, losses, mask = inputs(seed, "holes")
    got = aggregate_token_losses(losses, mask, mode="sequence_mean", horizon=R).item()
    means = [sum(losses[i, t].item() for t in valid(mask, i)) / len(valid(mask, i)) for i in range(B) if valid(mask, i)]
    assert len(means) == B - 1
    assert got == pytest.approx(sum(means) / len(means), rel=1e-12)


def test_shaped_score_adds_the_overlong_penalty():
    from rlhf.stages.ppo_rollout import shaped

    cfg = load_config(PPOConfig, None, ["reward.overlong_buffer=4", "reward.overlong_penalty=0.5", "ppo.no_eos_score=null"])
    seqs = SimpleNamespace(has_eos=torch.tensor([True, True, False]), response_lengths=torch.tensor([3, 6, 8]))
    got = shaped(torch.tensor([1.0, 1.0, 1.0]), seqs, cfg).tolist()
    assert got == pytest.approx([1.0, 1.0 - 0.25, 1.0 - 0.5])
    off = load_config(PPOConfig, None, ["ppo.no_eos_score=null"])
    assert shaped(torch.tensor([1.0, 1.0, 1.0]), seqs, off).tolist() == [1.0, 1.0, 1.0]


def test_defaults_keep_todays_ppo():
    ppo = load_config(PPOConfig).ppo
    cfg = load_config(PPOConfig)
    assert clip_bounds(ppo) == (0.2, 0.2) and ppo.ratio == "token" and not ppo.overlong_filter
    assert ppo.tis_cap is None and ppo.max_mismatch_kl is None and cfg.reward.overlong_buffer is None
    assert clip_bounds(load_config(PPOConfig, None, ["ppo.clip_range=0.1", "ppo.clip_high=0.28"]).ppo) == (0.1, 0.28)


@pytest.mark.parametrize("overrides, fragments", [
    (["ppo.clip_low=0"], ["ppo.clip_low must be in (0, 1)"]),
    (["ppo.clip_low=1.5"], ["ppo.clip_low must be in (0, 1)", "1.5"]),
    (["ppo.clip_high=-0.1"], ["ppo.clip_high must be positive"]),
    (["ppo.ratio=seq"], ["ppo.ratio", "token", "sequence"]),
    (["ppo.tis_cap=0.5", "rollout.logprobs_from_generation=false"], ["ppo.tis_cap must be at least 1"]),
    (["ppo.tis_cap=2"], ["ppo.tis_cap", "rollout.logprobs_from_generation=false"]),
    (["ppo.max_mismatch_kl=0.1"], ["ppo.max_mismatch_kl", "rollout.logprobs_from_generation=false"]),
    (["ppo.max_mismatch_kl=0", "rollout.logprobs_from_generation=false"], ["ppo.max_mismatch_kl must be positive"]),
    (["reward.overlong_buffer=0"], ["reward.overlong_buffer must be in [1, rollout.max_new_tokens=8]", "got 0"]),
    (["reward.overlong_buffer=9"], ["reward.overlong_buffer", "got 9"]),
    (["reward.overlong_buffer=4", "reward.overlong_penalty=0"], ["reward.overlong_penalty must be positive"]),
    (["reward.overlong_penalty=2"], ["reward.overlong_penalty", "set reward.overlong_buffer"]),
])
def test_bad_recipe_settings_are_one_line_errors(overrides, fragments):
    with pytest.raises(UserError) as err:
        load_config(PPOConfig, None, overrides)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("overrides", [
    ["ppo.tis_cap=2", "rollout.logprobs_from_generation=false"],
    ["ppo.tis_cap=2", "engine.precision=bf16"],  # there generation's log-probs are never the old ones
    ["ppo.clip_low=0.2", "ppo.clip_high=0.28", "ppo.ratio=sequence", "ppo.overlong_filter=true", "reward.overlong_buffer=8"],
])
def test_good_recipe_settings_load(overrides):
    load_config(PPOConfig, None, overrides)


def test_a_mismatch_past_max_mismatch_kl_stops_in_one_line_naming_value_and_step():
    from rlhf.stages.ppo_context import PPOState
    from rlhf.stages.ppo_rollout import stop_if_mismatched

    def stop(state, message):
        raise UserError(message)

    keeper = SimpleNamespace(run=SimpleNamespace(checkpoint_dir="ckpt"), stop=stop)
    cfg = load_config(PPOConfig, None, ["ppo.max_mismatch_kl=0.1", "rollout.logprobs_from_generation=false"])
    stop_if_mismatched(keeper, PPOState(step=4), cfg, {"train/mismatch_kl": 0.1})  # at the limit: goes on
    with pytest.raises(UserError) as err:
        stop_if_mismatched(keeper, PPOState(step=4), cfg, {"train/mismatch_kl": 0.25})
    assert "\n" not in str(err.value)
    assert "train/mismatch_kl=0.25 passed ppo.max_mismatch_kl=0.1 in step 5" in str(err.value)
    off = load_config(PPOConfig)
    stop_if_mismatched(keeper, PPOState(step=4), off, {"train/mismatch_kl": 9.0})  # no limit set


def test_stage_surrogate_with_sequence_ratio_uses_the_rows_mean_advantage():
    """gae's per-token advantages: the GSPO loss of a row is that of its masked-mean advantage, laid on its tokens."""
    from rlhf.stages.ppo_update import surrogate

    logp, old, adv, mask = inputs(0, "holes")
    ppo = load_config(PPOConfig, None, ["ppo.ratio=sequence", "ppo.clip_high=0.3"]).ppo
    tokens, stats = surrogate(logp, old, adv, mask, ppo)
    rows, _ = sequence_clipped_surrogate(logp, old, sequence_advantages(adv, mask), mask, clip_low=0.2, clip_high=0.3)
    for i in range(B):
        for t in range(R):
            assert tokens[i, t].item() == (rows[i].item() if mask[i, t] else 0.0)
    assert {"clipfrac", "ratio_mean", "approx_kl"} <= set(stats)
