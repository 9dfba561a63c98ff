"""Steps 5 and 6 of a PPO step: draw the rollout batch (sample, then score with all four models), then
per-token rewards, advantages and returns.

Generation and scoring run in eval mode: the old log-probs and values must be the deterministic ones
the updates (rlhf/stages/ppo_update.py) compare against. With ppo.dynamic_sampling (DAPO), more rounds
are drawn while a rank lacks groups whose rewards differ (rlhf/rollouts/dynamic_sampling.py).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TypedDict

import torch

from rlhf.algos.critic_free import group_advantages, leave_one_out_advantages, per_token, returns_to_go, sequence_rewards
from rlhf.algos.ppo import gae, masked_moments, masked_whiten, penalized_rewards, shape_scores
from rlhf.algos.reasoning import mismatch_kl, overlong_penalty
from rlhf.config import GROUP_ESTIMATORS, PPOConfig, checks_mismatch, kl_estimator_of
from rlhf.errors import UserError
from rlhf.protocols import ScoringModel
from rlhf.rollouts.dynamic_sampling import Drawn, choice_of, dynamic_metrics, join_chosen
from rlhf.rollouts.generation import SampledLogprobs, ScoredRollout, Sequences, sample_rollout_with_logprobs
from rlhf.rollouts.multiturn import Episodes, any_rank, sample_episodes
from rlhf.rollouts.rewards import rollout_texts
from rlhf.rollouts.scoring import Packing, score_rollout
from rlhf.stages.ppo_context import Data, PPOContext, PPOState, packing_capacity, stop_if_nonfinite
from rlhf.store.trust import resume_command
from rlhf.training.engine import Dist
from rlhf.training.rank_sums import RankSums
from rlhf.training.run_keeper import RunKeeper

GENERATION_LOGITS_BUDGET = 256 * 2**20  # bytes of float32 logits generation may keep for the old log-probs
SCORE_LOGITS_BUDGET = 256 * 2**20  # bytes of float32 response logits one scoring forward may produce (rollout.score_batch_size=0)


@dataclass
class Rollout:
    """One step's sampled batch, scored, with its rewards, advantages and returns."""

    seqs: Sequences
    scored: ScoredRollout
    score: torch.Tensor
    """The shaped reward-model score of each response."""
    penalized_kl: torch.Tensor
    """Per token, the ppo.kl_estimator value beta multiplies."""
    advantages: torch.Tensor
    returns: torch.Tensor | None
    """The critic's regression targets (None for a critic-free estimator)."""
    tis_weights: torch.Tensor | None = None
    """Per token, truncated importance sampling's min(pi_train / pi_sampler, ppo.tis_cap) (None when off)."""
    episodes: Episodes | None = None
    """With rollout.env: the episodes' turns, environment tokens and rewards."""


class RewardFailed(UserError):
    """A reward function raised or returned something other than one finite float per response (on some rank)."""


