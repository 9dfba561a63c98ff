"""Best-of-N (rejection sampling): N sampled responses per prompt, the one the reward scores highest kept.

Two products. The training prompts' best responses, written as an SFT dataset (`prompt`,
`response` JSON lines: Llama 2's rejection-sampling fine-tuning trains on it with `rlhf sft
data.train=<entry path>/train.jsonl`). And best-of-N as an evaluation: on held-out prompts, the
reward and (on the embedded default) the oracle's score of the response kept among the first n
samples, for n = 1, 2, 4, ..., N, beside the KL of best-of-n to the policy, log n - (n-1)/n.

The reward is any `rlhf.rollouts.rewards` source: a reward model, Python functions, the oracle, or a
weighted sum. Nothing trains; under ZeRO-3 the policy and the reward model are partitioned.

1. Ranks.  2. Tokenizer, the reward's sources, prompts.  3. The policy and the reward model.
4. The held-out curve.  5. The training prompts, shard by shard (what a killed run already wrote,
the curve and whole shards, is kept: that is the resume).  6. The dataset folder and the registry entry.

The functions after `main` take the frozen `BestOfNContext` (models, data, config, sampling, ranks,
keeper) built once in `main`; a shard on disk is the only state, so there is none to pass.

Run it with `rlhf bon` (any number of ranks), or alone: `python -m rlhf.stages.bon --config FILE`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from rlhf.algos.best_of_n import best_of_first, best_of_n_kl, curve_ns
from rlhf.config import BestOfNConfig, BestOfNSamplingConfig, ModelConfig, to_dict
from rlhf.data.formats import Prompt
from rlhf.data.load import prompt_rows
from rlhf.models.loading import disable_dropout, load_causal_lm
from rlhf.models.sources import (
    ImplicitSources,
    ModelSource,
    base_model_identity,
    causal_lm_and_tokenizer,
    ensemble_sources,
    implicit_sources,
    reward_model_source,
    reward_stats,
)
from rlhf.models.stage_models import build_ensemble, build_reward
from rlhf.models.tokenizer import tokenizer_fingerprint
from rlhf.protocols import PolicyModel, ScoringModel, Tokenizer, inner_model
from rlhf.rollouts.generation import RewardEnsemble, Sampling, Sequences, sample_rollout
from rlhf.rollouts.implicit_reward import ImplicitReward, learned_scores
from rlhf.rollouts.rewards import Reward, describe, parse_sources, rollout_texts
from rlhf.store.entry import DATASET_FILES, Entry, now_iso
from rlhf.store.fileio import atomic_write_text
from rlhf.store.runs import Run, stage_entrypoint
from rlhf.toy import TOY, oracle_score
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
from rlhf.training.rank_sums import RankSums
from rlhf.training.shard_keeper import ShardKeeper
from rlhf.training.tracking import print_warning

HEADLINE = ("best_reward", "first_reward", "eval/best_oracle_score")
CURVE_FILE = "curve.json"
DATASET = DATASET_FILES["bon"]


@dataclass
class Models:
    policy: PolicyModel
    reward_model: ScoringModel | ImplicitReward | None
    """None when no source of the reward is a reward model; an ImplicitReward for a DPO policy."""
    reward: Reward
    ensemble: RewardEnsemble | None = None
    """reward_ensemble's reward models, scored beside reward_model."""

    def learned_scores(self, seqs: Sequences) -> torch.Tensor | None:
        """(B,) the reward model's scores, or with an ensemble mean - penalty x std of the members' normalized scores."""
        if self.reward_model is None:
            return None
        first = learned_scores(self.reward_model, seqs)
        return first if self.ensemble is None else self.ensemble.combine(first, seqs)[0]


@dataclass
class Data:
    source: ModelSource
    """The policy's."""
    reward_source: ModelSource | None
    """The reward model's, when a source of the reward is one."""
    implicit: ImplicitSources | None
    """With a DPO policy as the reward model: its implicit reward's reference and beta."""
    members: tuple[ModelSource, ...]
    """reward_ensemble's reward models."""
    tokenizer: Tokenizer
    train_rows: list
    eval_rows: list
    shards: list[list]
    """The training rows, sampling.shard_prompts to a shard."""


@dataclass(frozen=True)
class BestOfNContext:
    """One best-of-N run's fixed parts, built once before the first sample: what the functions share."""

    models: Models
    data: Data
    cfg: BestOfNConfig
    sampling: Sampling
    dist: Dist
    keeper: ShardKeeper
    """Metrics, progress and stops: shard by shard."""


