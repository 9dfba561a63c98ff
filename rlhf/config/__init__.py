"""Typed configs: one frozen dataclass tree per stage, read from defaults, a YAML file and dotted command-line
overrides, validated once and never mutated. `loader` builds one (each value converted by its field's type, every
mistake a `UserError` naming the key and where it came from, `file.yaml:12` or the override, with the closest
valid key for a typo), writes it back and lists a class's keys and docs; `yaml_file` reads a config file with the
line of every key. `common` holds the sections the stages share and the checks their `validate` methods share;
each stage's own sections and checks are in `sft`, `rm`, `ppo` (its sections in `ppo_sections`), `dpo`, `bon` and
`feedback` (`rlhf sample`, `rlhf label`). The names of the algorithms' variants (losses, estimators) come from
rlhf.algos.variants. Everything other modules use is re-exported here, so `from rlhf.config import X` is the way
in. The package imports no torch, so that `rlhf --help` and config errors stay fast.
"""

from __future__ import annotations

from rlhf.algos.variants import CRITIC_FREE_ESTIMATORS, GROUP_ESTIMATORS, REFERENCE_FREE_LOSSES
from rlhf.config.bon import BestOfNConfig, BestOfNDataConfig, BestOfNEvalConfig, BestOfNSamplingConfig
from rlhf.config.common import (
    MAX_SEED,
    MAX_STEPS,
    EngineConfig,
    EvalConfig,
    FrozenModelConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RewardConfig,
    RewardEnsembleConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
    check_precision,
)
from rlhf.config.dpo import DEFAULT_BETAS, DPOAlgoConfig, DPOConfig, DPODataConfig, DPOEvalConfig, loss_beta
from rlhf.config.feedback import (
    JUDGE_TEMPLATE,
    JudgeConfig,
    LabelConfig,
    LabelDataConfig,
    SampleConfig,
    SampleDataConfig,
    SampleSettingsConfig,
)
from rlhf.config.loader import field_docs, leaf_keys, load_config, save_config, to_dict
from rlhf.config.ppo import PPOConfig
from rlhf.config.ppo_sections import (
    PPOAlgoConfig,
    PPODataConfig,
    PPOEvalConfig,
    RolloutConfig,
    checks_mismatch,
    clip_bounds,
    kl_estimator_of,
    loss_aggregation_of,
)
from rlhf.config.rm import RMConfig, RMDataConfig, RMEvalConfig
from rlhf.config.sft import SFTConfig, SFTDataConfig
from rlhf.config.yaml_file import MAX_YAML_VALUES, read_yaml_file

StageConfig = SFTConfig | RMConfig | PPOConfig | DPOConfig | BestOfNConfig | SampleConfig | LabelConfig
"""Any stage's config (the values of STAGE_CONFIGS); functions that dispatch on the stage name take this."""
TrainedConfig = SFTConfig | RMConfig | PPOConfig | DPOConfig
"""The configs of the stages that train a model (each has engine, optim, train, eval, model and data sections)."""
DataConfig = SFTDataConfig | RMDataConfig | PPODataConfig | DPODataConfig | BestOfNDataConfig | SampleDataConfig | LabelDataConfig
"""Any stage's data section."""

STAGE_CONFIGS: dict[str, type] = {"sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig, "dpo": DPOConfig, "bon": BestOfNConfig,
                                  "sample": SampleConfig, "label": LabelConfig}

__all__ = [
    "CRITIC_FREE_ESTIMATORS", "DEFAULT_BETAS", "GROUP_ESTIMATORS", "JUDGE_TEMPLATE", "MAX_SEED", "MAX_STEPS", "MAX_YAML_VALUES",
    "REFERENCE_FREE_LOSSES", "STAGE_CONFIGS", "DataConfig", "StageConfig", "TrainedConfig",
    "BestOfNConfig", "BestOfNDataConfig", "BestOfNEvalConfig", "BestOfNSamplingConfig",
    "DPOAlgoConfig", "DPOConfig", "DPODataConfig", "DPOEvalConfig",
    "EngineConfig", "EvalConfig", "FrozenModelConfig", "LoraConfig", "ModelConfig", "OptimConfig", "RewardConfig",
    "RewardEnsembleConfig", "RunConfig", "TrackingConfig", "TrainConfig",
    "JudgeConfig", "LabelConfig", "LabelDataConfig", "SampleConfig", "SampleDataConfig", "SampleSettingsConfig",
    "PPOAlgoConfig", "PPOConfig", "PPODataConfig", "PPOEvalConfig", "RolloutConfig",
    "RMConfig", "RMDataConfig", "RMEvalConfig", "SFTConfig", "SFTDataConfig",
    "check_precision", "checks_mismatch", "clip_bounds", "field_docs", "kl_estimator_of", "leaf_keys", "load_config",
    "loss_aggregation_of", "loss_beta", "read_yaml_file", "save_config", "to_dict",
]
