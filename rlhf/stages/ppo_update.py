"""Step 7 of a PPO step: `ppo.epochs` passes of clipped policy and value updates over shuffled
minibatches of the rollout, with the PPO-ptx LM loss (and, with ppo.kl_in=loss, the KL) on the actor.
The losses themselves are in rlhf/algos/ (ppo.py, critic_free.py, reasoning.py, lm.py)."""

from __future__ import annotations

import torch

from rlhf.algos.critic_free import aggregate_token_losses, per_token
from rlhf.algos.lm import masked_lm_loss
from rlhf.algos.ppo import clipped_surrogate, kl_per_token, value_loss
from rlhf.algos.reasoning import sequence_advantages, sequence_clipped_surrogate
from rlhf.config import PPOAlgoConfig, clip_bounds, kl_estimator_of, loss_aggregation_of
from rlhf.data.collate import collate_sft
from rlhf.rollouts.generation import Sequences, minibatch_rows
from rlhf.rollouts.packed import PackedRollout, pack_rollout, rollout_logprobs, rollout_values
from rlhf.stages.ppo_context import PPOContext, PPOState, minibatches_per_epoch, packing_capacity, stop_if_nonfinite
from rlhf.stages.ppo_rollout import Rollout
from rlhf.stages.sft import micro_batch_loss
from rlhf.training.rank_sums import RankSums

UPDATE_STATS = ("policy_loss", "value_loss", "policy_clipfrac", "approx_kl", "ratio_mean", "value_clipfrac")  # means over updates
VALUE_STATS = ("value_loss", "value_clipfrac")  # absent without a critic


def update_stats(ctx: PPOContext) -> tuple[str, ...]:
    """The per-update statistics this run measures: no value statistics without a critic."""
    stats = tuple(k for k in UPDATE_STATS if ctx.models.critic is not None or k not in VALUE_STATS)
    return stats + (("ptx_loss",) if ctx.data.ptx_batches is not None else ()) + (("kl_loss",) if ctx.cfg.ppo.kl_in == "loss" else ())


def update_on(ctx: PPOContext, state: PPOState, rollout: Rollout) -> dict[str, float]:
    """`ppo.epochs` passes of clipped policy (+ ptx, + KL with ppo.kl_in=loss) and, with a critic,
    clipped value updates over shuffled minibatches; the means of update_stats over the updates and the ranks."""
    actor, critic, cfg, dist = ctx.models.actor, ctx.models.critic, ctx.cfg, ctx.dist
    ppo = cfg.ppo
    for engine in (actor, critic):
        if engine is not None:
            engine.train()
    measured = update_stats(ctx)
    stats = RankSums(measured, dist.device)  # summed over this step's updates and the ranks
    updates = 0
    for epoch in range(ppo.epochs):
        epoch_rows = minibatch_rows(rollout.seqs.response_lengths, micro_batch_size=cfg.engine.micro_batch_size,
                                    group_by_length=ppo.length_grouped_minibatches)
        for m, rows in enumerate(epoch_rows):
            batch, mask = rollout.seqs.rows(rows), rollout.seqs.response_mask[rows]
            packed = minibatch_packed(ctx, batch)
            micro_step = (state.step * ppo.epochs + epoch) * minibatches_per_epoch(cfg) + m
            actor_loss, actor_stats = actor_loss_on(ctx, rollout, rows, batch, mask, micro_step=micro_step, beta=state.beta,
                                                    packed=packed)
            vf_loss = None
            if critic is not None:
                assert rollout.scored.values is not None and rollout.returns is not None  # gae's, with the critic
                values = rollout_values(critic, batch, packed)
                vf_loss, vf_stats = value_loss(values, rollout.scored.values[rows], rollout.returns[rows], mask,
                                               clip=ppo.value_clip_range)
                actor_stats.update(value_loss=vf_loss, value_clipfrac=vf_stats["clipfrac"])
            stop_if_nonfinite(ctx, state, "the policy or value loss", actor_loss.detach(), None if vf_loss is None else vf_loss.detach())
            actor.backward(actor_loss)
            actor.step()
            if critic is not None and vf_loss is not None:  # vf_loss is set exactly when there is a critic
                critic.backward(vf_loss)
                critic.step()
            updates += 1
            stats.add(**actor_stats)
    total = stats.over_ranks()
    return {k: total[k] / updates / dist.world_size for k in measured}


def minibatch_packed(ctx: PPOContext, batch: Sequences) -> PackedRollout | None:
    """The minibatch packed once for the actor's and the critic's forwards (data.packing), or None."""
    capacity = packing_capacity(ctx.cfg)
    return None if capacity is None else pack_rollout(batch, pad_id=ctx.sampling.pad_id, capacity=capacity)