@dataclass
class Candidates:
    """A batch of prompts (this rank's) with their N sampled responses and what the reward said."""

    prompts: list[str]
    responses: list[list[str]]
    """[prompt][sample] as text."""
    rewards: torch.Tensor
    """(P, N) the reward's score of each response."""
    has_eos: torch.Tensor
    """(P, N) whether each response ended by itself."""


def main(run: Run[BestOfNConfig]) -> None:
    cfg: BestOfNConfig = run.config
    started = time.time()

    # 1. Ranks.
    dist = init_distributed()

    # 2. Tokenizer, the reward's sources (a reward model among them is checked against the policy), prompts.
    data = load_data(cfg, run)

    # 3. The policy (frozen, dropout off) and, when the reward has a learned part, the reward model (and its ensemble).
    models = build_models(cfg, data, dist)
    sampling = Sampling(pad_id=data.tokenizer.pad_token_id, eos_id=data.tokenizer.eos_token_id,
                        max_new_tokens=cfg.sampling.max_new_tokens, temperature=cfg.sampling.temperature,
                        top_k=cfg.sampling.top_k, top_p=cfg.sampling.top_p,
                        zero3_engine=models.policy if cfg.engine.zero_stage == 3 else None, device=dist.device)
    keeper = ShardKeeper(run, dist, shards=len(data.shards), total_steps=max(len(data.shards), 1), headline=HEADLINE,
                         stop_note=" (a requeued SLURM job does so itself)")
    ctx = BestOfNContext(models=models, data=data, cfg=cfg, sampling=sampling, dist=dist, keeper=keeper)
    done = keeper.resume()
    if done:
        keeper.print(f"resumed {run.run_id} at shard {done} of {len(data.shards)}")
    keeper.print(f"bon: best of {cfg.sampling.n} for {len(data.train_rows)} prompts in {len(data.shards)} shard(s), "
                 f"{len(data.eval_rows)} held-out prompts; reward = {describe(models.reward.sources)}"
                 + (f" (its reward model with {len(data.members)} more: mean - {cfg.reward_ensemble.penalty:g} x std)"
                    if data.members else ""))

    # 4. The held-out curve: reward and oracle score of best-of-n against n (once: a resumed run reads it back).
    curve = held_out_curve(ctx)

    # 5. The training prompts, shard by shard; a shard on disk is done (its samples came from its own seed).
    kept = write_shards(ctx)

    # 6. The dataset folder and the registry entry.
    if dist.is_main:
        publish(ctx, {**kept, **curve, "wall_time_s": round(time.time() - started, 1)})
    keeper.close()


def load_data(cfg: BestOfNConfig, run: Run) -> Data:
    source, tokenizer = causal_lm_and_tokenizer(cfg.model, run.registry)
    reward_source = reward_model_source(cfg, run.registry, tokenizer)
    implicit = implicit_sources(cfg, reward_source, run.registry, tokenizer)
    members = ensemble_sources(cfg, run.registry, tokenizer)
    train_rows, eval_rows = load_prompts(cfg, tokenizer)
    shards = [train_rows[i : i + cfg.sampling.shard_prompts] for i in range(0, len(train_rows), cfg.sampling.shard_prompts)]
    return Data(source, reward_source, implicit, members, tokenizer, train_rows, eval_rows, shards)


def load_prompts(cfg: BestOfNConfig, tokenizer: Tokenizer) -> tuple[list, list]:
    """(training rows, held-out rows): each a (Prompt, ids) pair, capped at data.max_prompts / eval.max_rows."""
    data = cfg.data
    train_rows: list[tuple[Prompt, list[int]]] = []
    eval_rows: list[tuple[Prompt, list[int]]] = []
    if data.train is not None:
        train_rows, _ = prompt_rows(data.train, split="train", tokenizer=tokenizer, data=data, key="data.train")
        train_rows = train_rows[: data.max_prompts or None]
    if data.eval is not None:
        eval_rows, _ = prompt_rows(data.eval, split="eval", tokenizer=tokenizer, data=data, key="data.eval")
        eval_rows = eval_rows[: cfg.eval.max_rows or None]
    return train_rows, eval_rows


def build_models(cfg: BestOfNConfig, data: Data, dist: Dist) -> Models:
    source, reward_source, members, tokenizer = data.source, data.reward_source, data.members, data.tokenizer
    engine = cfg.engine
    model = load_causal_lm(source, cfg.model, tokenizer, seed=cfg.sampling.seed, dtype=PRECISION_DTYPES[engine.precision],
                           partitioning=zero3_partitioning(frozen_zero3_config(engine, False)))
    disable_dropout(model)
    policy = build_frozen(model, engine=engine, offload=False, dist=dist)
    reward_model = None if reward_source is None else build_reward(cfg, reward_source, tokenizer, seed=cfg.sampling.seed, dist=dist,
                                                                   implicit=data.implicit)
    if not members:
        return Models(policy, reward_model, combined_reward(cfg, reward_source))
    assert reward_source is not None  # ensemble members come with a reward model
    ensemble = build_ensemble(cfg, reward_source, members, tokenizer, seed=cfg.sampling.seed, dist=dist)
    # The members' scores arrive normalized and combined: the reward adds them to other sources as they are.
    return Models(policy, reward_model, Reward(parse_sources(cfg.reward.name_or_path, cfg.reward.weights)), ensemble)


