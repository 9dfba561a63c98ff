"""How `rlhf dpo` scores stored responses: each response's log-probs summed over its tokens.

Unpacked, a batch is laid out as a sampled rollout is (prompts left-padded, responses right-padded)
and scored by `rlhf.rollouts.generation.policy_logprobs`. Packed (data.packing), the same prompt + response
sequences lie end to end in rows of data.packing_tokens (rlhf/data/packing.py): one forward without
padding, each response token's log-prob read at its flattened index and summed per sequence. The sums
and the response lengths are the same either way, so every loss of the family is too.
"""

from __future__ import annotations

from typing import cast

import torch

from rlhf.algos.ppo import logprobs_from_logits
from rlhf.config import DPODataConfig
from rlhf.data.packing import PackedResponses, collate_packed_responses, packed_forward_inputs
from rlhf.protocols import AdapterLM, PolicyModel, inner_model
from rlhf.rollouts.generation import Sequences, pack_sequences, policy_logprobs, reference_logprobs

Scored = Sequences | PackedResponses


def packing_capacity(data_cfg: DPODataConfig) -> int | None:
    """Tokens per packed row (None = packing off)."""
    return (data_cfg.packing_tokens or data_cfg.max_length) if data_cfg.packing else None


def lay_out(prompts: list[list[int]], responses: list[list[int]], *, pad_id: int, eos_id: int, capacity: int | None,
            device: torch.device) -> Scored:
    """The prompt + response sequences to score, on `device`: a rollout's layout, or packed rows of `capacity` tokens."""
    if capacity is None:
        return pack_sequences(prompts, responses, pad_id=pad_id, eos_id=eos_id, device=device)
    return collate_packed_responses(prompts, responses, pad_id=pad_id, capacity=capacity).to(device)


def packed_logps(model: PolicyModel, packed: PackedResponses) -> torch.Tensor:
    """(N,) each response's summed log-probs (temperature 1) under `model` (a causal LM, its engine, or a
    peft model), from one forward over the packed rows. Differentiable."""
    config = inner_model(model).config
    input_ids, inputs = packed_forward_inputs(config, packed.input_ids, packed.position_ids, dtype=next(model.parameters()).dtype)
    # No cache: transformers reads packed rows from the position ids only when there is none.
    logits = model(input_ids=input_ids, use_cache=False, **inputs).logits
    # The token before each response token predicts it (never another sequence's: every prompt holds a token).
    picked = logits.reshape(-1, logits.shape[-1])[packed.targets - 1]  # (T, V)
    logp = logprobs_from_logits(picked, packed.input_ids.flatten()[packed.targets])  # (T,)
    return logp.new_zeros(packed.response_lengths.shape[0]).index_add(0, packed.owners, logp)


def sequence_logps(model: PolicyModel, seqs: Scored) -> torch.Tensor:
    """(B,) each response's log-prob summed over its tokens under `model`."""
    if isinstance(seqs, PackedResponses):
        return packed_logps(model, seqs)
    logp, _ = policy_logprobs(model, seqs, temperature=1.0)  # (B, R), 0 at padding
    return logp.sum(dim=1)


def reference_sums(reference: PolicyModel | None, actor: PolicyModel, seqs: Scored) -> torch.Tensor:
    """(B,) the summed response log-probs under the frozen `reference`, or, when it is None, under `actor`
    (a peft model or its engine) with its LoRA adapters off. No gradient."""
    if isinstance(seqs, Sequences):
        return reference_logprobs(reference, actor, seqs, temperature=1.0).sum(dim=1)
    with torch.no_grad():
        if reference is not None:
            return packed_logps(reference, seqs)
        with cast(AdapterLM, inner_model(actor)).disable_adapter():  # no reference: the actor has adapters
            return packed_logps(actor, seqs)
