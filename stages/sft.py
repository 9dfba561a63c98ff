"""Stage 1 of InstructGPT: supervised fine-tuning on demonstrations.

The loss is the causal LM loss on response tokens only: prompt tokens are context, never
targets. Every counted token of a global batch weighs the same, whatever rank it lands on.

Run it with `rlhf sft` (any number of ranks), or alone: `python stages/sft.py --config FILE`.
"""

from __future__ import annotations

import time

import torch

from rlhf.algos.lm import masked_lm_loss
from rlhf.config import SFTConfig
from rlhf.data.collate import collate_sft
from rlhf.data.load import stage_datasets
from rlhf.data.sampler import ShuffledBatches
from rlhf.engine import (
    PRECISION_DTYPES,
    build_engine,
    deepspeed_config,
    full_state_dict,
    global_grad_norm,
    init_distributed,
    seed_everything,
    zero3_partitioning,
)
from rlhf.evaluation import heldout_loss, oracle_eval
from rlhf.model_loading import load_causal_lm
from rlhf.model_saving import save_final
from rlhf.model_sources import causal_lm_and_tokenizer
from rlhf.rollout import Sampling
from rlhf.runs import Run, stage_entrypoint
from rlhf.toy import TOY, ToyTask
from rlhf.training import StageLoop


def main(run: Run) -> None:
    cfg: SFTConfig = run.config

    # 1. Ranks and seeds: each rank samples from its own stream (the toy model's initial weights
    #    come from their own seed, and DeepSpeed broadcasts rank 0's weights anyway).
    dist = init_distributed()
    seed_everything(cfg.train.seed, rank=dist.rank)

    # 2. Tokenizer and data: prompt tokens masked out of the loss, truncation counted.
    source, tokenizer = causal_lm_and_tokenizer(cfg.model, run.registry)
    train_set, train_stats, eval_set, eval_stats = stage_datasets("sft", cfg, tokenizer, world_size=dist.world_size)
    batches = ShuffledBatches(len(train_set), batch_size=cfg.engine.micro_batch_size, world_size=dist.world_size, seed=cfg.train.seed)
    # On the embedded default the oracle grades generations from held-out prompts.
    oracle_prompts = [row["prompt"] for row in ToyTask(cfg.data.toy).prompts("eval")] if cfg.data.train == TOY else []
    if cfg.eval.max_rows:
        oracle_prompts = oracle_prompts[: cfg.eval.max_rows]

    # 3. Model and engine.
    zero3 = cfg.engine.zero_stage == 3
    model = load_causal_lm(
        source, cfg.model, tokenizer, seed=cfg.train.seed, dtype=PRECISION_DTYPES[cfg.engine.precision],
        partitioning=zero3_partitioning(deepspeed_config(cfg.engine, cfg.optim) if zero3 else None),
    )
    engine = build_engine(model, engine=cfg.engine, optim=cfg.optim, total_steps=cfg.train.max_steps)
    sampling = Sampling(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=cfg.eval.max_new_tokens,
                        temperature=cfg.eval.temperature, zero3_engine=engine if zero3 else None, device=dist.device)

    def evaluate() -> dict[str, float]:
        metrics: dict[str, float] = {}
        if eval_set:
            metrics["eval/loss"] = heldout_loss(engine, eval_set, batch_size=cfg.eval.batch_size, pad_id=tokenizer.pad_token_id, dist=dist)
        if oracle_prompts:
            scores = oracle_eval(engine.module, tokenizer, oracle_prompts, batch_size=cfg.eval.batch_size, sampling=sampling, dist=dist)
            metrics.update({f"eval/{k}": v for k, v in scores.items()})
        return metrics

    # 4. Resume from the last complete checkpoint of this run, or measure the untrained baseline.
    loop = StageLoop(run, engine, dist, evaluate=evaluate)
    step = loop.step
    loop.tracker.print(
        f"sft: {len(train_set)} training rows ({train_stats.truncated_responses} responses truncated, "
        f"{train_stats.skipped_long_prompts} long prompts skipped), {dist.world_size} rank(s), ZeRO-{cfg.engine.zero_stage}"
    )

    # 5. Train.
    engine.train()
    accum = cfg.engine.grad_accum
    window_tokens, window_start = 0, time.time()
    while step < cfg.train.max_steps:
        # Every rank knows the whole step's batches, so the global token count needs no collective.
        micro = [batches.global_batch(step * accum + m) for m in range(accum)]
        global_tokens = sum(train_set[i].num_targets for ranks in micro for rows in ranks for i in rows)
        # DeepSpeed averages gradients over ranks and accumulation steps; undo that so the
        # loss is the plain mean over every counted token of the global batch.
        scale = global_tokens / (dist.world_size * accum)
        step_loss = torch.zeros((), dtype=torch.float64, device=dist.device)
        for ranks in micro:
            batch = collate_sft([train_set[i] for i in ranks[dist.rank]], pad_id=tokenizer.pad_token_id)
            batch = {k: v.to(dist.device) for k, v in batch.items()}
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = masked_lm_loss(logits=logits, input_ids=batch["input_ids"], response_mask=batch["response_mask"], num_tokens=scale)
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().double() / (dist.world_size * accum)
            window_tokens += int(batch["attention_mask"].sum()) * dist.world_size
        step += 1
        torch.distributed.all_reduce(step_loss)
        metrics = None
        if loop.should_log(step):
            metrics = {
                "loss": step_loss.item(),
                "lr": engine.get_lr()[0],
                "grad_norm": global_grad_norm(engine),
                "tokens_per_s": window_tokens / max(time.time() - window_start, 1e-9),
            }
            window_tokens, window_start = 0, time.time()
        loop.end_step(step, step_loss.item(), metrics)

    # 6. Final evaluation, the save_pretrained folder, and the registry entry (in that order,
    #    so an entry only ever points at a complete folder).
    final_eval = evaluate()
    loop.tracker.log(step, final_eval)
    weights = full_state_dict(engine, dist=dist)
    adapter = "none"
    if dist.is_main:
        adapter = save_final(engine.module, weights, tokenizer, run.final_dir, lora=cfg.model.lora)
    loop.publish(source=source, tokenizer=tokenizer, adapter=adapter, metrics={
        "train_loss": step_loss.item(),
        **loop.summary(final_eval),
        "steps": step,
        "train_rows": len(train_set),
        "truncated_responses": train_stats.truncated_responses,
        "skipped_long_prompts": train_stats.skipped_long_prompts,
        "eval_truncated_responses": eval_stats.truncated_responses if eval_stats else 0,
    })


if __name__ == "__main__":
    stage_entrypoint("sft", main)
