"""Direct preference optimization of the SFT policy: DPO, IPO, KTO, SimPO or ORPO (`dpo.loss`).

No reward model and no sampling in training: every step scores stored responses. The paired
losses take (prompt, chosen, rejected) rows, chosen and rejected scored in one forward pass. KTO
takes unpaired (prompt, completion, label) rows, and for its reference point z0 each row's prompt
with another row's completion (a fixed partner, half the data set away). A sequence enters a loss
as its response log-probs summed under the response mask, and its response length; the losses
themselves are rlhf/algos/preference.py, a batch and its loss rlhf/stages/dpo_batches.py. data.packing
scores the same sequences laid end to end without padding (rlhf/stages/dpo_scoring.py): the same sums,
so the same losses and gradients.

The reference policy is a frozen copy of the starting model (ZeRO-3 partitioned under ZeRO-3), or
the policy with its LoRA adapters off, or its log-probs computed once before training
(dpo.precompute_reference). SimPO and ORPO train without one; eval.kl loads one to measure the
held-out KL to the start, the way `rlhf.stages.ppo` measures it.

1. Ranks and seeds.  2. Tokenizer and data.  3. The policy engine and the reference.  4. The
reference's log-probs, once (dpo.precompute_reference).  5. Resume, or measure the starting policy.
6. Train.  7. Final evaluation, the save_pretrained folder (with dpo.loss=dpo what makes it a reward model too:
rlhf/stages/dpo_reward.py), the registry entry.

Run it with `rlhf dpo` (any number of ranks), or alone: `python -m rlhf.stages.dpo --config FILE`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rlhf.config import REFERENCE_FREE_LOSSES, DPOConfig, loss_beta
from rlhf.data.load import stage_datasets
from rlhf.data.packing import check_packing_supported
from rlhf.data.sampler import ShuffledBatches
from rlhf.data.tokenize import TruncationStats
from rlhf.models.loading import disable_dropout, load_causal_lm
from rlhf.models.sources import ModelSource, causal_lm_and_tokenizer, reference_source
from rlhf.models.stage_models import build_reference
from rlhf.protocols import CausalLM, Tokenizer, TrainEngine, inner_model
from rlhf.rollouts.generation import Sampling, policy_logprobs, reference_logprobs, sample_rollout
from rlhf.stages.dpo_batches import SUMS, Reference, add_stats, batch_loss, make_batch, precompute_reference, summarize
from rlhf.stages.dpo_reward import reward_files
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


@dataclass
class Data:
    source: ModelSource
    reference_source: ModelSource | None
    """The frozen reference's model; None = the policy without its adapters, or no reference."""
    tokenizer: Tokenizer
    train_set: list
    """PairExample rows, or UnpairedExample rows for kto."""
    train_stats: TruncationStats
    eval_set: list
    eval_stats: TruncationStats | None
    batches: ShuffledBatches
    eval_prompts: list[list[int]]
    """Held-out prompts whose sampled answers give the KL to the reference."""
    oracle_texts: list[str]
    """The same prompts as text on the embedded default, for the oracle; empty elsewhere."""


@dataclass(frozen=True)
class DPOContext:
    """What every step and evaluation of a run reads, built once in main (after the reference's log-probs)."""

    engine: TrainEngine[CausalLM]
    reference: Reference
    data: Data
    cfg: DPOConfig
    sampling: Sampling
    dist: Dist
    keeper: RunKeeper


