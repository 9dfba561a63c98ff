"""Direct preference optimization of the SFT policy: DPO, IPO, KTO, SimPO or ORPO (`dpo.loss`).

No reward model and no sampling in training: every step scores stored responses. The paired
losses take (prompt, chosen, rejected) rows, chosen and rejected scored in one forward pass. KTO
takes unpaired (prompt, completion, label) rows, and for its reference point z0 each row's prompt
with another row's completion (a fixed partner, half the data set away). A sequence enters a loss
as its response log-probs summed under the response mask, and its response length; the losses
themselves are rlhf/algos/preference.py. data.packing scores the same sequences laid end to end without
padding (rlhf/stages/dpo_scoring.py): the same sums, so the same losses and gradients.

The reference policy is a frozen copy of the starting model (ZeRO-3 partitioned under ZeRO-3), or
the policy with its LoRA adapters off, or its log-probs computed once before training
(dpo.precompute_reference). SimPO and ORPO train without one; eval.kl loads one to measure the
held-out KL to the start, the way `rlhf.stages.ppo` measures it.

1. Ranks and seeds.  2. Tokenizer and data.  3. The policy engine and the reference.  4. The
reference's log-probs, once (dpo.precompute_reference).  5. Resume, or measure the starting policy.
6. Train.  7. Final evaluation, the save_pretrained folder, the registry entry.

Run it with `rlhf dpo` (any number of ranks), or alone: `python -m rlhf.stages.dpo --config FILE`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from rlhf.algos.preference import dpo_loss, ipo_loss, kto_loss, orpo_loss, simpo_loss
from rlhf.config import REFERENCE_FREE_LOSSES, DPOConfig, loss_beta
from rlhf.data.load import stage_datasets
from rlhf.data.packing import check_packing_supported
from rlhf.data.sampler import ShuffledBatches
from rlhf.models.loading import disable_dropout, load_causal_lm
from rlhf.models.sources import ModelSource, causal_lm_and_tokenizer, reference_source
from rlhf.models.stage_models import build_reference
from rlhf.rollouts.generation import Sampling, policy_logprobs, reference_logprobs, sample_rollout
from rlhf.stages.dpo_scoring import Scored, lay_out, packing_capacity, reference_sums, sequence_logps
from rlhf.store.runs import Run, stage_entrypoint
from rlhf.toy import TOY, ToyTask
from rlhf.training.engine import (
    PRECISION_DTYPES,
    Dist,
    build_engine,
    deepspeed_config,
    global_grad_norm,
    init_distributed,
    seed_everything,
    zero3_partitioning,
)
from rlhf.training.evaluation import even_shard, oracle_eval
from rlhf.training.rank_sums import RankSums
from rlhf.training.run_keeper import LoopState, RunKeeper

HEADLINE = ("loss", "accuracy", "margin", "eval/accuracy", "eval/kl", "eval/oracle_score")
# Sums over a batch's examples (and ranks); every name is declared on every rank (RankSums).
# chosen/rejected count the examples each side's means divide by: pairs twice, or KTO's
# desirable and undesirable rows.
SUMS = ("loss", "examples", "correct", "margin", "chosen", "rejected", "chosen_reward", "rejected_reward", "chosen_logp",
        "rejected_logp", "sft_loss", "odds_ratio_loss", "kl_reference_point", "batches")


@dataclass
class Data:
    source: ModelSource
    reference_source: ModelSource | None
    """The frozen reference's model; None = the policy without its adapters, or no reference."""
    tokenizer: Any
    train_set: list
    """PairExample rows, or UnpairedExample rows for kto."""
    train_stats: Any
    eval_set: list
    eval_stats: Any
    batches: ShuffledBatches
    eval_prompts: list[list[int]]
    """Held-out prompts whose sampled answers give the KL to the reference."""
    oracle_texts: list[str]
    """The same prompts as text on the embedded default, for the oracle; empty elsewhere."""


