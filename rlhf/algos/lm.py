"""Language-modelling loss with a response mask (SFT, and the PPO-ptx term)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_lm_loss(
    *,
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    num_tokens: float | None = None,
) -> torch.Tensor:
    """Summed next-token negative log-likelihood over counted targets, divided by `num_tokens`.

    Args:
        logits: (B, T, V) model outputs; position t predicts token t + 1.
        input_ids: (B, T) the sequences.
        response_mask: (B, T) bool, True where the token is a target that counts (response tokens
            and their EOS); False on prompt tokens and padding.
        num_tokens: the denominator. Pass the number of counted tokens in the whole global batch
            (all ranks and accumulation steps) scaled as the caller's reduction needs, so every token
            weighs the same however tokens fall across ranks; None = the count in this batch.

    Returns:
        A scalar loss.
    """
    # Position t's logits score token t + 1, so targets and their mask drop the first position.
    targets = input_ids[:, 1:]
    counted = response_mask[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none"
    ).view_as(targets)
    total = (nll * counted).sum()
    denominator = counted.sum().clamp(min=1) if num_tokens is None else num_tokens
    return total / denominator
