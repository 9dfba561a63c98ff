"""`rlhf label`: each prompt's K sampled responses ranked by a labeler, as ranked lists for `rlhf rm`.

Reads `rlhf sample`'s rows (checked against the digest the sample stage recorded, so a file edited by
hand stops in one line), has the labeler score each prompt's responses (rlhf.feedback.labelers: the oracle,
a python: function, or a judge model), and writes `{"prompt", "responses" (best first), "ranks",
"scores", "sample_index", "labeler"}` rows: `rlhf rm data.train=prefs:latest` trains on them as they
are (a tie gives no pair). On the embedded default's prompts the labels' pairwise agreement with
the oracle is measured and kept in the entry's metrics.

1. Ranks.  2. The samples.  3. The labeler.  4. The prompts, shard by shard (a shard on disk is done:
that is the resume).  5. The dataset folder and the registry entry (`prefs:<id>`, parents: the samples' entry, the judge's).

The functions after `main` take the frozen `LabelContext` (the labeler, config, ranks, keeper) built
once in `main`; a shard on disk is the only state.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rlhf.config import LabelConfig, to_dict
from rlhf.errors import UserError
from rlhf.feedback.labelers import LabelerSpec, function_scores, parse_labeler, rank, read_samples
from rlhf.store.entry import DATASET_FILES, Entry, now_iso
from rlhf.store.fileio import atomic_write_text
from rlhf.store.runs import Run, stage_entrypoint
from rlhf.toy import oracle_score
from rlhf.training.engine import PRECISION_DTYPES, Dist, init_distributed
from rlhf.training.evaluation import even_shard
from rlhf.training.shard_keeper import ShardKeeper

SHARD_PROMPTS = 256


@dataclass(frozen=True)
class LabelContext:
    """One label run's fixed parts, built once before the first shard: what the functions share."""

    cfg: LabelConfig
    samples: Path
    """data.samples: the rows `rlhf sample` wrote."""
    spec: LabelerSpec
    """The labeler `by` names (rlhf.feedback.labelers.parse_labeler)."""
    score: Callable[[str, list[str]], list[float]]
    """(prompt, its responses) -> one score per response, from the labeler."""
    dist: Dist
    keeper: ShardKeeper
    """Metrics, progress and stops: shard by shard."""


def main(run: Run[LabelConfig]) -> None:
    cfg: LabelConfig = run.config
    started = time.time()
    dist = init_distributed()
    path = Path(cfg.data.samples)
    rows = read_samples(path)
    spec = parse_labeler(cfg.by)
    shards = [rows[i : i + SHARD_PROMPTS] for i in range(0, len(rows), SHARD_PROMPTS)]
    keeper = ShardKeeper(run, dist, shards=len(shards), headline=("tied_pairs",))
    ctx = LabelContext(cfg=cfg, samples=path, spec=spec, score=scorer(cfg, spec, run), dist=dist, keeper=keeper)
    done = keeper.resume()
    keeper.print(f"label: {len(rows)} prompts of {path} by {cfg.by}" + (f"; resumed at shard {done}" if done else ""))
    for index in range(done, len(shards)):
        keeper.finish_shard(index, pair_counts(label_shard(ctx, index, shards[index])))
    if dist.is_main:
        earlier = read_ranked(Path(cfg.data.include)) if cfg.data.include else []
        publish(ctx, earlier, len(shards), time.time() - started)
    keeper.close()


def scorer(cfg: LabelConfig, spec: LabelerSpec, run: Run) -> Callable[[str, list[str]], list[float]]:
    """The labeler's scores of one prompt's responses: a judge model's (loaded here) or a function's."""
    if spec.kind != "judge":
        return _function_scorer(spec)
    from rlhf.feedback.judge import load_judge

    judge = load_judge(spec.target, cfg.judge, run.registry, dtype=PRECISION_DTYPES[cfg.engine.precision])
    return lambda prompt, texts: judge.scores(prompt, texts)[0]


def label_shard(ctx: LabelContext, index: int, shard: list) -> list[dict]:
    """The shard's labeled rows in prompt order, written whole by rank 0 (by rename)."""
    dist = ctx.dist
    share, real = even_shard(shard, dist=dist)
    labeled = [(dist.rank + i * dist.world_size, label_row(ctx, row)) for i, row in enumerate(share) if real[i]]
    gathered: list[list] = [[] for _ in range(dist.world_size)]
    torch.distributed.all_gather_object(gathered, labeled)
    ordered = [row for _, row in sorted((item for part in gathered for item in part), key=lambda item: item[0])]
    if dist.is_main:
        atomic_write_text(ctx.keeper.shard_path(index), "".join(json.dumps(row) + "\n" for row in ordered))
    return ordered


