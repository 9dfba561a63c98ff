"""Scoring a sampled rollout for PPO: one forward of each model (actor, reference, critic, reward model) over
the rollout, in chunks of rows, padded or (data.packing) packed; both give the same (B, R) and (B,) outputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, cast

import torch

from rlhf.data.packing import check_packing_supported
from rlhf.protocols import AdapterLM, PolicyModel, ScoringModel, inner_model
from rlhf.rollouts.generation import (
    RewardEnsemble,
    SampledLogprobs,
    ScoredRollout,
    Sequences,
)
from rlhf.rollouts.implicit_reward import ImplicitReward, learned_scores
from rlhf.rollouts.packed import inner_scalar, pack_rollout, rollout_logprobs, rollout_values

if TYPE_CHECKING:
    from rlhf.models.stage_models import PPOModels

class Packing(NamedTuple):
    """Pack each chunk's rows into rows of at most `capacity` tokens, padded with `pad_id`."""

    pad_id: int
    capacity: int


@torch.no_grad()
def score_rollout(
    seqs: Sequences, *, actor: PolicyModel, reference: PolicyModel | None, critic: ScoringModel | None,
    reward: ScoringModel | ImplicitReward | None, temperature: float,
    chunk: int,
    reference_is_actor_without_adapters: bool = False,
    sampled: SampledLogprobs | None = None,
    ensemble: RewardEnsemble | None = None,
    packing: Packing | None = None,
) -> ScoredRollout:
    """One forward pass of each model over the rollout, `chunk` rows at a time: the actor's
    log-probs (PPO's old policy) and entropies, the reference's log-probs (the KL penalty), the
    critic's values (when given) and the reward model's scores (when given; else scores is None).

    With `reference_is_actor_without_adapters` (LoRA on the actor) `reference` is ignored and the
    reference log-probs come from the actor with its adapters switched off: no second copy. With
    `sampled` (generation's own log-probs of this rollout) the actor's forward is skipped. With
    `ensemble` (beside `reward`) the scores are its combination and ensemble_std its spread (its
    other members score the padded rows). With `packing` each chunk is packed once for every model.
    """
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("logprobs", "entropy", "ref_logprobs", "values", "scores", "ensemble_std")}
    # Chunks of similar response lengths: each is trimmed to its own longest response (or packs alike).
    order = torch.argsort(seqs.response_lengths, stable=True)
    for start in range(0, seqs.input_ids.shape[0], chunk):
        rows = order[start : start + chunk]
        part = seqs.rows(rows)
        packed = None if packing is None else pack_rollout(part, pad_id=packing.pad_id, capacity=packing.capacity)
        if sampled is None:
            logp, entropy = rollout_logprobs(actor, part, packed, temperature=temperature, with_entropy=True)
        else:
            logp, entropy = sampled.logprobs[rows], sampled.entropy[rows]
        assert entropy is not None  # with_entropy=True
        parts["logprobs"].append(logp)
        parts["entropy"].append(entropy)
        if reference_is_actor_without_adapters:
            with cast(AdapterLM, inner_model(actor)).disable_adapter():
                parts["ref_logprobs"].append(rollout_logprobs(actor, part, packed, temperature=temperature)[0])
        else:
            assert reference is not None  # a separate reference unless the actor's adapters are switched off
            parts["ref_logprobs"].append(rollout_logprobs(reference, part, packed, temperature=temperature)[0])
        if critic is not None:
            parts["values"].append(rollout_values(critic, part, packed))
        if reward is not None:
            scores = learned_scores(reward, part, packed)
            if ensemble is not None:
                scores, spread = ensemble.combine(scores, part)
                parts["ensemble_std"].append(spread)
            parts["scores"].append(scores)
    restore = torch.argsort(order)  # rows back in the rollout's order
    joined = {k: torch.cat(v)[restore] if v else None for k, v in parts.items()}
    logprobs, ref_logprobs, entropy = joined["logprobs"], joined["ref_logprobs"], joined["entropy"]
    assert logprobs is not None and ref_logprobs is not None and entropy is not None  # one chunk at least
    return ScoredRollout(seqs=seqs, logprobs=logprobs, ref_logprobs=ref_logprobs, entropy=entropy, values=joined["values"],
                         scores=joined["scores"], ensemble_std=joined["ensemble_std"])


def check_rollout_packing(models: PPOModels) -> None:
    """Refuse data.packing, in one line, unless every model PPO packs (actor, reference, critic, and the reward model, or
    an implicit reward's policy and reference) is checked."""
    reward = models.reward
    implicit = (reward.policy, reward.reference) if isinstance(reward, ImplicitReward) else ()
    for policy in (models.actor, models.reference, *implicit):
        if policy is not None:
            check_packing_supported(inner_model(policy).config)
    for scorer in (models.critic, None if isinstance(reward, ImplicitReward) else reward):
        if scorer is not None:
            check_packing_supported(inner_scalar(scorer).hf_model.config)
