"""Held-out evaluation shared by the stages: LM loss, preference accuracy, and the oracle's score
on the embedded default."""

from __future__ import annotations

import math
from typing import TypeVar

import torch
import torch.nn.functional as F

from rlhf.algos.lm import masked_lm_loss
from rlhf.algos.reward import sequence_rewards
from rlhf.data.collate import collate_rm, collate_sft
from rlhf.data.tokenize import RMExample, SFTExample
from rlhf.models.loading import ScalarModel
from rlhf.protocols import CausalLM, Tokenizer, TrainEngine
from rlhf.rollouts.generation import Sampling, generate
from rlhf.toy import oracle_score
from rlhf.training.engine import Dist
from rlhf.training.rank_sums import RankSums

T = TypeVar("T")


def even_shard(items: list[T], *, dist: Dist) -> tuple[list[T], list[bool]]:
    """This rank's share of `items`, padded so every rank gets the same count.

    Under ZeRO-3 every forward pass is a collective, so all ranks must run the same number of
    batches; the padding rows repeat the first item and are flagged False (not counted).
    """
    share = items[dist.rank :: dist.world_size]
    per_rank = math.ceil(len(items) / dist.world_size)
    real = [True] * len(share) + [False] * (per_rank - len(share))
    return share + [items[0]] * (per_rank - len(share)), real


@torch.no_grad()
def heldout_loss(engine: TrainEngine[CausalLM], examples: list[SFTExample], *, batch_size: int, pad_id: int, dist: Dist) -> float:
    """Mean next-token loss over every counted response token of `examples` (all ranks)."""
    share, real = even_shard(examples, dist=dist)
    was_training = engine.training
    engine.eval()
    sums = RankSums(("nll", "tokens"), dist.device)
    for start in range(0, len(share), batch_size):
        batch = {k: v.to(dist.device) for k, v in collate_sft(share[start : start + batch_size], pad_id=pad_id).items()}
        # Padding rows (added only to keep ranks in step) count for nothing.
        keep = torch.tensor(real[start : start + batch_size], device=dist.device).unsqueeze(1)  # (B, 1)
        mask = batch["response_mask"] & keep
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sums.add(nll=masked_lm_loss(logits=logits, input_ids=batch["input_ids"], response_mask=mask, num_tokens=1.0),
                 tokens=mask[:, 1:])
    engine.train(was_training)
    total = sums.over_ranks()
    return total["nll"] / max(total["tokens"], 1.0)


@torch.no_grad()
def preference_eval(engine: TrainEngine[ScalarModel], examples: list[RMExample], *, batch_size: int, pad_id: int,
                    dist: Dist) -> dict[str, float]:
    """A reward model on preference groups (all ranks): pair accuracy (a tie counts as wrong),
    mean margin r_better - r_worse, mean pair loss -log sigmoid(margin - data margin), the
    mean and std of the rewards of every scored sequence, and the correlation of those rewards with
    the responses' lengths in tokens (a reward model that learned "longer is better" shows it here)."""
    share, real = even_shard(examples, dist=dist)
    was_training = engine.training
    engine.eval()
    sums = RankSums(("correct", "pairs", "gap", "loss", "reward", "reward_sq", "sequences", "length", "length_sq", "reward_length"),
                    dist.device)
    for start in range(0, len(share), batch_size):
        groups = share[start : start + batch_size]
        batch = {k: v.to(dist.device) for k, v in collate_rm(groups, pad_id=pad_id).items()}
        rewards = sequence_rewards(engine(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"]).double()
        # Rows of groups added only to keep ranks in step count for nothing.
        seq_real = torch.tensor([r for g, r in zip(groups, real[start:]) for _ in g.sequences], device=dist.device)
        pair_real = torch.tensor([r for g, r in zip(groups, real[start:]) for _ in g.pairs], device=dist.device)
        gap = rewards[batch["better"]] - rewards[batch["worse"]]
        loss = -F.logsigmoid(gap - batch["margins"].double())
        lengths = torch.tensor([len(s) - (g.prompt_length or 0) for g in groups for s in g.sequences], device=dist.device,
                               dtype=torch.float64)[seq_real]
        sums.add(correct=(gap > 0) & pair_real, pairs=pair_real, gap=gap[pair_real], loss=loss[pair_real],
                 reward=rewards[seq_real], reward_sq=rewards[seq_real].pow(2), sequences=seq_real,
                 length=lengths, length_sq=lengths.pow(2), reward_length=rewards[seq_real] * lengths)
    engine.train(was_training)
    total = sums.over_ranks()
    pairs, seqs = max(total["pairs"], 1.0), max(total["sequences"], 1.0)
    mean = total["reward"] / seqs
    return {
        "accuracy": total["correct"] / pairs,
        "margin": total["gap"] / pairs,
        "loss": total["loss"] / pairs,
        "reward_mean": mean,
        "reward_std": math.sqrt(max(total["reward_sq"] / seqs - mean * mean, 0.0)),
        "reward_length_corr": pearson(total["sequences"], total["reward"], total["reward_sq"], total["length"], total["length_sq"],
                                      total["reward_length"]),
    }


def pearson(n: float, x: float, xx: float, y: float, yy: float, xy: float) -> float:
    """Pearson's correlation from sums over n points (nan when either side is constant)."""
    if n < 2:
        return float("nan")
    cov, vx, vy = xy / n - (x / n) * (y / n), xx / n - (x / n) ** 2, yy / n - (y / n) ** 2
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else float("nan")


def pair_agreement(proxy: list[float], gold: list[float]) -> tuple[int, int]:
    """(pairs the gold score orders, those the proxy orders the same way): how well a reward ranks what it is shown."""
    judged = agreed = 0
    for i in range(len(gold)):
        for j in range(i + 1, len(gold)):
            if gold[i] != gold[j]:
                judged += 1
                agreed += (proxy[i] - proxy[j]) * (gold[i] - gold[j]) > 0
    return judged, agreed


@torch.no_grad()
def oracle_eval(module: CausalLM, tokenizer: Tokenizer, prompts: list[str], *, batch_size: int, sampling: Sampling,
                dist: Dist) -> dict[str, float]:
    """The oracle's mean score (0-100) of responses to `prompts` drawn with `sampling` and of greedy
    ones (see `rlhf.rollouts.generation.Sampling` for ZeRO-3)."""
    share, real = even_shard(prompts, dist=dist)
    was_training = module.training
    module.eval()
    results: dict[str, float] = {}
    for name, how in (("oracle_score", sampling), ("oracle_greedy", sampling.greedy())):
        sums = RankSums(("score", "count"), dist.device)
        for start in range(0, len(share), batch_size):
            texts = share[start : start + batch_size]
            ids = [tokenizer(t, add_special_tokens=True).input_ids for t in texts]
            responses = generate(module, ids, how)
            for text, response, counted in zip(texts, responses, real[start : start + batch_size]):
                if counted:
                    sums.add(score=oracle_score(text, tokenizer.decode(response, skip_special_tokens=True)), count=1.0)
        total = sums.over_ranks()
        results[name] = 100.0 * total["score"] / max(total["count"], 1.0)
    module.train(was_training)
    return results
