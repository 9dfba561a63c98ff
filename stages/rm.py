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
import time

from rlhf.algos.reward import bradley_terry_loss, sequence_rewards
from rlhf.config import RMConfig
from rlhf.data.collate import collate_rm
from rlhf.data.load import rm_examples, stage_datasets
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
from rlhf.evaluation import preference_eval
from rlhf.model_loading import load_scalar_model
from rlhf.model_saving import save_final
from rlhf.model_sources import REWARD_STATS_FILE, causal_lm_and_tokenizer
from rlhf.rank_sums import RankSums
from rlhf.runs import Run, stage_entrypoint
from rlhf.toy import TOY
from rlhf.training import StageLoop

ORACLE_PAIRS = 1000  # fresh held-out pairs for the oracle agreement: +-1% standard error at 90%


def main(run: Run) -> None:
    cfg: RMConfig = run.config

    # 1. Ranks and seeds.
    dist = init_distributed()
    seed_everything(cfg.train.seed, rank=dist.rank)

    # 2. Backbone, tokenizer (the parent's own) and preference data.
    source, tokenizer = causal_lm_and_tokenizer(cfg.model, run.registry)
    train_set, train_stats, eval_set, eval_stats = stage_datasets("rm", cfg, tokenizer, world_size=dist.world_size)
    # On the embedded default, pairs of held-out prompts drawn apart from every data file: the
    # oracle's verdict on them is the ground truth the RM is measured against.
    oracle_set = []
    if cfg.data.train == TOY:
        fresh = dataclasses.replace(cfg.data, toy=dataclasses.replace(cfg.data.toy, eval_size=ORACLE_PAIRS))
        oracle_set, _ = rm_examples(TOY, split="eval", tokenizer=tokenizer, data=fresh, key="data.toy", toy_kind="fresh_comparisons")
    batches = ShuffledBatches(len(train_set), batch_size=cfg.engine.micro_batch_size, world_size=dist.world_size, seed=cfg.train.seed)

    # 3. Model (backbone + new scalar head) and engine.
    zero3 = cfg.engine.zero_stage == 3
    model = load_scalar_model(
        source, cfg.model, tokenizer, seed=cfg.train.seed, dtype=PRECISION_DTYPES[cfg.engine.precision],
        partitioning=zero3_partitioning(deepspeed_config(cfg.engine, cfg.optim) if zero3 else None),
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

    # 4. Resume from the last complete checkpoint of this run, or measure the untrained baseline.
    loop = StageLoop(run, engine, dist, evaluate=evaluate, headline=("loss", "accuracy", "eval/accuracy", "eval/oracle_agreement", "lr"))
    step = loop.step
    loop.tracker.print(
        f"rm: {len(train_set)} training prompts, {sum(len(g.pairs) for g in train_set)} pairs "
        f"({train_stats.identical_pairs} identical pairs dropped, {train_stats.truncated_responses} responses truncated, "
        f"{train_stats.skipped_long_prompts} long prompts skipped), {dist.world_size} rank(s), ZeRO-{cfg.engine.zero_stage}"
    )

    # 5. Train. Every rank holds the same number of prompts per micro-batch, so the per-rank
    #    mean over prompts, averaged by DeepSpeed over ranks and micro-batches, is the global mean.
    engine.train()
    accum = cfg.engine.grad_accum
    window_seqs, window_start = 0, time.time()
    train_loss = None  # the last step's (none when resumed at the end)
    while step < cfg.train.max_steps:
        sums = RankSums(("loss", "correct", "pairs", "gap"), dist.device)  # over micro-batches and ranks
        for m in range(accum):
            rows = batches.global_batch(step * accum + m)[dist.rank]
            batch = {k: v.to(dist.device) for k, v in collate_rm([train_set[i] for i in rows], pad_id=pad_id).items()}
            rewards = sequence_rewards(engine(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
            loss = bradley_terry_loss(rewards, batch["better"], batch["worse"], batch["weights"], batch["margins"])
            engine.backward(loss)
            engine.step()
            gap = (rewards[batch["better"]] - rewards[batch["worse"]]).detach().double()
            sums.add(loss=loss.detach().double() / (dist.world_size * accum), correct=gap > 0, pairs=len(gap), gap=gap)
            window_seqs += batch["input_ids"].shape[0] * dist.world_size
        step += 1
        total = sums.over_ranks()
        train_loss = total["loss"]
        metrics = None
        if loop.should_log(step):
            metrics = {
                "loss": total["loss"],
                "accuracy": total["correct"] / total["pairs"],
                "margin": total["gap"] / total["pairs"],
                "lr": engine.get_lr()[0],
                "grad_norm": global_grad_norm(engine),
                "sequences_per_s": window_seqs / max(time.time() - window_start, 1e-9),
            }
            window_seqs, window_start = 0, time.time()
        loop.end_step(step, total["loss"], metrics)

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
    loop.tracker.log(step, {**final_eval, "train/reward_mean": reward_stats["mean"], "train/reward_std": reward_stats["std"],
                            "train/accuracy": on_train["accuracy"]})
    weights = full_state_dict(engine, dist=dist)
    adapter = "none"
    if dist.is_main:
        adapter = save_final(
            engine.module, weights, tokenizer, run.final_dir, lora=cfg.model.lora,
            extra_files={REWARD_STATS_FILE: json.dumps(reward_stats, indent=2) + "\n"},
        )
    loop.publish(source=source, tokenizer=tokenizer, adapter=adapter, metrics={
        "train_loss": train_loss,
        **loop.summary(final_eval),
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
    })


if __name__ == "__main__":
    stage_entrypoint("rm", main)