def combined_reward(cfg: BestOfNConfig, reward_source: ModelSource | None) -> Reward:
    """The reward's sources and weights; a reward model's score is normalized with its stored
    statistics only when other sources are added to it (alone, normalizing would not change the pick)."""
    sources = parse_sources(cfg.reward.name_or_path, cfg.reward.weights)
    if reward_source is None or len(sources) == 1:
        return Reward(sources)
    stats = reward_stats(reward_source)
    return Reward(sources, mean=stats["mean"], std=stats["std"], normalize=True)


@torch.no_grad()
def sample_candidates(ctx: BestOfNContext, rows: list) -> Candidates:
    """Each row's prompt sampled N times (in one generation call per sampling.batch_size prompts) and scored."""
    models, cfg, sampling, tokenizer = ctx.models, ctx.cfg, ctx.sampling, ctx.data.tokenizer
    n, prompts, responses, rewards, has_eos = cfg.sampling.n, [], [], [], []
    for start in range(0, len(rows), cfg.sampling.batch_size):
        batch = rows[start : start + cfg.sampling.batch_size]
        seqs = sample_rollout(inner_model(models.policy), [ids for _, ids in batch for _ in range(n)], sampling)
        prompt_texts, response_texts = rollout_texts(seqs, tokenizer)
        learned = models.learned_scores(seqs)
        scores = models.reward.scores(prompt_texts, response_texts, learned=learned, device=sampling.device).total
        prompts += [prompt.prompt for prompt, _ in batch]
        responses += [response_texts[i * n : (i + 1) * n] for i in range(len(batch))]
        rewards.append(scores.float().view(len(batch), n).cpu())
        has_eos.append(seqs.has_eos.view(len(batch), n).cpu())
    return Candidates(prompts, responses, torch.cat(rewards), torch.cat(has_eos))


def write_shards(ctx: BestOfNContext) -> dict[str, float]:
    """Each shard's best responses as JSON lines in shards/<index>.jsonl (rank 0 writes it whole, by
    rename); shards already there are skipped. Returns the kept rows' counts over every shard."""
    cfg, dist, keeper, shards = ctx.cfg, ctx.dist, ctx.keeper, ctx.data.shards
    for index, shard in enumerate(shards):
        path = keeper.shard_path(index)
        if path.exists():
            continue
        seed_everything(cfg.sampling.seed + index, rank=dist.rank)  # the shard's own stream: resuming redraws the same
        share, real = even_shard(shard, dist=dist)
        found = sample_candidates(ctx, share)
        rows, sums = best_rows(found, real, cfg.sampling, dist)
        gathered: list[list[tuple[int, dict]]] = [[] for _ in range(dist.world_size)]
        torch.distributed.all_gather_object(gathered, rows)
        if dist.is_main:  # in the shard's prompt order, whatever the number of ranks
            ordered = sorted((row for part in gathered for row in part), key=lambda row: row[0])
            atomic_write_text(path, "".join(json.dumps(row) + "\n" for _, row in ordered))
        totals = sums.over_ranks()
        keeper.finish_shard(index, {"best_reward": totals["best"] / totals["prompts"], "first_reward": totals["first"] / totals["prompts"],
                                    "best_has_eos": totals["best_eos"] / totals["prompts"]})
    return dataset_counts(ctx) if dist.is_main else {}


def best_rows(found: Candidates, real: list[bool], sampling: BestOfNSamplingConfig, dist: Dist) -> tuple[list[tuple[int, dict]], RankSums]:
    """The kept response of each real prompt with the prompt's place in the shard (even_shard deals
    them round-robin), and sums for the log. None is kept when all N were cut by the length limit,
    or when the best reward is below sampling.min_reward."""
    kept = best_of_first(found.rewards, found.has_eos, sampling.n).tolist()
    sums = RankSums(("prompts", "best", "first", "best_eos"), dist.device)
    rows = []
    for i, counted in enumerate(real):
        if not counted:
            continue
        k = kept[i]
        ended = bool(found.has_eos[i, k])
        sums.add(prompts=1.0, best=float(found.rewards[i, k]), first=float(found.rewards[i, 0]), best_eos=float(ended))
        if ended and (sampling.min_reward is None or float(found.rewards[i, k]) >= sampling.min_reward):
            row = {"prompt": found.prompts[i], "response": found.responses[i][k], "reward": float(found.rewards[i, k])}
            rows.append((dist.rank + i * dist.world_size, row))
    return rows, sums


