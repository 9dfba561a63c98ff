"""Padding-free forwards over a rollout (`rlhf ppo` with data.packing): the actor's log-probs and entropies,
the reference's log-probs, the critic's values and the reward model's scores from forwards over packed rows.

Each rollout row's attended tokens (its prompt without the left padding, its response side up to the
episode's end: environment tokens included) become one sequence, laid end to end with others in rows of
at most `capacity` tokens (rlhf/data/packing.py), position ids restarting at each. Those position ids are
the rollout's own (they count attended tokens), and attention stays inside each sequence, so every output
read back is the unpacked one up to summation order. Per-token outputs come back in the rollout's (B, R)
layout, 0 where response_mask is False, exactly as `rlhf.rollouts.generation.policy_logprobs` and
`token_values` give them: every loss, KL, advantage and metric downstream is computed unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, cast

import torch

from rlhf.algos.ppo import entropy_from_logits, logprobs_from_logits
from rlhf.data.packing import pack_sequences, packed_forward_inputs
from rlhf.protocols import PolicyModel, ScoringModel, inner_model
from rlhf.rollouts.generation import (
    Sequences,
    _accepts_logits_to_keep,
    policy_logprobs,
    token_values,
)

if TYPE_CHECKING:
    from rlhf.models.loading import ScalarModel


class PackedRollout(NamedTuple):
    """A rollout batch of B rows packed. input_ids, position_ids (R', P') long; sources (T,) long: for each
    response token (response_mask's True entries, row-major), the flattened (R' * P') index of the token
    before it, whose logits and value belong to it; targets (T,) long: the token's own index; response_mask
    (B, R) bool: where the T outputs go back; last_index (B,) long: each sequence's last token (its reward)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    sources: torch.Tensor
    targets: torch.Tensor
    response_mask: torch.Tensor
    last_index: torch.Tensor

    def to(self, device: torch.device) -> PackedRollout:
        return PackedRollout(*(t.to(device) for t in self))


def pack_rollout(seqs: Sequences, *, pad_id: int, capacity: int) -> PackedRollout:
    """`seqs` packed in rows of at most `capacity` tokens, on `seqs`' device. Each response token must follow
    an attended column (true of every rollout: prompts are never empty, episodes have no holes in attention),
    as the unpacked forward reads it from the column before."""
    seqs = seqs.to(torch.device("cpu"))
    attended = seqs.attention_mask.bool()  # (B, P + R)
    response = seqs.response_mask
    if not attended[:, seqs.prompt_width - 1 : -1][response].all():
        raise ValueError("a response token follows a column outside the attention mask")
    packed = pack_sequences([ids[mask].tolist() for ids, mask in zip(seqs.input_ids, attended)], pad_id=pad_id, capacity=capacity)
    # The flattened index of every attended column: its sequence's start plus the attended columns before it.
    index = packed.starts[:, None] + attended.long().cumsum(dim=1) - 1  # (B, P + R)
    targets = index[:, seqs.prompt_width :][response]  # (T,) row-major over (B, R)
    out = PackedRollout(packed.input_ids, packed.position_ids, targets - 1, targets, response, packed.starts + packed.lengths - 1)
    return out.to(seqs.input_ids.device) if out.input_ids.device != seqs.input_ids.device else out


def _unpacked(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(T,) per-response-token values -> (B, R), 0 where response_mask is False. Differentiable."""
    return values.new_zeros(response_mask.shape).masked_scatter(response_mask, values)


def inner_scalar(model: ScoringModel) -> ScalarModel:
    """The ScalarModel inside a DeepSpeed engine, or `model` itself."""
    return cast("ScalarModel", getattr(model, "module", model))


def packed_logprobs(model: PolicyModel, packed: PackedRollout, *, temperature: float,
                    with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, R) log-probs of the response tokens under `model` (a causal LM, its engine, or a peft model) at
    `temperature`, and optionally (B, R) entropies; 0 at padding, as `policy_logprobs`. Differentiable.

    The LM head runs only at the columns that hold a source (`logits_to_keep`, where the model takes it).
    """
    input_ids, inputs = packed_forward_inputs(inner_model(model).config, packed.input_ids, packed.position_ids,
                                              dtype=next(model.parameters()).dtype)
    width = input_ids.shape[1]
    rows, columns = packed.sources // width, packed.sources % width  # in the forward's layout, (R', P') or (1, R' * P')
    if _accepts_logits_to_keep(model):
        kept = torch.unique(columns)  # sorted
        logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=kept, **inputs).logits  # (R', K, V)
        picked = logits[rows, torch.searchsorted(kept, columns)]  # (T, V)
    else:
        picked = model(input_ids=input_ids, use_cache=False, **inputs).logits[rows, columns]
    logp = logprobs_from_logits(picked, input_ids.flatten()[packed.targets], temperature=temperature)
    entropy = _unpacked(entropy_from_logits(picked.detach(), temperature=temperature), packed.response_mask) if with_entropy else None
    return _unpacked(logp, packed.response_mask), entropy


def _scalar_scores(model: ScoringModel, packed: PackedRollout) -> torch.Tensor:
    """(R' * P') a ScalarModel's (or its engine's) score at every packed token."""
    input_ids, inputs = packed_forward_inputs(inner_scalar(model).hf_model.config, packed.input_ids, packed.position_ids,
                                              dtype=next(model.parameters()).dtype)
    return model(input_ids, inputs.get("attention_mask"), position_ids=inputs["position_ids"]).flatten()


def packed_values(critic: ScoringModel, packed: PackedRollout) -> torch.Tensor:
    """(B, R) the critic's value of the state before each response token (0 at padding), as `token_values`. Differentiable."""
    return _unpacked(_scalar_scores(critic, packed)[packed.sources], packed.response_mask)


def packed_scores(reward_model: ScoringModel, packed: PackedRollout) -> torch.Tensor:
    """(B,) the reward model's score of each sequence, read at its last token, as `sequence_scores`."""
    return _scalar_scores(reward_model, packed)[packed.last_index]


def rollout_logprobs(model: PolicyModel, seqs: Sequences, packed: PackedRollout | None, *, temperature: float,
                     with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`policy_logprobs`, from the packed rows when `packed` is given."""
    if packed is None:
        return policy_logprobs(model, seqs, temperature=temperature, with_entropy=with_entropy)
    return packed_logprobs(model, packed, temperature=temperature, with_entropy=with_entropy)


def rollout_values(critic: ScoringModel, seqs: Sequences, packed: PackedRollout | None) -> torch.Tensor:
    """`token_values`, from the packed rows when `packed` is given."""
    return token_values(critic, seqs) if packed is None else packed_values(critic, packed)
