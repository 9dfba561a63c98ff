"""DPO's batches and their loss: rows laid out for scoring (padded, or packed by rlhf/stages/dpo_scoring.py),
the configured loss of the family (rlhf/algos/preference.py) with its per-example stats summed over ranks, and the
reference's log-probs (live, the policy without adapters, or precomputed once). rlhf/stages/dpo.py runs the stage."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.algos.preference import KTOStats, ORPOStats, PairStats, dpo_loss, ipo_loss, kto_loss, orpo_loss, simpo_loss
from rlhf.config import REFERENCE_FREE_LOSSES, DPOConfig, loss_beta
from rlhf.protocols import CausalLM, PolicyModel, Tokenizer, TrainEngine
from rlhf.stages.dpo_scoring import Scored, lay_out, packing_capacity, reference_sums, sequence_logps
from rlhf.training.engine import Dist
from rlhf.training.evaluation import even_shard
from rlhf.training.rank_sums import RankSums

LossStats = PairStats | ORPOStats | KTOStats
"""A batch's per-example stats, of the configured loss."""

# Sums over a batch's examples (and ranks); every name is declared on every rank (RankSums).
# chosen/rejected count the examples each side's means divide by: pairs twice, or KTO's
# desirable and undesirable rows.
SUMS = ("loss", "examples", "correct", "margin", "chosen", "rejected", "chosen_reward", "rejected_reward", "chosen_logp",
        "rejected_logp", "sft_loss", "odds_ratio_loss", "kl_reference_point", "batches")


@dataclass
class Reference:
    """Where reference log-probs come from: `model` (frozen), or the policy with its adapters off
    (`adapters_off`), or neither (simpo/orpo without eval.kl). `train_logps`, `eval_logps`: (N, 2)
    float32 per row, precomputed: (chosen, rejected) of a pair, or (completion, KL partner) of a KTO row."""

    model: PolicyModel | None
    adapters_off: bool
    train_logps: torch.Tensor | None = None
    eval_logps: torch.Tensor | None = None

    @property
    def available(self) -> bool:
        return self.model is not None or self.adapters_off


@dataclass
class Batch:
    """One batch of rows. seqs: pairs as 2B sequences, chosen rows then rejected rows, or KTO's B
    completions; kl_seqs: KTO's B prompts with their partners' completions (each padded or packed,
    rlhf/stages/dpo_scoring.py); desirable (B,) bool; ref, kl_ref: the precomputed reference
    log-probs of seqs (2B,) or (B,) and of kl_seqs (B,)."""

    seqs: Scored
    kl_seqs: Scored | None
    desirable: torch.Tensor | None
    ref: torch.Tensor | None
    kl_ref: torch.Tensor | None


