"""Stage 3 of InstructGPT: PPO against the reward model, with a KL penalty to the SFT policy.

Four models. The actor (the policy, from sft:latest) and the critic (from rm:latest, trained head
included) train; the reference (the actor's starting weights) and the reward model are frozen.
The objective is in rlhf/algos/ppo.py, once. A critic-free estimator (ppo.estimator grpo, rloo,
reinforce_pp; rlhf/algos/critic_free.py) builds three models: its advantages come from the
rewards of a group of responses to the same prompt, or of the whole batch, instead of a critic.

1. Ranks and seeds.  2. Where the four models come from, the prompts, the ptx data.  3. The four
models.  4. Resume, or measure the SFT policy: the baseline PPO must beat.  Then each step:
5. sample a response to every prompt of a batch and score it with all four models;  6. per-token
rewards r_t = -beta * KL_t plus the shaped score at the last token, GAE advantages and returns;
7. `ppo.epochs` passes of clipped policy and value updates over shuffled minibatches, with the
PPO-ptx LM loss on the actor;  8. metrics, and the adaptive beta.  9. Final evaluation, the actor's
and critic's save_pretrained folders, the registry entries.

Run it with `rlhf ppo` (any number of ranks), or alone: `python -m rlhf.stages.ppo --config FILE`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch

from rlhf.algos.critic_free import (
    aggregate_token_losses,
    group_advantages,
    leave_one_out_advantages,
    per_token,
    returns_to_go,
    sequence_rewards,
)
from rlhf.algos.lm import masked_lm_loss
from rlhf.algos.ppo import (
    adaptive_beta,
    clipped_surrogate,
    explained_variance,
    gae,
    kl_per_token,
    masked_moments,
    masked_whiten,
    penalized_rewards,
    shape_scores,
    value_loss,
)
from rlhf.algos.reasoning import (
    mismatch_kl,
    overlong_penalty,
    sequence_advantages,
    sequence_clipped_surrogate,
    truncated_is_weights,
)
from rlhf.config import GROUP_ESTIMATORS, PPOAlgoConfig, PPOConfig, checks_mismatch, clip_bounds, kl_estimator_of, loss_aggregation_of
from rlhf.data.collate import collate_sft
from rlhf.data.load import ptx_data_config, sft_examples, stage_datasets
from rlhf.data.sampler import ShuffledBatches
from rlhf.dynamic_sampling import Drawn, choice_of, dynamic_metrics, join_chosen
from rlhf.engine import Dist, global_grad_norm, init_distributed, seed_everything
from rlhf.errors import UserError
from rlhf.evaluation import even_shard, oracle_eval, pair_agreement, pearson
from rlhf.model_sources import ModelSource, PPOSources, causal_lm_and_tokenizer, ppo_sources, reward_stats
from rlhf.multiturn import Episodes, any_rank, episode_metrics, load_env_class, sample_episodes
from rlhf.ppo_models import PPOModels, build_ppo_models
from rlhf.rank_sums import RankSums
from rlhf.rewards import Reward, learned_source, parse_source, parse_sources, rollout_texts
from rlhf.rewards import describe as describe_reward
from rlhf.rollout import (
    SampledLogprobs,
    Sampling,
    ScoredRollout,
    Sequences,
    minibatch_rows,
    policy_logprobs,
    sample_rollout_with_logprobs,
    score_rollout,
    token_values,
)
from rlhf.run_keeper import LoopState, RunKeeper
from rlhf.runs import Run, stage_entrypoint
from rlhf.toy import TOY, oracle_score
from rlhf.trust import resume_command

GENERATION_LOGITS_BUDGET = 256 * 2**20  # bytes of float32 logits generation may keep for the old log-probs
SCORE_LOGITS_BUDGET = 256 * 2**20  # bytes of float32 response logits one scoring forward may produce (rollout.score_batch_size=0)
NEGATIVE_KL_STEPS = 3  # consecutive steps of negative mean KL before warning of a log-prob mismatch
UPDATE_STATS = ("policy_loss", "value_loss", "policy_clipfrac", "approx_kl", "ratio_mean", "value_clipfrac")  # means over updates
VALUE_STATS = ("value_loss", "value_clipfrac")  # absent without a critic
HEADLINE = ("score", "kl", "beta", "eval/score", "eval/kl", "eval/oracle_score")


@dataclass
class PPOState(LoopState):
    beta: float = 0.0
    """The KL coefficient now (moves with ppo.kl_target)."""
    negative_kl_steps: int = 0
    """Consecutive steps whose mean KL to the reference was negative."""
    extra_rounds: int = 0
    """Generation rounds beyond one per step so far (ppo.dynamic_sampling): step s draws the prompt sampler's batches
    from s + extra_rounds on, so the prompt stream, and a resume, follow from the saved state alone."""


@dataclass
class Data:
    tokenizer: Any
    actor_source: ModelSource
    sources: PPOSources
    reward: Reward
    """The reward's components (reward.name_or_path), with the reward model's statistics when it normalizes."""
    train_prompts: list
    prompt_stats: Any
    eval_prompts: list
    eval_texts: list[str]
    """On the embedded default, the held-out prompts as text: the oracle grades their answers."""
    batches: ShuffledBatches
    ptx_set: list
    ptx_batches: ShuffledBatches | None
    env_class: type | None = None
    """rollout.env's class (imported on every rank), or None: one response per prompt."""
    gold: Reward | None = None
    """eval.gold, the task's ground truth for held-out answers (a function or the oracle), or None."""


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


