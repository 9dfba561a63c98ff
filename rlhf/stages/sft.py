"""Stage 1 of InstructGPT: supervised fine-tuning on demonstrations.

The loss is the causal LM loss on response tokens only: prompt tokens are context, never
targets. Every counted token of a global batch weighs the same, whatever rank it lands on.

1. Ranks and seeds.  2. Tokenizer and data.  3. Model and engine.  4. Resume, or measure the
untrained baseline.  5. Train.  6. Final evaluation, the save_pretrained folder, the registry entry.

The step functions take the frozen `SFTContext` (engine, data, config, sampling, ranks, keeper) built
once in `main`, and the `LoopState` a resume restores.

Run it with `rlhf sft` (any number of ranks), or alone: `python -m rlhf.stages.sft --config FILE`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rlhf.algos.lm import masked_lm_loss
from rlhf.config import SFTConfig
from rlhf.data.collate import collate_sft
from rlhf.data.load import stage_datasets
from rlhf.data.packing import check_packing_supported, collate_packed_sft, packed_forward_inputs
from rlhf.data.sampler import ShuffledBatches
from rlhf.data.tokenize import SFTExample, TruncationStats
from rlhf.models.loading import load_causal_lm
from rlhf.models.sources import ModelSource, causal_lm_and_tokenizer
from rlhf.protocols import CausalLM, PolicyModel, Tokenizer, TrainEngine
from rlhf.rollouts.generation import Sampling
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
from rlhf.training.evaluation import heldout_loss, oracle_eval
from rlhf.training.run_keeper import LoopState, RunKeeper


@dataclass
class Data:
    source: ModelSource
    tokenizer: Tokenizer
    train_set: list
    train_stats: TruncationStats
    eval_set: list
    eval_stats: TruncationStats | None
    batches: ShuffledBatches
    oracle_prompts: list[str]
    """Held-out prompts the oracle grades generations of (the embedded default only)."""


@dataclass(frozen=True)
class SFTContext:
    """One SFT run's fixed parts, built once before the first step: what the step functions share."""

    engine: TrainEngine[CausalLM]
    """The policy's DeepSpeed engine."""
    data: Data
    cfg: SFTConfig
    sampling: Sampling
    """Generation settings of the oracle's held-out samples."""
    dist: Dist
    keeper: RunKeeper


def main(run: Run[SFTConfig]) -> None:
    cfg: SFTConfig = run.config

    # 1. Ranks and seeds: each rank samples from its own stream (the toy model's initial weights
    #    come from their own seed, and DeepSpeed broadcasts rank 0's weights anyway).
    dist = init_distributed()
    seed_everything(cfg.train.seed, rank=dist.rank)

    # 2. Tokenizer and data: prompt tokens masked out of the loss, truncation counted.
    data = load_data(cfg, run, dist)

    # 3. Model and engine.
    engine = build_model(cfg, data)
    sampling = Sampling(pad_id=data.tokenizer.pad_token_id, eos_id=data.tokenizer.eos_token_id,
                        max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature,
                        zero3_engine=engine if cfg.engine.zero_stage == 3 else None, device=dist.device)

    # 4. Resume from the last complete checkpoint of this run, or measure the untrained baseline.
    keeper = RunKeeper(run, engine, dist)
    ctx = SFTContext(engine=engine, data=data, cfg=cfg, sampling=sampling, dist=dist, keeper=keeper)
    state = keeper.resume(LoopState())
    if state.step == 0:
        keeper.record_baseline(state, evaluate(ctx))
    keeper.print(
        f"sft: {len(data.train_set)} training rows ({data.train_stats.truncated_responses} responses truncated, "
        f"{data.train_stats.skipped_long_prompts} long prompts skipped), {dist.world_size} rank(s), ZeRO-{cfg.engine.zero_stage}"
    )

    # 5. Train.
    train_loss = train(ctx, state)

    # 6. Final evaluation, the save_pretrained folder, and the registry entry (in that order,
    #    so an entry only ever points at a complete folder).
    final_eval = evaluate(ctx)
    keeper.log(state.step, final_eval)
    keeper.publish_model(engine, source=data.source, model_cfg=cfg.model, tokenizer=data.tokenizer, metrics={
        "train_loss": train_loss,
        **keeper.summary(state, final_eval),
        "steps": state.step,
        "train_rows": len(data.train_set),
        "truncated_responses": data.train_stats.truncated_responses,
        "skipped_long_prompts": data.train_stats.skipped_long_prompts,
        "eval_truncated_responses": data.eval_stats.truncated_responses if data.eval_stats else 0,
    })
    keeper.close()


def load_data(cfg: SFTConfig, run: Run, dist: Dist) -> Data:
    source, tokenizer = causal_lm_and_tokenizer(cfg.model, run.registry)
    train_set, train_stats, eval_set, eval_stats = stage_datasets("sft", cfg, tokenizer, world_size=dist.world_size)
    batches = ShuffledBatches(len(train_set), batch_size=cfg.engine.micro_batch_size, world_size=dist.world_size, seed=cfg.train.seed)
    oracle_prompts = [row["prompt"] for row in ToyTask(cfg.data.toy).prompts("eval")] if cfg.data.train == TOY else []
    if cfg.eval.max_rows:
        oracle_prompts = oracle_prompts[: cfg.eval.max_rows]
    return Data(source, tokenizer, train_set, train_stats, eval_set, eval_stats, batches, oracle_prompts)


