"""Batched generation from a policy, the same way for evaluation and for PPO rollouts."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from rlhf.data.collate import left_pad_prompts


@torch.no_grad()
def generate(
    model: Any,
    prompts: list[list[int]],
    *,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    zero3: bool = False,
    device: torch.device | None = None,
) -> list[list[int]]:
    """Sample (or, at temperature 0, greedily decode) a continuation of each prompt.

    Prompts are left-padded so every row's last prompt token sits at the same position and the
    KV cache grows in step; the attention mask keeps padding out. Returns each response's token
    ids up to and including its first EOS (responses cut by max_new_tokens have no EOS).

    Under ZeRO-3 the parameters are gathered once for the whole call rather than once per token,
    and `synced_gpus` keeps every rank stepping until all are done, because a partitioned forward
    is a collective that all ranks must join.
    """
    batch = left_pad_prompts(prompts, pad_id=pad_id)
    input_ids = batch["input_ids"].to(device) if device else batch["input_ids"]
    attention_mask = batch["attention_mask"].to(device) if device else batch["attention_mask"]
    sampling: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    gather: contextlib.AbstractContextManager = contextlib.nullcontext()
    if zero3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    with gather:
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            synced_gpus=zero3,
            **sampling,
        )
    responses = []
    for row in output[:, input_ids.shape[1] :].tolist():
        cut = row.index(eos_id) + 1 if eos_id in row else len(row)
        responses.append(row[:cut])
    return responses