def main(run: Run) -> None:
    cfg: PPOConfig = run.config

    # 1. Ranks and seeds (each rank samples from its own stream).
    dist = init_distributed()
    seed_everything(cfg.train.seed, rank=dist.rank)

    # 2. Where the four models come from (checked: reward models, one tokenizer), prompts, ptx data.
    data = load_data(cfg, run, dist)

    # 3. Actor and critic engines (own optimizers, annealed over every PPO update); frozen
    #    reference and reward, partitioned under ZeRO-3. Dropout off in all four.
    models = build_ppo_models(cfg, data.sources, data.actor_source, data.tokenizer, dist=dist, total_updates=total_updates(cfg))
    sampling = sampling_of(cfg, data, models, dist)

    # 4. Resume (both engines, beta, RNG) or measure the SFT policy: the baseline PPO must beat.
    engines = {"actor": models.actor} if models.critic is None else {"actor": models.actor, "critic": models.critic}
    keeper = RunKeeper(run, engines, dist, headline=HEADLINE)
    state = keeper.resume(PPOState(beta=cfg.ppo.beta))
    if state.step == 0:
        keeper.record_baseline(state, evaluate(models, data, cfg, sampling, dist))
    keeper.print(describe(cfg, data, models, dist))

    # 5-8. Steps: rollout, advantages, PPO epochs, metrics.
    metrics = train(models, data, cfg, sampling, dist, keeper, state)

    # 9. Final evaluation, the actor's and critic's save_pretrained folders, the registry entries.
    final_eval = evaluate(models, data, cfg, sampling, dist)
    keeper.log(state.step, final_eval)
    if models.critic is not None:
        keeper.publish_model(models.critic, source=data.sources.critic, model_cfg=cfg.critic, tokenizer=data.tokenizer,
                             companion="critic",
                             metrics={k: metrics[k] for k in ("value_loss", "explained_variance") if k in metrics})
    keeper.publish_model(models.actor, source=data.actor_source, model_cfg=cfg.model, tokenizer=data.tokenizer,
                         parents=tuple(dict.fromkeys(data.actor_source.parents + data.sources.parents)), metrics={
        **keeper.summary(state, final_eval),
        "steps": state.step,
        "beta": state.beta,
        "train_score": metrics.get("score"),
        "train_kl": metrics.get("kl"),
        "max_kl": cfg.ppo.max_kl,
        "prompts": len(data.train_prompts),
        "skipped_long_prompts": data.prompt_stats.skipped_long_prompts,
        **({"critic": f"{run.run_id}-critic"} if models.critic is not None else {}),
    })
    keeper.close()


def sampling_of(cfg: PPOConfig, data: Data, models: PPOModels, dist: Dist) -> Sampling:
    r = cfg.rollout
    return Sampling(pad_id=data.tokenizer.pad_token_id, eos_id=data.tokenizer.eos_token_id, max_new_tokens=r.max_new_tokens,
                    temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                    zero3_engine=models.actor if cfg.engine.zero_stage == 3 else None, gather=r.gather_params, device=dist.device)


def load_data(cfg: PPOConfig, run: Run, dist: Dist) -> Data:
    actor_source, tokenizer = causal_lm_and_tokenizer(cfg.model, run.registry)
    sources = ppo_sources(cfg, run.registry, actor_source, tokenizer)
    reward = ppo_reward(cfg, sources)
    train_prompts, prompt_stats, eval_prompts, _ = stage_datasets("ppo", cfg, tokenizer, world_size=dist.world_size)
    batches = ShuffledBatches(len(train_prompts), batch_size=prompts_per_rank(cfg), world_size=dist.world_size, seed=cfg.train.seed)
    ptx_set, ptx_batches = [], None
    if cfg.ppo.ptx_coef > 0:
        ptx_set, _ = sft_examples(cfg.data.ptx, split="train", tokenizer=tokenizer, data=ptx_data_config(cfg.data), key="data.ptx")
        ptx_batches = ShuffledBatches(len(ptx_set), batch_size=cfg.engine.micro_batch_size, world_size=dist.world_size,
                                      seed=cfg.train.seed)
    eval_texts = [tokenizer.decode(p, skip_special_tokens=True) for p in eval_prompts] if cfg.data.eval == TOY else []
    env_class = load_env_class(cfg.rollout.env) if cfg.rollout.env is not None else None
    gold = Reward([parse_source(cfg.eval.gold, key="eval.gold")]) if cfg.eval.gold is not None else None
    return Data(tokenizer, actor_source, sources, reward, train_prompts, prompt_stats, eval_prompts, eval_texts, batches,
                ptx_set, ptx_batches, env_class, gold)


