"""From a data source named in a config to model-ready examples, one function per stage kind.

The embedded default ('toy') goes through exactly the same format and tokenization code as a
user's file, so what is tested on it is what runs on real data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import datasets

from rlhf.data.formats import Prompt, to_comparisons, to_prompt_responses, to_prompts, to_ranked, to_unpaired
from rlhf.data.sources import Records, load_records
from rlhf.data.tokenize import (
    PairExample,
    RMExample,
    SFTExample,
    TruncationStats,
    UnpairedExample,
    preference_pairs,
    tokenize_preferences,
    tokenize_prompt_rows,
    tokenize_sft,
    tokenize_unpaired,
)
from rlhf.errors import UserError
from rlhf.protocols import Tokenizer
from rlhf.toy import TOY, ToyTask, ToyTaskConfig

if TYPE_CHECKING:
    from rlhf.config import (
        BestOfNDataConfig,
        DataConfig,
        DPOConfig,
        PPODataConfig,
        RMDataConfig,
        SampleDataConfig,
        SFTDataConfig,
        StageConfig,
        TrainedConfig,
    )

HUB_SPLITS = {"train": "train", "eval": "test"}


def records(source: str, *, split: str, toy: ToyTaskConfig, toy_kind: str, key: str) -> Records:
    """Rows of `source`; for 'toy', the synthetic task's `toy_kind` rows of `split` ('train'/'eval')."""
    if source == TOY:
        rows = getattr(ToyTask(toy), toy_kind)(split)
        return Records(rows=datasets.Dataset.from_list(rows), source=f"toy {toy_kind} ({split})", line_numbers=None, key=key)
    # A hub name without ':split' reads the split conventionally used for this role.
    return load_records(source, split=HUB_SPLITS[split], key=key)


def sft_examples(source: str, *, split: str, tokenizer: Tokenizer, data: SFTDataConfig, key: str
                 ) -> tuple[list[SFTExample], TruncationStats]:
    """Tokenized prompt/response (or chat) examples with the response mask, and what truncation did."""
    rows = records(source, split=split, toy=data.toy, toy_kind="demonstrations", key=key)
    return tokenize_sft(
        to_prompt_responses(rows, tokenizer), tokenizer, max_length=data.max_length, long_prompts=data.long_prompts
    )


TOY_RM_KINDS = {"ranked": "ranked", "pairs": "comparisons"}


def rm_examples(
    source: str, *, split: str, tokenizer: Tokenizer, data: RMDataConfig, key: str, toy_kind: str | None = None
) -> tuple[list[RMExample], TruncationStats]:
    """Tokenized preference groups: comparisons (one pair each) or ranked lists (all their pairs).

    A source with a 'responses' column is read as ranked lists, any other as comparisons. On
    'toy', training uses data.toy_format and held-out evaluation pairs, unless `toy_kind` names
    another of the task's row builders.
    """
    toy_kind = toy_kind or (TOY_RM_KINDS[data.toy_format] if split == "train" else "comparisons")
    rows = records(source, split=split, toy=data.toy, toy_kind=toy_kind, key=key)
    convert = to_ranked if "responses" in rows.rows.column_names else to_comparisons
    return tokenize_preferences(
        convert(rows, tokenizer), tokenizer, max_length=data.max_length, long_prompts=data.long_prompts,
        use_margin=data.use_margin,
    )


def ppo_examples(source: str, *, split: str, tokenizer: Tokenizer, data: PPODataConfig | BestOfNDataConfig | SampleDataConfig, key: str
                 ) -> tuple[list[list[int]], TruncationStats]:
    """Tokenized PPO prompts (a prompt column or messages), none longer than data.max_prompt_length."""
    rows, stats = prompt_rows(source, split=split, tokenizer=tokenizer, data=data, key=key)
    return [ids for _, ids in rows], stats


def prompt_rows(source: str, *, split: str, tokenizer: Tokenizer, data: PPODataConfig | BestOfNDataConfig | SampleDataConfig, key: str
                ) -> tuple[list[tuple[Prompt, list[int]]], TruncationStats]:
    """`ppo_examples` with each prompt's rendered text beside its ids (what `rlhf sft` tokenizes back to the same ids)."""
    rows = records(source, split=split, toy=data.toy, toy_kind="prompts", key=key)
    return tokenize_prompt_rows(
        to_prompts(rows, tokenizer), tokenizer, max_length=data.max_prompt_length, long_prompts=data.long_prompts
    )


TOY_DPO_KINDS = {"pairs": "comparisons", "ranked": "ranked"}


