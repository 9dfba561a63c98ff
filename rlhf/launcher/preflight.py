"""Each stage's input checks, run by the CLI before any rank starts (and before a cluster allocates
GPUs for them): `check_inputs(stage, cfg)`, one function per stage in `PREFLIGHT`.

Model references resolve to a causal LM, the tokenizer is the parent entry's, and local data
(files and the embedded default) goes through the very loading and tokenization the stage will
run, so a malformed row, an empty file or a prompt longer than the context stops here with one
line. Hub datasets are checked by the stage itself, where they are downloaded once.

Kept apart from `rlhf/stages/*.py` because the library never imports a stage program, and the CLI
process should import only what the checks need (torch, transformers, datasets; never deepspeed).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, TypeAlias

from rlhf.protocols import Tokenizer

if TYPE_CHECKING:
    from rlhf.config import BestOfNConfig, DataConfig, DPOConfig, LabelConfig, PPOConfig, RMConfig, SampleConfig, SFTConfig, StageConfig
    from rlhf.data.load import DPOReading

ModelAndData: TypeAlias = "SFTConfig | RMConfig | PPOConfig | DPOConfig | BestOfNConfig | SampleConfig"
"""The stages whose checks load a model and read data.train (rlhf label reads rlhf sample's rows instead)."""


class DataCheck(NamedTuple):
    key: str
    """The config key, for the error message."""
    split: str
    source: str
    reader: str
    """The stage whose example format the data has."""


def check_inputs(stage: str, cfg: StageConfig) -> None:
    """Run `stage`'s checks on its resolved config; a UserError names the first bad input."""
    PREFLIGHT[stage](cfg)


def check_sft(cfg: SFTConfig) -> None:
    _check_stage("sft", cfg)


def check_rm(cfg: RMConfig) -> None:
    _check_stage("rm", cfg)


def check_ppo(cfg: PPOConfig) -> None:
    from rlhf.models.sources import ppo_sources, reward_stats

    # The ptx term reads SFT-format data (data.ptx is set with ppo.ptx_coef > 0: PPOConfig checks).
    ptx = (DataCheck("data.ptx", "train", cfg.data.ptx or "", "sft"),) if cfg.ppo.ptx_coef > 0 else ()
    local = _local_data("ppo", cfg, ptx)
    source, registry, tokenizer = _model_and_tokenizer(cfg, need_tokenizer=True)
    # The critic and a learned reward are reward models that read the actor's token ids.
    reward = ppo_sources(cfg, registry, source, tokenizer).reward
    if (cfg.ppo.normalize_score or cfg.reward_ensemble.name_or_path) and reward is not None and reward.kind in ("registry", "path"):
        reward_stats(reward)
    _check_reward_functions(cfg)
    if cfg.rollout.env is not None:  # the environment class imports, here, before any rank starts
        from rlhf.rollouts.multiturn import load_env_class

        load_env_class(cfg.rollout.env)
    _check_data(cfg, local, tokenizer)


def _check_reward_functions(cfg: PPOConfig | BestOfNConfig) -> None:
    """Each python: reward source imports and is callable here, in the environment the ranks inherit."""
    from rlhf.rollouts.rewards import load_function, parse_source, parse_sources

    for source in parse_sources(cfg.reward.name_or_path, cfg.reward.weights):
        if source.kind == "python":
            load_function(source)
    gold = getattr(getattr(cfg, "eval", None), "gold", None)  # rlhf ppo's held-out grader
    if gold is not None and gold.startswith("python:"):
        load_function(parse_source(gold, key="eval.gold"), key="eval.gold")


def check_dpo(cfg: DPOConfig) -> None:
    from rlhf.config import REFERENCE_FREE_LOSSES
    from rlhf.models.sources import reference_source

    local = _local_data("dpo", cfg)
    source, registry, tokenizer = _model_and_tokenizer(cfg, need_tokenizer=True)
    # A named reference must be a causal LM reading the policy's tokens (loaded for the loss or for eval.kl).
    if cfg.dpo.loss not in REFERENCE_FREE_LOSSES or cfg.eval.kl:
        reference_source(cfg, registry, source, tokenizer)
    _check_data(cfg, local, tokenizer)


def check_bon(cfg: BestOfNConfig) -> None:
    from rlhf.models.sources import ensemble_sources, implicit_sources, reward_model_source, reward_stats
    from rlhf.rollouts.rewards import parse_sources

    local = _local_data("ppo", cfg)  # prompts, read as the ppo stage reads them
    source, registry, tokenizer = _model_and_tokenizer(cfg, need_tokenizer=True)
    reward = reward_model_source(cfg, registry, tokenizer)
    # Combined with other sources or an ensemble, the reward model's scores are normalized with its stored statistics.
    if reward is not None and (len(parse_sources(cfg.reward.name_or_path, cfg.reward.weights)) > 1 or cfg.reward_ensemble.name_or_path):
        reward_stats(reward)
    implicit_sources(cfg, reward, registry, tokenizer)  # a DPO policy's reference, resolved and checked
    ensemble_sources(cfg, registry, tokenizer)
    _check_reward_functions(cfg)
    _check_data(cfg, local, tokenizer)


def check_sample(cfg: SampleConfig) -> None:
    from rlhf.data.load import prompt_rows
    from rlhf.errors import UserError

    local = _local_data("ppo", cfg)
    _, _, tokenizer = _model_and_tokenizer(cfg, need_tokenizer=True)
    for check in local:
        rows, _ = prompt_rows(check.source, split="train", tokenizer=tokenizer, data=cfg.data, key=check.key)
        if not rows[: cfg.data.max_prompts or None]:
            raise UserError(f"data.train={cfg.data.train} leaves no prompt to sample for (empty, or every prompt longer "
                            f"than data.max_prompt_length={cfg.data.max_prompt_length})")


def check_label(cfg: LabelConfig) -> None:
    """The samples are rlhf sample's, unedited; the labeler imports (python:) or is a causal LM whose answer texts are one token each."""
    from rlhf.feedback.labelers import function_scores, parse_labeler, read_samples

    read_samples(Path(cfg.data.samples))
    spec = parse_labeler(cfg.by)
    if spec.kind == "python":
        function_scores(spec)
    elif spec.kind == "judge":
        from rlhf.feedback.judge import choice_ids
        from rlhf.models.sources import check_causal_lm, load_tokenizer, resolve_model
        from rlhf.store.registry import Registry

        assert cfg.run.registry is not None  # resolve_config sets it
        source = resolve_model(spec.target, Registry(cfg.run.registry), key="by")
        check_causal_lm(source, key="by")
        choice_ids(load_tokenizer(source, trust_remote_code=cfg.judge.trust_remote_code, key="by"), cfg.judge.choices)


# Each takes its own stage's config, so the dict's callables take Any.
PREFLIGHT: dict[str, Callable[[Any], None]] = {"sft": check_sft, "rm": check_rm, "ppo": check_ppo, "dpo": check_dpo,
                                               "bon": check_bon, "sample": check_sample, "label": check_label}


def _check_stage(stage: str, cfg: SFTConfig | RMConfig) -> None:
    local = _local_data(stage, cfg)
    _, _, tokenizer = _model_and_tokenizer(cfg, need_tokenizer=bool(local))
    _check_data(cfg, local, tokenizer)


def _local_data(stage: str, cfg: ModelAndData, extra: tuple[DataCheck, ...] = ()) -> list[DataCheck]:
    """The stage's data that is here to read (files, the embedded default), not on a hub."""
    from rlhf.data.sources import FILE_SUFFIXES
    from rlhf.toy import TOY

    evaluation = getattr(cfg.data, "eval", None) or ""  # rlhf sample reads training prompts only; bon may read eval only
    named = [DataCheck("data.train", "train", cfg.data.train or "", stage), DataCheck("data.eval", "eval", evaluation, stage), *extra]
    return [c for c in named
            if c.source and (c.source == TOY or c.source.endswith(FILE_SUFFIXES) or Path(c.source).expanduser().exists())]


def _model_and_tokenizer(cfg: ModelAndData, *, need_tokenizer: bool):
    """Precision and the model reference checked; (model source, registry, tokenizer), the tokenizer
    loaded when data will be tokenized or the model is a registry entry (its tokenizer is the parent's)."""
    import torch

    from rlhf.config import check_precision
    from rlhf.models.sources import check_causal_lm, load_tokenizer, resolve_model
    from rlhf.store.registry import Registry

    check_precision(cfg.engine, cuda_available=torch.cuda.is_available())
    assert cfg.run.registry is not None  # resolve_config sets it
    registry = Registry(cfg.run.registry)
    source = resolve_model(cfg.model.name_or_path, registry)
    check_causal_lm(source)
    tokenizer = None
    if need_tokenizer or source.entry is not None:
        tokenizer = load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code, name_or_path=cfg.model.tokenizer)
    return source, registry, tokenizer


def _check_data(cfg: ModelAndData, local: list[DataCheck], tokenizer: Tokenizer) -> None:
    """Load and tokenize the local data the way the stage will."""
    from rlhf.data.load import STAGE_EXAMPLES

    for check in local:
        STAGE_EXAMPLES[check.reader](check.source, split=check.split, tokenizer=tokenizer,
                                     data=_data_section_for(check.reader, cfg), key=check.key)


def _data_section_for(reader: str, cfg: ModelAndData) -> DataConfig | DPOReading:
    """The data settings of a reader: PPO's ptx data is read the way the ppo stage reads it, DPO's
    data in the layout of its loss."""
    from rlhf.config import PPOConfig
    from rlhf.data.load import ptx_data_config, stage_reading

    # reader "sft" comes from rlhf sft (its own data) or from rlhf ppo (data.ptx)
    return ptx_data_config(cfg.data) if reader == "sft" and isinstance(cfg, PPOConfig) else stage_reading(reader, cfg)