def prompts_per_rank(cfg: PPOConfig) -> int:
    """Prompts a rank draws per step: each is sampled rollout.samples_per_prompt times."""
    return cfg.rollout.batch_size // cfg.rollout.samples_per_prompt


def ppo_reward(cfg: PPOConfig, sources: PPOSources) -> Reward:
    """The reward's components; only a reward model's scores are normalized (ppo.normalize_score),
    with the statistics stored beside it. An ensemble's combined score arrives normalized (each member with
    its own statistics) and is used as it is. Functions are imported here, on every rank."""
    components = parse_sources(cfg.reward.name_or_path, cfg.reward.weights)
    if learned_source(components) is None or not cfg.ppo.normalize_score or sources.ensemble:
        return Reward(components)
    return Reward(components, **reward_stats(sources.reward), normalize=True)


def minibatches_per_epoch(cfg: PPOConfig) -> int:
    return cfg.rollout.batch_size // cfg.engine.micro_batch_size


def total_updates(cfg: PPOConfig) -> int:
    """Optimizer steps of the whole run: what both learning-rate schedules anneal over."""
    return cfg.optimizer_steps()


def describe(cfg: PPOConfig, data: Data, models: PPOModels, dist: Dist) -> str:
    reference = "the actor without its LoRA adapters" if models.reference is None else data.sources.reference.location
    ppo, k = cfg.ppo, cfg.rollout.samples_per_prompt
    estimator = (f"{ppo.estimator}: critic-free, 3 models (actor, reference, reward); critic and critic_optim settings unused"
                 if models.critic is None else f"{ppo.estimator}: 4 models (actor, critic, reference, reward)")
    return (
        f"ppo: {len(data.train_prompts)} prompts ({data.prompt_stats.skipped_long_prompts} longer than data.max_prompt_length "
        f"skipped), {cfg.rollout.batch_size} rollouts x {dist.world_size} rank(s) per step, {cfg.ppo.epochs} epochs of "
        f"{minibatches_per_epoch(cfg)} minibatches, ZeRO-{cfg.engine.zero_stage}, reference = {reference}, "
        f"reward = {describe_reward(data.reward.sources)}{reward_model_note(cfg, models)}\n"
        f"{estimator}; {k} sample(s) per prompt, KL in the {ppo.kl_in} ({kl_estimator_of(ppo)}), "
        f"loss aggregation {loss_aggregation_of(ppo)}, {ppo.ratio} ratio clipped to [1 - {clip_bounds(ppo)[0]}, 1 + {clip_bounds(ppo)[1]}]"
        + multi_turn_note(cfg) + dynamic_sampling_note(cfg)
    )


def dynamic_sampling_note(cfg: PPOConfig) -> str:
    if not cfg.ppo.dynamic_sampling:
        return ""
    return (f"\ndynamic sampling: groups whose shaped scores are all equal are dropped, up to {cfg.ppo.max_sampling_rounds} "
            f"generation rounds a step to find {cfg.rollout.batch_size // cfg.rollout.samples_per_prompt} other groups per rank")


def multi_turn_note(cfg: PPOConfig) -> str:
    r = cfg.rollout
    if r.env is None:
        return ""
    return (f"\nmulti-turn: {r.env}, up to {r.max_turns} turns of {r.max_new_tokens} tokens and {r.episode_tokens()} tokens an "
            f"episode, environment rewards {'at the end' if r.turn_rewards == 'end' else 'per turn'}")


def reward_model_note(cfg: PPOConfig, models: PPOModels) -> str:
    if models.reward is None:
        return " (no reward model loaded)"
    members = len(cfg.reward_ensemble.name_or_path)
    return f" (its reward model with {members} more: mean - {cfg.reward_ensemble.penalty:g} x std)" if members else ""


def shaped(scores: torch.Tensor, seqs: Sequences, cfg: PPOConfig) -> torch.Tensor:
    """The combined reward (`score`'s, the reward model's part already normalized) as PPO's: clipped,
    a fixed score without EOS, plus DAPO's overlong penalty (reward.overlong_buffer)."""
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


def score(seqs: Sequences, models: PPOModels, cfg: PPOConfig, data: Data, dist: Dist, *, critic: Any,
          sampled: SampledLogprobs | None = None, episodes: Episodes | None = None) -> ScoredRollout:
    """Log-probs of actor (generation's own when `sampled`) and reference, values (none without
    `critic`), and the reward: its components (reward-model scores, functions of the decoded texts;
    of `episodes`, their last policy turns) and their weighted sum as `scores`. A reward function
    that fails on any rank stops every rank with its one line."""
    scored = score_rollout(seqs, actor=models.actor, reference=models.reference, critic=critic, reward=models.reward,
                           temperature=cfg.rollout.temperature, chunk=score_batch_size(cfg, models.actor.module.config.vocab_size),
                           reference_is_actor_without_adapters=models.reference is None, sampled=sampled, ensemble=models.ensemble)
    prompts, responses = texts_of(seqs, episodes, data) if data.reward.needs_text else ([], [])
    failure, reward = None, None
    try:
        reward = data.reward.scores(prompts, responses, learned=scored.scores, device=seqs.input_ids.device)
    except UserError as exc:
        failure = str(exc)
    if data.reward.needs_text:
        failure = first_failure(failure, dist)
    if failure is not None:
        raise RewardFailed(failure)
    return dataclasses.replace(scored, scores=reward.total, reward_parts=reward.parts)


