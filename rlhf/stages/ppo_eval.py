"""The PPO stage's held-out evaluation: the policy's answers to the eval prompts, sampled as in training
and scored by the same reward; on the embedded default graded by the oracle, with eval.gold by the task's grader."""

from __future__ import annotations

import torch

from rlhf.errors import UserError
from rlhf.rollouts.rewards import Reward
from rlhf.stages.ppo_context import PPOContext
from rlhf.stages.ppo_rollout import RewardFailed, first_failure, sample, score, shaped, texts_of
from rlhf.toy import oracle_score
from rlhf.training.engine import Dist
from rlhf.training.evaluation import even_shard, oracle_eval, pair_agreement, pearson
from rlhf.training.rank_sums import RankSums

EVAL_SUMS = ("score", "score_sq", "kl", "length", "length_sq", "score_length", "no_eos", "responses", "oracle_pairs", "oracle_agreed",
             "ensemble_std", "gold", "gold_pairs", "gold_agreed")


@torch.no_grad()
def evaluate(ctx: PPOContext) -> dict[str, float]:
    """Held-out prompts, sampled as in training: the shaped score, the KL to the reference per
    response, length and EOS rate; on the embedded default the oracle's score (0-100)."""
    models, data, cfg, dist = ctx.models, ctx.data, ctx.cfg, ctx.dist
    if not data.eval_prompts:
        return {}
    actor = models.actor
    actor.eval()
    share, real = even_shard(data.eval_prompts, dist=dist)
    sums = RankSums(EVAL_SUMS, dist.device)
    for start in range(0, len(share), cfg.eval.batch_size):
        seqs, _, episodes = sample(ctx, share[start : start + cfg.eval.batch_size], keep_logprobs=False)
        scored = score(ctx, seqs, critic=None, episodes=episodes)
        keep = torch.tensor(real[start : start + cfg.eval.batch_size], device=dist.device)
        shaped_score = shaped(scored.scores, seqs, cfg)[keep].double()
        kl = ((scored.logprobs - scored.ref_logprobs) * seqs.response_mask).sum(dim=1)[keep].double()
        lengths = seqs.response_lengths[keep].double()
        sums.add(score=shaped_score, score_sq=shaped_score.pow(2), kl=kl, length=lengths, length_sq=lengths.pow(2),
                 score_length=shaped_score * lengths, no_eos=~seqs.has_eos[keep], responses=keep)
        if scored.ensemble_std is not None:
            sums.add(ensemble_std=scored.ensemble_std[keep])
        if data.eval_texts or data.gold is not None:  # what the reward read, for the oracle and eval.gold alike
            prompts, responses = texts_of(seqs, episodes, data)
        if data.eval_texts:  # the reward against the oracle on the policy's own current samples
            gold = [oracle_score(p, r) for p, r, k in zip(prompts, responses, keep.tolist()) if k]
            judged, agreed = pair_agreement(shaped_score.tolist(), gold)
            sums.add(oracle_pairs=float(judged), oracle_agreed=float(agreed))
        if data.gold is not None:  # the reward against eval.gold, the same way
            gold = gold_scores(data.gold, prompts, responses, keep, dist)
            judged, agreed = pair_agreement(shaped_score.tolist(), gold)
            sums.add(gold=float(sum(gold)), gold_pairs=float(judged), gold_agreed=float(agreed))
    metrics = eval_metrics(ctx, sums.over_ranks())
    warn_if_past_max_kl(ctx, metrics)
    actor.train()
    return metrics


def eval_metrics(ctx: PPOContext, total: dict[str, float]) -> dict[str, float]:
    """The held-out figures from the sums over every rank, and the oracle's own evaluation on the embedded default."""
    models, data, cfg = ctx.models, ctx.data, ctx.cfg
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
        oracle = oracle_eval(models.actor.module, data.tokenizer, data.eval_texts, batch_size=cfg.eval.batch_size, sampling=ctx.sampling,
                             dist=ctx.dist)
        metrics.update({f"eval/{k}": v for k, v in oracle.items()})
    return metrics


def warn_if_past_max_kl(ctx: PPOContext, metrics: dict[str, float]) -> None:
    max_kl = ctx.cfg.ppo.max_kl
    if max_kl is not None and metrics["eval/kl"] > max_kl and ctx.dist.is_main:
        # Drift far from the reference is how reward hacking starts: say so while it happens.
        print(f"warning: held-out KL to the reference is {metrics['eval/kl']:.3g}, above ppo.max_kl={max_kl}: "
              "the policy may be exploiting the reward model; raise ppo.beta or set ppo.kl_target", flush=True)


def gold_scores(gold: Reward, prompts: list[str], responses: list[str], keep: torch.Tensor, dist: Dist) -> list[float]:
    """eval.gold's score of each kept held-out response; a grader that fails on any rank stops every rank in one line."""
    failure, values = None, []
    try:
        values = gold.scores(prompts, responses, device=dist.device).total.tolist()
    except UserError as exc:
        failure = f"eval.gold: {exc}"
    failure = first_failure(failure, dist)
    if failure is not None:
        raise RewardFailed(failure)
    return [v for v, k in zip(values, keep.tolist()) if k]
