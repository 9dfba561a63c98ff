"""`rlhf sft`'s config: supervised fine-tuning on prompt/response pairs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf.config.common import (
    EngineConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
    _check_common,
    _check_max_length,
    _check_packing_tokens,
)
from rlhf.toy.task import ToyTaskConfig


@dataclass(frozen=True)
class SFTDataConfig:
    train: str = "toy"
    """'toy', a .jsonl/.json/.parquet file, or a hub dataset 'name[:split]' with prompt/response or messages."""
    eval: str | None = "toy"
    """Held-out set in the same forms; null = no held-out evaluation."""
    max_length: int = 32
    """Tokens per sequence (prompt + response); longer responses are cut and counted."""
    long_prompts: Literal["error", "skip"] = "error"
    """What to do with a prompt that leaves no room for a response: stop with an error, or drop it (counted)."""
    packing: bool = False
    """Padding-free training: each micro-batch's rows laid end to end in rows of data.packing_tokens, position ids
    restarting per row and attention kept inside it; the same loss and gradients as unpacked (within fp32 rounding)."""
    packing_tokens: int = 0
    """Tokens per packed row when data.packing is on; 0 = data.max_length."""
    toy: ToyTaskConfig = field(default_factory=ToyTaskConfig)
    """The synthetic task of the embedded default."""


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning: causal LM loss on response tokens only."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        _check_common(self)
        _check_max_length(self.data.max_length)
        _check_packing_tokens(self.data)
