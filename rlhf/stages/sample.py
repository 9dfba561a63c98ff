"""`rlhf sample`: K responses per prompt from a policy, for a labeler to rank (`rlhf label`).

InstructGPT's second step, and each round of Llama 2's: the reward model is trained on what the
current policy writes. Every row of the dataset keeps what made it: the prompt and its token ids,
each response's text, token ids, per-token log-probs under the sampling policy (at the sampling
temperature) and whether it ended by itself, and the shard's seed and rank; the entry's config
holds the sampling settings.

1. Ranks.  2. Tokenizer, prompts.  3. The policy.  4. The prompts, shard by shard (a shard on disk is
done: that is the resume).  5. The dataset folder and the registry entry (`samples:<id>`, parent: the policy's entry).

The functions after `main` take the frozen `SampleContext` (policy, tokenizer, config, sampling, ranks,
keeper) built once in `main`; a shard on disk is the only state.

Run it with `rlhf sample` (any number of ranks), or alone: `python -m rlhf.stages.sample --config FILE`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import torch

from rlhf.config import SampleConfig, to_dict
from rlhf.data.load import prompt_rows
from rlhf.errors import UserError
from rlhf.feedback.labelers import SAMPLES_MANIFEST as MANIFEST
from rlhf.models.loading import disable_dropout, load_causal_lm
from rlhf.models.sources import ModelSource, base_model_identity, causal_lm_and_tokenizer
from rlhf.models.tokenizer import tokenizer_fingerprint
from rlhf.protocols import PolicyModel, Tokenizer, inner_model
from rlhf.rollouts.generation import Sampling, sample_rollout_with_logprobs
from rlhf.store.entry import DATASET_FILES, Entry, now_iso
from rlhf.store.fileio import atomic_write_text
from rlhf.store.runs import Run, stage_entrypoint
from rlhf.training.engine import (
    PRECISION_DTYPES,
    Dist,
    build_frozen,
    frozen_zero3_config,
    init_distributed,
    seed_everything,
    zero3_partitioning,
)
from rlhf.training.evaluation import even_shard
from rlhf.training.shard_keeper import ShardKeeper

DATASET = DATASET_FILES["samples"]


@dataclass(frozen=True)
class SampleContext:
    """One sample run's fixed parts, built once before the first shard: what the functions share."""

    policy: PolicyModel
    """The frozen policy engine (dropout off)."""
    source: ModelSource
    """Where the policy came from: the entry's parent."""
    tokenizer: Tokenizer
    cfg: SampleConfig
    sampling: Sampling
    dist: Dist
    keeper: ShardKeeper
    """Metrics, progress and stops: shard by shard."""


def main(run: Run[SampleConfig]) -> None:
    cfg: SampleConfig = run.config
    started = time.time()
    dist = init_distributed()
    source, tokenizer = causal_lm_and_tokenizer(cfg.model, run.registry)
    rows, _ = prompt_rows(cfg.data.train, split="train", tokenizer=tokenizer, data=cfg.data, key="data.train")
    rows = rows[: cfg.data.max_prompts or None]
    if not rows:
        raise UserError(f"data.train={cfg.data.train} has no prompt to sample for (all longer than data.max_prompt_length?)")
    policy = build_policy(cfg, source, tokenizer, dist)
    s = cfg.sampling
    sampling = Sampling(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=s.max_new_tokens,
                        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                        zero3_engine=policy if cfg.engine.zero_stage == 3 else None, device=dist.device)
    shards = [rows[i : i + s.shard_prompts] for i in range(0, len(rows), s.shard_prompts)]
    keeper = ShardKeeper(run, dist, shards=len(shards), headline=("ended",))
    ctx = SampleContext(policy=policy, source=source, tokenizer=tokenizer, cfg=cfg, sampling=sampling, dist=dist, keeper=keeper)
    done = keeper.resume()
    if done:
        keeper.print(f"resumed {run.run_id} at shard {done} of {len(shards)}")
    keeper.print(f"sample: {s.k} responses for each of {len(rows)} prompts in {len(shards)} shard(s), {dist.world_size} rank(s)")
    for index in range(done, len(shards)):
        keeper.finish_shard(index, write_shard(ctx, index, shards[index]))
    if dist.is_main:
        publish(ctx, len(shards), time.time() - started)
    keeper.close()


