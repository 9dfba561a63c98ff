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

Here: main, the loop and one step (5-8) with its metrics. Beside it, each step function taking the frozen
`PPOContext` (models, data, config, sampling, ranks, keeper) and the `PPOState` a resume restores:
ppo_context.py (those two, and the setup of 2), ppo_rollout.py (5 and 6), ppo_update.py (7), ppo_eval.py
(the held-out evaluation of 4 and 9).

Run it with `rlhf ppo` (any number of ranks), or alone: `python -m rlhf.stages.ppo --config FILE`.
"""

from __future__ import annotations

import time

import torch

from rlhf.algos.ppo import adaptive_beta, explained_variance
from rlhf.algos.reasoning import truncated_is_weights
from rlhf.config import GROUP_ESTIMATORS, PPOConfig, clip_bounds, kl_estimator_of, loss_aggregation_of
from rlhf.models.stage_models import build_ppo_models
from rlhf.rollouts.generation import ScoredRollout
from rlhf.rollouts.implicit_reward import ImplicitReward
from rlhf.rollouts.multiturn import episode_metrics
from rlhf.rollouts.rewards import describe as describe_reward
from rlhf.rollouts.rewards import parse_source
from rlhf.rollouts.scoring import check_rollout_packing
from rlhf.stages.ppo_context import PPOContext, PPOState, load_data, minibatches_per_epoch, sampling_of, total_updates
from rlhf.stages.ppo_eval import evaluate
from rlhf.stages.ppo_rollout import Rollout, advantages_of, draw_rollout, sampler_mismatch, stop_if_mismatched
from rlhf.stages.ppo_update import update_on
from rlhf.store.runs import Run, stage_entrypoint
from rlhf.training.engine import Dist, global_grad_norm, init_distributed, seed_everything
from rlhf.training.rank_sums import RankSums
from rlhf.training.run_keeper import RunKeeper

NEGATIVE_KL_STEPS = 3  # consecutive steps of negative mean KL before warning of a log-prob mismatch
HEADLINE = ("score", "kl", "beta", "eval/score", "eval/kl", "eval/oracle_score")


def main(run: Run[PPOConfig]) -> None:
    cfg: PPOConfig = run.config

    # 1. Ranks and seeds (each rank samples from its own stream).
    dist = init_distributed()
    seed_everything(cfg.train.seed, rank=dist.rank)

    # 2. Where the four models come from (checked: reward models, one tokenizer), prompts, ptx data.
    data = load_data(cfg, run, dist)

    # 3. Actor and critic engines (own optimizers, annealed over every PPO update); frozen
    #    reference and reward, partitioned under ZeRO-3. Dropout off in all four.
    models = build_ppo_models(cfg, data.sources, data.actor_source, data.tokenizer, dist=dist, total_updates=total_updates(cfg))
    if cfg.data.packing:
        check_rollout_packing(models)
    sampling = sampling_of(cfg, data, models, dist)

    # 4. Resume (both engines, beta, RNG) or measure the SFT policy: the baseline PPO must beat.
    engines = {"actor": models.actor} if models.critic is None else {"actor": models.actor, "critic": models.critic}
    keeper = RunKeeper(run, engines, dist, headline=HEADLINE)
    ctx = PPOContext(models=models, data=data, cfg=cfg, sampling=sampling, dist=dist, keeper=keeper)
    state = keeper.resume(PPOState(beta=cfg.ppo.beta))
    if state.step == 0:
        keeper.record_baseline(state, evaluate(ctx))
    keeper.print(describe(ctx))

    # 5-8. Steps: rollout, advantages, PPO epochs, metrics.
    metrics = train(ctx, state)

    # 9. Final evaluation, the actor's and critic's save_pretrained folders, the registry entries.
    final_eval = evaluate(ctx)
    keeper.log(state.step, final_eval)
    publish(ctx, state, metrics, final_eval)
    keeper.close()


def publish(ctx: PPOContext, state: PPOState, metrics: dict[str, float | None], final_eval: dict[str, float]) -> None:
    """The critic's (when there is one) and the actor's save_pretrained folders and registry entries."""
    models, data, cfg, keeper = ctx.models, ctx.data, ctx.cfg, ctx.keeper
    if models.critic is not None:
        assert data.sources.critic is not None  # the critic's source
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
        **({"critic": f"{keeper.run.run_id}-critic"} if models.critic is not None else {}),
    })


def describe(ctx: PPOContext) -> str:
    cfg, data, models = ctx.cfg, ctx.data, ctx.models
    reference = "the actor without its LoRA adapters" if data.sources.reference is None else data.sources.reference.location
    ppo, k = cfg.ppo, cfg.rollout.samples_per_prompt
    estimator = (f"{ppo.estimator}: critic-free, 3 models (actor, reference, reward); critic and critic_optim settings unused"
                 if models.critic is None else f"{ppo.estimator}: 4 models (actor, critic, reference, reward)")
    return (
        f"ppo: {len(data.train_prompts)} prompts ({data.prompt_stats.skipped_long_prompts} longer than data.max_prompt_length "
        f"skipped), {cfg.rollout.batch_size} rollouts x {ctx.dist.world_size} rank(s) per step, {cfg.ppo.epochs} epochs of "
        f"{minibatches_per_epoch(cfg)} minibatches{', packed' if cfg.data.packing else ''}, ZeRO-{cfg.engine.zero_stage}, "
        f"reference = {reference}, "
        f"reward = {describe_reward(data.reward.sources)}{reward_model_note(ctx)}\n"
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


def reward_model_note(ctx: PPOContext) -> str:
    cfg, models = ctx.cfg, ctx.models
    if models.reward is None:
        return " (no reward model loaded)"
    if isinstance(models.reward, ImplicitReward):
        return f" (a DPO policy's implicit reward: {models.reward.beta:g} x its log-ratio to its reference, summed over the response)"
    members = len(cfg.reward_ensemble.name_or_path)
    return f" (its reward model with {members} more: mean - {cfg.reward_ensemble.penalty:g} x std)" if members else ""

def train(ctx: PPOContext, state: PPOState) -> dict[str, float | None]:
    """PPO steps up to train.max_steps; returns the last step's metrics (none when resumed at the end)."""
    metrics: dict[str, float | None] = {}
    while state.step < ctx.cfg.train.max_steps:
        metrics = ppo_step(ctx, state)
        loss = metrics["policy_loss"]
        assert loss is not None  # measured at every step; grad_norm is the metric that may be None
        ctx.keeper.finish_step(state, loss=loss, metrics=metrics if ctx.keeper.should_log(state.step) else None,
                               evaluate=lambda: evaluate(ctx))
    return metrics


