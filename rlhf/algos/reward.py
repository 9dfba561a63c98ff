"""Reward-model math: the sequence reward at the last real token, and the Bradley-Terry loss.

Shapes: B sequences of length T; P comparison pairs drawn from those sequences. A pair
(better[p], worse[p]) indexes two rows of the batch; one prompt with K ranked responses gives
K(K-1)/2 pairs over its K rows, so each sequence is scored once however many pairs it is in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask, 1 = real token -> (B,) long: the column of each row's last real token.

    Reads the mask, never the token ids, so it is right for left and right padding alike and for a
    pad id equal to EOS. Every row must hold at least one real token.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (T,)
    # The rightmost column where the mask is 1 has the largest position among the real ones.
    return (positions * attention_mask.long()).argmax(dim=1)


def sequence_rewards(token_scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) per-token head outputs, (B, T) mask -> (B,) each sequence's reward, read at its last real token."""
    index = last_token_index(attention_mask)  # (B,)
    return token_scores.gather(1, index.unsqueeze(1)).squeeze(1)


def ranked_pairs(k: int) -> list[tuple[int, int]]:
    """All K(K-1)/2 (better, worse) index pairs of a list ranked best first."""
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def bradley_terry_loss(
    rewards: torch.Tensor,
    better: torch.Tensor,
    worse: torch.Tensor,
    weights: torch.Tensor,
    margins: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_p weights[p] * -log sigmoid(r[better[p]] - r[worse[p]] - margins[p]).

    rewards (B,) float; better, worse (P,) long indices into rewards; weights (P,) float, e.g.
    1 / (pairs of the prompt * prompts in the batch) for InstructGPT's per-prompt mean; margins
    (P,) float or None (the Llama 2 margin: the better side must win by at least this much).
    Returns a scalar. logsigmoid keeps large reward gaps finite.
    """
    gap = rewards[better] - rewards[worse]  # (P,)
    if margins is not None:
        gap = gap - margins
    return (weights * -F.logsigmoid(gap)).sum()


def ensemble_score(scores: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, penalty: float) -> torch.Tensor:
    """(M, B) raw scores of M reward models -> (B,) mean - penalty * std over the members of their normalized
    scores ((s - mean_m) / std_m, each model's own statistics: a Bradley-Terry model's offset and scale are its
    own). The spread is the population std, 0 for one member (Coste et al. 2023's uncertainty-weighted optimization)."""
    normalized = (scores - mean[:, None]) / std[:, None]
    return normalized.mean(dim=0) - penalty * normalized.std(dim=0, unbiased=False)


def ensemble_spread(scores: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(M, B) raw scores -> (B,) the std that ensemble_score penalizes: how much the members disagree."""
    return ((scores - mean[:, None]) / std[:, None]).std(dim=0, unbiased=False)