def build_model(cfg: SFTConfig, data: Data) -> TrainEngine[CausalLM]:
    """The policy to train, as a DeepSpeed engine (partitioned as it is built under ZeRO-3)."""
    zero3 = cfg.engine.zero_stage == 3
    model = load_causal_lm(
        data.source, cfg.model, data.tokenizer, seed=cfg.train.seed, dtype=PRECISION_DTYPES[cfg.engine.precision],
        partitioning=zero3_partitioning(deepspeed_config(cfg.engine, cfg.optim) if zero3 else None),
    )
    if cfg.data.packing:
        check_packing_supported(model.config)
    return build_engine(model, engine=cfg.engine, optim=cfg.optim, total_steps=cfg.train.max_steps)


def evaluate(ctx: SFTContext) -> dict[str, float]:
    """Held-out loss; on the embedded default the oracle's score of sampled and greedy answers."""
    engine, data, cfg, dist = ctx.engine, ctx.data, ctx.cfg, ctx.dist
    metrics: dict[str, float] = {}
    if data.eval_set:
        metrics["eval/loss"] = heldout_loss(engine, data.eval_set, batch_size=cfg.eval.batch_size,
                                            pad_id=data.tokenizer.pad_token_id, dist=dist)
    if data.oracle_prompts:
        scores = oracle_eval(engine.module, data.tokenizer, data.oracle_prompts, batch_size=cfg.eval.batch_size,
                             sampling=ctx.sampling, dist=dist)
        metrics.update({f"eval/{k}": v for k, v in scores.items()})
    return metrics


def train(ctx: SFTContext, state: LoopState) -> float | None:
    """Optimizer steps up to train.max_steps; returns the last step's loss (None when resumed at the end)."""
    engine, keeper = ctx.engine, ctx.keeper
    engine.train()
    loss = None
    window_tokens, window_start = 0, time.time()
    while state.step < ctx.cfg.train.max_steps:
        loss, tokens = train_step(ctx, step=state.step)
        state.step += 1
        window_tokens += tokens
        metrics = None
        if keeper.should_log(state.step):
            metrics = {
                "loss": loss,
                "lr": engine.get_lr()[0],
                "grad_norm": global_grad_norm(engine),
                "tokens_per_s": window_tokens / max(time.time() - window_start, 1e-9),
            }
            window_tokens, window_start = 0, time.time()
        keeper.finish_step(state, loss=loss, metrics=metrics, evaluate=lambda: evaluate(ctx))
    return loss


def train_step(ctx: SFTContext, *, step: int) -> tuple[float, int]:
    """One optimizer step over `engine.grad_accum` micro-batches: the global mean loss over every
    counted token of the step's batches, and the tokens every rank processed."""
    engine, data, cfg, dist = ctx.engine, ctx.data, ctx.cfg, ctx.dist
    accum = cfg.engine.grad_accum
    # Every rank knows the whole step's batches, so the global token count needs no collective.
    micro = [data.batches.global_batch(step * accum + m) for m in range(accum)]
    global_tokens = sum(data.train_set[i].num_targets for ranks in micro for rows in ranks for i in rows)
    # DeepSpeed averages gradients over ranks and accumulation steps; undo that so the
    # loss is the plain mean over every counted token of the global batch.
    scale = global_tokens / (dist.world_size * accum)
    step_loss = torch.zeros((), dtype=torch.float64, device=dist.device)
    tokens = 0
    for ranks in micro:
        loss, rank_tokens = micro_batch_loss(engine, [data.train_set[i] for i in ranks[dist.rank]], pad_id=data.tokenizer.pad_token_id,
                                             packing_tokens=packing_capacity(cfg), num_tokens=scale, device=dist.device)
        engine.backward(loss)
        engine.step()
        step_loss += loss.detach().double() / (dist.world_size * accum)
        tokens += rank_tokens * dist.world_size
    torch.distributed.all_reduce(step_loss)
    return step_loss.item(), tokens


def packing_capacity(cfg: SFTConfig) -> int | None:
    """Tokens per packed row (None = packing off)."""
    if not cfg.data.packing:
        return None
    return cfg.data.packing_tokens or cfg.data.max_length


def micro_batch_loss(model: PolicyModel, rows: list[SFTExample], *, pad_id: int, packing_tokens: int | None, num_tokens: float,
                     device: torch.device) -> tuple[torch.Tensor, int]:
    """The summed response-token NLL of `rows` over `num_tokens`, and the real tokens the forward saw.

    Unpacked: right-padded rows with an attention mask. Packed (`packing_tokens` set): the same rows
    end to end in rows of at most `packing_tokens`, position ids restarting per row and no attention
    mask (transformers keeps attention inside each row); the sum, hence the loss, is the same.
    """
    if packing_tokens is None:
        batch = collate_sft(rows, pad_id=pad_id)
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        response_mask = batch["response_mask"].to(device)
        real_tokens = int(batch["attention_mask"].sum())
    else:
        batch = collate_packed_sft(rows, pad_id=pad_id, capacity=packing_tokens)
        config = model.module.config if hasattr(model, "module") else model.config
        input_ids, inputs = packed_forward_inputs(config, batch["input_ids"].to(device), batch["position_ids"].to(device),
                                                  dtype=next(model.parameters()).dtype)
        # No cache: transformers reads packed rows from the position ids only when there is none.
        logits = model(input_ids=input_ids, use_cache=False, **inputs).logits
        response_mask = batch["response_mask"].to(device).view_as(input_ids)
        real_tokens = int(batch["num_tokens"])
    loss = masked_lm_loss(logits=logits, input_ids=input_ids, response_mask=response_mask, num_tokens=num_tokens)
    return loss, real_tokens


if __name__ == "__main__":
    stage_entrypoint("sft", main)
