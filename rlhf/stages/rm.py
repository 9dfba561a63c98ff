"""Stage 2 of InstructGPT: a reward model trained on human comparisons.

A causal LM backbone (the SFT model by default) with a scalar head; a sequence's reward is the
head's output at its last real token. The loss is Bradley-Terry, -log sigmoid(r_better - r_worse):
a prompt ranked over K responses gives all K(K-1)/2 pairs in one batch, each response scored once,
and every prompt weighs the same whatever its K. At the end the rewards of training responses
give the mean and std PPO normalizes scores with.

1. Ranks and seeds.  2. Backbone's tokenizer and preference data.  3. Model and engine.
4. Resume, or measure the untrained baseline.  5. Train.  6. Final evaluation, reward statistics,
the save_pretrained folder, the registry entry.

The step functions take the frozen `RMContext` (engine, data, config, ranks, keeper) built once in
`main`, and the `LoopState` a resume restores.

Run it with `rlhf rm` (any number of ranks), or alone: `python -m rlhf.stages.rm --config FILE`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any

import torch

from rlhf.algos.reward import bradley_terry_loss, sequence_rewards
from rlhf.config import RMConfig
from rlhf.data.collate import collate_rm
from rlhf.data.load import rm_examples, stage_datasets
from rlhf.data.packing import check_packing_supported, collate_packed_rm, packed_forward_inputs
from rlhf.data.sampler import ShuffledBatches
from rlhf.data.tokenize import RMExample, TruncationStats
from rlhf.models.loading import ScalarModel, load_scalar_model
from rlhf.models.sources import REWARD_STATS_FILE, ModelSource, causal_lm_and_tokenizer
from rlhf.protocols import Tokenizer, TrainEngine
from rlhf.store.runs import Run, stage_entrypoint
from rlhf.toy import TOY
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
from rlhf.training.evaluation import preference_eval
from rlhf.training.rank_sums import RankSums
from rlhf.training.run_keeper import LoopState, RunKeeper

ORACLE_PAIRS = 1000  # fresh held-out pairs for the oracle agreement: +-1% standard error at 90%
HEADLINE = ("loss", "accuracy", "eval/accuracy", "eval/oracle_agreement", "lr")


@dataclass
class Data:
    source: ModelSource
    tokenizer: Tokenizer
    train_set: list
    train_stats: TruncationStats
    eval_set: list
    eval_stats: TruncationStats | None
    batches: ShuffledBatches
    oracle_set: list
    """On the embedded default, pairs of held-out prompts drawn apart from every data file: the
    oracle's verdict on them is the ground truth the RM is measured against."""


@dataclass(frozen=True)
class RMContext:
    """One RM run's fixed parts, built once before the first step: what the step functions share."""

    engine: TrainEngine[ScalarModel]
    """The reward model's DeepSpeed engine (backbone and scalar head)."""
    data: Data
    cfg: RMConfig
    dist: Dist
    keeper: RunKeeper


def main(run: Run[RMConfig]) -> None:
    cfg: RMConfig = run.config

    # 1. Ranks and seeds.
    dist = init_distributed()
    seed_everything(cfg.train.seed, rank=dist.rank)

    # 2. Backbone, tokenizer (the parent's own) and preference data.
    data = load_data(cfg, run, dist)

    # 3. Model (backbone + new scalar head) and engine.
    engine = build_model(cfg, data)

    # 4. Resume from the last complete checkpoint of this run, or measure the untrained baseline.
    keeper = RunKeeper(run, engine, dist, headline=HEADLINE)
    ctx = RMContext(engine=engine, data=data, cfg=cfg, dist=dist, keeper=keeper)
    state = keeper.resume(LoopState())
    if state.step == 0:
        keeper.record_baseline(state, evaluate(ctx))
    keeper.print(
        f"rm: {len(data.train_set)} training prompts, {sum(len(g.pairs) for g in data.train_set)} pairs "
        f"({data.train_stats.identical_pairs} identical and {data.train_stats.tied_pairs} tied pairs dropped, "
        f"{data.train_stats.truncated_responses} responses truncated, "
        f"{data.train_stats.skipped_long_prompts} long prompts skipped), {dist.world_size} rank(s), ZeRO-{cfg.engine.zero_stage}"
    )

    # 5. Train.
    train_loss = train(ctx, state)

    # 6. Final evaluation; the reward statistics on training responses (PPO's normalization);
    #    the save_pretrained folder; the registry entry (in that order).
    publish(ctx, state, train_loss)
    keeper.close()


