"""Critic-free estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++) and loss aggregation, checked against
straightforward float64 loops over groups, rows and tokens on random masked inputs."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.algos.critic_free import (
    LOSS_AGGREGATIONS,
    aggregate_token_losses,
    group_advantages,
    leave_one_out_advantages,
    per_token,
    returns_to_go,
    sequence_rewards,
)
from rlhf.algos.ppo import kl_per_token
from tests.masks import PATTERNS, random_mask

R = 7
SEEDS = range(3)
DTYPES = [torch.float64, torch.float32]
GROUP_SIZES = [2, 3, 4]


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def garbled(x: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x with every masked entry replaced by large finite garbage."""
    return torch.where(mask, x, (randn(gen, *x.shape) * 1e6).to(x.dtype))


def close(actual, expected, dtype: torch.dtype) -> None:
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(torch.as_tensor(actual).double(), torch.as_tensor(expected, dtype=torch.float64), rtol=tol, atol=tol)


# ---------------------------------------------------------------- float64 loop references


def ref_group_advantages(rewards: list, k: int, scale: bool, eps: float) -> list:
    out = []
    for start in range(0, len(rewards), k):
        group = rewards[start : start + k]
        mean = sum(group) / k
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (k - 1))  # sample std
        out += [(r - mean) / (std + eps) if scale else r - mean for r in group]
    return out


def ref_leave_one_out(rewards: list, k: int) -> list:
    out = []
    for start in range(0, len(rewards), k):
        group = rewards[start : start + k]
        for i, r in enumerate(group):
            others = [group[j] for j in range(k) if j != i]
            out.append(r - sum(others) / len(others))
    return out


def ref_returns_to_go(rewards: list, mask: list, gamma: float) -> list:
    out = []
    for row, keep in zip(rewards, mask):
        ret, g = [0.0] * len(row), 0.0
        for t in reversed([t for t in range(len(row)) if keep[t]]):
            g = row[t] + gamma * g
            ret[t] = g
        out.append(ret)
    return out


def ref_aggregate(losses: list, mask: list, mode: str, horizon: int) -> float:
    if mode == "token_mean":
        vals = [v for row, keep in zip(losses, mask) for v, m in zip(row, keep) if m]
        return sum(vals) / len(vals)
    if mode == "sequence_mean":
        means = []
        for row, keep in zip(losses, mask):
            vals = [v for v, m in zip(row, keep) if m]
            means.append(sum(vals) / len(vals))
        return sum(means) / len(means)
    total = sum(v for row, keep in zip(losses, mask) for v, m in zip(row, keep) if m)
    return total / (len(losses) * horizon)


# ---------------------------------------------------------------- group estimators


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", GROUP_SIZES)
@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_match_loop(seed, dtype, k, scale):
    gen = torch.Generator().manual_seed(seed)
    rewards = randn(gen, 3 * k, dtype=dtype)
    adv = group_advantages(rewards, group_size=k, scale_by_std=scale)
    assert adv.shape == rewards.shape and adv.dtype == dtype
    close(adv, ref_group_advantages(rewards.double().tolist(), k, scale, 1e-4), dtype)
    # Every group's advantages sum to zero: only relative standing within a prompt counts.
    close(adv.double().reshape(-1, k).sum(dim=1), [0.0, 0.0, 0.0], torch.float32)


def test_group_of_equal_rewards_has_zero_advantage_with_or_without_std():
    rewards = torch.tensor([2.0, 2.0, 2.0, 1.0, 3.0, 5.0])
    for scale in (True, False):
        adv = group_advantages(rewards, group_size=3, scale_by_std=scale)
        assert torch.equal(adv[:3], torch.zeros(3)), adv
        assert adv[3] < 0 < adv[5]


def test_dr_grpo_is_grpo_times_the_group_std():
    """Dr. GRPO drops the std division: a group with a small spread is no longer blown up."""
    rewards = torch.tensor([0.0, 0.1, 0.0, 10.0], dtype=torch.float64)
    grpo = group_advantages(rewards, group_size=2, scale_by_std=True, eps=0.0)
    dr = group_advantages(rewards, group_size=2, scale_by_std=False)
    close(grpo, [-math.sqrt(0.5), math.sqrt(0.5), -math.sqrt(0.5), math.sqrt(0.5)], torch.float64)
    close(dr, [-0.05, 0.05, -5.0, 5.0], torch.float64)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", GROUP_SIZES)
