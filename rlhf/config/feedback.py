"""The feedback loop's configs: `rlhf sample` (K responses per prompt) and `rlhf label` (a labeler ranks them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf.config.common import (
    MAX_SEED,
    EngineConfig,
    ModelConfig,
    RunConfig,
    TrackingConfig,
    _at_least,
    _check_data_source,
    _check_toy,
    _within,
)
from rlhf.errors import UserError
from rlhf.toy.task import ToyTaskConfig


@dataclass(frozen=True)
class SampleDataConfig:
    train: str = "toy"
    """Prompts to sample for: 'toy', a .jsonl/.json/.parquet file or a hub dataset 'name[:split]' with a prompt column or messages."""
    max_prompt_length: int = 16
    """Tokens per prompt; prompts are never cut."""
    long_prompts: Literal["error", "skip"] = "skip"
    """What to do with a prompt longer than max_prompt_length: stop with an error, or drop it (counted)."""
    max_prompts: int = 0
    """Prompts sampled for (the first N); 0 = all."""
    toy: ToyTaskConfig = field(default_factory=ToyTaskConfig)
    """The synthetic task of the embedded default."""


@dataclass(frozen=True)
class SampleSettingsConfig:
    k: int = 4
    """Responses sampled per prompt (K >= 2: a labeler ranks them)."""
    max_new_tokens: int = 8
    """Longest response; a response cut here has no EOS (recorded: `ended` false)."""
    temperature: float = 1.0
    """Sampling temperature (above 0: the K responses must differ)."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0 = no limit."""
    top_p: float = 1.0
    """Nucleus sampling; 1.0 = off."""
    batch_size: int = 16
    """Prompts per rank per generation call (each sampled k times in the same call)."""
    shard_prompts: int = 512
    """Prompts per shard of the dataset: the unit of progress and of resuming after a kill."""
    seed: int = 42
    """Each shard samples from its own seed (this plus the shard's index, and the rank): recorded in every row."""


@dataclass(frozen=True)
class SampleConfig:
    """`rlhf sample`: K responses per prompt from a policy, with their token ids and log-probs, for a labeler to rank."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="sft:latest"))
    """The policy sampled (not trained)."""
    data: SampleDataConfig = field(default_factory=SampleDataConfig)
    sampling: SampleSettingsConfig = field(default_factory=SampleSettingsConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Only zero_stage (3 partitions the policy across ranks) and precision apply: nothing trains."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        data, sampling = self.data, self.sampling
        _check_toy(self.model.toy, "model.toy")
        _check_toy(data.toy, "data.toy")
        _check_data_source("data.train", data.train)
        _at_least(1, {"data.max_prompt_length": data.max_prompt_length, "sampling.max_new_tokens": sampling.max_new_tokens,
                      "sampling.batch_size": sampling.batch_size, "sampling.shard_prompts": sampling.shard_prompts})
        _at_least(2, {"sampling.k": sampling.k})
        _at_least(0, {"data.max_prompts": data.max_prompts})
        _within(0, MAX_SEED, {"sampling.seed": sampling.seed})
        if sampling.temperature <= 0:
            raise UserError(f"sampling.temperature must be positive (K greedy responses would all be the same), got {sampling.temperature}")
        if not 0 < sampling.top_p <= 1 or sampling.top_k < 0:
            raise UserError("sampling.top_p must be in (0, 1] and sampling.top_k at least 0")
        if self.model.lora.enabled:
            raise UserError("model.lora.enabled: sampling trains nothing, so it takes no adapters; drop it")


JUDGE_TEMPLATE = ("Question: {prompt}\nAnswer A: {a}\nAnswer B: {b}\n"
                  "Which answer is better, A or B? The better answer is")


@dataclass(frozen=True)
class JudgeConfig:
    template: str = JUDGE_TEMPLATE
    """What the judge reads for each pair; must hold {prompt}, {a} and {b} (the two responses, asked in both orders)."""
    choices: list[str] = field(default_factory=lambda: [" A", " B"])
    """The texts whose next-token log-probs are compared: the first names {a}, the second {b}; each must be one token
    of the judge's tokenizer."""
    chat_template: bool = True
    """Wrap the question in the judge tokenizer's chat template (when it has one) as a user turn."""
    trust_remote_code: bool = False
    """Let the judge's repository run its own code (off: a judge is a plain transformers causal LM)."""
    batch_size: int = 8
    """Pairs per forward pass."""


@dataclass(frozen=True)
class LabelDataConfig:
    samples: str = "samples:latest"
    """The samples to rank: a `samples` registry reference (rlhf sample's entry) or its samples.jsonl."""
    include: str | None = None
    """A `prefs` entry (or its train.jsonl) whose ranked lists come first in this one: iterated rounds keep every
    comparison so far in the newest entry; null = only the new labels."""


@dataclass(frozen=True)
class LabelConfig:
    """`rlhf label`: each prompt's K sampled responses ranked by a labeler, written as ranked lists (`prefs:<id>`)."""

    data: LabelDataConfig = field(default_factory=LabelDataConfig)
    by: str = "oracle"
    """Who ranks: 'oracle' (the embedded default's ground truth), 'python:package.module:function' (a function of the
    installed environment: prompts, responses -> one score each) or 'judge:<model>' (a causal LM asked which of two
    responses is better: registry reference, folder, .gguf or hub name). Equal scores are ties."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """With by=judge:<model>: how the judge is asked."""
    tie_tolerance: float = 0.0
    """Scores within this of each other rank equal (a tie: the reward model takes no pair from them)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Only precision applies (the judge's dtype)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        from rlhf.feedback.labelers import parse_labeler

        _check_data_source("data.samples", self.data.samples)
        parse_labeler(self.by)
        _at_least(0, {"tie_tolerance": self.tie_tolerance})
        _at_least(1, {"judge.batch_size": self.judge.batch_size})
        missing = [name for name in ("{prompt}", "{a}", "{b}") if name not in self.judge.template]
        if missing:
            raise UserError(f"judge.template lacks {', '.join(missing)}; it must hold {{prompt}}, {{a}} and {{b}}")
        if len(self.judge.choices) != 2 or len(set(self.judge.choices)) != 2:
            raise UserError(f"judge.choices must be two different texts (naming {{a}} and {{b}}), got {self.judge.choices}")