def publish(ctx: RMContext, state: LoopState, train_loss: float | None) -> None:
    """The final evaluation, the reward statistics on training responses, the save_pretrained folder
    (with those statistics beside the weights) and the registry entry."""
    engine, data, cfg, keeper = ctx.engine, ctx.data, ctx.cfg, ctx.keeper
    final_eval = evaluate(ctx)
    stats_rows = data.train_set[: cfg.eval.reward_stats_rows] if cfg.eval.reward_stats_rows else data.train_set
    on_train = preference_eval(engine, stats_rows, batch_size=cfg.eval.batch_size, pad_id=data.tokenizer.pad_token_id, dist=ctx.dist)
    reward_stats: dict[str, Any] = {  # a JSON record: measured floats and what they mean
        "mean": on_train["reward_mean"],
        "std": on_train["reward_std"],
        "measured_on": f"the responses of {len(stats_rows)} training rows",
        "reward_at": "the head's output at each sequence's last non-padding token",
    }
    keeper.log(state.step, {**final_eval, "train/reward_mean": reward_stats["mean"], "train/reward_std": reward_stats["std"],
                            "train/accuracy": on_train["accuracy"]})
    keeper.publish_model(engine, source=data.source, model_cfg=cfg.model, tokenizer=data.tokenizer,
                         extra_files={REWARD_STATS_FILE: json.dumps(reward_stats, indent=2) + "\n"}, metrics={
        "train_loss": train_loss,
        **keeper.summary(state, final_eval),
        "train_accuracy": on_train["accuracy"],
        "reward_mean": reward_stats["mean"],
        "reward_std": reward_stats["std"],
        "steps": state.step,
        "train_rows": len(data.train_set),
        "train_pairs": sum(len(g.pairs) for g in data.train_set),
        "identical_pairs": data.train_stats.identical_pairs,
        "truncated_responses": data.train_stats.truncated_responses,
        "skipped_long_prompts": data.train_stats.skipped_long_prompts,
        "eval_identical_pairs": data.eval_stats.identical_pairs if data.eval_stats else 0,
    })


def load_data(cfg: RMConfig, run: Run, dist: Dist) -> Data:
    source, tokenizer = causal_lm_and_tokenizer(cfg.model, run.registry)
    train_set, train_stats, eval_set, eval_stats = stage_datasets("rm", cfg, tokenizer, world_size=dist.world_size)
    oracle_set: list[RMExample] = []
    if TOY in (cfg.data.train, cfg.data.eval):  # the embedded default's task, also when trained on labeled samples of it
        fresh = dataclasses.replace(cfg.data, toy=dataclasses.replace(cfg.data.toy, eval_size=ORACLE_PAIRS))
        oracle_set, _ = rm_examples(TOY, split="eval", tokenizer=tokenizer, data=fresh, key="data.toy", toy_kind="fresh_comparisons")
    batches = ShuffledBatches(len(train_set), batch_size=cfg.engine.micro_batch_size, world_size=dist.world_size, seed=cfg.train.seed)
    return Data(source, tokenizer, train_set, train_stats, eval_set, eval_stats, batches, oracle_set)


def build_model(cfg: RMConfig, data: Data) -> TrainEngine[ScalarModel]:
    """The backbone with a new scalar head, as a DeepSpeed engine (partitioned as built under ZeRO-3)."""
    zero3 = cfg.engine.zero_stage == 3
    model = load_scalar_model(
        data.source, cfg.model, data.tokenizer, seed=cfg.train.seed, dtype=PRECISION_DTYPES[cfg.engine.precision],
        partitioning=zero3_partitioning(deepspeed_config(cfg.engine, cfg.optim) if zero3 else None),
    )
    if cfg.data.packing:
        check_packing_supported(model.hf_model.config)
    return build_engine(model, engine=cfg.engine, optim=cfg.optim, total_steps=cfg.train.max_steps)


