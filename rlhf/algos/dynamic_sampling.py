"""DAPO's dynamic sampling (Yu et al. 2025, "DAPO: an open-source LLM reinforcement learning system at
scale", section 3.2): a group whose K responses all got the same reward has a group advantage of 0 for
every response, so it adds no policy gradient and only dilutes the batch. Such groups are dropped and
more prompts are sampled until the batch holds its quota of groups that do say something.

The pure part: which groups are degenerate, and which drawn groups fill a batch. Groups are K
consecutive rows (rows [g*K, (g+1)*K) are group g), as rlhf/algos/critic_free.py lays them out.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

EQUAL_ATOL = 1e-6  # rewards this close count as equal: the group's advantages are ~0 (grpo divides by std + 1e-4)


def degenerate_groups(scores: torch.Tensor, *, group_size: int, atol: float = EQUAL_ATOL) -> torch.Tensor:
    """(B,) per-response rewards -> (B / K,) bool, True where a group's rewards are all equal: max - min <= atol,
    computed in float64. A group holding a NaN is never degenerate (the stage stops on non-finite scores anyway)."""
    if scores.dim() != 1 or scores.shape[0] % group_size:
        raise ValueError(f"scores must be (B,) with B a multiple of group_size={group_size}, got {tuple(scores.shape)}")
    groups = scores.double().reshape(-1, group_size)  # (B / K, K)
    return (groups.amax(dim=1) - groups.amin(dim=1)) <= atol


class GroupChoice(NamedTuple):
    """Which of the groups drawn so far make the batch, and how the others were counted."""

    groups: torch.Tensor
    """(quota,) long, indices of the chosen groups in the order they were drawn (or fewer while short: see choose_groups)."""
    kept: int
    """Informative groups chosen (at most quota)."""
    filler: int
    """Degenerate groups chosen to fill the batch because too few informative ones were drawn."""
    dropped: int
    """Degenerate groups left out."""
    surplus: int
    """Informative groups left out: drawn after the quota was met (another rank still needed more)."""

    @property
    def short(self) -> int:
        """How many informative groups the batch still lacks (the filler's count)."""
        return self.filler


def choose_groups(degenerate: torch.Tensor, *, quota: int) -> GroupChoice:
    """(N,) bool per drawn group, in draw order (N >= quota) -> the batch's `quota` groups: the first `quota`
    informative groups; when fewer were drawn, topped up with the first degenerate ones (their advantages are 0,
    so they add no policy gradient, and every rank keeps the same number of rows for its minibatches)."""
    if degenerate.dim() != 1 or degenerate.shape[0] < quota:
        raise ValueError(f"need at least quota={quota} drawn groups, got {tuple(degenerate.shape)}")
    degenerate = degenerate.bool().cpu()
    informative = (~degenerate).nonzero().flatten()
    kept = informative[:quota]
    filler = degenerate.nonzero().flatten()[: quota - kept.numel()]
    chosen = torch.sort(torch.cat([kept, filler])).values
    return GroupChoice(groups=chosen, kept=kept.numel(), filler=filler.numel(), dropped=int(degenerate.sum()) - filler.numel(),
                       surplus=informative.numel() - kept.numel())


def group_rows(groups: torch.Tensor, *, group_size: int) -> torch.Tensor:
    """(G,) group indices -> (G * K,) their rows, group by group: group g is rows [g*K, (g+1)*K)."""
    return (groups[:, None] * group_size + torch.arange(group_size)[None, :]).flatten()