@dataclass
class Reference:
    """Where reference log-probs come from: `model` (frozen), or the policy with its adapters off
    (`adapters_off`), or neither (simpo/orpo without eval.kl). `train_logps`, `eval_logps`: (N, 2)
    float32 per row, precomputed: (chosen, rejected) of a pair, or (completion, KL partner) of a KTO row."""

    model: Any | None
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


def main(run: Run) -> None:
    cfg: DPOConfig = run.config

    # 1. Ranks and seeds.
    dist = init_distributed()
    seed_everything(cfg.train.seed, rank=dist.rank)

    # 2. Tokenizer (the parent's own), preference data, held-out prompts.
    data = load_data(cfg, run, dist)

    # 3. The policy as an engine (dropout off, so a step's log-probs compare with the reference's);
    #    the reference frozen, or the policy without adapters, or none.
    engine = build_policy(cfg, data)
    reference = Reference(model=None if data.reference_source is None else build_reference(cfg, data.reference_source,
                                                                                          data.tokenizer, dist=dist),
                          adapters_off=needs_reference(cfg) and data.reference_source is None)
    if cfg.data.packing and reference.model is not None:
        check_packing_supported(getattr(reference.model, "module", reference.model).config)
    sampling = Sampling(pad_id=data.tokenizer.pad_token_id, eos_id=data.tokenizer.eos_token_id,
                        max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature,
                        zero3_engine=engine if cfg.engine.zero_stage == 3 else None, device=dist.device)

    # 4. Reference log-probs of every row, once; the frozen copy is let go unless eval.kl needs it.
    if cfg.dpo.precompute_reference:
        reference.train_logps = precompute_reference(engine, reference, data.train_set, cfg, data, dist)
        reference.eval_logps = precompute_reference(engine, reference, data.eval_set, cfg, data, dist)
        if not cfg.eval.kl:
            reference.model = None

    # 5. Resume, or measure the starting (SFT) policy: the baseline every later figure is read against.
    keeper = RunKeeper(run, engine, dist, headline=HEADLINE)
    state = keeper.resume(LoopState())
    if state.step == 0:
        keeper.record_baseline(state, evaluate(engine, reference, data, cfg, sampling, dist))
    keeper.print(describe(cfg, data, dist))

    # 6. Train.
    metrics = train(engine, reference, data, cfg, sampling, dist, keeper, state)

    # 7. Final evaluation, the save_pretrained folder, the registry entry (parents: the starting
    #    model's entry, and a named reference's).
    final_eval = evaluate(engine, reference, data, cfg, sampling, dist)
    keeper.log(state.step, final_eval)
    reference_parents = data.reference_source.parents if data.reference_source is not None else ()
    keeper.publish_model(engine, source=data.source, model_cfg=cfg.model, tokenizer=data.tokenizer,
                         parents=tuple(dict.fromkeys(data.source.parents + reference_parents)), metrics={
        **keeper.summary(state, final_eval),
        **{f"train_{k}": v for k, v in metrics.items() if k in ("loss", "accuracy", "margin")},
        "objective": cfg.dpo.loss,
        "beta": loss_beta(cfg.dpo),
        "steps": state.step,
        "train_rows": len(data.train_set),
        "truncated_responses": data.train_stats.truncated_responses,
        "skipped_long_prompts": data.train_stats.skipped_long_prompts,
    })
    keeper.close()


def needs_reference(cfg: DPOConfig) -> bool:
    """Whether any reference log-prob is taken: by the loss, or by the held-out KL."""
    return cfg.dpo.loss not in REFERENCE_FREE_LOSSES or cfg.eval.kl


