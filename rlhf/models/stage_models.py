"""PPO's four models built from their resolved sources: the actor and critic as DeepSpeed engines
with their optimizers, the reference and reward frozen; three without the critic for a critic-free
advantage estimator. `build_reference` is DPO's too."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from rlhf.config import BestOfNConfig, DPOConfig, LoraConfig, ModelConfig, PPOConfig
from rlhf.models.loading import ScalarModel, disable_dropout, load_causal_lm, load_scalar_model, zero_scalar_head
from rlhf.models.sources import ImplicitSources, ModelSource, PPOSources, reward_stats
from rlhf.protocols import CausalLM, PolicyModel, ScoringModel, Tokenizer, TrainEngine
from rlhf.rollouts.generation import RewardEnsemble
from rlhf.rollouts.implicit_reward import ImplicitReward
from rlhf.training.engine import (
    PRECISION_DTYPES,
    Dist,
    build_engine,
    build_frozen,
    deepspeed_config,
    frozen_zero3_config,
    zero3_partitioning,
)


@dataclass(frozen=True)
class PPOModels:
    """PPO's four models: the actor and critic as DeepSpeed engines with their optimizers; the
    reference and reward frozen (ZeRO-3 partitions under ZeRO-3 or offload, else plain modules).
    reference None = the actor with its LoRA adapters switched off; critic None = a critic-free
    estimator (ppo.estimator other than gae); reward None = no learned component in the reward
    (functions or the oracle only)."""

    actor: TrainEngine[CausalLM]
    critic: TrainEngine[ScalarModel] | None
    reference: PolicyModel | None
    reward: ScoringModel | ImplicitReward | None
    ensemble: RewardEnsemble | None = None
    """reward_ensemble's reward models, frozen like reward (None without an ensemble)."""


def frozen_model_config(cfg: PPOConfig | DPOConfig | BestOfNConfig, name: str) -> ModelConfig:
    """How PPO loads its frozen `name` ('reference' or 'reward'): the actor's kernel choice, no
    adapters or recomputed activations (they never backpropagate), and that model's own
    trust_remote_code, since trusting the actor's repository says nothing about another's. A null
    reference is the actor's own model, already loaded under model.trust_remote_code."""
    own = getattr(cfg, name)
    trust = cfg.model.trust_remote_code if name == "reference" and own.name_or_path is None else own.trust_remote_code
    return dataclasses.replace(cfg.model, lora=LoraConfig(), gradient_checkpointing=False, trust_remote_code=trust)


def build_reference(cfg: PPOConfig | DPOConfig, source: ModelSource, tokenizer: Tokenizer, *, dist: Dist) -> PolicyModel:
    """The frozen reference policy of a config with `model`, `reference` and `engine` sections (PPO's,
    DPO's): loaded like the actor without adapters, dropout off, ZeRO-3 partitioned under ZeRO-3 or
    reference.offload, else a plain copy on this rank's device."""
    engine = cfg.engine
    reference = load_causal_lm(source, frozen_model_config(cfg, "reference"), tokenizer, seed=cfg.train.seed,
                               dtype=PRECISION_DTYPES[engine.precision],
                               partitioning=zero3_partitioning(frozen_zero3_config(engine, cfg.reference.offload)),
                               key="reference.name_or_path")
    disable_dropout(reference)
    return build_frozen(reference, engine=engine, offload=cfg.reference.offload, dist=dist)


def build_reward(cfg: PPOConfig | BestOfNConfig, source: ModelSource, tokenizer: Tokenizer, *, seed: int, dist: Dist,
                 implicit: ImplicitSources | None = None) -> ScoringModel | ImplicitReward:
    """The frozen reward model of a config with `model`, `reward` and `engine` sections (PPO's, best-of-N's),
    dropout off: ZeRO-3 partitioned under ZeRO-3 or reward.offload, else a plain copy. With `implicit` (a DPO
    policy as the reward model) the policy and its reference as two frozen causal LMs, and its beta."""
    if implicit is not None:
        policy, reference = (_frozen_policy(cfg, s, tokenizer, seed=seed, dist=dist) for s in (source, implicit.reference))
        return ImplicitReward(policy, reference, implicit.beta)
    return build_scalar_reward(cfg, source, tokenizer, seed=seed, dist=dist)