def texts_of(seqs: Sequences, episodes: Episodes | None, data: Data) -> tuple[list[str], list[str]]:
    """What a reward function and the oracle read: prompts and responses, or an episode's last policy turn
    as the response and everything before it as the prompt."""
    if episodes is None:
        return rollout_texts(seqs, data.tokenizer)
    return episodes.reward_prompts, episodes.reward_responses


def sample(models: PPOModels, prompts: list[list[int]], sampling: Sampling, cfg: PPOConfig, data: Data, dist: Dist, *,
           keep_logprobs: bool) -> tuple[Sequences, SampledLogprobs | None, Episodes | None]:
    """A response to each prompt (`sample_rollout_with_logprobs`), or with rollout.env an episode of turns
    (rlhf/multiturn.py), whose old log-probs come from the actor's forward (no sampled log-probs)."""
    if data.env_class is None:
        return (*sample_rollout_with_logprobs(models.actor.module, prompts, sampling, keep_logprobs=keep_logprobs), None)
    r = cfg.rollout
    episodes = sample_episodes(models.actor.module, prompts, sampling, env_class=data.env_class, tokenizer=data.tokenizer,
                               max_turns=r.max_turns, max_tokens=r.episode_tokens(), per_turn=r.turn_rewards == "per_turn",
                               keep_going=lambda active: any_rank(active, dist=dist))
    return episodes.seqs, None, episodes


class RewardFailed(UserError):
    """A reward function raised or returned something other than one finite float per response (on some rank)."""


def first_failure(message: str | None, dist: Dist) -> str | None:
    """The first rank's failure message, on every rank (None when all succeeded): all stop together."""
    if dist.world_size == 1:
        return message
    messages: list[str | None] = [None] * dist.world_size
    torch.distributed.all_gather_object(messages, message)
    return next((m for m in messages if m is not None), None)


@torch.no_grad()
def evaluate(models: PPOModels, data: Data, cfg: PPOConfig, sampling: Sampling, dist: Dist) -> dict[str, float]:
    """Held-out prompts, sampled as in training: the shaped score, the KL to the reference per
    response, length and EOS rate; on the embedded default the oracle's score (0-100)."""
    if not data.eval_prompts:
        return {}
    actor = models.actor
    actor.eval()
    share, real = even_shard(data.eval_prompts, dist=dist)
    sums = RankSums(("score", "score_sq", "kl", "length", "length_sq", "score_length", "no_eos", "responses", "oracle_pairs",
                     "oracle_agreed", "ensemble_std", "gold", "gold_pairs", "gold_agreed"), dist.device)
    for start in range(0, len(share), cfg.eval.batch_size):
        seqs, _, episodes = sample(models, share[start : start + cfg.eval.batch_size], sampling, cfg, data, dist,
                                   keep_logprobs=False)
        scored = score(seqs, models, cfg, data, dist, critic=None, episodes=episodes)
        keep = torch.tensor(real[start : start + cfg.eval.batch_size], device=dist.device)
        shaped_score = shaped(scored.scores, seqs, cfg)[keep].double()
        kl = ((scored.logprobs - scored.ref_logprobs) * seqs.response_mask).sum(dim=1)[keep].double()
        lengths = seqs.response_lengths[keep].double()
        sums.add(score=shaped_score, score_sq=shaped_score.pow(2), kl=kl, length=lengths, length_sq=lengths.pow(2),
                 score_length=shaped_score * lengths, no_eos=~seqs.has_eos[keep], responses=keep)
        if scored.ensemble_std is not None:
            sums.add(ensemble_std=scored.ensemble_std[keep])
        if data.eval_texts:  # the reward against the oracle on the policy's own current samples
            prompts, responses = texts_of(seqs, episodes, data)
            gold = [oracle_score(p, r) for p, r, k in zip(prompts, responses, keep.tolist()) if k]
            judged, agreed = pair_agreement(shaped_score.tolist(), gold)
            sums.add(oracle_pairs=float(judged), oracle_agreed=float(agreed))
        if data.gold is not None:  # the reward against eval.gold, the same way
            gold = gold_scores(data.gold, seqs, keep, data.tokenizer, dist)
            judged, agreed = pair_agreement(shaped_score.tolist(), gold)
            sums.add(gold=float(sum(gold)), gold_pairs=float(judged), gold_agreed=float(agreed))
    total = sums.over_ranks()
    n, mean_score = total["responses"], total["score"] / total["responses"]
    metrics = {"eval/score": mean_score, "eval/score_std": max(total["score_sq"] / n - mean_score**2, 0.0) ** 0.5,
               "eval/kl": total["kl"] / n, "eval/response_length": total["length"] / n, "eval/no_eos_fraction": total["no_eos"] / n,
               "eval/score_length_corr": pearson(n, total["score"], total["score_sq"], total["length"], total["length_sq"],
                                                 total["score_length"])}
    if models.ensemble is not None:
        metrics["eval/reward_ensemble_std"] = total["ensemble_std"] / n
    if total["oracle_pairs"]:
        metrics["eval/reward_oracle_agreement"] = total["oracle_agreed"] / total["oracle_pairs"]
    if data.gold is not None:
        metrics["eval/gold_score"] = total["gold"] / n
        if total["gold_pairs"]:
            metrics["eval/reward_gold_agreement"] = total["gold_agreed"] / total["gold_pairs"]
    if data.eval_texts:
        oracle = oracle_eval(actor.module, data.tokenizer, data.eval_texts, batch_size=cfg.eval.batch_size, sampling=sampling, dist=dist)
        metrics.update({f"eval/{k}": v for k, v in oracle.items()})
    if cfg.ppo.max_kl is not None and metrics["eval/kl"] > cfg.ppo.max_kl and dist.is_main:
        # Drift far from the reference is how reward hacking starts: say so while it happens.
        print(f"warning: held-out KL to the reference is {metrics['eval/kl']:.3g}, above ppo.max_kl={cfg.ppo.max_kl}: "
              "the policy may be exploiting the reward model; raise ppo.beta or set ppo.kl_target", flush=True)
    actor.train()
    return metrics


