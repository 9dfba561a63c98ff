"""From a data source named in a config to model-ready examples, one function per stage kind.

The embedded default ('toy') goes through exactly the same format and tokenization code as a
user's file, so what is tested on it is what runs on real data.
"""

from __future__ import annotations

from typing import Any

import datasets

from rlhf.data.formats import to_prompt_responses
from rlhf.data.sources import Records, load_records
from rlhf.data.tokenize import SFTExample, TruncationStats, tokenize_sft
from rlhf.toy import TOY, ToyTask, ToyTaskConfig


HUB_SPLITS = {"train": "train", "eval": "test"}


def records(source: str, *, split: str, toy: ToyTaskConfig, toy_kind: str, key: str) -> Records:
    """Rows of `source`; for 'toy', the synthetic task's `toy_kind` rows of `split` ('train'/'eval')."""
    if source == TOY:
        rows = getattr(ToyTask(toy), toy_kind)(split)
        return Records(rows=datasets.Dataset.from_list(rows), source=f"toy {toy_kind} ({split})", line_numbers=None, key=key)
    # A hub name without ':split' reads the split conventionally used for this role.
    return load_records(source, split=HUB_SPLITS[split], key=key)


def sft_examples(source: str, *, split: str, tokenizer: Any, data: Any, key: str) -> tuple[list[SFTExample], TruncationStats]:
    """Tokenized prompt/response (or chat) examples with the response mask, and what truncation did."""
    rows = records(source, split=split, toy=data.toy, toy_kind="demonstrations", key=key)
    return tokenize_sft(
        to_prompt_responses(rows, tokenizer), tokenizer, max_length=data.max_length, long_prompts=data.long_prompts
    )
