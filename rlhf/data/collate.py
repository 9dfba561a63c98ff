"""Batch padding: right padding for training, left padding for generation."""

from __future__ import annotations

import torch

from rlhf.data.tokenize import SFTExample


def pad_right(seqs: list[list[int]], *, pad_value: int) -> torch.Tensor:
    """Stack sequences of unequal length, padding on the right. Returns (B, T_max) long."""
    if not seqs:
        raise ValueError("pad_right needs at least one sequence")
    t_max = max(len(s) for s in seqs)
    out = torch.full((len(seqs), t_max), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def collate_sft(batch: list[SFTExample], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of SFT examples.

    Returns input_ids (B, T) long; attention_mask (B, T) long, 1 = real token, 0 = pad;
    response_mask (B, T) bool, True = counts in the loss (response tokens and EOS), False on
    prompt tokens and on padding.
    """
    lengths = [len(ex.input_ids) for ex in batch]
    input_ids = pad_right([ex.input_ids for ex in batch], pad_value=pad_id)
    # From the lengths, not from input_ids != pad_id: the pad id may equal EOS, which is real.
    positions = torch.arange(input_ids.shape[1])  # (T,)
    attention_mask = (positions[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    response_mask = pad_right([[int(m) for m in ex.response_mask] for ex in batch], pad_value=0).bool()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def left_pad_prompts(prompts: list[list[int]], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for batched generation, so every prompt ends at the same column.

    Returns input_ids (B, T) long; attention_mask (B, T) long, 1 = real token; position_ids (B, T)
    long, 0 at each prompt's first real token and counting up, 0 on pads. Without these position
    ids a left-padded prompt would start at position = its pad count, unlike in training.
    """
    if not prompts:
        raise ValueError("left_pad_prompts needs at least one prompt")
    t_max = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), t_max), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), t_max), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            input_ids[i, t_max - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            attention_mask[i, t_max - len(p) :] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
