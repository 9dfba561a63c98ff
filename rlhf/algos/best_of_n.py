"""Best-of-N selection: which of a prompt's N sampled responses the reward keeps.

A response cut by the length limit (no EOS) never beats one that ended: written to an SFT dataset
it would become a complete answer (SFT appends the EOS). Among the responses that ended, and
among those that did not when none ended, the highest reward wins; ties go to the earlier sample.
A NaN reward (a broken score) loses to every number, so it is kept only when nothing else can be.
"""

from __future__ import annotations

import math

import torch


def best_of_first(rewards: torch.Tensor, has_eos: torch.Tensor, n: int) -> torch.Tensor:
    """(P,) the index of the response kept among the first `n` of each prompt's samples.

    rewards: (P, N) float; has_eos: (P, N) bool; 1 <= n <= N. Each row is decided on its own, by
    comparisons only: a NaN reward ranks below every other reward (-inf included) and is kept only
    when all the row's candidates are NaN (then the first of them); +-inf rank as numbers."""
    if not 1 <= n <= rewards.shape[1]:
        raise ValueError(f"n must be in [1, {rewards.shape[1]}], got {n}")
    first, ended = rewards[:, :n].double(), has_eos[:, :n].bool()
    # Candidates: the ended responses, or all of them in a row where none ended. No arithmetic
    # lift: a batch-wide offset is spoiled by one NaN/inf or by a spread that overflows.
    cand = torch.where(ended.any(dim=1, keepdim=True), ended, torch.ones_like(ended))
    numbers = cand & ~first.isnan()
    cand = torch.where(numbers.any(dim=1, keepdim=True), numbers, cand)
    best = torch.where(numbers, first, torch.full_like(first, -math.inf)).amax(dim=1, keepdim=True)
    hit = cand & (first == best)
    hit = torch.where(hit.any(dim=1, keepdim=True), hit, cand)  # an all-NaN row: any candidate
    return hit.int().argmax(dim=1)  # argmax returns the first of equal maxima


def curve_ns(n: int) -> list[int]:
    """The n of the best-of-n curve: 1, 2, 4, ... up to `n`, and `n` itself."""
    ns = [2**k for k in range(int(math.log2(n)) + 1)]
    return ns if ns[-1] == n else [*ns, n]


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n policy || policy) in nats when the reward has no ties: log n - (n - 1) / n
    (Stiennon et al. 2020, appendix G.3); an upper bound otherwise."""
    return math.log(n) - (n - 1) / n