def dataset_counts(ctx: BestOfNContext) -> dict[str, float]:
    keeper = ctx.keeper
    written = sum(1 for index in range(len(ctx.data.shards)) for line in keeper.shard_path(index).read_text().splitlines() if line)
    return {"dataset_rows": float(written)}


def held_out_curve(ctx: BestOfNContext) -> dict[str, float]:
    """`evaluate`, logged at step 0 and kept in curve.json (plain JSON) for a resumed run to read back.
    Every rank looks before any rank can write: writing waits for evaluate's all-reduce."""
    path = ctx.keeper.run.run_dir / CURVE_FILE
    if path.exists():
        return json.loads(path.read_text())
    curve = evaluate(ctx)
    if ctx.dist.is_main:
        atomic_write_text(path, json.dumps(curve))
    ctx.keeper.log(0, curve)
    return curve


@torch.no_grad()
def evaluate(ctx: BestOfNContext) -> dict[str, float]:
    """For n = 1, 2, 4, ..., N: the mean reward of the response kept among the first n samples of
    each held-out prompt, and on the embedded default the oracle's score (0-100) of that response."""
    cfg, dist, rows = ctx.cfg, ctx.dist, ctx.data.eval_rows
    if not rows:
        return {}
    seed_everything(cfg.sampling.seed, rank=dist.rank)
    share, real = even_shard(rows, dist=dist)
    found = sample_candidates(ctx, share)
    counted = torch.tensor(real)
    oracle = cfg.data.eval == TOY
    ns = curve_ns(cfg.sampling.n)
    sums = RankSums(("prompts", *(f"reward_{n}" for n in ns), *(f"oracle_{n}" for n in ns)), dist.device)
    sums.add(prompts=counted.double())
    for n in ns:
        kept = best_of_first(found.rewards, found.has_eos, n)
        sums.add(**{f"reward_{n}": found.rewards.gather(1, kept[:, None]).squeeze(1).double()[counted]})
        if oracle:
            scores = [oracle_score(found.prompts[i], found.responses[i][k]) for i, k in enumerate(kept.tolist()) if real[i]]
            sums.add(**{f"oracle_{n}": float(sum(scores))})
    total = sums.over_ranks()
    count = total["prompts"]
    metrics = {f"eval/best_of_{n}_reward": total[f"reward_{n}"] / count for n in ns}
    metrics |= {f"eval/best_of_{n}_kl_bound": best_of_n_kl(n) for n in ns}
    if oracle:
        metrics |= {f"eval/best_of_{n}_oracle_score": 100.0 * total[f"oracle_{n}"] / count for n in ns}
        metrics["eval/best_oracle_score"] = metrics[f"eval/best_of_{ns[-1]}_oracle_score"]
    return metrics


def publish(ctx: BestOfNContext, metrics: dict[str, float]) -> None:
    """The shards joined into final/train.jsonl (by rename), then the entry that points at it."""
    cfg, data, keeper, run = ctx.cfg, ctx.data, ctx.keeper, ctx.keeper.run
    source, tokenizer, shards = data.source, data.tokenizer, data.shards
    reward_sources = (data.reward_source, *data.members) if data.reward_source else ()
    final = run.final_dir
    final.mkdir(exist_ok=True)
    text = "".join(keeper.shard_path(index).read_text() for index in range(len(shards)))
    atomic_write_text(final / DATASET, text)
    parents = tuple(dict.fromkeys(source.parents + tuple(p for s in reward_sources for p in s.parents)))
    model_cfg: ModelConfig = cfg.model
    entry = run.publish(Entry(
        id=run.run_id, stage="bon", status="completed", created=now_iso(), path=str(final), run_dir=str(run.run_dir),
        config=to_dict(cfg), parents=parents, base_model=base_model_identity(source, model_cfg),
        tokenizer=tokenizer_fingerprint(tokenizer), metrics={k.removeprefix("eval/"): v for k, v in metrics.items()},
        tags=tuple(cfg.run.tags),
    ))
    if not metrics.get("dataset_rows") and shards:
        print_warning("no prompt kept a response: none ended by itself (raise sampling.max_new_tokens) or reached "
                      "sampling.min_reward")
    keeper.print(f"[green]bon finished[/]: {entry.id} -> {final / DATASET} ({int(metrics.get('dataset_rows', 0))} rows); "
                 f"train on it with `rlhf sft data.train={final / DATASET}`")


if __name__ == "__main__":
    stage_entrypoint("bon", main)