def main(run: Run[DPOConfig]) -> None:
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
        check_packing_supported(inner_model(reference.model).config)
    sampling = Sampling(pad_id=data.tokenizer.pad_token_id, eos_id=data.tokenizer.eos_token_id,
                        max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature,
                        zero3_engine=engine if cfg.engine.zero_stage == 3 else None, device=dist.device)

    # 4. Reference log-probs of every row, once; the frozen copy is let go unless eval.kl needs it.
    if cfg.dpo.precompute_reference:
        reference.train_logps = precompute_reference(engine, reference, data.train_set, cfg, data.tokenizer, dist)
        reference.eval_logps = precompute_reference(engine, reference, data.eval_set, cfg, data.tokenizer, dist)
        if not cfg.eval.kl:
            reference.model = None

    # 5. Resume, or measure the starting (SFT) policy: the baseline every later figure is read against.
    keeper = RunKeeper(run, engine, dist, headline=HEADLINE)
    ctx = DPOContext(engine, reference, data, cfg, sampling, dist, keeper)
    state = keeper.resume(LoopState())
    if state.step == 0:
        keeper.record_baseline(state, evaluate(ctx))
    keeper.print(describe(cfg, data, dist))

    # 6. Train.
    metrics = train(ctx, state)

    # 7. Final evaluation, the save_pretrained folder, the registry entry (parents: the starting
    #    model's entry, and a named reference's).
    final_eval = evaluate(ctx)
    keeper.log(state.step, final_eval)
    reference_parents = data.reference_source.parents if data.reference_source is not None else ()
    extra_files = reward_files(engine, ctx.reference, cfg, dist, reference_source=data.reference_source or data.source,
                               train_set=data.train_set, tokenizer=data.tokenizer)
    keeper.publish_model(engine, source=data.source, model_cfg=cfg.model, tokenizer=data.tokenizer, extra_files=extra_files,
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


def build_policy(cfg: DPOConfig, data: Data) -> TrainEngine[CausalLM]:
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


@torch.no_grad()
def heldout_preferences(ctx: DPOContext) -> dict[str, float]:
    """The loss and its implicit-reward metrics on the held-out rows (all ranks)."""
    engine, reference, data, cfg, dist = ctx.engine, ctx.reference, ctx.data, ctx.cfg, ctx.dist
    indices, real = even_shard(list(range(len(data.eval_set))), dist=dist)
    sums = RankSums(SUMS, dist.device)
    for start in range(0, len(indices), cfg.eval.batch_size):
        batch = make_batch(data.eval_set, indices[start : start + cfg.eval.batch_size], cfg, data.tokenizer, dist, reference.eval_logps)
        _, stats = batch_loss(engine, reference, batch, cfg, dist)
        # Rows added only to keep the ranks in step count for nothing.
        add_stats(sums, stats, keep=torch.tensor(real[start : start + cfg.eval.batch_size], device=dist.device))
    return summarize(sums.over_ranks(), cfg.dpo.loss)


@torch.no_grad()
def heldout_kl(ctx: DPOContext) -> dict[str, float]:
    """As `rlhf.stages.ppo` measures it: sample an answer to each held-out prompt, score it under the
    policy and the reference at the sampling temperature, and average sum_t (log pi - log pi_ref)
    over the answer's tokens per response (the k1 estimate of KL(policy || reference))."""
    engine, reference, data, cfg, sampling, dist = ctx.engine, ctx.reference, ctx.data, ctx.cfg, ctx.sampling, ctx.dist
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
def evaluate(ctx: DPOContext) -> dict[str, float]:
    """Held-out loss, reward accuracy and margin; the KL to the reference of sampled answers
    (eval.kl); on the embedded default the oracle's score (0-100) of sampled and greedy answers."""
    engine, data, cfg = ctx.engine, ctx.data, ctx.cfg
    engine.eval()
    metrics: dict[str, float] = {}
    if data.eval_set:
        metrics.update({f"eval/{k}": v for k, v in heldout_preferences(ctx).items()})
    if cfg.eval.kl and data.eval_prompts and ctx.reference.available:
        metrics.update(heldout_kl(ctx))
    if data.oracle_texts:
        oracle = oracle_eval(engine.module, data.tokenizer, data.oracle_texts, batch_size=cfg.eval.batch_size, sampling=ctx.sampling,
                             dist=ctx.dist)
        metrics.update({f"eval/{k}": v for k, v in oracle.items()})
    engine.train()
    return metrics


def train(ctx: DPOContext, state: LoopState) -> dict[str, float]:
    """Optimizer steps up to train.max_steps; returns the last step's metrics (none when resumed at the end)."""
    engine, keeper = ctx.engine, ctx.keeper
    engine.train()
    metrics: dict[str, float] = {}
    window_rows, window_start = 0, time.time()
    while state.step < ctx.cfg.train.max_steps:
        metrics, rows = train_step(ctx, step=state.step)
        state.step += 1
        window_rows += rows
        logged = None
        if keeper.should_log(state.step):
            logged = {**metrics, "lr": engine.get_lr()[0], "grad_norm": global_grad_norm(engine),
                      "rows_per_s": window_rows / max(time.time() - window_start, 1e-9)}
            window_rows, window_start = 0, time.time()
        keeper.finish_step(state, loss=metrics["loss"], metrics=logged, evaluate=lambda: evaluate(ctx))
    return metrics


def train_step(ctx: DPOContext, *, step: int) -> tuple[dict[str, float], int]:
    """One optimizer step over `engine.grad_accum` micro-batches: the metrics over every rank, and
    the rows every rank trained on. Every rank holds the same number of rows per micro-batch, so
    the per-rank mean loss, averaged by DeepSpeed over ranks and micro-batches, is the global mean."""
    engine, reference, data, cfg, dist = ctx.engine, ctx.reference, ctx.data, ctx.cfg, ctx.dist
    accum = cfg.engine.grad_accum
    sums = RankSums(SUMS, dist.device)
    rows = 0
    for m in range(accum):
        indices = data.batches.global_batch(step * accum + m)[dist.rank]
        batch = make_batch(data.train_set, indices, cfg, data.tokenizer, dist, reference.train_logps)
        loss, stats = batch_loss(engine, reference, batch, cfg, dist)
        engine.backward(loss)
        engine.step()
        add_stats(sums, stats)
        rows += len(indices) * dist.world_size
    return summarize(sums.over_ranks(), cfg.dpo.loss), rows


if __name__ == "__main__":
    stage_entrypoint("dpo", main)