def kl_partner(i: int, n: int) -> int:
    """KTO's mismatched pair for row i: row i's prompt with the completion of row i + n // 2 (mod n).
    A fixed partner half the data set away keeps the pair mismatched when neighbouring rows share
    a prompt, and lets the reference's log-prob of it be precomputed; which rows meet in a batch is
    shuffled, so the batch's KL estimate is over random mismatched pairs, as in the paper."""
    return (i + n // 2) % n


def make_batch(rows: list, indices: list[int], cfg: DPOConfig, tokenizer: Tokenizer, dist: Dist, precomputed: torch.Tensor | None) -> Batch:
    """The sequences of rows[indices] on this rank's device, laid out as `Batch` says."""
    def lay(prompts: list[list[int]], responses: list[list[int]]) -> Scored:
        return lay_out(prompts, responses, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                       capacity=packing_capacity(cfg.data), device=dist.device)

    picked = [rows[i] for i in indices]
    ref = kl_ref = desirable = kl_seqs = None
    if cfg.dpo.loss == "kto":
        seqs = lay([r.prompt for r in picked], [r.completion for r in picked])
        # The partner's completion is cut to fit this prompt's room (no EOS then, as any cut).
        partners = [rows[kl_partner(i, len(rows))].completion[: cfg.data.max_length - len(rows[i].prompt)] for i in indices]
        kl_seqs = lay([r.prompt for r in picked], partners)
        desirable = torch.tensor([r.desirable for r in picked], device=dist.device)
        if precomputed is not None:
            ref, kl_ref = precomputed[indices, 0].to(dist.device), precomputed[indices, 1].to(dist.device)
    else:
        seqs = lay([r.prompt for r in picked] * 2, [r.chosen for r in picked] + [r.rejected for r in picked])
        if precomputed is not None:
            ref = torch.cat([precomputed[indices, 0], precomputed[indices, 1]]).to(dist.device)
    return Batch(seqs, kl_seqs, desirable, ref, kl_ref)


def gathered(x: torch.Tensor, dist: Dist) -> torch.Tensor:
    """`x` (M,) from every rank, concatenated (all ranks hold the same M)."""
    if dist.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.world_size)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def batch_loss(engine: TrainEngine[CausalLM], reference: Reference, batch: Batch, cfg: DPOConfig,
               dist: Dist) -> tuple[torch.Tensor, LossStats]:
    """The configured loss of one batch and its per-example stats. KTO's z0 is estimated over every
    rank's KL rows (gathered), so it is one number per micro-step, as with one large batch."""
    dpo, beta = cfg.dpo, loss_beta(cfg.dpo)
    ref, kl_ref = batch.ref, batch.kl_ref
    if dpo.loss not in REFERENCE_FREE_LOSSES and ref is None:
        ref = reference_sums(reference.model, engine, batch.seqs)
    logps = sequence_logps(engine, batch.seqs)
    lengths = batch.seqs.response_lengths
    if dpo.loss == "kto":
        # make_batch gives KTO rows their KL sequences and labels; kto has a reference and a beta.
        assert batch.kl_seqs is not None and batch.desirable is not None and ref is not None and beta is not None
        with torch.no_grad():  # z0 is not backpropagated through (KTO paper, section 4)
            kl_logps = sequence_logps(engine, batch.kl_seqs)
            if kl_ref is None:
                kl_ref = reference_sums(reference.model, engine, batch.kl_seqs)
        return kto_loss(logps=logps, ref_logps=ref, desirable=batch.desirable, kl_logps=gathered(kl_logps, dist),
                        kl_ref_logps=gathered(kl_ref, dist), beta=beta, desirable_weight=dpo.desirable_weight,
                        undesirable_weight=dpo.undesirable_weight)
    b = logps.shape[0] // 2  # chosen rows first, then rejected
    sides = {"chosen_logps": logps[:b], "rejected_logps": logps[b:]}
    lengths_of = {"chosen_lengths": lengths[:b], "rejected_lengths": lengths[b:]}
    # Every loss but orpo has a beta (DEFAULT_BETAS); dpo and ipo have reference log-probs (above).
    if dpo.loss == "dpo":
        assert ref is not None and beta is not None
        return dpo_loss(**sides, chosen_ref_logps=ref[:b], rejected_ref_logps=ref[b:], beta=beta, label_smoothing=dpo.label_smoothing)
    if dpo.loss == "ipo":
        assert ref is not None and beta is not None
        return ipo_loss(**sides, chosen_ref_logps=ref[:b], rejected_ref_logps=ref[b:], **lengths_of, beta=beta)
    if dpo.loss == "simpo":
        assert beta is not None
        return simpo_loss(**sides, **lengths_of, beta=beta, gamma=dpo.simpo_gamma)
    return orpo_loss(**sides, **lengths_of, lam=dpo.orpo_lambda)