def gold_scores(gold: Reward, seqs: Sequences, keep: torch.Tensor, tokenizer: Any, dist: Dist) -> list[float]:
    """eval.gold's score of each kept held-out response; a grader that fails on any rank stops every rank in one line."""
    prompts, responses = rollout_texts(seqs, tokenizer)
    failure, values = None, []
    try:
        values = gold.scores(prompts, responses, device=dist.device).total.tolist()
    except UserError as exc:
        failure = f"eval.gold: {exc}"
    failure = first_failure(failure, dist)
    if failure is not None:
        raise RewardFailed(failure)
    return [v for v, k in zip(values, keep.tolist()) if k]


def train(models: PPOModels, data: Data, cfg: PPOConfig, sampling: Sampling, dist: Dist, keeper: RunKeeper,
          state: PPOState) -> dict[str, float]:
    """PPO steps up to train.max_steps; returns the last step's metrics (none when resumed at the end)."""
    metrics: dict[str, float] = {}
    while state.step < cfg.train.max_steps:
        metrics = ppo_step(models, data, cfg, sampling, dist, keeper, state)
        keeper.end_step(state, loss=metrics["policy_loss"], metrics=metrics if keeper.should_log(state.step) else None)
        if keeper.eval_due(state.step):
            keeper.log(state.step, evaluate(models, data, cfg, sampling, dist))
        keeper.checkpoint_due(state)
    return metrics


def ppo_step(models: PPOModels, data: Data, cfg: PPOConfig, sampling: Sampling, dist: Dist, keeper: RunKeeper,
             state: PPOState) -> dict[str, float]:
    """Steps 5-8 once: advances `state` (step, beta, extra_rounds) and returns the step's metrics."""
    # 5. Rollout: sample with the KV cache, then score with all four models (in eval mode: the
    #    old log-probs and values must be the deterministic ones the updates compare against);
    #    with ppo.dynamic_sampling, more rounds while a rank lacks groups whose rewards differ.
    for engine in (models.actor, models.critic):
        if engine is not None:
            engine.eval()
    drawn, dynamic = draw_rollout(models, data, cfg, sampling, dist, keeper, state)
    seqs, sampled, scored, episodes = drawn.seqs, drawn.sampled, drawn.scored, drawn.episodes
    drawn_at = time.time()

    # 6. Rewards and advantages.
    rollout = advantages_of(seqs, scored, cfg, data, dist, beta=state.beta, episodes=episodes)
    mismatch = sampler_mismatch(rollout, sampled, cfg, dist)
    stop_if_mismatched(keeper, state, cfg, mismatch)
    if cfg.ppo.tis_cap is not None:
        rollout.tis_weights = truncated_is_weights(scored.logprobs, sampled.logprobs, seqs.response_mask, cap=cfg.ppo.tis_cap)
    scored_at = time.time()

    # 7. PPO epochs over shuffled minibatches.
    per_update = update_on(rollout, models, data, cfg, dist, keeper, state)
    state.step += 1
    state.extra_rounds += int(dynamic.get("sampling_rounds", 1)) - 1
    trained = time.time()

    # 8. Metrics over every rank's rollouts; the adaptive beta moves toward its KL target.
    metrics = {
        **rollout_metrics(rollout, dist, beta=state.beta),
        **group_metrics(rollout, cfg, dist),
        **episode_metrics(episodes, dist),
        **dynamic,
        **mismatch,
        **per_update,
        "lr": models.actor.get_lr()[0],
        **({"critic_lr": models.critic.get_lr()[0]} if models.critic is not None else {}),
        "grad_norm": global_grad_norm(models.actor),
        "time_generate_s": drawn.generate_s, "time_score_s": drawn.score_s + scored_at - drawn_at, "time_train_s": trained - scored_at,
    }
    adapt_beta(state, metrics, cfg, keeper, responses=cfg.rollout.batch_size * dist.world_size)
    return metrics


