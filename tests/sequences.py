"""Test-only: a rollout batch laid out from given prompts and responses (the stage samples its own)."""

from __future__ import annotations

from dataclasses import fields

import torch

from rlhf.data.collate import left_pad_prompts, pad_right
from rlhf.rollouts.generation import Sequences


def build_sequences(
    prompts: list[list[int]], responses: list[list[int]], *, pad_id: int, eos_id: int, device: torch.device | None = None
) -> Sequences:
    """Lay prompts (left-padded) and responses (right-padded) side by side. Every response holds at
    least one token. Masks come from lengths, never from token ids (a pad may equal EOS)."""
    if any(not r for r in responses):
        raise ValueError("every response must hold at least one token")
    left = left_pad_prompts(prompts, pad_id=pad_id)
    right = pad_right(responses, pad_value=pad_id)  # (B, R)
    lengths = torch.tensor([len(r) for r in responses])
    response_mask = torch.arange(right.shape[1])[None, :] < lengths[:, None]  # (B, R)
    attention_mask = torch.cat([left["attention_mask"], response_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    has_eos = torch.tensor([r[-1] == eos_id for r in responses])
    seqs = Sequences(
        input_ids=torch.cat([left["input_ids"], right], dim=1), attention_mask=attention_mask, position_ids=position_ids,
        response_mask=response_mask, has_eos=has_eos, prompt_width=left["input_ids"].shape[1],
    )
    if device is not None:
        seqs = Sequences(**{f.name: getattr(seqs, f.name).to(device) for f in fields(seqs) if f.name != "prompt_width"},
                         prompt_width=seqs.prompt_width)
    return seqs
