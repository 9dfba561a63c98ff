"""Stage 1 of InstructGPT: supervised fine-tuning on demonstrations.

The loss is the causal LM loss on response tokens only: prompt tokens are context, never
targets. Every counted token of a global batch weighs the same, whatever rank it lands on.

Run it with `rlhf sft` (any number of ranks), or alone: `python stages/sft.py --config FILE`.
"""

from __future__ import annotations

import math
import time

import torch

from rlhf.algos.lm import masked_lm_loss
from rlhf.config import SFTConfig, to_dict
from rlhf.data.collate import collate_sft
from rlhf.data.load import sft_examples
from rlhf.data.sampler import ShuffledBatches
from rlhf.engine import (
    build_engine,
    deepspeed_config,
    full_state_dict,
    init_distributed,
    PRECISION_DTYPES,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)
from rlhf.errors import UserError
from rlhf.evaluation import heldout_loss, oracle_eval
from rlhf.models import (
    base_model_identity,
    check_causal_lm,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
    save_final,
    tokenizer_fingerprint,
)
from rlhf.registry import Entry, now_iso
from rlhf.runs import Run, stage_entrypoint
from rlhf.toy import TOY, ToyTask
from rlhf.tracking import Tracker

def main(run: Run) -> None:
    cfg: SFTConfig = run.config
    started = time.time()

    # 1. Ranks and seeds: each rank samples from its own stream (the toy model's initial weights
    #    come from their own seed, and DeepSpeed broadcasts rank 0's weights anyway).
    dist = init_distributed()
    seed_everything(cfg.train.seed, rank=dist.rank)

    # 2. Tokenizer and data: prompt tokens masked out of the loss, truncation counted.
    source = resolve_model(cfg.model.name_or_path, run.registry)
    check_causal_lm(source)
    tokenizer = load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code, name_or_path=cfg.model.tokenizer)
    train_set, train_stats = sft_examples(cfg.data.train, split="train", tokenizer=tokenizer, data=cfg.data, key="data.train")
    eval_set, eval_stats = [], None
    if cfg.data.eval:
        eval_set, eval_stats = sft_examples(cfg.data.eval, split="eval", tokenizer=tokenizer, data=cfg.data, key="data.eval")
        if cfg.eval.max_rows:
            eval_set = eval_set[: cfg.eval.max_rows]
    global_batch = cfg.engine.micro_batch_size * dist.world_size
    if len(train_set) < global_batch:
        raise UserError(
            f"data.train has {len(train_set)} usable rows, fewer than one global batch of {global_batch} "
            "(engine.micro_batch_size x ranks); add data or lower engine.micro_batch_size"
        )
    batches = ShuffledBatches(len(train_set), batch_size=cfg.engine.micro_batch_size, world_size=dist.world_size, seed=cfg.train.seed)
    # On the embedded default the oracle grades generations from held-out prompts.
    oracle_prompts = [row["prompt"] for row in ToyTask(cfg.data.toy).prompts("eval")] if cfg.data.train == TOY else []
    if cfg.eval.max_rows:
        oracle_prompts = oracle_prompts[: cfg.eval.max_rows]

    # 3. Model and engine.
    zero3 = cfg.engine.zero_stage == 3
    model = load_causal_lm(
        source, cfg.model, tokenizer, seed=cfg.train.seed, dtype=PRECISION_DTYPES[cfg.engine.precision],
        zero3_config=deepspeed_config(cfg.engine, cfg.optim) if zero3 else None,
    )
    engine = build_engine(model, engine=cfg.engine, optim=cfg.optim, total_steps=cfg.train.max_steps)

    def evaluate() -> dict[str, float]:
        metrics: dict[str, float] = {}
        if eval_set:
            metrics["eval/loss"] = heldout_loss(engine, eval_set, batch_size=cfg.eval.batch_size, pad_id=tokenizer.pad_token_id, dist=dist)
        if oracle_prompts:
            scores = oracle_eval(
                engine.module, tokenizer, oracle_prompts, batch_size=cfg.eval.batch_size,
                max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature, zero3=zero3, dist=dist,
            )
            metrics.update({f"eval/{k}": v for k, v in scores.items()})
        return metrics

    # 4. Resume from the last complete checkpoint of this run, if any.
    state = load_checkpoint(engine, run.checkpoint_dir, dist=dist) or {"step": 0}
    step = state["step"]
    tracker = Tracker(
        run.run_dir, active=dist.is_main, tracking=cfg.tracking, config=to_dict(cfg), run_id=run.run_id,
        total_steps=cfg.train.max_steps, start_step=step, description=f"sft {run.run_id}",
    )
    if step:
        tracker.print(f"resumed {run.run_id} at step {step}")
    else:
        # The untrained model's figures, the baseline every later score is read against.
        state["initial_eval"] = evaluate()
        tracker.log(0, state["initial_eval"])
    tracker.print(
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
        if not math.isfinite(step_loss.item()):
            raise UserError(
                f"the training loss became {step_loss.item()} at step {step}; the run stopped. Lower optim.lr, "
                "or use engine.precision=bf16/fp32 instead of fp16, and start a new run"
            )
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            elapsed = max(time.time() - window_start, 1e-9)
            tracker.log(step, {
                "loss": step_loss.item(),
                "lr": engine.get_lr()[0],
                "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "tokens_per_s": window_tokens / elapsed,
            })
            window_tokens, window_start = 0, time.time()
        else:
            tracker.advance(step)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
            tracker.log(step, evaluate())
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.max_steps:
            state["step"] = step
            save_checkpoint(engine, run.checkpoint_dir, step=step, client_state=state, keep=cfg.train.keep_checkpoints, dist=dist)

    # 6. Final evaluation, the save_pretrained folder, and the registry entry (in that order,
    #    so an entry only ever points at a complete folder).
    final_eval = evaluate()
    tracker.log(step, final_eval)
    weights = full_state_dict(engine, dist=dist)
    if dist.is_main:
        adapter = save_final(engine.module, weights, tokenizer, run.final_dir, lora=cfg.model.lora)
        metrics = {
            "train_loss": step_loss.item(),
            **{k.removeprefix("eval/"): v for k, v in final_eval.items()},
            **{f"initial_{k.removeprefix('eval/')}": v for k, v in state.get("initial_eval", {}).items()},
            "steps": step,
            "train_rows": len(train_set),
            "truncated_responses": train_stats.truncated_responses,
            "skipped_long_prompts": train_stats.skipped_long_prompts,
            "eval_truncated_responses": eval_stats.truncated_responses if eval_stats else 0,
            "wall_time_s": round(time.time() - started, 1),
        }
        entry = run.registry.publish(Entry(
            id=run.run_id, stage="sft", status="completed", created=now_iso(), path=str(run.final_dir),
            run_dir=str(run.run_dir), config=to_dict(cfg), parents=source.parents,
            base_model=base_model_identity(source, cfg.model),
            tokenizer=tokenizer_fingerprint(tokenizer), metrics=metrics, adapter=adapter, tags=tuple(cfg.run.tags),
        ))
        tracker.print(f"[green]sft finished[/]: {entry.id} -> {entry.path}")
        tracker.print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    tracker.close()
    torch.distributed.barrier()


if __name__ == "__main__":
    stage_entrypoint("sft", main)