def build_policy(cfg: SampleConfig, source: ModelSource, tokenizer: Tokenizer, dist: Dist) -> PolicyModel:
    engine = cfg.engine
    policy = load_causal_lm(source, cfg.model, tokenizer, seed=cfg.sampling.seed, dtype=PRECISION_DTYPES[engine.precision],
                            partitioning=zero3_partitioning(frozen_zero3_config(engine, False)))
    disable_dropout(policy)
    return build_frozen(policy, engine=engine, offload=False, dist=dist)


def write_shard(ctx: SampleContext, index: int, shard: list) -> dict[str, float]:
    """The shard's rows in prompt order, written whole by rank 0 (by rename), from the shard's own seed;
    returns its metrics (the fraction of responses that ended by themselves)."""
    dist = ctx.dist
    seed = ctx.cfg.sampling.seed + index
    seed_everything(seed, rank=dist.rank)  # resuming redraws what an uninterrupted run drew
    share, real = even_shard(shard, dist=dist)
    rows = [(dist.rank + i * dist.world_size, row) for i, row in enumerate(sample_rows(ctx, share)) if real[i]]
    for _, row in rows:
        row.update(shard=index, seed=seed, rank=dist.rank)
    gathered: list[list[tuple[int, dict]]] = [[] for _ in range(dist.world_size)]
    torch.distributed.all_gather_object(gathered, rows)
    ordered = sorted((row for part in gathered for row in part), key=lambda row: row[0])
    if dist.is_main:
        atomic_write_text(ctx.keeper.shard_path(index), "".join(json.dumps(row) + "\n" for _, row in ordered))
    ended = [r["ended"] for _, row in ordered for r in row["responses"]]
    return {"ended": sum(ended) / max(len(ended), 1)}


@torch.no_grad()
def sample_rows(ctx: SampleContext, rows: list) -> list[dict]:
    """Each (Prompt, ids) row sampled k times: the prompt and its K responses with ids, log-probs and text."""
    cfg, sampling, tokenizer = ctx.cfg, ctx.sampling, ctx.tokenizer
    k, out = cfg.sampling.k, []
    model = inner_model(ctx.policy)
    for start in range(0, len(rows), cfg.sampling.batch_size):
        batch = rows[start : start + cfg.sampling.batch_size]
        seqs, sampled = sample_rollout_with_logprobs(model, [ids for _, ids in batch for _ in range(k)], sampling)
        assert sampled is not None  # kept at every temperature above 0, the only ones SampleConfig allows
        lengths = seqs.response_mask.sum(dim=1).tolist()
        ids = [row[:n] for row, n in zip(seqs.response_ids.tolist(), lengths)]
        logprobs = [[round(v, 6) for v in row[:n]] for row, n in zip(sampled.logprobs.float().tolist(), lengths)]
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        ended = seqs.has_eos.tolist()
        for p, (prompt, prompt_ids) in enumerate(batch):
            responses = [{"text": texts[j], "ids": ids[j], "logprobs": logprobs[j], "ended": ended[j]}
                         for j in range(p * k, (p + 1) * k)]
            out.append({"prompt": prompt.prompt, "prompt_ids": list(prompt_ids), "responses": responses})
    return out


def publish(ctx: SampleContext, shards: int, seconds: float) -> None:
    """The shards joined into final/samples.jsonl (by rename), then the `samples` entry that points at it."""
    cfg, keeper, source, run = ctx.cfg, ctx.keeper, ctx.source, ctx.keeper.run
    final = run.final_dir
    final.mkdir(exist_ok=True)
    text = "".join(keeper.shard_path(index).read_text() for index in range(shards))
    atomic_write_text(final / DATASET, text)
    prompts = sum(1 for line in text.splitlines() if line)
    # `rlhf label` checks the rows against this: labels rank what the policy wrote, not a hand-edited file.
    atomic_write_text(final / MANIFEST, json.dumps({"sha256": hashlib.sha256(text.encode()).hexdigest(), "rows": prompts}))
    entry = run.publish(Entry(
        id=run.run_id, stage="samples", status="completed", created=now_iso(), path=str(final), run_dir=str(run.run_dir),
        config=to_dict(cfg), parents=source.parents, base_model=base_model_identity(source, cfg.model),
        tokenizer=tokenizer_fingerprint(ctx.tokenizer), metrics={"prompts": float(prompts), "k": float(cfg.sampling.k),
                                                             "wall_time_s": round(seconds, 1)},
        tags=tuple(cfg.run.tags),
    ))
    keeper.print(f"[green]sample finished[/]: {entry.id} -> {final / DATASET} ({prompts} prompts x {cfg.sampling.k}); "
                 f"rank them with `rlhf label data.samples=samples:{entry.id}`")


if __name__ == "__main__":
    stage_entrypoint("sample", main)
