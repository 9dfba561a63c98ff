"""`rlhf sample`: K responses per prompt from a policy, for a labeler to rank (`rlhf label`).

InstructGPT's second step, and each round of Llama 2's: the reward model is trained on what the
current policy writes. Every row of the dataset keeps what made it: the prompt and its token ids,
each response's text, token ids, per-token log-probs under the sampling policy (at the sampling
temperature) and whether it ended by itself, and the shard's seed and rank; the entry's config
holds the sampling settings.

1. Ranks.  2. Tokenizer, prompts.  3. The policy.  4. The prompts, shard by shard (a shard on disk is
done: that is the resume).  5. The dataset folder and the registry entry (`samples:<id>`, parent: the policy's entry).

Run it with `rlhf sample` (any number of ranks), or alone: `python -m rlhf.stages.sample --config FILE`.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from rlhf.config import SampleConfig, to_dict
from rlhf.data.load import prompt_rows
from rlhf.engine import PRECISION_DTYPES, Dist, build_frozen, frozen_zero3_config, init_distributed, seed_everything, zero3_partitioning
from rlhf.errors import StoppedBySignal, UserError
from rlhf.evaluation import even_shard
from rlhf.fileio import atomic_write_text
from rlhf.labelers import SAMPLES_MANIFEST as MANIFEST
from rlhf.model_loading import disable_dropout, load_causal_lm
from rlhf.model_sources import ModelSource, base_model_identity, causal_lm_and_tokenizer
from rlhf.registry_entry import DATASET_FILES, Entry, now_iso
from rlhf.rollout import Sampling, sample_rollout_with_logprobs
from rlhf.runs import Run, mark_started, stage_entrypoint
from rlhf.stop_signal import StopSignal
from rlhf.tokenizer import tokenizer_fingerprint
from rlhf.tracking import Tracker

SHARDS = "shards"
DATASET = DATASET_FILES["samples"]


def main(run: Run) -> None:
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
    stopper = StopSignal(dist)
    stopper.listen()
    if dist.is_main:
        mark_started(run)
    done = sum(1 for index in range(len(shards)) if shard_path(run, index).exists())  # written in order
    tracker = Tracker(run.run_dir, active=dist.is_main, tracking=cfg.tracking, config=to_dict(cfg), run_id=run.run_id,
                      total_steps=len(shards), start_step=done, description=f"sample {run.run_id}", headline=("ended",))
    if done:
        tracker.print(f"resumed {run.run_id} at shard {done} of {len(shards)}")
    tracker.print(f"sample: {s.k} responses for each of {len(rows)} prompts in {len(shards)} shard(s), {dist.world_size} rank(s)")
    (run.run_dir / SHARDS).mkdir(exist_ok=True)
    for index in range(done, len(shards)):
        write_shard(index, shards[index], policy, cfg, sampling, tokenizer, dist, run, tracker)
        if stopper.requested():
            tracker.print(f"[yellow]{stopper.name}: stopped after shard {index + 1} of {len(shards)}[/]; "
                          f"`rlhf sample --resume --run {run.run_id}` continues it")
            tracker.close()
            raise StoppedBySignal(stopper.name)
    if dist.is_main:
        publish(run, cfg, source, tokenizer, len(shards), tracker, time.time() - started)
    tracker.close()
    torch.distributed.barrier()


def build_policy(cfg: SampleConfig, source: ModelSource, tokenizer: Any, dist: Dist) -> Any:
    engine = cfg.engine
    policy = load_causal_lm(source, cfg.model, tokenizer, seed=cfg.sampling.seed, dtype=PRECISION_DTYPES[engine.precision],
                            partitioning=zero3_partitioning(frozen_zero3_config(engine, False)))
    disable_dropout(policy)
    return build_frozen(policy, engine=engine, offload=False, dist=dist)


def write_shard(index: int, shard: list, policy: Any, cfg: SampleConfig, sampling: Sampling, tokenizer: Any, dist: Dist,
                run: Run, tracker: Tracker) -> None:
    """The shard's rows in prompt order, written whole by rank 0 (by rename), from the shard's own seed."""
    seed = cfg.sampling.seed + index
    seed_everything(seed, rank=dist.rank)  # resuming redraws what an uninterrupted run drew
    share, real = even_shard(shard, dist=dist)
    rows = [(dist.rank + i * dist.world_size, row) for i, row in enumerate(sample_rows(share, policy, cfg, sampling, tokenizer))
            if real[i]]
    for _, row in rows:
        row.update(shard=index, seed=seed, rank=dist.rank)
    gathered: list[list[tuple[int, dict]]] = [[] for _ in range(dist.world_size)]
    torch.distributed.all_gather_object(gathered, rows)
    ordered = sorted((row for part in gathered for row in part), key=lambda row: row[0])
    if dist.is_main:
        atomic_write_text(shard_path(run, index), "".join(json.dumps(row) + "\n" for _, row in ordered))
    ended = [r["ended"] for _, row in ordered for r in row["responses"]]
    tracker.log(index + 1, {"ended": sum(ended) / max(len(ended), 1)})


@torch.no_grad()
def sample_rows(rows: list, policy: Any, cfg: SampleConfig, sampling: Sampling, tokenizer: Any) -> list[dict]:
    """Each (Prompt, ids) row sampled k times: the prompt and its K responses with ids, log-probs and text."""
    k, out = cfg.sampling.k, []
    model = getattr(policy, "module", policy)
    for start in range(0, len(rows), cfg.sampling.batch_size):
        batch = rows[start : start + cfg.sampling.batch_size]
        seqs, sampled = sample_rollout_with_logprobs(model, [ids for _, ids in batch for _ in range(k)], sampling)
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


def shard_path(run: Run, index: int) -> Path:
    return run.run_dir / SHARDS / f"{index:05d}.jsonl"


def publish(run: Run, cfg: SampleConfig, source: ModelSource, tokenizer: Any, shards: int, tracker: Tracker, seconds: float) -> None:
    """The shards joined into final/samples.jsonl (by rename), then the `samples` entry that points at it."""
    final = run.final_dir
    final.mkdir(exist_ok=True)
    text = "".join(shard_path(run, index).read_text() for index in range(shards))
    atomic_write_text(final / DATASET, text)
    prompts = sum(1 for line in text.splitlines() if line)
    # `rlhf label` checks the rows against this: labels rank what the policy wrote, not a hand-edited file.
    atomic_write_text(final / MANIFEST, json.dumps({"sha256": hashlib.sha256(text.encode()).hexdigest(), "rows": prompts}))
    entry = run.publish(Entry(
        id=run.run_id, stage="samples", status="completed", created=now_iso(), path=str(final), run_dir=str(run.run_dir),
        config=to_dict(cfg), parents=source.parents, base_model=base_model_identity(source, cfg.model),
        tokenizer=tokenizer_fingerprint(tokenizer), metrics={"prompts": float(prompts), "k": float(cfg.sampling.k),
                                                             "wall_time_s": round(seconds, 1)},
        tags=tuple(cfg.run.tags),
    ))
    tracker.print(f"[green]sample finished[/]: {entry.id} -> {final / DATASET} ({prompts} prompts x {cfg.sampling.k}); "
                  f"rank them with `rlhf label data.samples=samples:{entry.id}`")


if __name__ == "__main__":
    stage_entrypoint("sample", main)