def draw_rollout(ctx: PPOContext, state: PPOState) -> tuple[Drawn, dict[str, float]]:
    """Step 5: the step's rollout batch and, with ppo.dynamic_sampling (DAPO), its group counts. Round n of step s
    draws the prompt sampler's batch s + state.extra_rounds + n. Groups whose shaped scores are all equal are dropped
    and another round is drawn while any rank lacks rollout.batch_size / K informative groups, up to
    ppo.max_sampling_rounds; then a short rank fills its batch with dropped groups (rlhf/rollouts/dynamic_sampling.py)."""
    cfg = ctx.cfg
    first = state.step + state.extra_rounds
    rounds = [sample_and_score(ctx, state, batch=first)]
    if not cfg.ppo.dynamic_sampling:
        return rounds[0], {}
    k = cfg.rollout.samples_per_prompt
    choice = choice_of(rounds, group_size=k, quota=cfg.rollout.batch_size // k)
    # Generation is collective under ZeRO-3: every rank draws again while any rank is short.
    while len(rounds) < cfg.ppo.max_sampling_rounds and any_rank(choice.short > 0, dist=ctx.dist):
        rounds.append(sample_and_score(ctx, state, batch=first + len(rounds)))
        choice = choice_of(rounds, group_size=k, quota=cfg.rollout.batch_size // k)
    joined = join_chosen(rounds, choice, group_size=k, pad_id=ctx.sampling.pad_id)
    return joined, dynamic_metrics(choice, rounds=len(rounds), dist=ctx.dist)


def sample_and_score(ctx: PPOContext, state: PPOState, *, batch: int) -> Drawn:
    """One generation round: responses to the prompt sampler's `batch`-th batch, scored by all four models; a
    failing reward function or a non-finite score stops every rank (with a checkpoint of the state before the step)."""
    cfg, keeper = ctx.cfg, ctx.keeper
    started = time.time()
    prompts = step_prompts(ctx, step=batch)
    from_generation = logprobs_from_generation(cfg, ctx.models.actor.module.config.vocab_size)
    seqs, sampled, episodes = sample(ctx, prompts, keep_logprobs=from_generation or checks_mismatch(cfg.ppo))
    generated = time.time()
    try:
        scored = score(ctx, seqs, critic=ctx.models.critic, sampled=sampled if from_generation else None, episodes=episodes)
    except RewardFailed as exc:  # resumable once the function is fixed: the dotted name is imported anew
        keeper.stop(state, f"{exc}; the run stopped in step {state.step + 1} and saved its state in {keeper.run.checkpoint_dir}: "
                           f"fix the function and resume (`{resume_command('ppo', keeper.run.run_id, cfg)}`)")
    stop_if_nonfinite(ctx, state, "a reward-model score or a critic value", scored.scores, scored.values)
    return Drawn(seqs=seqs, sampled=sampled, scored=scored, shaped=shaped(scored.scores, seqs, cfg), generate_s=generated - started,
                 score_s=time.time() - generated, episodes=episodes)


def step_prompts(ctx: PPOContext, *, step: int) -> list[list[int]]:
    """This rank's prompts of the sampler's 0-based batch `step` (0-based step s plus PPOState.extra_rounds, the
    earlier steps' extra rounds of dynamic sampling), each drawn prompt K = rollout.samples_per_prompt times in a
    row: rows [g*K, (g+1)*K) are one group, on this rank."""
    k, data = ctx.cfg.rollout.samples_per_prompt, ctx.data
    return [data.train_prompts[i] for i in data.batches.global_batch(step)[ctx.dist.rank] for _ in range(k)]


def sample(ctx: PPOContext, prompts: list[list[int]], *, keep_logprobs: bool) -> tuple[Sequences, SampledLogprobs | None, Episodes | None]:
    """A response to each prompt (`sample_rollout_with_logprobs`), or with rollout.env an episode of turns
    (rlhf/rollouts/multiturn.py), whose old log-probs come from the actor's forward (no sampled log-probs)."""
    actor, data = ctx.models.actor, ctx.data
    if data.env_class is None:
        return (*sample_rollout_with_logprobs(actor.module, prompts, ctx.sampling, keep_logprobs=keep_logprobs), None)
    r = ctx.cfg.rollout
    episodes = sample_episodes(actor.module, prompts, ctx.sampling, env_class=data.env_class, tokenizer=data.tokenizer,
                               max_turns=r.max_turns, max_tokens=r.episode_tokens(), per_turn=r.turn_rewards == "per_turn",
                               keep_going=lambda active: any_rank(active, dist=ctx.dist))
    return episodes.seqs, None, episodes


def score(ctx: PPOContext, seqs: Sequences, *, critic: ScoringModel | None, sampled: SampledLogprobs | None = None,
          episodes: Episodes | None = None) -> ScoredRollout:
    """Log-probs of actor (generation's own when `sampled`) and reference, values (none without
    `critic`), and the reward: its components (reward-model scores, functions of the decoded texts;
    of `episodes`, their last policy turns) and their weighted sum as `scores`. A reward function
    that fails on any rank stops every rank with its one line."""
    models, data, cfg = ctx.models, ctx.data, ctx.cfg
    capacity = packing_capacity(cfg)
    packing = None if capacity is None else Packing(ctx.sampling.pad_id, capacity)  # packed: the same outputs
    scored = score_rollout(
        seqs, actor=models.actor, reference=models.reference, critic=critic, reward=models.reward, temperature=cfg.rollout.temperature,
        chunk=score_batch_size(cfg, models.actor.module.config.vocab_size), reference_is_actor_without_adapters=models.reference is None,
        sampled=sampled, ensemble=models.ensemble, packing=packing)
    prompts, responses = texts_of(seqs, episodes, data) if data.reward.needs_text else ([], [])
    failure, reward = None, None
    try:
        reward = data.reward.scores(prompts, responses, learned=scored.scores, device=seqs.input_ids.device)
    except UserError as exc:
        failure = str(exc)
    if data.reward.needs_text:
        failure = first_failure(failure, ctx.dist)
    if failure is not None:
        raise RewardFailed(failure)
    assert reward is not None  # set unless the failure above raised
    return dataclasses.replace(scored, scores=reward.total, reward_parts=reward.parts)


def texts_of(seqs: Sequences, episodes: Episodes | None, data: Data) -> tuple[list[str], list[str]]:
    """What a reward function and the oracle read: prompts and responses, or an episode's last policy turn
    as the response and everything before it as the prompt."""
    if episodes is None:
        return rollout_texts(seqs, data.tokenizer)
    return episodes.reward_prompts, episodes.reward_responses


def first_failure(message: str | None, dist: Dist) -> str | None:
    """The first rank's failure message, on every rank (None when all succeeded): all stop together."""
    if dist.world_size == 1:
        return message
    messages: list[str | None] = [None] * dist.world_size
    torch.distributed.all_gather_object(messages, message)
    return next((m for m in messages if m is not None), None)


def shaped(scores: torch.Tensor | None, seqs: Sequences, cfg: PPOConfig) -> torch.Tensor:
    """The combined reward (`score`'s, the reward model's part already normalized) as PPO's: clipped,
    a fixed score without EOS, plus DAPO's overlong penalty (reward.overlong_buffer)."""
    assert scores is not None  # score() always sets the reward
    ppo, reward = cfg.ppo, cfg.reward
    shaped_scores = shape_scores(scores, seqs.has_eos, normalize=False, clip=ppo.score_clip, no_eos_score=ppo.no_eos_score)
    if reward.overlong_buffer is None:
        return shaped_scores
    penalty = overlong_penalty(seqs.response_lengths, max_length=cfg.rollout.max_new_tokens, buffer=reward.overlong_buffer,
                               scale=reward.overlong_penalty)
    return shaped_scores + penalty.to(shaped_scores.dtype)


def logprobs_from_generation(cfg: PPOConfig, vocab_size: int) -> bool:
    """Whether the old log-probs come from generation's logits (rollout.logprobs_from_generation): in
    fp32 only, where tests/unit/test_rollout.py shows them equal to the actor's forward (in bf16 the
    KV cache's rounding is another policy's), and within GENERATION_LOGITS_BUDGET."""
    r = cfg.rollout
    kept = r.batch_size * r.max_new_tokens * vocab_size * 4
    return r.logprobs_from_generation and cfg.engine.precision == "fp32" and kept <= GENERATION_LOGITS_BUDGET


def score_batch_size(cfg: PPOConfig, vocab_size: int) -> int:
    """Rollouts per scoring forward: rollout.score_batch_size, or (0) the most whose response logits
    stay within SCORE_LOGITS_BUDGET, between the training minibatch (whose forward, with gradients,
    holds more) and the whole rollout batch (one forward of each model, as generation is one call)."""
    r = cfg.rollout
    if r.score_batch_size:
        return r.score_batch_size
    within_budget = SCORE_LOGITS_BUDGET // ((r.episode_tokens() + 1) * vocab_size * 4)
    return max(cfg.engine.micro_batch_size, min(r.batch_size, within_budget))


def advantages_of(ctx: PPOContext, seqs: Sequences, scored: ScoredRollout, *, beta: float,
                  episodes: Episodes | None = None) -> Rollout:
    """Per-token rewards (the shaped score at the last token; -beta * KL at each with ppo.kl_in=reward;
    an episode's environment rewards where rollout.turn_rewards puts them), then ppo.estimator's
    advantages: GAE with the critic's values, relative to the response's group (grpo, rloo), or
    REINFORCE++'s returns-to-go. Whitening uses the whole batch across ranks. The mask holds the
    policy's tokens only: an episode's environment tokens are holes every step below skips."""
    cfg, dist = ctx.cfg, ctx.dist
    ppo, mask = cfg.ppo, seqs.response_mask
    score_now = shaped(scored.scores, seqs, cfg)
    rewards, penalized_kl = penalized_rewards(scored.logprobs, scored.ref_logprobs, score_now, mask,
                                              beta=beta if ppo.kl_in == "reward" else 0.0, kl_estimator=kl_estimator_of(ppo))
    if episodes is not None:
        rewards = rewards + episodes.env_rewards.to(rewards.dtype)
    if ppo.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, **global_moments(rewards, mask, dist))
    if ppo.estimator in GROUP_ESTIMATORS:
        # A group's K responses share a prompt and a rank: each is judged against its siblings only.
        advantages = per_token(group_relative(sequence_rewards(rewards, mask), cfg), mask)
        return Rollout(seqs, scored, score_now, penalized_kl, advantages, None, episodes=episodes)
    returns = None
    if ppo.estimator == "gae":
        assert scored.values is not None  # gae trains a critic
        advantages, returns = gae(rewards, scored.values, mask, gamma=ppo.gamma, lam=ppo.lam)
    else:
        advantages = returns_to_go(rewards, mask, gamma=ppo.gamma)
    if ppo.whiten_advantages:
        advantages = masked_whiten(advantages, mask, **global_moments(advantages, mask, dist))
    return Rollout(seqs, scored, score_now, penalized_kl, advantages, returns, episodes=episodes)


def group_relative(rewards: torch.Tensor, cfg: PPOConfig) -> torch.Tensor:
    """(B,) sequence rewards -> (B,) advantages within each group of rollout.samples_per_prompt rows."""
    k = cfg.rollout.samples_per_prompt
    if cfg.ppo.estimator == "rloo":
        return leave_one_out_advantages(rewards, group_size=k)
    return group_advantages(rewards, group_size=k, scale_by_std=cfg.ppo.scale_by_group_std)


class Moments(TypedDict):
    """masked_whiten's mean and var keywords."""

    mean: float
    var: float


def global_moments(x: torch.Tensor, mask: torch.Tensor, dist: Dist) -> Moments:
    """Mean and variance of `x` over the valid tokens of every rank's rollouts."""
    mean, var = masked_moments(x, mask, all_reduce=torch.distributed.all_reduce)
    return {"mean": mean, "var": var}


def sampler_mismatch(ctx: PPOContext, rollout: Rollout, sampled: SampledLogprobs | None) -> dict[str, float]:
    """train/mismatch_kl: the mean over every rank's response tokens of the k3 estimate of KL(sampler || trainer),
    generation's log-probs against the actor's forward (when ppo.tis_cap or ppo.max_mismatch_kl asks for it)."""
    if not checks_mismatch(ctx.cfg.ppo) or sampled is None:
        return {}
    mask = rollout.seqs.response_mask
    sums = RankSums(("kl", "tokens"), ctx.dist.device)
    sums.add(kl=mismatch_kl(rollout.scored.logprobs, sampled.logprobs, mask).double(), tokens=mask)
    total = sums.over_ranks()
    return {"train/mismatch_kl": total["kl"] / max(total["tokens"], 1.0)}


def stop_if_mismatched(keeper: RunKeeper, state: PPOState, cfg: PPOConfig, mismatch: dict[str, float]) -> None:
    """Stop every rank (all see the same all-reduced value) before training on a rollout whose sampler and
    trainer disagree beyond ppo.max_mismatch_kl."""
    limit, value = cfg.ppo.max_mismatch_kl, mismatch.get("train/mismatch_kl")
    if limit is not None and value is not None and value > limit:
        keeper.stop(state, f"train/mismatch_kl={value:.4g} passed ppo.max_mismatch_kl={limit} in step {state.step + 1}: generation's "
                           f"log-probs and the actor's forward disagree (precision, sampling settings); the run stopped and saved its "
                           f"state in {keeper.run.checkpoint_dir}")
