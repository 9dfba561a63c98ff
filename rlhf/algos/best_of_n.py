"""Best-of-N selection: which of a prompt's N sampled responses the reward keeps.

A response cut by the length limit (no EOS) never beats one that ended: written to an SFT dataset
it would become a complete answer (SFT appends the EOS). Among the responses that ended, and
among those that did not when none ended, the highest reward wins; ties go to the earlier sample.
"""

from __future__ import annotations

import math

import torch


def best_of_first(rewards: torch.Tensor, has_eos: torch.Tensor, n: int) -> torch.Tensor:
    """(P,) the index of the response kept among the first `n` of each prompt's samples.

    rewards: (P, N) float; has_eos: (P, N) bool; 1 <= n <= N."""
    if not 1 <= n <= rewards.shape[1]:
        raise ValueError(f"n must be in [1, {rewards.shape[1]}], got {n}")
    first, ended = rewards[:, :n].double(), has_eos[:, :n]
    # An ended response outranks every cut one: lift the ended ones above the largest cut reward.
    lift = (first.max() - first.min() + 1.0) if first.numel() else 0.0
    ranked = first + ended.double() * lift
    return ranked.argmax(dim=1)  # argmax returns the first of equal maxima


def curve_ns(n: int) -> list[int]:
    """The n of the best-of-n curve: 1, 2, 4, ... up to `n`, and `n` itself."""
    ns = [2**k for k in range(int(math.log2(n)) + 1)]
    return ns if ns[-1] == n else [*ns, n]


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n policy || policy) in nats when the reward has no ties: log n - (n - 1) / n
    (Stiennon et al. 2020, appendix G.3); an upper bound otherwise."""
    return math.log(n) - (n - 1) / n
