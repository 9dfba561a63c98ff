"""Stage 3 of InstructGPT: PPO against the reward model, with a KL penalty to the SFT policy.

Four models. The actor (the policy, from sft:latest) and the critic (from rm:latest, trained head
included) train; the reference (the actor's starting weights) and the reward model are frozen.
Each step: sample a response to every prompt of a batch -> one forward pass of each model ->
per-token rewards r_t = -beta * KL_t, plus the shaped score at the last token -> GAE advantages
and returns -> `ppo.epochs` passes of clipped policy and value updates over shuffled minibatches,
with the PPO-ptx LM loss on the actor -> metrics. The objective is in rlhf/algos/ppo.py, once.

Run it with `rlhf ppo` (any number of ranks), or alone: `python stages/ppo.py --config FILE`.
"""

from __future__ import annotations

import time

import torch

from rlhf.algos.lm import masked_lm_loss
from rlhf.algos.ppo import (
    adaptive_beta,
    explained_variance,
    gae,
    masked_sums,
    masked_whiten,
    moments_from_sums,
    penalized_rewards,
    policy_loss,
    shape_scores,
    value_loss,
)
from rlhf.config import PPOConfig
from rlhf.data.collate import collate_sft
from rlhf.data.load import ptx_data_config, sft_examples, stage_datasets
from rlhf.data.sampler import ShuffledBatches
from rlhf.engine import Dist, full_state_dict, global_grad_norm, init_distributed, seed_everything
from rlhf.evaluation import even_shard, oracle_eval
from rlhf.model_saving import save_final
from rlhf.model_sources import base_model_identity, causal_lm_and_tokenizer, ppo_sources, reward_stats
from rlhf.ppo_models import build_ppo_models
from rlhf.rank_sums import RankSums
from rlhf.rollout import Sampling, minibatch_rows, policy_logprobs, sample_rollout, score_rollout, token_values
from rlhf.runs import Run, stage_entrypoint
from rlhf.toy import TOY
from rlhf.training import StageLoop

NEGATIVE_KL_STEPS = 3  # consecutive steps of negative mean KL before warning of a log-prob mismatch
UPDATE_STATS = ("policy_loss", "value_loss", "policy_clipfrac", "approx_kl", "ratio_mean", "value_clipfrac")  # means over updates


