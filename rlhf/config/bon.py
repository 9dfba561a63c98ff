"""`rlhf bon`'s config: best-of-N sampling, the response the reward scores highest kept."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf.config.common import (
    MAX_SEED,
    EngineConfig,
    ModelConfig,
    RewardConfig,
    RewardEnsembleConfig,
    RunConfig,
    TrackingConfig,
    _at_least,
    _check_data_source,
    _check_ensemble,
    _check_reward,
    _check_toy,
    _within,
)
from rlhf.errors import UserError
from rlhf.toy.task import ToyTaskConfig


@dataclass(frozen=True)
class BestOfNDataConfig:
    train: str | None = "toy"
    """Prompts to answer: the rows of the dataset written ('toy', a .jsonl/.json/.parquet file or a hub dataset
    'name[:split]' with a prompt column or messages); null = only the held-out best-of-N curve."""
    eval: str | None = "toy"
    """Held-out prompts for the best-of-N curve (reward and, on the embedded default, oracle score against n); null = none."""
    max_prompt_length: int = 16
    """Tokens per prompt; prompts are never cut."""
    long_prompts: Literal["error", "skip"] = "skip"
    """What to do with a prompt longer than max_prompt_length: stop with an error, or drop it (counted)."""
    max_prompts: int = 0
    """Training prompts answered (the first N); 0 = all."""
    toy: ToyTaskConfig = field(default_factory=lambda: ToyTaskConfig(eval_size=800))
    """The synthetic task of the embedded default."""


@dataclass(frozen=True)
class BestOfNSamplingConfig:
    n: int = 8
    """Responses sampled per prompt; the one the reward scores highest is kept."""
    max_new_tokens: int = 8
    """Longest response; a response cut here has no EOS and ranks below every response that ended."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0 = no limit."""
    top_p: float = 1.0
    """Nucleus sampling; 1.0 = off."""
    batch_size: int = 16
    """Prompts per rank per generation call (each sampled n times in the same call)."""
    shard_prompts: int = 512
    """Prompts per shard of the dataset: the unit of progress and of resuming after a kill."""
    seed: int = 42
    """Each shard samples from its own seed (this, the shard and the rank): a resumed run writes what an uninterrupted one would."""
    min_reward: float | None = None
    """Keep a prompt's best response only if its reward is at least this (with a verifiable reward: only correct
    answers); null = always keep the best (Llama 2's rejection sampling)."""


@dataclass(frozen=True)
class BestOfNEvalConfig:
    max_rows: int = 800
    """Held-out prompts of the best-of-N curve (the first N); 0 = all."""


@dataclass(frozen=True)
class BestOfNConfig:
    """Best-of-N: sample N responses per prompt, keep the one the reward scores highest (rejection sampling)."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="sft:latest"))
    """The policy sampled (not trained)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """What picks the best: a reward model, Python functions, the oracle, or a weighted sum (as in `rlhf ppo`)."""
    reward_ensemble: RewardEnsembleConfig = field(default_factory=RewardEnsembleConfig)
    """An uncertainty penalty: reward.name_or_path's reward model and these, combined as mean - penalty x std."""
    data: BestOfNDataConfig = field(default_factory=BestOfNDataConfig)
    sampling: BestOfNSamplingConfig = field(default_factory=BestOfNSamplingConfig)
    eval: BestOfNEvalConfig = field(default_factory=BestOfNEvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Only zero_stage (3 partitions the policy and the reward model across ranks) and precision apply: nothing trains."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        data, sampling = self.data, self.sampling
        _check_toy(self.model.toy, "model.toy")
        _check_toy(data.toy, "data.toy")
        if data.train is None and data.eval is None:
            raise UserError("data.train and data.eval are both null: give prompts to answer, held-out prompts, or both")
        for key in ("train", "eval"):
            if getattr(data, key) is not None:
                _check_data_source(f"data.{key}", getattr(data, key))
        _at_least(1, {"data.max_prompt_length": data.max_prompt_length, "sampling.n": sampling.n,
                      "sampling.max_new_tokens": sampling.max_new_tokens, "sampling.batch_size": sampling.batch_size,
                      "sampling.shard_prompts": sampling.shard_prompts})
        _at_least(0, {"data.max_prompts": data.max_prompts, "eval.max_rows": self.eval.max_rows})
        _within(0, MAX_SEED, {"sampling.seed": sampling.seed})
        if sampling.temperature <= 0:
            raise UserError(f"sampling.temperature must be positive (best-of-N samples), got {sampling.temperature}")
        if not 0 < sampling.top_p <= 1 or sampling.top_k < 0:
            raise UserError("sampling.top_p must be in (0, 1] and sampling.top_k at least 0")
        if self.model.lora.enabled:
            raise UserError("model.lora.enabled: best-of-N trains nothing, so it takes no adapters; drop it")
        _check_reward(self.reward, data)
        _check_ensemble(self.reward_ensemble, self.reward)