def _function_scorer(spec: LabelerSpec) -> Callable[[str, list[str]], list[float]]:
    call = function_scores(spec)
    return lambda prompt, texts: call([prompt] * len(texts), texts)


def label_row(ctx: LabelContext, row: dict) -> dict:
    cfg = ctx.cfg
    texts = [r["text"] for r in row["responses"]]
    scores = [float(s) for s in ctx.score(row["prompt"], texts)]
    order, ranks = rank(scores, cfg.tie_tolerance)
    return {"prompt": row["prompt"], "responses": [texts[i] for i in order], "ranks": ranks,
            "scores": [scores[i] for i in order], "sample_index": order, "labeler": cfg.by}


def pair_counts(rows: list[dict]) -> dict[str, float]:
    """Pairs and tied pairs of the labeled rows; on "a+b=" prompts also the pairs where the oracle agrees."""
    pairs = tied = judged = agreed = 0
    for row in rows:
        ranks, texts = row["ranks"], row["responses"]
        truth = _oracle_scores(row["prompt"], texts)
        for i in range(len(ranks)):
            for j in range(i + 1, len(ranks)):
                pairs += 1
                if ranks[i] == ranks[j]:
                    tied += 1
                elif truth is not None and truth[i] != truth[j]:
                    judged += 1
                    agreed += truth[i] > truth[j]  # i is ranked better: does the oracle agree?
    counts = {"pairs": float(pairs), "tied_pairs": float(tied)}
    if judged:
        counts |= {"oracle_pairs": float(judged), "oracle_agreement": agreed / judged}
    return counts


def _oracle_scores(prompt: str, texts: list[str]) -> list[float] | None:
    try:
        return [oracle_score(prompt, text) for text in texts]
    except ValueError:
        return None  # not the embedded default's task


def judge_parents(spec: LabelerSpec, run: Run) -> tuple[str, ...]:
    if spec.kind != "judge":
        return ()
    from rlhf.models.sources import resolve_model

    return resolve_model(spec.target, run.registry, key="by").parents


def read_ranked(path: Path) -> list[dict]:
    """An earlier `rlhf label` entry's ranked lists (data.include), each checked as `rlhf rm` will read it."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("responses"), list)
                and isinstance(row.get("ranks"), list) and len(row["ranks"]) == len(row["responses"])):
            raise UserError(f"{path}:{number}: not a ranked list `rlhf label` wrote (prompt, responses, ranks); "
                            "data.include takes a prefs entry")
        rows.append(row)
    return rows


def publish(ctx: LabelContext, earlier: list[dict], shards: int, seconds: float) -> None:
    """The shards (after data.include's ranked lists) joined into final/train.jsonl (by rename), then the
    `prefs` entry that points at it."""
    cfg, keeper, run = ctx.cfg, ctx.keeper, ctx.keeper.run
    judge = judge_parents(ctx.spec, run)
    final = run.final_dir
    final.mkdir(exist_ok=True)
    rows = [json.loads(line) for index in range(shards) for line in keeper.shard_path(index).read_text().splitlines() if line]
    atomic_write_text(final / DATASET_FILES["prefs"], "".join(json.dumps(row) + "\n" for row in earlier + rows))
    read: list[str | Path] = [ctx.samples, *([cfg.data.include] if cfg.data.include else [])]
    holders = [run.registry.entry_holding(p) for p in read]
    metrics = {**pair_counts(rows), "prompts": float(len(rows)), "ranked_lists": float(len(earlier) + len(rows)),
               "wall_time_s": round(seconds, 1)}
    entry = run.publish(Entry(
        id=run.run_id, stage="prefs", status="completed", created=now_iso(), path=str(final), run_dir=str(run.run_dir),
        config=to_dict(cfg), parents=tuple(dict.fromkeys(tuple(h.id for h in holders if h) + judge)), metrics=metrics,
        tags=tuple(cfg.run.tags),
    ))
    agreement = f", oracle agreement {metrics['oracle_agreement']:.3f}" if "oracle_agreement" in metrics else ""
    keeper.print(f"[green]label finished[/]: {entry.id} -> {final / DATASET_FILES['prefs']} ({len(rows)} ranked lists, "
                 f"{int(metrics['tied_pairs'])} of {int(metrics['pairs'])} pairs tied{agreement}); "
                 f"train a reward model on them with `rlhf rm data.train=prefs:{entry.id}`")


if __name__ == "__main__":
    stage_entrypoint("label", main)