def ppo_step(ctx: PPOContext, state: PPOState) -> dict[str, float | None]:
    """Steps 5-8 once: advances `state` (step, beta, extra_rounds) and returns the step's metrics."""
    models, cfg, dist = ctx.models, ctx.cfg, ctx.dist
    # 5. Rollout: sample with the KV cache, then score with all four models (in eval mode: the
    #    old log-probs and values must be the deterministic ones the updates compare against);
    #    with ppo.dynamic_sampling, more rounds while a rank lacks groups whose rewards differ.
    for engine in (models.actor, models.critic):
        if engine is not None:
            engine.eval()
    drawn, dynamic = draw_rollout(ctx, state)
    seqs, sampled, scored, episodes = drawn.seqs, drawn.sampled, drawn.scored, drawn.episodes
    drawn_at = time.time()

    # 6. Rewards and advantages.
    rollout = advantages_of(ctx, seqs, scored, beta=state.beta, episodes=episodes)
    mismatch = sampler_mismatch(ctx, rollout, sampled)
    stop_if_mismatched(ctx.keeper, state, cfg, mismatch)
    if cfg.ppo.tis_cap is not None:
        assert sampled is not None  # ppo.tis_cap keeps generation's log-probs (checks_mismatch)
        rollout.tis_weights = truncated_is_weights(scored.logprobs, sampled.logprobs, seqs.response_mask, cap=cfg.ppo.tis_cap)
    scored_at = time.time()

    # 7. PPO epochs over shuffled minibatches.
    per_update = update_on(ctx, state, rollout)
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
    adapt_beta(ctx, state, metrics, responses=cfg.rollout.batch_size * dist.world_size)
    return metrics


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
        assert rollout.returns is not None  # gae's, with the critic
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


def adapt_beta(ctx: PPOContext, state: PPOState, metrics: dict[str, float | None], *, responses: int) -> None:
    """Move beta toward ppo.kl_target (when set), and warn once the mean KL stays negative."""
    ppo, kl_penalty, kl = ctx.cfg.ppo, metrics["kl_penalty"], metrics["kl"]
    assert kl_penalty is not None and kl is not None  # measured at every step
    if ppo.kl_target is not None:
        state.beta = adaptive_beta(state.beta, kl_penalty, target=ppo.kl_target, horizon=ppo.kl_horizon,
                                   n_steps=responses)
    state.negative_kl_steps = state.negative_kl_steps + 1 if kl < 0 else 0
    if state.negative_kl_steps == NEGATIVE_KL_STEPS:
        ctx.keeper.print(
            f"[yellow]warning[/]: the mean KL to the reference has been negative for {NEGATIVE_KL_STEPS} steps: "
            "the sampling distribution and the scored log-probs disagree (top_k/top_p, temperature or a generation config)"
        )


if __name__ == "__main__":
    stage_entrypoint("ppo", main)