def add_stats(sums: RankSums, stats: LossStats, *, keep: torch.Tensor | None = None) -> None:
    """Add one batch's per-example stats (those of `keep`, default all) to the named sums."""
    keep = torch.ones_like(stats.losses, dtype=torch.bool) if keep is None else keep
    if isinstance(stats, KTOStats):  # KTO: chosen = desirable rows, rejected = undesirable rows
        good, bad = stats.desirable & keep, ~stats.desirable & keep
        sums.add(loss=stats.losses[keep].double(), examples=keep, chosen=good, rejected=bad,
                 chosen_reward=stats.rewards[good].double(), rejected_reward=stats.rewards[bad].double(),
                 chosen_logp=stats.logps[good].double(), rejected_logp=stats.logps[bad].double(),
                 kl_reference_point=stats.reference_point.double(), batches=1.0)
        return
    sums.add(loss=stats.losses[keep].double(), examples=keep, correct=stats.accuracy[keep].double(),
             margin=stats.margin[keep].double(), chosen=keep, rejected=keep,
             chosen_reward=stats.chosen_rewards[keep].double(), rejected_reward=stats.rejected_rewards[keep].double(),
             chosen_logp=stats.chosen_logps[keep].double(), rejected_logp=stats.rejected_logps[keep].double(), batches=1.0)
    if isinstance(stats, ORPOStats):
        sums.add(sft_loss=stats.sft_losses[keep].double(), odds_ratio_loss=stats.odds_ratio_losses[keep].double())


def summarize(total: dict[str, float], loss: str) -> dict[str, float]:
    """Means over all ranks' examples from the sums of `add_stats`."""
    n, chosen, rejected = max(total["examples"], 1.0), max(total["chosen"], 1.0), max(total["rejected"], 1.0)
    out = {"loss": total["loss"] / n, "chosen_reward": total["chosen_reward"] / chosen,
           "rejected_reward": total["rejected_reward"] / rejected, "chosen_logp": total["chosen_logp"] / chosen,
           "rejected_logp": total["rejected_logp"] / rejected}
    if loss == "kto":
        # No pairs, so no per-pair accuracy: the margin is the gap between the two groups' mean rewards.
        out["margin"] = out["chosen_reward"] - out["rejected_reward"]
        out["kl_reference_point"] = total["kl_reference_point"] / max(total["batches"], 1.0)
        return out
    out.update(accuracy=total["correct"] / n, margin=total["margin"] / n)
    if loss == "orpo":
        out.update(sft_loss=total["sft_loss"] / n, odds_ratio_loss=total["odds_ratio_loss"] / n)
    return out


@torch.no_grad()
def precompute_reference(engine: TrainEngine[CausalLM], reference: Reference, rows: list, cfg: DPOConfig, tokenizer: Tokenizer,
                         dist: Dist) -> torch.Tensor | None:
    """(N, 2) float32 on the CPU: the reference's summed log-probs of every row (chosen and
    rejected, or completion and KL partner). Each rank scores its share; one all-gather joins them."""
    if not rows:
        return None
    indices, _ = even_shard(list(range(len(rows))), dist=dist)  # rank r holds rows r, r + W, ...
    parts = []
    for start in range(0, len(indices), cfg.eval.batch_size):
        batch = make_batch(rows, indices[start : start + cfg.eval.batch_size], cfg, tokenizer, dist, None)
        ref = reference_sums(reference.model, engine, batch.seqs)
        if batch.kl_seqs is not None:
            parts.append(torch.stack([ref, reference_sums(reference.model, engine, batch.kl_seqs)], dim=1))
        else:
            b = ref.shape[0] // 2
            parts.append(torch.stack([ref[:b], ref[b:]], dim=1))
    mine = torch.cat(parts).float()  # (per_rank, 2)
    every = gathered(mine.flatten(), dist).view(dist.world_size, -1, 2)  # (W, per_rank, 2)
    # Rank r's k-th row is row k * W + r: interleave the ranks back into row order.
    return every.transpose(0, 1).reshape(-1, 2)[: len(rows)].cpu()
