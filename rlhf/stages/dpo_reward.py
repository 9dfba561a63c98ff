"""What makes a `rlhf dpo` run a reward model (dpo.loss=dpo): implicit_reward.json (beta and the reference it
trained against, rlhf/rollouts/implicit_reward.py) and reward_stats.json (the mean and std of its implicit rewards
of training responses, which PPO normalizes scores with, as for a `rlhf rm` entry), written beside the weights."""

from __future__ import annotations

import json

import torch

from rlhf.algos.preference import PairStats
from rlhf.config import DPOConfig, loss_beta
from rlhf.models.sources import REWARD_STATS_FILE, ModelSource
from rlhf.protocols import CausalLM, Tokenizer, TrainEngine
from rlhf.rollouts.implicit_reward import IMPLICIT_REWARD_FILE, implicit_reward_json
from rlhf.stages.dpo_batches import Reference, batch_loss, gathered, make_batch
from rlhf.training.engine import Dist
from rlhf.training.evaluation import even_shard


def reference_name(source: ModelSource) -> str:
    """How implicit_reward.json names the reference: `stage:id` for a registry entry (not a tag that moves), else its
    folder or hub name."""
    return f"{source.entry.stage}:{source.entry.id}" if source.entry is not None else source.location


def reward_files(engine: TrainEngine[CausalLM], reference: Reference, cfg: DPOConfig, dist: Dist, *, reference_source: ModelSource,
                 train_set: list, tokenizer: Tokenizer) -> dict[str, str]:
    """implicit_reward.json and reward_stats.json for the save folder; none unless dpo.loss=dpo and the reference reloads
    as it was (the embedded default's untrained `toy` start is rebuilt from a seed, so it does not). `reference_source`:
    the frozen reference's model, or the starting model's when the reference is the policy without its adapters."""
    beta = loss_beta(cfg.dpo)
    if cfg.dpo.loss != "dpo" or reference_source.kind == "toy" or beta is None:
        return {}
    rows = train_set[: cfg.eval.reward_stats_rows] if cfg.eval.reward_stats_rows else train_set
    rewards = training_rewards(engine, reference, cfg, dist, rows=rows, tokenizer=tokenizer)
    stats = {"mean": rewards.mean().item(), "std": rewards.std(unbiased=False).item(),
             "measured_on": f"the chosen and rejected responses of {len(rows)} training rows",
             "reward_at": "beta * (log pi - log pi_ref) summed over the response's tokens (the implicit reward)"}
    return {IMPLICIT_REWARD_FILE: implicit_reward_json(beta, reference_name(reference_source)),
            REWARD_STATS_FILE: json.dumps(stats, indent=2) + "\n"}


@torch.no_grad()
def training_rewards(engine: TrainEngine[CausalLM], reference: Reference, cfg: DPOConfig, dist: Dist, *, rows: list,
                     tokenizer: Tokenizer) -> torch.Tensor:
    """(2N,) float64 on every rank: the implicit reward of each row's chosen and rejected responses (all ranks score
    their share; padding rows of the last batch are dropped). `rows` lead the training set (precomputed reference
    log-probs are read by row index)."""
    engine.eval()
    indices, real = even_shard(list(range(len(rows))), dist=dist)
    found, kept = [], []
    for start in range(0, len(indices), cfg.eval.batch_size):
        batch = make_batch(rows, indices[start : start + cfg.eval.batch_size], cfg, tokenizer, dist, reference.train_logps)
        _, stats = batch_loss(engine, reference, batch, cfg, dist)
        assert isinstance(stats, PairStats)  # dpo.loss=dpo
        keep = torch.tensor(real[start : start + cfg.eval.batch_size], dtype=torch.float64, device=dist.device)
        found.append(torch.cat([stats.chosen_rewards, stats.rejected_rewards]).double())
        kept.append(torch.cat([keep, keep]))  # a float, not a bool: gloo gathers no bools
    every, mask = gathered(torch.cat(found), dist), gathered(torch.cat(kept), dist)
    return every[mask > 0]