def load_data(cfg: DPOConfig, run: Run, dist: Dist) -> Data:
    source, tokenizer = causal_lm_and_tokenizer(cfg.model, run.registry)
    ref_source = reference_source(cfg, run.registry, source, tokenizer) if needs_reference(cfg) else None
    train_set, train_stats, eval_set, eval_stats = stage_datasets("dpo", cfg, tokenizer, world_size=dist.world_size)
    batches = ShuffledBatches(len(train_set), batch_size=cfg.engine.micro_batch_size, world_size=dist.world_size, seed=cfg.train.seed)
    oracle_texts: list[str] = []
    if cfg.data.eval == TOY:
        oracle_texts = [row["prompt"] for row in ToyTask(cfg.data.toy).prompts("eval")]
        eval_prompts = [tokenizer(text, add_special_tokens=True).input_ids for text in oracle_texts]
    else:
        # Each held-out prompt once, in the order the rows give them.
        eval_prompts = list({tuple(row.prompt): row.prompt for row in eval_set}.values())
    if cfg.eval.max_prompts:
        oracle_texts, eval_prompts = oracle_texts[: cfg.eval.max_prompts], eval_prompts[: cfg.eval.max_prompts]
    return Data(source, ref_source, tokenizer, train_set, train_stats, eval_set, eval_stats, batches, eval_prompts, oracle_texts)


def build_policy(cfg: DPOConfig, data: Data) -> Any:
    """The policy to train (LoRA when configured), as a DeepSpeed engine, dropout off."""
    zero3 = cfg.engine.zero_stage == 3
    model = load_causal_lm(
        data.source, cfg.model, data.tokenizer, seed=cfg.train.seed, dtype=PRECISION_DTYPES[cfg.engine.precision],
        partitioning=zero3_partitioning(deepspeed_config(cfg.engine, cfg.optim) if zero3 else None),
    )
    disable_dropout(model)
    if cfg.data.packing:
        check_packing_supported(model.config)
    return build_engine(model, engine=cfg.engine, optim=cfg.optim, total_steps=cfg.train.max_steps)


def describe(cfg: DPOConfig, data: Data, dist: Dist) -> str:
    loss = cfg.dpo.loss
    if data.reference_source is not None:
        reference = data.reference_source.location
    elif needs_reference(cfg):
        reference = "the policy without its LoRA adapters"
    else:
        reference = "none"
    if loss in REFERENCE_FREE_LOSSES and needs_reference(cfg):
        reference += " (for eval.kl only)"
    if cfg.dpo.precompute_reference:
        reference += ", log-probs precomputed"
    if loss == "kto":
        desirable = sum(row.desirable for row in data.train_set)
        rows = f"{len(data.train_set)} unpaired rows ({desirable} desirable, {len(data.train_set) - desirable} undesirable)"
    else:
        rows = f"{len(data.train_set)} pairs"
    beta = loss_beta(cfg.dpo)
    return (
        f"dpo: loss {loss}{f' (beta {beta:g})' if beta is not None else ''}, {rows} ({data.train_stats.truncated_responses} "
        f"responses truncated, {data.train_stats.skipped_long_prompts} long prompts skipped), {dist.world_size} rank(s), "
        f"ZeRO-{cfg.engine.zero_stage}, reference = {reference}{', packed' if cfg.data.packing else ''}"
    )


