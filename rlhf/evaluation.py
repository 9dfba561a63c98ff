"""Held-out evaluation shared by the stages: LM loss, preference accuracy, and the oracle's score
on the embedded default."""

from __future__ import annotations

import math
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from rlhf.algos.lm import masked_lm_loss
from rlhf.algos.reward import sequence_rewards
from rlhf.data.collate import collate_rm, collate_sft
from rlhf.data.tokenize import RMExample, SFTExample
from rlhf.engine import Dist
from rlhf.rollout import Sampling, generate
from rlhf.toy import oracle_score

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


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over every rank (float64)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def heldout_loss(engine: Any, examples: list[SFTExample], *, batch_size: int, pad_id: int, dist: Dist) -> float:
    """Mean next-token loss over every counted response token of `examples` (all ranks)."""
    share, real = even_shard(examples, dist=dist)
    was_training = engine.training
    engine.eval()
    nll_sum, tokens = 0.0, 0.0
    for start in range(0, len(share), batch_size):
        batch = {k: v.to(dist.device) for k, v in collate_sft(share[start : start + batch_size], pad_id=pad_id).items()}
        # Padding rows (added only to keep ranks in step) count for nothing.
        keep = torch.tensor(real[start : start + batch_size], device=dist.device).unsqueeze(1)  # (B, 1)
        mask = batch["response_mask"] & keep
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll_sum += masked_lm_loss(logits=logits, input_ids=batch["input_ids"], response_mask=mask, num_tokens=1.0).item()
        tokens += mask[:, 1:].sum().item()
    engine.train(was_training)
    nll_sum, tokens = all_sum([nll_sum, tokens], dist.device)
    return nll_sum / max(tokens, 1.0)


@torch.no_grad()
def preference_eval(engine: Any, examples: list[RMExample], *, batch_size: int, pad_id: int, dist: Dist) -> dict[str, float]:
    """A reward model on preference groups (all ranks): pair accuracy (a tie counts as wrong),
    mean margin r_better - r_worse, mean pair loss -log sigmoid(margin - data margin), and the
    mean and std of the rewards of every scored sequence."""
    share, real = even_shard(examples, dist=dist)
    was_training = engine.training
    engine.eval()
    # correct, pairs, gap sum, loss sum, reward sum, reward^2 sum, sequences
    sums = [0.0] * 7
    for start in range(0, len(share), batch_size):
        groups = share[start : start + batch_size]
        batch = {k: v.to(dist.device) for k, v in collate_rm(groups, pad_id=pad_id).items()}
        rewards = sequence_rewards(engine(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"]).double()
        # Rows of groups added only to keep ranks in step count for nothing.
        seq_real = torch.tensor([r for g, r in zip(groups, real[start:]) for _ in g.sequences], device=dist.device)
        pair_real = torch.tensor([r for g, r in zip(groups, real[start:]) for _ in g.pairs], device=dist.device)
        gap = rewards[batch["better"]] - rewards[batch["worse"]]
        loss = -F.logsigmoid(gap - batch["margins"].double())
        sums[0] += ((gap > 0) & pair_real).sum().item()
        sums[1] += pair_real.sum().item()
        sums[2] += gap[pair_real].sum().item()
        sums[3] += loss[pair_real].sum().item()
        sums[4] += rewards[seq_real].sum().item()
        sums[5] += rewards[seq_real].pow(2).sum().item()
        sums[6] += seq_real.sum().item()
    engine.train(was_training)
    correct, pairs, gap_sum, loss_sum, r_sum, r2_sum, seqs = all_sum(sums, dist.device)
    mean = r_sum / max(seqs, 1.0)
    return {
        "accuracy": correct / max(pairs, 1.0),
        "margin": gap_sum / max(pairs, 1.0),
        "loss": loss_sum / max(pairs, 1.0),
        "reward_mean": mean,
        "reward_std": math.sqrt(max(r2_sum / max(seqs, 1.0) - mean * mean, 0.0)),
    }


@torch.no_grad()
def oracle_eval(module: Any, tokenizer: Any, prompts: list[str], *, batch_size: int, sampling: Sampling, dist: Dist) -> dict[str, float]:
    """The oracle's mean score (0-100) of responses to `prompts` drawn with `sampling` and of greedy
    ones (see `rlhf.rollout.Sampling` for ZeRO-3)."""
    share, real = even_shard(prompts, dist=dist)
    was_training = module.training
    module.eval()
    results: dict[str, float] = {}
    for name, how in (("oracle_score", sampling), ("oracle_greedy", sampling.greedy())):
        total, count = 0.0, 0.0
        for start in range(0, len(share), batch_size):
            texts = share[start : start + batch_size]
            ids = [tokenizer(t, add_special_tokens=True).input_ids for t in texts]
            responses = generate(module, ids, how)
            for text, response, counted in zip(texts, responses, real[start : start + batch_size]):
                if counted:
                    total += oracle_score(text, tokenizer.decode(response, skip_special_tokens=True))
                    count += 1
        total, count = all_sum([total, count], dist.device)
        results[name] = 100.0 * total / max(count, 1.0)
    module.train(was_training)
    return results