def main(run: Run) -> None:
    cfg: PPOConfig = run.config
    ppo, rollout, engine_cfg = cfg.ppo, cfg.rollout, cfg.engine

    # 1. Ranks and seeds (each rank samples from its own stream).
    dist = init_distributed()
    seed_everything(cfg.train.seed, rank=dist.rank)

    # 2. Where the four models come from (checked: reward models, one tokenizer), prompts, ptx data.
    actor_source, tokenizer = causal_lm_and_tokenizer(cfg.model, run.registry)
    sources = ppo_sources(cfg, run.registry, actor_source, tokenizer)
    stats = reward_stats(sources.reward) if ppo.normalize_score else {"mean": 0.0, "std": 1.0}
    train_prompts, prompt_stats, eval_prompts, _ = stage_datasets("ppo", cfg, tokenizer, world_size=dist.world_size)
    batches = ShuffledBatches(len(train_prompts), batch_size=rollout.batch_size, world_size=dist.world_size, seed=cfg.train.seed)
    ptx_set, ptx_batches = [], None
    if ppo.ptx_coef > 0:
        ptx_set, _ = sft_examples(cfg.data.ptx, split="train", tokenizer=tokenizer, data=ptx_data_config(cfg.data), key="data.ptx")
        ptx_batches = ShuffledBatches(len(ptx_set), batch_size=engine_cfg.micro_batch_size, world_size=dist.world_size, seed=cfg.train.seed)

    # 3. Actor and critic engines (own optimizers, annealed over every PPO update); frozen
    #    reference and reward, partitioned under ZeRO-3. Dropout off in all four.
    zero3 = engine_cfg.zero_stage == 3
    minibatches = rollout.batch_size // engine_cfg.micro_batch_size
    total_updates = cfg.train.max_steps * ppo.epochs * minibatches // engine_cfg.grad_accum
    models = build_ppo_models(cfg, sources, actor_source, tokenizer, dist=dist, total_updates=total_updates)
    actor, critic, reference, reward = models.actor, models.critic, models.reference, models.reward
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    lora_reference = reference is None

    sampling = Sampling(pad_id=pad_id, eos_id=eos_id, max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                        top_k=rollout.top_k, top_p=rollout.top_p, zero3_engine=actor if zero3 else None,
                        gather=rollout.gather_params, device=dist.device)

    def shaped(scores: torch.Tensor, has_eos: torch.Tensor) -> torch.Tensor:
        return shape_scores(scores, has_eos, mean=stats["mean"], std=stats["std"], normalize=ppo.normalize_score,
                            clip=ppo.score_clip, no_eos_score=ppo.no_eos_score)

    # On the embedded default the oracle grades held-out answers: the ground truth PPO must raise.
    eval_texts = [tokenizer.decode(p, skip_special_tokens=True) for p in eval_prompts] if cfg.data.eval == TOY else []

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        """Held-out prompts, sampled as in training: the shaped score, the KL to the reference per
        response, length and EOS rate; on the embedded default the oracle's score (0-100)."""
        if not eval_prompts:
            return {}
        actor.eval()
        share, real = even_shard(eval_prompts, dist=dist)
        sums = RankSums(("score", "score_sq", "kl", "length", "no_eos", "responses"), dist.device)
        for start in range(0, len(share), cfg.eval.batch_size):
            seqs = sample_rollout(actor.module, share[start : start + cfg.eval.batch_size], sampling)
            scored = score_rollout(seqs, actor=actor, reference=reference, critic=None, reward=reward,
                                   temperature=rollout.temperature, chunk=engine_cfg.micro_batch_size,
                                   reference_is_actor_without_adapters=lora_reference)
            keep = torch.tensor(real[start : start + cfg.eval.batch_size], device=dist.device)
            score = shaped(scored.scores, seqs.has_eos)[keep].double()
            kl = ((scored.logprobs - scored.ref_logprobs) * seqs.response_mask).sum(dim=1)[keep].double()
            sums.add(score=score, score_sq=score.pow(2), kl=kl, length=seqs.response_lengths[keep], no_eos=~seqs.has_eos[keep],
                     responses=keep)
        total = sums.over_ranks()
        n, mean_score = total["responses"], total["score"] / total["responses"]
        metrics = {"eval/score": mean_score, "eval/score_std": max(total["score_sq"] / n - mean_score**2, 0.0) ** 0.5,
                   "eval/kl": total["kl"] / n, "eval/response_length": total["length"] / n, "eval/no_eos_fraction": total["no_eos"] / n}
        if eval_texts:
            oracle = oracle_eval(actor.module, tokenizer, eval_texts, batch_size=cfg.eval.batch_size, sampling=sampling, dist=dist)
            metrics.update({f"eval/{k}": v for k, v in oracle.items()})
        if ppo.max_kl is not None and metrics["eval/kl"] > ppo.max_kl and dist.is_main:
            # Drift far from the reference is how reward hacking starts: say so while it happens.
            print(f"warning: held-out KL to the reference is {metrics['eval/kl']:.3g}, above ppo.max_kl={ppo.max_kl}: "
                  "the policy may be exploiting the reward model; raise ppo.beta or set ppo.kl_target", flush=True)
        actor.train()
        return metrics

    # 4. Resume (both engines, beta, RNG) or measure the SFT policy: the baseline PPO must beat.
    loop = StageLoop(run, {"actor": actor, "critic": critic}, dist, evaluate=evaluate,
                     headline=("score", "kl", "beta", "eval/score", "eval/kl", "eval/oracle_score"))
    loop.state.setdefault("beta", ppo.beta)
    loop.state.setdefault("negative_kl_steps", 0)
    step = loop.step
    metrics: dict[str, float] = {}
    reference_text = "the actor without its LoRA adapters" if lora_reference else sources.reference.location
    loop.tracker.print(
        f"ppo: {len(train_prompts)} prompts ({prompt_stats.skipped_long_prompts} longer than data.max_prompt_length skipped), "
        f"{rollout.batch_size} rollouts x {dist.world_size} rank(s) per step, {ppo.epochs} epochs of {minibatches} minibatches, "
        f"ZeRO-{engine_cfg.zero_stage}, reference = {reference_text}"
    )

    def stop_if_nonfinite(step: int, what: str, *tensors: torch.Tensor) -> None:
        # One all-reduce and host sync per call (per minibatch in the update loop): a non-finite
        # loss must stop every rank before any rank applies it.
        bad = torch.tensor([float(any(not torch.isfinite(t).all() for t in tensors))], device=dist.device)
        torch.distributed.all_reduce(bad)  # every rank stops together (and saves together)
        if bad.item():
            loop.stop_nonfinite(step, what)

    while step < cfg.train.max_steps:
        # 5. Rollout: sample with the KV cache, then score with all four models (in eval mode: the
        #    old log-probs and values must be the deterministic ones the updates compare against).
        actor.eval()
        critic.eval()
        started = time.time()
        prompts = [train_prompts[i] for i in batches.global_batch(step)[dist.rank]]
        seqs = sample_rollout(actor.module, prompts, sampling)
        generated = time.time()
        scored = score_rollout(seqs, actor=actor, reference=reference, critic=critic, reward=reward,
                               temperature=rollout.temperature, chunk=engine_cfg.micro_batch_size,
                               reference_is_actor_without_adapters=lora_reference)
        stop_if_nonfinite(step, "a reward-model score or a critic value", scored.scores, scored.values)

        # 6. Rewards and advantages: KL penalty per token, shaped score at the last one, GAE;
        #    whitening uses the statistics of the whole rollout batch across ranks.
        mask = seqs.response_mask
        score = shaped(scored.scores, seqs.has_eos)
        rewards, penalized_kl = penalized_rewards(scored.logprobs, scored.ref_logprobs, score, mask, beta=loop.state["beta"],
                                        kl_estimator=ppo.kl_estimator)
        if ppo.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, **global_moments(rewards, mask, dist))
        advantages, returns = gae(rewards, scored.values, mask, gamma=ppo.gamma, lam=ppo.lam)
        if ppo.whiten_advantages:
            advantages = masked_whiten(advantages, mask, **global_moments(advantages, mask, dist))
        scored_at = time.time()

        # 7. PPO epochs over shuffled minibatches: clipped policy loss (+ ptx) and clipped value loss.
        actor.train()
        critic.train()
        update_stats = RankSums((*UPDATE_STATS, "ptx_loss"), dist.device)  # summed over this step's updates and the ranks
        updates = 0
        for epoch in range(ppo.epochs):
            epoch_rows = minibatch_rows(seqs.response_lengths, micro_batch_size=engine_cfg.micro_batch_size,
                                        group_by_length=ppo.length_grouped_minibatches)
            for m, rows in enumerate(epoch_rows):
                batch, batch_mask = seqs.rows(rows), mask[rows]
                logp, _ = policy_logprobs(actor, batch, temperature=rollout.temperature)
                pg_loss, pg_stats = policy_loss(logp, scored.logprobs[rows], advantages[rows], batch_mask, clip=ppo.clip_range)
                actor_loss = pg_loss
                if ptx_batches is not None:
                    micro_step = (step * ppo.epochs + epoch) * minibatches + m
                    ptx = collate_sft([ptx_set[i] for i in ptx_batches.global_batch(micro_step)[dist.rank]], pad_id=pad_id)
                    ptx = {k: v.to(dist.device) for k, v in ptx.items()}
                    logits = actor(input_ids=ptx["input_ids"], attention_mask=ptx["attention_mask"], use_cache=False).logits
                    ptx_loss = masked_lm_loss(logits=logits, input_ids=ptx["input_ids"], response_mask=ptx["response_mask"])
                    actor_loss = pg_loss + ppo.ptx_coef * ptx_loss
                    update_stats.add(ptx_loss=ptx_loss)
                values = token_values(critic, batch)
                vf_loss, vf_stats = value_loss(values, scored.values[rows], returns[rows], batch_mask, clip=ppo.value_clip_range)
                stop_if_nonfinite(step, "the policy or value loss", actor_loss.detach(), vf_loss.detach())
                actor.backward(actor_loss)
                actor.step()
                critic.backward(vf_loss)
                critic.step()
                updates += 1
                update_stats.add(policy_loss=pg_loss, value_loss=vf_loss, policy_clipfrac=pg_stats["clipfrac"],
                                 approx_kl=pg_stats["approx_kl"], ratio_mean=pg_stats["ratio_mean"], value_clipfrac=vf_stats["clipfrac"])
        step += 1
        trained = time.time()

        # 8. Metrics over every rank's rollouts; the adaptive beta moves toward its KL target.
        # kl: the k1 estimate of KL(policy || reference) per response, whatever ppo.kl_estimator is;
        # kl_penalty: the estimator's value, what beta multiplies (and the adaptive controller tracks).
        rollout_stats = RankSums(("kl", "kl_penalty", "score", "score_sq", "rm_score", "entropy", "tokens", "length", "no_eos",
                                  "responses", "explained_variance"), dist.device)
        rollout_stats.add(kl=((scored.logprobs - scored.ref_logprobs) * mask).sum(dim=1).double(),
                          kl_penalty=penalized_kl.sum(dim=1).double(), score=score.double(), score_sq=score.double().pow(2),
                          rm_score=scored.scores.double(), entropy=scored.entropy * mask, tokens=mask, length=seqs.response_lengths,
                          no_eos=~seqs.has_eos, responses=float(len(prompts)),
                          explained_variance=explained_variance(scored.values, returns, mask))
        total, per_update = rollout_stats.over_ranks(), update_stats.over_ranks()
        n, mean_score = total["responses"], total["score"] / total["responses"]
        mean_kl, mean_penalty = total["kl"] / n, total["kl_penalty"] / n
        measured = (*UPDATE_STATS, "ptx_loss") if ptx_batches is not None else UPDATE_STATS
        metrics = {
            "score": mean_score, "score_std": max(total["score_sq"] / n - mean_score**2, 0.0) ** 0.5, "rm_score": total["rm_score"] / n,
            "kl": mean_kl, "kl_penalty": mean_penalty, "beta": loop.state["beta"], "entropy": total["entropy"] / total["tokens"],
            **{k: per_update[k] / updates / dist.world_size for k in measured},
            "explained_variance": total["explained_variance"] / dist.world_size,
            "response_length": total["length"] / n, "no_eos_fraction": total["no_eos"] / n,
            "lr": actor.get_lr()[0], "critic_lr": critic.get_lr()[0], "grad_norm": global_grad_norm(actor),
            "time_generate_s": generated - started, "time_score_s": scored_at - generated, "time_train_s": trained - scored_at,
        }
        if ppo.kl_target is not None:
            loop.state["beta"] = adaptive_beta(loop.state["beta"], mean_penalty, target=ppo.kl_target, horizon=ppo.kl_horizon,
                                               n_steps=int(n))
        loop.state["negative_kl_steps"] = loop.state["negative_kl_steps"] + 1 if mean_kl < 0 else 0
        if loop.state["negative_kl_steps"] == NEGATIVE_KL_STEPS:
            loop.tracker.print(
                f"[yellow]warning[/]: the mean KL to the reference has been negative for {NEGATIVE_KL_STEPS} steps: "
                "the sampling distribution and the scored log-probs disagree (top_k/top_p, temperature or a generation config)"
            )
        loop.end_step(step, metrics["policy_loss"], metrics if loop.should_log(step) else None)

    # 9. Final evaluation, the actor's and critic's save_pretrained folders, the registry entries.
    final_eval = evaluate()
    loop.tracker.log(step, final_eval)
    actor_weights = full_state_dict(actor, dist=dist)
    critic_weights = full_state_dict(critic, dist=dist)
    actor_adapter = critic_adapter = "none"
    critic_dir = run.run_dir / "critic"
    if dist.is_main:
        actor_adapter = save_final(actor.module, actor_weights, tokenizer, run.final_dir, lora=cfg.model.lora)
        critic_adapter = save_final(critic.module, critic_weights, tokenizer, critic_dir, lora=cfg.critic.lora)
    summary = loop.summary(final_eval)
    loop.publish_companion(
        stage="critic", path=critic_dir, parents=sources.critic.parents, base_model=base_model_identity(sources.critic, cfg.critic),
        tokenizer=tokenizer, adapter=critic_adapter, metrics={k: metrics[k] for k in ("value_loss", "explained_variance") if k in metrics},
    )
    loop.publish(source=actor_source, tokenizer=tokenizer, adapter=actor_adapter,
                 parents=tuple(dict.fromkeys(actor_source.parents + sources.parents)), metrics={
        **summary,
        "steps": step,
        "beta": loop.state["beta"],
        "train_score": metrics.get("score"),
        "train_kl": metrics.get("kl"),
        "max_kl": ppo.max_kl,
        "prompts": len(train_prompts),
        "skipped_long_prompts": prompt_stats.skipped_long_prompts,
        "critic": f"{run.run_id}-critic",
    })


def global_moments(x: torch.Tensor, mask: torch.Tensor, dist: Dist) -> dict[str, float]:
    """Mean and variance of `x` over the valid tokens of every rank's rollouts."""
    sums = masked_sums(x, mask)
    torch.distributed.all_reduce(sums)
    mean, var = moments_from_sums(sums)
    return {"mean": mean, "var": var}


if __name__ == "__main__":
    stage_entrypoint("ppo", main)