def actor_loss_on(ctx: PPOContext, rollout: Rollout, rows: torch.Tensor, batch: Sequences, mask: torch.Tensor, *, micro_step: int,
                  beta: float, packed: PackedRollout | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One minibatch's actor loss: the clipped surrogate aggregated per ppo.loss_aggregation, plus the
    PPO-ptx LM loss and, with ppo.kl_in=loss, beta * the KL of the current policy to the reference
    (aggregated alike); and its statistics. The log-probs come from `packed` rows when given (the same values)."""
    cfg, actor = ctx.cfg, ctx.models.actor
    ppo = cfg.ppo
    aggregation, horizon = loss_aggregation_of(ppo), cfg.rollout.max_new_tokens * cfg.rollout.max_turns
    logp, _ = rollout_logprobs(actor, batch, packed, temperature=cfg.rollout.temperature)
    if ppo.overlong_filter:  # DAPO: a truncated response says nothing about its answer; it is left out of the loss
        mask = mask & rollout.seqs.has_eos[rows].unsqueeze(1)
    token_losses, pg_stats = surrogate(logp, rollout.scored.logprobs[rows], rollout.advantages[rows], mask, ppo)
    if rollout.tis_weights is not None:
        token_losses = token_losses * rollout.tis_weights[rows]
    pg_loss = aggregate_token_losses(token_losses, mask, mode=aggregation, horizon=horizon)
    stats = {"policy_loss": pg_loss, "policy_clipfrac": pg_stats["clipfrac"], "approx_kl": pg_stats["approx_kl"],
             "ratio_mean": pg_stats["ratio_mean"]}
    loss = pg_loss
    if ppo.kl_in == "loss":
        kl = kl_per_token(logp, rollout.scored.ref_logprobs[rows], mask, estimator=kl_estimator_of(ppo))
        kl_loss = aggregate_token_losses(kl, mask, mode=aggregation, horizon=horizon)
        loss = loss + beta * kl_loss
        stats["kl_loss"] = kl_loss
    if ctx.data.ptx_batches is not None:
        ptx = ptx_loss(ctx, micro_step=micro_step)
        loss = loss + ppo.ptx_coef * ptx
        stats["ptx_loss"] = ptx
    return loss, stats


def surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              ppo: PPOAlgoConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(B, R) per-token policy losses of ppo.ratio, clipped to ppo's (clip_low, clip_high), and their statistics. With
    ratio=sequence each response's GSPO loss stands at each of its tokens, clipfrac and ratio_mean are per response."""
    low, high = clip_bounds(ppo)
    token_losses, stats = clipped_surrogate(logp, old_logp, advantages, mask, clip=low, clip_high=high)
    if ppo.ratio == "token":
        return token_losses, stats
    # The token surrogate above is kept for its approx_kl only: the sequence loss replaces its losses.
    seq_losses, seq_stats = sequence_clipped_surrogate(logp, old_logp, sequence_advantages(advantages, mask), mask,
                                                       clip_low=low, clip_high=high)
    return per_token(seq_losses, mask), {**stats, **seq_stats}


def ptx_loss(ctx: PPOContext, *, micro_step: int) -> torch.Tensor:
    """PPO-ptx: the LM loss on a batch of pretraining (SFT-format) data, mixed into the actor's loss (with
    data.packing, its rows packed as `rlhf sft` packs them: the same mean over the batch's targets)."""
    data, dist = ctx.data, ctx.dist
    assert data.ptx_batches is not None  # made when ppo.ptx_coef > 0
    rows = data.ptx_batches.global_batch(micro_step)[dist.rank]
    capacity = packing_capacity(ctx.cfg)
    if capacity is not None:
        examples = [data.ptx_set[i] for i in rows]
        loss, _ = micro_batch_loss(ctx.models.actor, examples, pad_id=data.tokenizer.pad_token_id, device=dist.device,
                                   packing_tokens=max(capacity, ctx.cfg.data.ptx_max_length),
                                   num_tokens=max(sum(ex.num_targets for ex in examples), 1))
        return loss
    ptx = {k: v.to(dist.device) for k, v in collate_sft([data.ptx_set[i] for i in rows], pad_id=data.tokenizer.pad_token_id).items()}
    logits = ctx.models.actor(input_ids=ptx["input_ids"], attention_mask=ptx["attention_mask"], use_cache=False).logits
    return masked_lm_loss(logits=logits, input_ids=ptx["input_ids"], response_mask=ptx["response_mask"])