@dataclass(frozen=True)
class DPOReading:
    """How `dpo_examples` reads a source: the data section's settings, and whether the loss takes
    unpaired rows (dpo.loss=kto), which lives in another section of the config."""

    max_length: int
    long_prompts: str
    toy_format: str
    toy: ToyTaskConfig
    unpaired: bool

    @classmethod
    def of(cls, cfg: DPOConfig) -> DPOReading:
        data = cfg.data
        return cls(data.max_length, data.long_prompts, data.toy_format, data.toy, unpaired=cfg.dpo.loss == "kto")


def dpo_examples(
    source: str, *, split: str, tokenizer: Tokenizer, data: DPOReading, key: str
) -> tuple[list[PairExample] | list[UnpairedExample], TruncationStats]:
    """The direct preference losses' rows: (prompt, chosen, rejected) pairs read as `rlhf rm` reads
    comparisons or ranked lists (each ranked list gives all its pairs; a margin is not used), or for
    loss='kto' unpaired (prompt, completion, label) rows. On 'toy': comparisons or ranked lists
    (data.toy_format) for training and comparisons held out; for kto the oracle's feedback."""
    if data.unpaired:
        rows = records(source, split=split, toy=data.toy, toy_kind="feedback", key=key)
        return tokenize_unpaired(to_unpaired(rows, tokenizer), tokenizer, max_length=data.max_length, long_prompts=data.long_prompts)
    toy_kind = TOY_DPO_KINDS[data.toy_format] if split == "train" else "comparisons"
    rows = records(source, split=split, toy=data.toy, toy_kind=toy_kind, key=key)
    convert = to_ranked if "responses" in rows.rows.column_names else to_comparisons
    groups, stats = tokenize_preferences(convert(rows, tokenizer), tokenizer, max_length=data.max_length,
                                         long_prompts=data.long_prompts, use_margin=False)
    return preference_pairs(groups), stats


STAGE_EXAMPLES: dict[str, Callable[..., tuple[list, TruncationStats]]] = {
    "sft": sft_examples, "rm": rm_examples, "ppo": ppo_examples, "dpo": dpo_examples}
"""Each stage's one way from a configured data source to its examples (used by the stage and by
the CLI's pre-launch check alike)."""


def stage_reading(stage: str, cfg: StageConfig) -> DataConfig | DPOReading:
    """What a stage's reader takes as `data`: its data section (dpo: with the loss's layout)."""
    from rlhf.config import DPOConfig

    return DPOReading.of(cfg) if isinstance(cfg, DPOConfig) else cfg.data  # isinstance: the same case as stage == "dpo"


def stage_datasets(stage: str, cfg: TrainedConfig, tokenizer: Tokenizer, *, world_size: int
                   ) -> tuple[list, TruncationStats, list, TruncationStats | None]:
    """A training stage's (train examples, their stats, held-out examples capped at eval.max_rows,
    their stats); stops when the training set cannot fill one global batch."""
    examples, reading = STAGE_EXAMPLES[stage], stage_reading(stage, cfg)
    train_set, train_stats = examples(cfg.data.train, split="train", tokenizer=tokenizer, data=reading, key="data.train")
    eval_set: list = []
    eval_stats: TruncationStats | None = None
    if cfg.data.eval:
        eval_set, eval_stats = examples(cfg.data.eval, split="eval", tokenizer=tokenizer, data=reading, key="data.eval")
        if cfg.eval.max_rows:
            eval_set = eval_set[: cfg.eval.max_rows]
    # PPO draws rollout.batch_size / rollout.samples_per_prompt prompts per rank per step; the other stages a micro-batch.
    from rlhf.config import PPOConfig

    ppo = isinstance(cfg, PPOConfig)  # the same case as stage == "ppo"
    batch_key = "rollout.batch_size" if ppo else "engine.micro_batch_size"
    per_rank = cfg.rollout.batch_size // cfg.rollout.samples_per_prompt if isinstance(cfg, PPOConfig) else cfg.engine.micro_batch_size
    global_batch = per_rank * world_size
    if len(train_set) < global_batch:
        raise UserError(
            f"data.train has {len(train_set)} usable rows, fewer than one global batch of {global_batch} "
            f"({batch_key} x ranks); add data or lower {batch_key}"
        )
    return train_set, train_stats, eval_set, eval_stats


def ptx_data_config(data: PPODataConfig) -> SFTDataConfig:
    """How PPO reads data.ptx (a PPODataConfig): SFT-format data cut at data.ptx_max_length (a long prompt is dropped)."""
    from rlhf.config import SFTDataConfig

    return SFTDataConfig(train=data.ptx or "", eval=None, max_length=data.ptx_max_length, long_prompts="skip", toy=data.toy)
