"""Batch padding: right padding for training, left padding for generation."""

from __future__ import annotations

import torch

from rlhf.data.tokenize import RMExample, SFTExample


def pad_right(seqs: list[list[int]], *, pad_value: int) -> torch.Tensor:
    """Stack sequences of unequal length, padding on the right. Returns (B, T_max) long."""
    if not seqs:
        raise ValueError("pad_right needs at least one sequence")
    t_max = max(len(s) for s in seqs)
    out = torch.full((len(seqs), t_max), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def _right_padded(seqs: list[list[int]], *, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T) long; the mask comes from the lengths, not from
    input_ids != pad_id, because the pad id may equal EOS, which is a real token."""
    input_ids = pad_right(seqs, pad_value=pad_id)
    positions = torch.arange(input_ids.shape[1])  # (T,)
    attention_mask = (positions[None, :] < torch.tensor([len(s) for s in seqs])[:, None]).long()
    return input_ids, attention_mask


def collate_sft(batch: list[SFTExample], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of SFT examples.

    Returns input_ids (B, T) long; attention_mask (B, T) long, 1 = real token, 0 = pad;
    response_mask (B, T) bool, True = counts in the loss (response tokens and EOS), False on
    prompt tokens and on padding.
    """
    input_ids, attention_mask = _right_padded([ex.input_ids for ex in batch], pad_id=pad_id)
    response_mask = pad_right([[int(m) for m in ex.response_mask] for ex in batch], pad_value=0).bool()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def collate_rm(batch: list[RMExample], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Every sequence of a batch of preference groups, right-padded, with the pairs as flat indices.

    Returns input_ids, attention_mask (N, T) long, N = all sequences of all groups; and the pairs
    of `rm_pairs`.
    """
    pairs, seqs = rm_pairs(batch)
    input_ids, attention_mask = _right_padded(seqs, pad_id=pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask, **pairs}


def rm_pairs(batch: list[RMExample]) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """The pairs of a batch of preference groups over its flat list of sequences, and that list.

    Returns better, worse (P,) long indices into the sequences; margins (P,) float; weights (P,)
    float = 1 / (pairs of the pair's group * groups in the batch), so the weighted sum is
    InstructGPT's mean over prompts of the mean over each prompt's pairs (a prompt with K responses
    weighs as much as one with 2).
    """
    seqs: list[list[int]] = []
    better: list[int] = []
    worse: list[int] = []
    margins: list[float] = []
    weights: list[float] = []
    for group in batch:
        offset = len(seqs)
        seqs.extend(group.sequences)
        for (i, j), margin in zip(group.pairs, group.margins):
            better.append(offset + i)
            worse.append(offset + j)
            margins.append(margin)
            weights.append(1.0 / (len(group.pairs) * len(batch)))
    pairs = {
        "better": torch.tensor(better, dtype=torch.long),
        "worse": torch.tensor(worse, dtype=torch.long),
        "margins": torch.tensor(margins, dtype=torch.float32),
        "weights": torch.tensor(weights, dtype=torch.float32),
    }
    return pairs, seqs


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
