"""Stage 2 of InstructGPT: a reward model trained on human comparisons.

A causal LM backbone (the SFT model by default) with a scalar head; a sequence's reward is the
head's output at its last real token. The loss is Bradley-Terry, -log sigmoid(r_better - r_worse):
a prompt ranked over K responses gives all K(K-1)/2 pairs in one batch, each response scored once,
and every prompt weighs the same whatever its K. At the end the rewards of training responses
give the mean and std PPO normalizes scores with.

Run it with `rlhf rm` (any number of ranks), or alone: `python stages/rm.py --config FILE`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import torch

from rlhf.algos.reward import bradley_terry_loss, sequence_rewards
from rlhf.config import RMConfig, to_dict
from rlhf.data.collate import collate_rm
from rlhf.data.load import rm_examples
from rlhf.data.sampler import ShuffledBatches
from rlhf.engine import (
    PRECISION_DTYPES,
    build_engine,
    deepspeed_config,
    full_state_dict,
    init_distributed,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)
from rlhf.errors import UserError
from rlhf.evaluation import preference_eval
from rlhf.models import (
    REWARD_STATS_FILE,
    base_model_identity,
    check_causal_lm,
    load_scalar_model,
    load_tokenizer,
    resolve_model,
    save_final,
    tokenizer_fingerprint,
)
from rlhf.registry import Entry, now_iso
from rlhf.runs import Run, stage_entrypoint
from rlhf.toy import TOY
from rlhf.tracking import Tracker

ORACLE_PAIRS = 1000  # fresh held-out pairs for the oracle agreement: +-1% standard error at 90%

def main(run: Run) -> None:
    cfg: RMConfig = run.config
    started = time.time()

    # 1. Ranks and seeds.
    dist = init_distributed()
    seed_everything(cfg.train.seed, rank=dist.rank)

    # 2. Backbone, tokenizer (the parent's own) and preference data.
    source = resolve_model(cfg.model.name_or_path, run.registry)
    check_causal_lm(source)
    tokenizer = load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code, name_or_path=cfg.model.tokenizer)
    train_set, train_stats = rm_examples(cfg.data.train, split="train", tokenizer=tokenizer, data=cfg.data, key="data.train")
    eval_set, eval_stats = [], None
    if cfg.data.eval:
        eval_set, eval_stats = rm_examples(cfg.data.eval, split="eval", tokenizer=tokenizer, data=cfg.data, key="data.eval")
        if cfg.eval.max_rows:
            eval_set = eval_set[: cfg.eval.max_rows]
    # On the embedded default, pairs of held-out prompts drawn apart from every data file: the
    # oracle's verdict on them is the ground truth the RM is measured against.
    oracle_set = []
    if cfg.data.train == TOY:
        fresh = dataclasses.replace(cfg.data, toy=dataclasses.replace(cfg.data.toy, eval_size=ORACLE_PAIRS))
        oracle_set, _ = rm_examples(TOY, split="eval", tokenizer=tokenizer, data=fresh, key="data.toy", toy_kind="fresh_comparisons")
    global_batch = cfg.engine.micro_batch_size * dist.world_size
    if len(train_set) < global_batch:
        raise UserError(
            f"data.train has {len(train_set)} usable rows, fewer than one global batch of {global_batch} "
            "(engine.micro_batch_size x ranks); add data or lower engine.micro_batch_size"
        )
    batches = ShuffledBatches(len(train_set), batch_size=cfg.engine.micro_batch_size, world_size=dist.world_size, seed=cfg.train.seed)

    # 3. Model (backbone + new scalar head) and engine.
    zero3 = cfg.engine.zero_stage == 3
    model = load_scalar_model(
        source, cfg.model, tokenizer, seed=cfg.train.seed, dtype=PRECISION_DTYPES[cfg.engine.precision],
        zero3_config=deepspeed_config(cfg.engine, cfg.optim) if zero3 else None,
    )
    engine = build_engine(model, engine=cfg.engine, optim=cfg.optim, total_steps=cfg.train.max_steps)
    pad_id = tokenizer.pad_token_id

    def evaluate() -> dict[str, float]:
        metrics: dict[str, float] = {}
        if eval_set:
            scores = preference_eval(engine, eval_set, batch_size=cfg.eval.batch_size, pad_id=pad_id, dist=dist)
            metrics.update({f"eval/{k}": v for k, v in scores.items()})
        if oracle_set:
            scores = preference_eval(engine, oracle_set, batch_size=cfg.eval.batch_size, pad_id=pad_id, dist=dist)
            metrics["eval/oracle_agreement"] = scores["accuracy"]
        return metrics

    # 4. Resume from the last complete checkpoint of this run, if any.
    state = load_checkpoint(engine, run.checkpoint_dir, dist=dist) or {"step": 0}
    step = state["step"]
    tracker = Tracker(
        run.run_dir, active=dist.is_main, tracking=cfg.tracking, config=to_dict(cfg), run_id=run.run_id,
        total_steps=cfg.train.max_steps, start_step=step, description=f"rm {run.run_id}",
        headline=("loss", "accuracy", "eval/accuracy", "eval/oracle_agreement", "lr"),
    )
    if step:
        tracker.print(f"resumed {run.run_id} at step {step}")
    else:
        state["initial_eval"] = evaluate()
        tracker.log(0, state["initial_eval"])
    tracker.print(
        f"rm: {len(train_set)} training prompts, {sum(len(g.pairs) for g in train_set)} pairs "
        f"({train_stats.identical_pairs} identical pairs dropped, {train_stats.truncated_responses} responses truncated, "
        f"{train_stats.skipped_long_prompts} long prompts skipped), {dist.world_size} rank(s), ZeRO-{cfg.engine.zero_stage}"
    )

    # 5. Train. Every rank holds the same number of prompts per micro-batch, so the per-rank
    #    mean over prompts, averaged by DeepSpeed over ranks and micro-batches, is the global mean.
    engine.train()
    accum = cfg.engine.grad_accum
    window_seqs, window_start = 0, time.time()
    while step < cfg.train.max_steps:
        # loss, correct pairs, pairs, sum of reward gaps: summed over micro-batches and ranks
        totals = torch.zeros(4, dtype=torch.float64, device=dist.device)
        for m in range(accum):
            rows = batches.global_batch(step * accum + m)[dist.rank]
            batch = {k: v.to(dist.device) for k, v in collate_rm([train_set[i] for i in rows], pad_id=pad_id).items()}
            rewards = sequence_rewards(engine(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
            loss = bradley_terry_loss(rewards, batch["better"], batch["worse"], batch["weights"], batch["margins"])
            engine.backward(loss)
            engine.step()
            gap = (rewards[batch["better"]] - rewards[batch["worse"]]).detach().double()
            totals += torch.stack([loss.detach().double() / (dist.world_size * accum), (gap > 0).sum(), gap.new_tensor(len(gap)), gap.sum()])
            window_seqs += batch["input_ids"].shape[0] * dist.world_size
        step += 1
        torch.distributed.all_reduce(totals)
        step_loss, correct, pairs, gap_sum = totals.tolist()
        if not math.isfinite(step_loss):
            raise UserError(
                f"the training loss became {step_loss} at step {step}; the run stopped. Lower optim.lr, "
                "or use engine.precision=bf16/fp32 instead of fp16, and start a new run"
            )
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            elapsed = max(time.time() - window_start, 1e-9)
            tracker.log(step, {
                "loss": step_loss,
                "accuracy": correct / pairs,
                "margin": gap_sum / pairs,
                "lr": engine.get_lr()[0],
                "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "sequences_per_s": window_seqs / elapsed,
            })
            window_seqs, window_start = 0, time.time()
        else:
            tracker.advance(step)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
            tracker.log(step, evaluate())
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.max_steps:
            state["step"] = step
            save_checkpoint(engine, run.checkpoint_dir, step=step, client_state=state, keep=cfg.train.keep_checkpoints, dist=dist)

    # 6. Final evaluation; the reward statistics on training responses (PPO's normalization);
    #    the save_pretrained folder; the registry entry (in that order).
    final_eval = evaluate()
    stats_rows = train_set[: cfg.eval.reward_stats_rows] if cfg.eval.reward_stats_rows else train_set
    on_train = preference_eval(engine, stats_rows, batch_size=cfg.eval.batch_size, pad_id=pad_id, dist=dist)
    reward_stats = {
        "mean": on_train["reward_mean"],
        "std": on_train["reward_std"],
        "measured_on": f"the responses of {len(stats_rows)} training rows",
        "reward_at": "the head's output at each sequence's last non-padding token",
    }
    tracker.log(step, {**final_eval, "train/reward_mean": reward_stats["mean"], "train/reward_std": reward_stats["std"], "train/accuracy": on_train["accuracy"]})
    weights = full_state_dict(engine, dist=dist)
    if dist.is_main:
        hf_weights = {name.removeprefix("model."): tensor for name, tensor in weights.items()}
        adapter = save_final(
            engine.module.model, hf_weights, tokenizer, run.final_dir, lora=cfg.model.lora,
            extra_files={REWARD_STATS_FILE: json.dumps(reward_stats, indent=2) + "\n"},
        )
        metrics = {
            "train_loss": step_loss,
            **{k.removeprefix("eval/"): v for k, v in final_eval.items()},
            **{f"initial_{k.removeprefix('eval/')}": v for k, v in state.get("initial_eval", {}).items()},
            "train_accuracy": on_train["accuracy"],
            "reward_mean": reward_stats["mean"],
            "reward_std": reward_stats["std"],
            "steps": step,
            "train_rows": len(train_set),
            "train_pairs": sum(len(g.pairs) for g in train_set),
            "identical_pairs": train_stats.identical_pairs,
            "truncated_responses": train_stats.truncated_responses,
            "skipped_long_prompts": train_stats.skipped_long_prompts,
            "eval_identical_pairs": eval_stats.identical_pairs if eval_stats else 0,
            "wall_time_s": round(time.time() - started, 1),
        }
        entry = run.registry.publish(Entry(
            id=run.run_id, stage="rm", status="completed", created=now_iso(), path=str(run.final_dir),
            run_dir=str(run.run_dir), config=to_dict(cfg), parents=source.parents,
            base_model=base_model_identity(source, cfg.model),
            tokenizer=tokenizer_fingerprint(tokenizer), metrics=metrics, adapter=adapter, tags=tuple(cfg.run.tags),
        ))
        tracker.print(f"[green]rm finished[/]: {entry.id} -> {entry.path}")
        tracker.print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    tracker.close()
    torch.distributed.barrier()


if __name__ == "__main__":
    stage_entrypoint("rm", main)