def test_leave_one_out_matches_loop(seed, dtype, k):
    gen = torch.Generator().manual_seed(seed)
    rewards = randn(gen, 4 * k, dtype=dtype)
    adv = leave_one_out_advantages(rewards, group_size=k)
    close(adv, ref_leave_one_out(rewards.double().tolist(), k), dtype)
    # The identity K / (K - 1) * (r - group mean).
    centered = group_advantages(rewards.double(), group_size=k, scale_by_std=False)
    close(adv, centered * k / (k - 1), dtype)


@pytest.mark.parametrize("fn", [group_advantages, leave_one_out_advantages])
@pytest.mark.parametrize("rows, k", [(6, 4), (4, 1), (0, 2)])
def test_group_estimators_refuse_batches_that_are_not_whole_groups(fn, rows, k):
    with pytest.raises(ValueError, match="multiple of group_size"):
        fn(torch.zeros(rows), group_size=k)


# ---------------------------------------------------------------- per-token pieces


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_sequence_rewards_and_per_token_match_loop(seed, dtype, pattern):
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(gen, pattern, rows=6, cols=R)
    rewards = randn(gen, 6, R, dtype=dtype)
    total = sequence_rewards(garbled(rewards, mask, gen), mask)
    close(total, [sum(v for v, m in zip(row, keep) if m) for row, keep in zip(rewards.double().tolist(), mask.tolist())], dtype)
    adv = randn(gen, 6, dtype=dtype)
    spread = per_token(adv, mask)
    expected = [[a if m else 0.0 for m in keep] for a, keep in zip(adv.double().tolist(), mask.tolist())]
    close(spread, expected, dtype)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_returns_to_go_match_loop(seed, dtype, pattern, gamma):
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(gen, pattern, rows=5, cols=R)
    rewards = randn(gen, 5, R, dtype=dtype)
    ret = returns_to_go(garbled(rewards, mask, gen), mask, gamma=gamma)
    close(ret, ref_returns_to_go(rewards.double().tolist(), mask.tolist(), gamma), dtype)


# ---------------------------------------------------------------- loss aggregation and the KL term


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_aggregation_matches_loop_and_ignores_padding(seed, dtype, pattern, mode):
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(gen, pattern, rows=5, cols=R)
    losses = randn(gen, 5, R, dtype=dtype).requires_grad_()
    loss = aggregate_token_losses(garbled(losses, mask, gen), mask, mode=mode, horizon=R + 3)
    close(loss, ref_aggregate(losses.double().tolist(), mask.tolist(), mode, R + 3), dtype)
    loss.backward()
    assert torch.equal(losses.grad[~mask], torch.zeros_like(losses.grad[~mask]))  # no gradient into padding


def test_aggregations_weigh_long_and_short_responses_differently():
    """One 1-token response with loss 1, one 3-token response with losses 0: what each mode learns."""
    losses = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, False, False], [True, True, True]])
    assert aggregate_token_losses(losses, mask, mode="token_mean", horizon=4).item() == pytest.approx(1 / 4)
    assert aggregate_token_losses(losses, mask, mode="sequence_mean", horizon=4).item() == pytest.approx(1 / 2)
    assert aggregate_token_losses(losses, mask, mode="token_sum", horizon=4).item() == pytest.approx(1 / 8)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_token_losses(losses, mask, mode="mean", horizon=4)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_k3_kl_loss_term_and_its_gradient_match_loop(seed, pattern, mode):
    """GRPO's KL term: aggregated k3 = exp(-d) - 1 + d per token, d = logp - ref_logp; its gradient
    with respect to logp is (1 - exp(-d)) times the aggregation's weight of that token."""
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(gen, pattern, rows=4, cols=R)
    ref = randn(gen, 4, R)
    logp = (ref + 0.5 * randn(gen, 4, R)).requires_grad_()
    kl = kl_per_token(garbled(logp, mask, gen), ref, mask, estimator="k3")
    loss = aggregate_token_losses(kl, mask, mode=mode, horizon=R)
    d = (logp.detach() - ref).tolist()
    per_tok = [[math.exp(-v) - 1 + v for v in row] for row in d]
    close(loss, ref_aggregate(per_tok, mask.tolist(), mode, R), torch.float64)
    loss.backward()
    weights = torch.zeros(4, R, dtype=torch.float64)  # d loss / d token loss, by aggregation
    for b, keep in enumerate(mask.tolist()):
        for t, m in enumerate(keep):
            if m:
                weights[b, t] = {"token_mean": 1 / int(mask.sum()), "sequence_mean": 1 / (4 * sum(keep)),
                                 "token_sum": 1 / (4 * R)}[mode]
    expected = [[weights[b, t].item() * (1 - math.exp(-d[b][t])) for t in range(R)] for b in range(4)]
    close(logp.grad, expected, torch.float64)