def draw_rollout(models: PPOModels, data: Data, cfg: PPOConfig, sampling: Sampling, dist: Dist, keeper: RunKeeper,
                 state: PPOState) -> tuple[Drawn, dict[str, float]]:
    """Step 5: the step's rollout batch and, with ppo.dynamic_sampling (DAPO), its group counts. Round n of step s
    draws the prompt sampler's batch s + state.extra_rounds + n. Groups whose shaped scores are all equal are dropped
    and another round is drawn while any rank lacks rollout.batch_size / K informative groups, up to
    ppo.max_sampling_rounds; then a short rank fills its batch with dropped groups (rlhf/dynamic_sampling.py)."""
    first = state.step + state.extra_rounds
    rounds = [sample_and_score(models, data, cfg, sampling, dist, keeper, state, batch=first)]
    if not cfg.ppo.dynamic_sampling:
        return rounds[0], {}
    k = cfg.rollout.samples_per_prompt
    choice = choice_of(rounds, group_size=k, quota=cfg.rollout.batch_size // k)
    # Generation is collective under ZeRO-3: every rank draws again while any rank is short.
    while len(rounds) < cfg.ppo.max_sampling_rounds and any_rank(choice.short > 0, dist=dist):
        rounds.append(sample_and_score(models, data, cfg, sampling, dist, keeper, state, batch=first + len(rounds)))
        choice = choice_of(rounds, group_size=k, quota=cfg.rollout.batch_size // k)
    joined = join_chosen(rounds, choice, group_size=k, pad_id=sampling.pad_id)
    return joined, dynamic_metrics(choice, rounds=len(rounds), dist=dist)


def sample_and_score(models: PPOModels, data: Data, cfg: PPOConfig, sampling: Sampling, dist: Dist, keeper: RunKeeper,
                     state: PPOState, *, batch: int) -> Drawn:
    """One generation round: responses to the prompt sampler's `batch`-th batch, scored by all four models; a
    failing reward function or a non-finite score stops every rank (with a checkpoint of the state before the step)."""
    started = time.time()
    prompts = step_prompts(data, cfg, dist, step=batch)
    from_generation = logprobs_from_generation(cfg, models.actor.module.config.vocab_size)
    seqs, sampled, episodes = sample(models, prompts, sampling, cfg, data, dist, keep_logprobs=from_generation or checks_mismatch(cfg.ppo))
    generated = time.time()
    try:
        scored = score(seqs, models, cfg, data, dist, critic=models.critic, sampled=sampled if from_generation else None,
                       episodes=episodes)
    except RewardFailed as exc:  # resumable once the function is fixed: the dotted name is imported anew
        keeper.stop(state, f"{exc}; the run stopped in step {state.step + 1} and saved its state in {keeper.run.checkpoint_dir}: "
                           f"fix the function and resume (`{resume_command('ppo', keeper.run.run_id, cfg)}`)")
    stop_if_nonfinite(keeper, state, dist, "a reward-model score or a critic value", scored.scores, scored.values)
    return Drawn(seqs=seqs, sampled=sampled, scored=scored, shaped=shaped(scored.scores, seqs, cfg), generate_s=generated - started,
                 score_s=time.time() - generated, episodes=episodes)


def sampler_mismatch(rollout: Rollout, sampled: SampledLogprobs | None, cfg: PPOConfig, dist: Dist) -> dict[str, float]:
    """train/mismatch_kl: the mean over every rank's response tokens of the k3 estimate of KL(sampler || trainer),
    generation's log-probs against the actor's forward (when ppo.tis_cap or ppo.max_mismatch_kl asks for it)."""
    if not checks_mismatch(cfg.ppo) or sampled is None:
        return {}
    mask = rollout.seqs.response_mask
    sums = RankSums(("kl", "tokens"), dist.device)
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


def step_prompts(data: Data, cfg: PPOConfig, dist: Dist, *, step: int) -> list[list[int]]:
    """This rank's prompts of the sampler's 0-based batch `step` (0-based step s plus PPOState.extra_rounds, the
    earlier steps' extra rounds of dynamic sampling), each drawn prompt K = rollout.samples_per_prompt times in a
    row: rows [g*K, (g+1)*K) are one group, on this rank."""
    k = cfg.rollout.samples_per_prompt
    return [data.train_prompts[i] for i in data.batches.global_batch(step)[dist.rank] for _ in range(k)]


def advantages_of(seqs: Sequences, scored: ScoredRollout, cfg: PPOConfig, data: Data, dist: Dist, *, beta: float,
                  episodes: Episodes | None = None) -> Rollout:
    """Per-token rewards (the shaped score at the last token; -beta * KL at each with ppo.kl_in=reward;
    an episode's environment rewards where rollout.turn_rewards puts them), then ppo.estimator's
    advantages: GAE with the critic's values, relative to the response's group (grpo, rloo), or
    REINFORCE++'s returns-to-go. Whitening uses the whole batch across ranks. The mask holds the
    policy's tokens only: an episode's environment tokens are holes every step below skips."""
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


def update_stats(cfg: PPOConfig, models: PPOModels, data: Data) -> tuple[str, ...]:
    """The per-update statistics this run measures: no value statistics without a critic."""
    stats = tuple(k for k in UPDATE_STATS if models.critic is not None or k not in VALUE_STATS)
    return stats + (("ptx_loss",) if data.ptx_batches is not None else ()) + (("kl_loss",) if cfg.ppo.kl_in == "loss" else ())


def update_on(rollout: Rollout, models: PPOModels, data: Data, cfg: PPOConfig, dist: Dist, keeper: RunKeeper,
              state: PPOState) -> dict[str, float]:
    """`ppo.epochs` passes of clipped policy (+ ptx, + KL with ppo.kl_in=loss) and, with a critic,
    clipped value updates over shuffled minibatches; the means of update_stats over the updates and the ranks."""
    actor, critic, ppo = models.actor, models.critic, cfg.ppo
    for engine in (actor, critic):
        if engine is not None:
            engine.train()
    measured = update_stats(cfg, models, data)
    stats = RankSums(measured, dist.device)  # summed over this step's updates and the ranks
    updates = 0
    for epoch in range(ppo.epochs):
        epoch_rows = minibatch_rows(rollout.seqs.response_lengths, micro_batch_size=cfg.engine.micro_batch_size,
                                    group_by_length=ppo.length_grouped_minibatches)
        for m, rows in enumerate(epoch_rows):
            batch, mask = rollout.seqs.rows(rows), rollout.seqs.response_mask[rows]
            micro_step = (state.step * ppo.epochs + epoch) * minibatches_per_epoch(cfg) + m
            actor_loss, actor_stats = actor_loss_on(rollout, rows, batch, mask, actor, data, cfg, dist, micro_step=micro_step,
                                                    beta=state.beta)
            vf_loss = None
            if critic is not None:
                values = token_values(critic, batch)
                vf_loss, vf_stats = value_loss(values, rollout.scored.values[rows], rollout.returns[rows], mask,
                                               clip=ppo.value_clip_range)
                actor_stats.update(value_loss=vf_loss, value_clipfrac=vf_stats["clipfrac"])
            stop_if_nonfinite(keeper, state, dist, "the policy or value loss", actor_loss.detach(),
                              None if vf_loss is None else vf_loss.detach())
            actor.backward(actor_loss)
            actor.step()
            if critic is not None:
                critic.backward(vf_loss)
                critic.step()
            updates += 1
            stats.add(**actor_stats)
    total = stats.over_ranks()
    return {k: total[k] / updates / dist.world_size for k in measured}


def actor_loss_on(rollout: Rollout, rows: torch.Tensor, batch: Sequences, mask: torch.Tensor, actor: Any, data: Data,
                  cfg: PPOConfig, dist: Dist, *, micro_step: int, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One minibatch's actor loss: the clipped surrogate aggregated per ppo.loss_aggregation, plus the
    PPO-ptx LM loss and, with ppo.kl_in=loss, beta * the KL of the current policy to the reference
    (aggregated alike); and its statistics."""
    ppo = cfg.ppo
    aggregation, horizon = loss_aggregation_of(ppo), cfg.rollout.max_new_tokens * cfg.rollout.max_turns
    logp, _ = policy_logprobs(actor, batch, temperature=cfg.rollout.temperature)
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
    if data.ptx_batches is not None:
        ptx = ptx_loss(actor, data, dist, micro_step=micro_step)
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


def ptx_loss(actor: Any, data: Data, dist: Dist, *, micro_step: int) -> torch.Tensor:
    """PPO-ptx: the LM loss on a batch of pretraining (SFT-format) data, mixed into the actor's loss."""
    rows = data.ptx_batches.global_batch(micro_step)[dist.rank]
    ptx = {k: v.to(dist.device) for k, v in collate_sft([data.ptx_set[i] for i in rows], pad_id=data.tokenizer.pad_token_id).items()}
    logits = actor(input_ids=ptx["input_ids"], attention_mask=ptx["attention_mask"], use_cache=False).logits
    return masked_lm_loss(logits=logits, input_ids=ptx["input_ids"], response_mask=ptx["response_mask"])


def rollout_metrics(rollout: Rollout, dist: Dist, *, beta: float) -> dict[str, float]:
    """Score, KL, entropy, length and value fit over every rank's rollouts.

    kl: the k1 estimate of KL(policy || reference) per response, whatever ppo.kl_estimator is;
    kl_penalty: the estimator's value, what beta multiplies (and the adaptive controller tracks);
    rm_score: the reward model's raw score (an ensemble's combined score); reward/<source>: each function's (with
    several sources); reward_ensemble_std: the std across reward_ensemble's normalized scores;
    truncated_responses: how many responses (all ranks) were cut at rollout.max_new_tokens without EOS."""
    seqs, scored, mask = rollout.seqs, rollout.scored, rollout.seqs.response_mask
    parts = reward_part_metrics(scored)
    sums = RankSums(("kl", "kl_penalty", "score", "score_sq", "entropy", "tokens", "length", "no_eos",
                     "responses", "explained_variance", *parts), dist.device)
    sums.add(kl=((scored.logprobs - scored.ref_logprobs) * mask).sum(dim=1).double(),
             kl_penalty=rollout.penalized_kl.sum(dim=1).double(), score=rollout.score.double(),
             score_sq=rollout.score.double().pow(2), entropy=scored.entropy * mask, tokens=mask,
             length=seqs.response_lengths, no_eos=~seqs.has_eos, responses=float(len(seqs.response_lengths)), **parts)
    if scored.values is not None:
        sums.add(explained_variance=explained_variance(scored.values, rollout.returns, mask))
    total = sums.over_ranks()
    n, mean_score = total["responses"], total["score"] / total["responses"]
    return {
        "score": mean_score, "score_std": max(total["score_sq"] / n - mean_score**2, 0.0) ** 0.5,
        "kl": total["kl"] / n, "kl_penalty": total["kl_penalty"] / n, "beta": beta, "entropy": total["entropy"] / total["tokens"],
        **({"explained_variance": total["explained_variance"] / dist.world_size} if scored.values is not None else {}),
        "response_length": total["length"] / n, "no_eos_fraction": total["no_eos"] / n, "truncated_responses": total["no_eos"],
        **{name: total[name] / n for name in parts},
    }


def group_metrics(rollout: Rollout, cfg: PPOConfig, dist: Dist) -> dict[str, float]:
    """grpo, rloo: group_score_std, the mean over groups of the spread (population std) of the shaped
    scores of one prompt's K responses. At 0 every group agrees and a group estimator learns nothing;
    the batch's score_std says how much of the spread is between prompts instead."""
    if cfg.ppo.estimator not in GROUP_ESTIMATORS:
        return {}
    groups = rollout.score.double().reshape(-1, cfg.rollout.samples_per_prompt)  # (B / K, K)
    sums = RankSums(("spread", "groups"), dist.device)
    sums.add(spread=groups.std(dim=1, unbiased=False), groups=float(groups.shape[0]))
    total = sums.over_ranks()
    return {"group_score_std": total["spread"] / total["groups"]}


def reward_part_metrics(scored: ScoredRollout) -> dict[str, torch.Tensor]:
    """The reward's components to average, by metric name: the reward model's raw score as
    rm_score (with reward_ensemble: the ensemble's mean - penalty x std), a function's (or the oracle's)
    as reward/<source>; and reward_ensemble_std, the members' disagreement."""
    parts = {"rm_score" if parse_source(name).kind == "learned" else f"reward/{name}": part.double()
             for name, part in scored.reward_parts.items()}
    return parts if scored.ensemble_std is None else {**parts, "reward_ensemble_std": scored.ensemble_std.double()}


def adapt_beta(state: PPOState, metrics: dict[str, float], cfg: PPOConfig, keeper: RunKeeper, *, responses: int) -> None:
    """Move beta toward ppo.kl_target (when set), and warn once the mean KL stays negative."""
    if cfg.ppo.kl_target is not None:
        state.beta = adaptive_beta(state.beta, metrics["kl_penalty"], target=cfg.ppo.kl_target, horizon=cfg.ppo.kl_horizon,
                                   n_steps=responses)
    state.negative_kl_steps = state.negative_kl_steps + 1 if metrics["kl"] < 0 else 0
    if state.negative_kl_steps == NEGATIVE_KL_STEPS:
        keeper.print(
            f"[yellow]warning[/]: the mean KL to the reference has been negative for {NEGATIVE_KL_STEPS} steps: "
            "the sampling distribution and the scored log-probs disagree (top_k/top_p, temperature or a generation config)"
        )


def stop_if_nonfinite(keeper: RunKeeper, state: PPOState, dist: Dist, what: str, *tensors: torch.Tensor | None) -> None:
    """Stop every rank, with a checkpoint, if any rank's `tensors` hold NaN or inf. One all-reduce
    and host sync per call (per minibatch in the update loop): a non-finite loss must stop every
    rank before any rank applies it."""
    bad = torch.stack([~torch.isfinite(t).all() for t in tensors if t is not None]).any().float()
    if dist.world_size > 1:
        torch.distributed.all_reduce(bad)  # every rank stops together (and saves together)
    if bad.item():
        keeper.stop_nonfinite(state, what)


def global_moments(x: torch.Tensor, mask: torch.Tensor, dist: Dist) -> dict[str, float]:
    """Mean and variance of `x` over the valid tokens of every rank's rollouts."""
    mean, var = masked_moments(x, mask, all_reduce=torch.distributed.all_reduce)
    return {"mean": mean, "var": var}


if __name__ == "__main__":
    stage_entrypoint("ppo", main)