def evaluate(ctx: RMContext) -> dict[str, float]:
    """Held-out pair accuracy and margins; on the embedded default the agreement with the oracle."""
    engine, data, cfg, dist = ctx.engine, ctx.data, ctx.cfg, ctx.dist
    metrics: dict[str, float] = {}
    pad_id = data.tokenizer.pad_token_id
    if data.eval_set:
        scores = preference_eval(engine, data.eval_set, batch_size=cfg.eval.batch_size, pad_id=pad_id, dist=dist)
        metrics.update({f"eval/{k}": v for k, v in scores.items()})
    if data.oracle_set:
        scores = preference_eval(engine, data.oracle_set, batch_size=cfg.eval.batch_size, pad_id=pad_id, dist=dist)
        metrics["eval/oracle_agreement"] = scores["accuracy"]
    return metrics


def train(ctx: RMContext, state: LoopState) -> float | None:
    """Optimizer steps up to train.max_steps; returns the last step's loss (None when resumed at the end)."""
    engine, keeper = ctx.engine, ctx.keeper
    engine.train()
    train_loss = None
    window_seqs, window_start = 0, time.time()
    while state.step < ctx.cfg.train.max_steps:
        total, sequences = train_step(ctx, step=state.step)
        state.step += 1
        train_loss = total["loss"]
        window_seqs += sequences
        metrics = None
        if keeper.should_log(state.step):
            metrics = {
                "loss": total["loss"],
                "accuracy": total["correct"] / total["pairs"],
                "margin": total["gap"] / total["pairs"],
                "lr": engine.get_lr()[0],
                "grad_norm": global_grad_norm(engine),
                "sequences_per_s": window_seqs / max(time.time() - window_start, 1e-9),
            }
            window_seqs, window_start = 0, time.time()
        keeper.finish_step(state, loss=total["loss"], metrics=metrics, evaluate=lambda: evaluate(ctx))
    return train_loss


def train_step(ctx: RMContext, *, step: int) -> tuple[dict[str, float], int]:
    """One optimizer step over `engine.grad_accum` micro-batches: loss, correct pairs, pairs and
    summed reward gap over every rank, and the sequences every rank scored. Every rank holds the
    same number of prompts per micro-batch, so the per-rank mean over prompts, averaged by DeepSpeed
    over ranks and micro-batches, is the global mean."""
    engine, data, cfg, dist = ctx.engine, ctx.data, ctx.cfg, ctx.dist
    accum = cfg.engine.grad_accum
    sums = RankSums(("loss", "correct", "pairs", "gap"), dist.device)
    sequences = 0
    for m in range(accum):
        rows = data.batches.global_batch(step * accum + m)[dist.rank]
        batch, rewards = micro_batch_rewards(engine, [data.train_set[i] for i in rows], pad_id=data.tokenizer.pad_token_id,
                                             packing_tokens=(cfg.data.packing_tokens or cfg.data.max_length) if cfg.data.packing else None,
                                             device=dist.device)
        loss = bradley_terry_loss(rewards, batch["better"], batch["worse"], batch["weights"], batch["margins"])
        engine.backward(loss)
        engine.step()
        gap = (rewards[batch["better"]] - rewards[batch["worse"]]).detach().double()
        sums.add(loss=loss.detach().double() / (dist.world_size * accum), correct=gap > 0, pairs=len(gap), gap=gap)
        sequences += len(rewards) * dist.world_size
    return sums.over_ranks(), sequences


def micro_batch_rewards(model: ScalarModel | TrainEngine[ScalarModel], groups: list[RMExample], *, pad_id: int, packing_tokens: int | None,
                        device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The batch (its pairs) and (N,) the reward of each of its N sequences, read at its last token.

    Unpacked: right-padded sequences with an attention mask. Packed (`packing_tokens` set): the
    sequences end to end in rows of at most `packing_tokens`, position ids restarting per sequence,
    and each reward read from the flattened (R * P) scores at the sequence's last token.
    """
    if packing_tokens is None:
        batch = {k: v.to(device) for k, v in collate_rm(groups, pad_id=pad_id).items()}
        return batch, sequence_rewards(model(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
    batch = {k: v.to(device) for k, v in collate_packed_rm(groups, pad_id=pad_id, capacity=packing_tokens).items()}
    scalar = model if isinstance(model, ScalarModel) else model.module  # the engine's module
    input_ids, inputs = packed_forward_inputs(scalar.hf_model.config, batch["input_ids"], batch["position_ids"],
                                              dtype=next(model.parameters()).dtype)
    scores = model(input_ids, inputs.get("attention_mask"), position_ids=inputs["position_ids"])  # (R, P), or (1, R * P)
    return batch, scores.flatten()[batch["last_index"]]


if __name__ == "__main__":
    stage_entrypoint("rm", main)
