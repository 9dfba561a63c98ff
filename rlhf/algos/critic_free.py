"""Critic-free advantage estimators and the loss aggregation they come with.

GRPO (Shao et al. 2024, DeepSeekMath): K responses per prompt; each response's reward minus its
group's mean, divided by the group's std; Dr. GRPO (Liu et al. 2025) drops the std division.
RLOO (Ahmadian et al. 2024): each response's reward minus the mean of the other K-1 of its group.
REINFORCE++ (Hu 2025): per-token rewards, discounted returns-to-go, whitened over the whole batch
(the whitening is masked_whiten in rlhf/algos/ppo.py, with statistics over every rank).

Shapes follow rlhf/algos/ppo.py: B rollouts by R response columns, `mask` (B, R) True at real
response tokens, masked entries may hold finite garbage and outputs are 0 there. Group methods
take (B,) sequence rewards laid out group by group: rows [g*K, (g+1)*K) are the K responses to
prompt g, so B must be a multiple of K.
"""

from __future__ import annotations

import torch

from rlhf.algos.ppo import gae, masked_mean, masked_where

# The aggregations by name: in rlhf.algos.variants, torch-free for the config.
from rlhf.algos.variants import LOSS_AGGREGATIONS as LOSS_AGGREGATIONS
from rlhf.algos.variants import LossAggregation as LossAggregation


def sequence_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, R) per-token rewards -> (B,) their sum over each row's valid tokens (the return at gamma 1)."""
    return masked_where(rewards, mask)[0].sum(dim=1)


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (B / K, K) view of the groups; ValueError unless B is a positive multiple of K >= 2."""
    if group_size < 2 or rewards.ndim != 1 or rewards.shape[0] % group_size or rewards.shape[0] == 0:
        raise ValueError(f"need (B,) rewards with B a positive multiple of group_size >= 2, got {tuple(rewards.shape)} and {group_size}")
    return rewards.reshape(-1, group_size)


def group_advantages(rewards: torch.Tensor, *, group_size: int, scale_by_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome advantages: (B,) sequence rewards -> (B,) (r - group mean) / (group std + eps).

    The std is the sample std of the K rewards (divide by K - 1), as DeepSeekMath's implementation;
    eps keeps a group of equal rewards at advantage 0 rather than 0/0. scale_by_std=False is
    Dr. GRPO's r - group mean: no group is up-weighted for having a small spread.
    """
    groups = _groups(rewards, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        centered = centered / (groups.std(dim=1, keepdim=True) + eps)
    return centered.reshape(-1)


def leave_one_out_advantages(rewards: torch.Tensor, *, group_size: int) -> torch.Tensor:
    """RLOO: (B,) sequence rewards -> (B,) r_i - mean of the other K-1 rewards of i's group.

    Equal to K / (K - 1) * (r_i - group mean): the baseline never contains the sample it judges,
    so the estimate stays unbiased.
    """
    groups = _groups(rewards, group_size)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def per_token(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) sequence advantages -> (B, R): each row's value at its valid tokens, 0 at padding."""
    return masked_where(advantages.unsqueeze(1).expand(mask.shape), mask)[0]


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """REINFORCE++'s per-token return: G_t = r_t + gamma * G_next over each row's valid tokens.

    rewards, mask: (B, R) -> (B, R), 0 at padding. This is GAE with all values 0 and lambda 1
    (delta_t = r_t, A_t = r_t + gamma * A_next), so it reuses gae's walk over the valid tokens.
    """
    zeros = torch.zeros_like(rewards)
    return gae(rewards, zeros, mask, gamma=gamma, lam=1.0)[0]


def aggregate_token_losses(
    token_losses: torch.Tensor, mask: torch.Tensor, *, mode: LossAggregation, horizon: int
) -> torch.Tensor:
    """(B, R) per-token losses -> the scalar loss of a minibatch.

    token_mean: sum over valid tokens / their count (PPO's usual, long responses weigh more);
    sequence_mean: mean over rows of each row's mean over its valid tokens (GRPO's 1/|o_i|: each
    response weighs the same whatever its length), over the rows with a valid token (a row masked
    out whole, e.g. by ppo.overlong_filter, weighs nothing); token_sum: sum over valid tokens / (B * horizon),
    a constant denominator (Dr. GRPO: no per-response length normalization); horizon is the
    longest possible response (rollout.max_new_tokens).
    """
    if mode == "token_mean":
        return masked_mean(token_losses, mask)
    if mode == "sequence_mean":
        rows = mask.bool().any(dim=1)
        return masked_mean(token_losses, mask, dim=1).sum() / rows.sum().clamp(min=1)
    if mode == "token_sum":
        return masked_where(token_losses, mask)[0].sum() / (token_losses.shape[0] * horizon)
    raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {LOSS_AGGREGATIONS}")
