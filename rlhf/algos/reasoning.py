"""Recipe pieces of RL for reasoning on top of the clipped surrogate of rlhf/algos/ppo.py.

DAPO (Yu et al. 2025): the soft overlong penalty (decoupled clipping is clipped_surrogate's
clip_high). GSPO (Zheng et al. 2025): one importance ratio per response, the geometric mean of its
token ratios. Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly
brings you off-policy RL training"): a per-token weight min(pi_train / pi_sampler, C) for the
mismatch between the sampler's log-probs and the training forward's.

Shapes and masking follow rlhf/algos/ppo.py: (B, R) tensors, mask True at real response tokens,
masked entries may hold finite garbage and never reach an output. A row may be masked out whole.
"""

from __future__ import annotations

import torch

from rlhf.algos.ppo import masked_mean, masked_where


def overlong_penalty(lengths: torch.Tensor, *, max_length: int, buffer: int, scale: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong penalty: (B,) response lengths L -> (B,) float penalties, scale times
    0 for L <= max_length - buffer, ((max_length - buffer) - L) / buffer up to max_length (a linear
    ramp from 0 to -1), -1 beyond max_length."""
    start = max_length - buffer
    ramp = (start - lengths.double()) / buffer
    penalty = torch.where(lengths.double() <= start, torch.zeros_like(ramp), ramp.clamp(min=-1.0))
    return scale * penalty


def sequence_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, R) per-token advantages -> (B,) each row's mean over its valid tokens (0 for an empty row).

    For a group estimator every token of a row holds the same value, so this is that value; for GAE
    it is the row's mean advantage, what GSPO's sequence ratio multiplies."""
    return masked_mean(advantages, mask, dim=1)


def sequence_clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO's clipped surrogate per response: (B,) max(-A_i * s_i, -A_i * clamp(s_i, 1 - clip_low, 1 + clip_high)).

    s_i = exp(mean over row i's valid tokens of logp - old_logp), the length-normalized sequence
    ratio; advantages: (B,) sequence advantages; an empty row has s_i = 1 and loss 0. stats
    (detached, over the rows with a valid token): clipfrac = fraction of responses whose clipped term
    is strictly larger, ratio_mean = mean s_i.
    """
    log_ratio, mask = masked_where(logp - old_logp, mask)
    rows = mask.any(dim=1)
    seq_ratio = torch.exp(masked_mean(log_ratio, mask, dim=1))
    adv = torch.where(rows, advantages, torch.zeros((), dtype=advantages.dtype, device=advantages.device))
    unclipped = -adv * seq_ratio
    clipped = -adv * seq_ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    losses = torch.where(rows, torch.maximum(unclipped, clipped), torch.zeros_like(unclipped))
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).to(seq_ratio.dtype), rows),
                 "ratio_mean": masked_mean(seq_ratio, rows)}
    return losses, {k: v.detach() for k, v in stats.items()}


def truncated_is_weights(train_logp: torch.Tensor, sample_logp: torch.Tensor, mask: torch.Tensor, *, cap: float) -> torch.Tensor:
    """(B, R) detached weights min(exp(train_logp - sample_logp), cap), 0 at padding: how much more
    likely the trained policy finds each sampled token than the sampler did, capped."""
    log_ratio, mask = masked_where((train_logp - sample_logp).detach(), mask)
    return masked_where(torch.exp(log_ratio).clamp(max=cap), mask)[0]


def mismatch_kl(train_logp: torch.Tensor, sample_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, R) per-token k3 estimate of KL(sampler || trainer) for tokens drawn from the sampler, 0 at
    padding: r - 1 - log r with r = exp(train_logp - sample_logp). Never negative, unlike k1
    (sample_logp - train_logp), so a threshold on its mean means the same every step."""
    log_ratio, mask = masked_where((train_logp - sample_logp).detach(), mask)
    return masked_where(torch.expm1(log_ratio) - log_ratio, mask)[0]