def build_scalar_reward(cfg: PPOConfig | BestOfNConfig, source: ModelSource, tokenizer: Tokenizer, *, seed: int,
                        dist: Dist) -> ScoringModel:
    """A frozen reward model with a scalar head (`build_reward`'s usual case; every reward_ensemble member)."""
    engine = cfg.engine
    reward = load_scalar_model(source, frozen_model_config(cfg, "reward"), tokenizer, seed=seed,
                               dtype=PRECISION_DTYPES[engine.precision], trained_head=True, key="reward.name_or_path",
                               partitioning=zero3_partitioning(frozen_zero3_config(engine, cfg.reward.offload)))
    disable_dropout(reward)
    return build_frozen(reward, engine=engine, offload=cfg.reward.offload, dist=dist)


def _frozen_policy(cfg: PPOConfig | BestOfNConfig, source: ModelSource, tokenizer: Tokenizer, *, seed: int, dist: Dist) -> PolicyModel:
    """A causal LM of an implicit reward, frozen as the reward model is (reward.offload, its trust_remote_code)."""
    engine = cfg.engine
    model = load_causal_lm(source, frozen_model_config(cfg, "reward"), tokenizer, seed=seed, dtype=PRECISION_DTYPES[engine.precision],
                           partitioning=zero3_partitioning(frozen_zero3_config(engine, cfg.reward.offload)), key="reward.name_or_path")
    disable_dropout(model)
    return build_frozen(model, engine=engine, offload=cfg.reward.offload, dist=dist)


def build_ensemble(cfg: PPOConfig | BestOfNConfig, main: ModelSource, members: tuple[ModelSource, ...], tokenizer: Tokenizer, *, seed: int,
                   dist: Dist) -> RewardEnsemble | None:
    """reward_ensemble's models, each built like the reward model, with the stored statistics of `main` and of each
    (PPO's, best-of-N's); None without members."""
    if not members:
        return None
    stats = torch.tensor([[s["mean"], s["std"]] for s in map(reward_stats, (main, *members))], dtype=torch.float64)
    models = tuple(build_scalar_reward(cfg, m, tokenizer, seed=seed, dist=dist) for m in members)
    return RewardEnsemble(models, stats, cfg.reward_ensemble.penalty)


def build_ppo_models(
    cfg: PPOConfig, sources: PPOSources, actor_source: ModelSource, tokenizer: Tokenizer, *, dist: Dist, total_updates: int
) -> PPOModels:
    """Load and wrap PPO's four models from their resolved sources, dropout off in all four; no
    critic when sources.critic is None (a critic-free estimator).

    Under ZeRO-3 each model loads straight into partitions. The critic keeps the reward model's
    backbone; its head is zeroed with ppo.value_head=zero. `total_updates` (optimizer steps of the
    whole run) sets both learning-rate schedules.
    """
    engine = cfg.engine
    zero3 = engine.zero_stage == 3
    dtype = PRECISION_DTYPES[engine.precision]
    seed = cfg.train.seed
    actor_model = load_causal_lm(actor_source, cfg.model, tokenizer, seed=seed, dtype=dtype,
                                 partitioning=zero3_partitioning(deepspeed_config(engine, cfg.optim) if zero3 else None))
    critic_model = None if sources.critic is None else load_critic(cfg, sources.critic, tokenizer, dtype=dtype)
    reference = None if sources.reference is None else build_reference(cfg, sources.reference, tokenizer, dist=dist)
    reward = None if sources.reward is None else build_reward(cfg, sources.reward, tokenizer, seed=seed, dist=dist,
                                                               implicit=sources.implicit)
    for model in (actor_model, critic_model):
        if model is not None:
            disable_dropout(model)
    actor = build_engine(actor_model, engine=engine, optim=cfg.optim, total_steps=total_updates)
    critic = None
    if critic_model is not None:
        critic = build_engine(critic_model, engine=engine, optim=cfg.critic_optim, total_steps=total_updates)
    ensemble = None if sources.reward is None else build_ensemble(cfg, sources.reward, sources.ensemble, tokenizer, seed=seed, dist=dist)
    return PPOModels(actor=actor, critic=critic, reference=reference, reward=reward, ensemble=ensemble)


def load_critic(cfg: PPOConfig, source: ModelSource, tokenizer: Tokenizer, *, dtype: torch.dtype) -> ScalarModel:
    """The critic before its engine: the reward model's backbone and head (zeroed with ppo.value_head=zero)."""
    partitioning = zero3_partitioning(deepspeed_config(cfg.engine, cfg.critic_optim) if cfg.engine.zero_stage == 3 else None)
    critic = load_scalar_model(source, cfg.critic, tokenizer, seed=cfg.train.seed, dtype=dtype, trained_head=True,
                               key="critic.name_or_path", partitioning=partitioning)
    if cfg.ppo.value_head == "zero":
        zero_scalar_head(critic, partitioning=partitioning)
    return critic