def kl_partner(i: int, n: int) -> int:
    """KTO's mismatched pair for row i: row i's prompt with the completion of row i + n // 2 (mod n).
    A fixed partner half the data set away keeps the pair mismatched when neighbouring rows share
    a prompt, and lets the reference's log-prob of it be precomputed; which rows meet in a batch is
    shuffled, so the batch's KL estimate is over random mismatched pairs, as in the paper."""
    return (i + n // 2) % n


def make_batch(rows: list, indices: list[int], cfg: DPOConfig, data: Data, dist: Dist, precomputed: torch.Tensor | None) -> Batch:
    """The sequences of rows[indices] on this rank's device, laid out as `Batch` says."""
    def lay(prompts: list[list[int]], responses: list[list[int]]) -> Scored:
        return lay_out(prompts, responses, pad_id=data.tokenizer.pad_token_id, eos_id=data.tokenizer.eos_token_id,
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


def batch_loss(engine: Any, reference: Reference, batch: Batch, cfg: DPOConfig, dist: Dist) -> tuple[torch.Tensor, Any]:
    """The configured loss of one batch and its per-example stats. KTO's z0 is estimated over every
    rank's KL rows (gathered), so it is one number per micro-step, as with one large batch."""
    dpo, beta = cfg.dpo, loss_beta(cfg.dpo)
    ref, kl_ref = batch.ref, batch.kl_ref
    if dpo.loss not in REFERENCE_FREE_LOSSES and ref is None:
        ref = reference_sums(reference.model, engine, batch.seqs)
    logps = sequence_logps(engine, batch.seqs)
    lengths = batch.seqs.response_lengths
    if dpo.loss == "kto":
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
    if dpo.loss == "dpo":
        return dpo_loss(**sides, chosen_ref_logps=ref[:b], rejected_ref_logps=ref[b:], beta=beta, label_smoothing=dpo.label_smoothing)
    if dpo.loss == "ipo":
        return ipo_loss(**sides, chosen_ref_logps=ref[:b], rejected_ref_logps=ref[b:], **lengths_of, beta=beta)
    if dpo.loss == "simpo":
        return simpo_loss(**sides, **lengths_of, beta=beta, gamma=dpo.simpo_gamma)
    return orpo_loss(**sides, **lengths_of, lam=dpo.orpo_lambda)


def add_stats(sums: RankSums, stats: Any, *, keep: torch.Tensor | None = None) -> None:
    """Add one batch's per-example stats (those of `keep`, default all) to the named sums."""
    keep = torch.ones_like(stats.losses, dtype=torch.bool) if keep is None else keep
    if hasattr(stats, "desirable"):  # KTO: chosen = desirable rows, rejected = undesirable rows
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
    if hasattr(stats, "sft_losses"):
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
def precompute_reference(engine: Any, reference: Reference, rows: list, cfg: DPOConfig, data: Data, dist: Dist) -> torch.Tensor | None:
    """(N, 2) float32 on the CPU: the reference's summed log-probs of every row (chosen and
    rejected, or completion and KL partner). Each rank scores its share; one all-gather joins them."""
    if not rows:
        return None
    indices, _ = even_shard(list(range(len(rows))), dist=dist)  # rank r holds rows r, r + W, ...
    parts = []
    for start in range(0, len(indices), cfg.eval.batch_size):
        batch = make_batch(rows, indices[start : start + cfg.eval.batch_size], cfg, data, dist, None)
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


@torch.no_grad()
def heldout_preferences(engine: Any, reference: Reference, data: Data, cfg: DPOConfig, dist: Dist) -> dict[str, float]:
    """The loss and its implicit-reward metrics on the held-out rows (all ranks)."""
    indices, real = even_shard(list(range(len(data.eval_set))), dist=dist)
    sums = RankSums(SUMS, dist.device)
    for start in range(0, len(indices), cfg.eval.batch_size):
        batch = make_batch(data.eval_set, indices[start : start + cfg.eval.batch_size], cfg, data, dist, reference.eval_logps)
        _, stats = batch_loss(engine, reference, batch, cfg, dist)
        # Rows added only to keep the ranks in step count for nothing.
        add_stats(sums, stats, keep=torch.tensor(real[start : start + cfg.eval.batch_size], device=dist.device))
    return summarize(sums.over_ranks(), cfg.dpo.loss)


@torch.no_grad()
def heldout_kl(engine: Any, reference: Reference, data: Data, cfg: DPOConfig, sampling: Sampling, dist: Dist) -> dict[str, float]:
    """As `rlhf.stages.ppo` measures it: sample an answer to each held-out prompt, score it under the
    policy and the reference at the sampling temperature, and average sum_t (log pi - log pi_ref)
    over the answer's tokens per response (the k1 estimate of KL(policy || reference))."""
    share, real = even_shard(data.eval_prompts, dist=dist)
    sums = RankSums(("kl", "length", "responses"), dist.device)
    for start in range(0, len(share), cfg.eval.batch_size):
        seqs = sample_rollout(engine.module, share[start : start + cfg.eval.batch_size], sampling)
        logp, _ = policy_logprobs(engine, seqs, temperature=sampling.temperature)
        ref = reference_logprobs(reference.model, engine, seqs, temperature=sampling.temperature)
        keep = torch.tensor(real[start : start + cfg.eval.batch_size], device=dist.device)
        sums.add(kl=((logp - ref) * seqs.response_mask).sum(dim=1)[keep].double(), length=seqs.response_lengths[keep],
                 responses=keep)
    total = sums.over_ranks()
    n = max(total["responses"], 1.0)
    return {"eval/kl": total["kl"] / n, "eval/response_length": total["length"] / n}


@torch.no_grad()
def evaluate(engine: Any, reference: Reference, data: Data, cfg: DPOConfig, sampling: Sampling, dist: Dist) -> dict[str, float]:
    """Held-out loss, reward accuracy and margin; the KL to the reference of sampled answers
    (eval.kl); on the embedded default the oracle's score (0-100) of sampled and greedy answers."""
    engine.eval()
    metrics: dict[str, float] = {}
    if data.eval_set:
        metrics.update({f"eval/{k}": v for k, v in heldout_preferences(engine, reference, data, cfg, dist).items()})
    if cfg.eval.kl and data.eval_prompts and reference.available:
        metrics.update(heldout_kl(engine, reference, data, cfg, sampling, dist))
    if data.oracle_texts:
        oracle = oracle_eval(engine.module, data.tokenizer, data.oracle_texts, batch_size=cfg.eval.batch_size, sampling=sampling,
                             dist=dist)
        metrics.update({f"eval/{k}": v for k, v in oracle.items()})
    engine.train()
    return metrics


def train(engine: Any, reference: Reference, data: Data, cfg: DPOConfig, sampling: Sampling, dist: Dist, keeper: RunKeeper,
          state: LoopState) -> dict[str, float]:
    """Optimizer steps up to train.max_steps; returns the last step's metrics (none when resumed at the end)."""
    engine.train()
    metrics: dict[str, float] = {}
    window_rows, window_start = 0, time.time()
    while state.step < cfg.train.max_steps:
        metrics, rows = train_step(engine, reference, data, cfg, dist, step=state.step)
        state.step += 1
        window_rows += rows
        logged = None
        if keeper.should_log(state.step):
            logged = {**metrics, "lr": engine.get_lr()[0], "grad_norm": global_grad_norm(engine),
                      "rows_per_s": window_rows / max(time.time() - window_start, 1e-9)}
            window_rows, window_start = 0, time.time()
        keeper.finish_step(state, loss=metrics["loss"], metrics=logged,
                           evaluate=lambda: evaluate(engine, reference, data, cfg, sampling, dist))
    return metrics


def train_step(engine: Any, reference: Reference, data: Data, cfg: DPOConfig, dist: Dist, *, step: int) -> tuple[dict[str, float], int]:
    """One optimizer step over `engine.grad_accum` micro-batches: the metrics over every rank, and
    the rows every rank trained on. Every rank holds the same number of rows per micro-batch, so
    the per-rank mean loss, averaged by DeepSpeed over ranks and micro-batches, is the global mean."""
    accum = cfg.engine.grad_accum
    sums = RankSums(SUMS, dist.device)
    rows = 0
    for m in range(accum):
        indices = data.batches.global_batch(step * accum + m)[dist.rank]
        batch = make_batch(data.train_set, indices, cfg, data, dist, reference.train_logps)
        loss, stats = batch_loss(engine, reference, batch, cfg, dist)
        engine.backward(loss)
        engine.step()
        add_stats(sums, stats)
        rows += len(indices) * dist.world_size
    return summarize(sums.over_ranks(), cfg.dpo.loss), rows


if __name__ == "__main__":
    stage_entrypoint("dpo", main)
