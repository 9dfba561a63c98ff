"""`rlhf ppo`'s config (its own sections are in rlhf/config/ppo_sections.py) and the checks of how they fit together."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.algos.variants import GROUP_ESTIMATORS
from rlhf.config.common import (
    EngineConfig,
    FrozenModelConfig,
    ModelConfig,
    OptimConfig,
    RewardConfig,
    RewardEnsembleConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
    _at_least,
    _check_common,
    _check_data_source,
    _check_ensemble,
    _check_max_length,
    _check_model,
    _check_optim,
    _check_reward,
    _positive,
)
from rlhf.config.ppo_sections import (
    PPOAlgoConfig,
    PPODataConfig,
    PPOEvalConfig,
    RolloutConfig,
    checks_mismatch,
)
from rlhf.errors import UserError


@dataclass(frozen=True)
class PPOConfig:
    """PPO against the reward model with a KL penalty to the SFT policy (InstructGPT, PPO-ptx)."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="sft:latest"))
    """The actor (policy), trained."""
    critic: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="rm:latest"))
    """The critic (value model), trained; starts from a reward model's weights and head."""
    reference: FrozenModelConfig = field(default_factory=FrozenModelConfig)
    """The frozen reference policy of the KL penalty (with LoRA on the actor: the actor without its adapters)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Where the score comes from: the frozen reward model, Python functions, the oracle, or a weighted sum."""
    reward_ensemble: RewardEnsembleConfig = field(default_factory=RewardEnsembleConfig)
    """An uncertainty penalty: reward.name_or_path's reward model and these, combined as mean - penalty x std (as in `rlhf bon`)."""
    data: PPODataConfig = field(default_factory=PPODataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=10))
    """The actor's optimizer and schedule (annealed over every PPO optimizer step)."""
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=10))
    """The critic's optimizer and schedule."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Actor and critic engines; micro_batch_size = rollouts per rank per PPO minibatch."""
    # Measured on the embedded default (1 rank, held-out oracle score of sampled answers, 0-100):
    # 60 -> 77 after 150 steps at lr 1e-4; 60 -> 74.5 at lr 5e-5; 60 -> 71 after 100 steps.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=150, log_every=1, eval_every=50, save_every=50))
    """max_steps = PPO steps (one rollout batch, then ppo.epochs passes over it)."""
    eval: PPOEvalConfig = field(default_factory=PPOEvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def optimizer_steps(self) -> int:
        """Optimizer steps of the whole run (each PPO step makes ppo.epochs passes of whole minibatches): what the
        learning-rate schedules anneal over."""
        minibatches = self.rollout.batch_size // self.engine.micro_batch_size // self.engine.grad_accum
        return self.train.max_steps * self.ppo.epochs * minibatches

    def validate(self) -> None:
        _check_common(self)
        data, engine, rollout = self.data, self.engine, self.rollout
        _at_least(1, {"data.max_prompt_length": data.max_prompt_length, "rollout.batch_size": rollout.batch_size,
                      "rollout.max_new_tokens": rollout.max_new_tokens})
        _at_least(0, {"rollout.score_batch_size": rollout.score_batch_size})
        _check_max_length(data.ptx_max_length, key="data.ptx_max_length")
        longest = data.max_prompt_length + rollout.episode_tokens()
        if data.packing_tokens and data.packing_tokens < longest:
            raise UserError(f"data.packing_tokens ({data.packing_tokens}) must be 0 or at least data.max_prompt_length + the longest "
                            f"response side ({longest}): a sequence is never split; raise it or set data.packing_tokens=0")
        if data.ptx is not None:
            _check_data_source("data.ptx", data.ptx)
        minibatch = engine.micro_batch_size * engine.grad_accum
        if rollout.batch_size % minibatch:
            raise UserError(
                f"rollout.batch_size ({rollout.batch_size}) must be a multiple of engine.micro_batch_size x engine.grad_accum "
                f"({minibatch}): each PPO epoch splits the rollout batch into whole optimizer steps"
            )
        if rollout.temperature <= 0:
            raise UserError(f"rollout.temperature must be positive (PPO samples), got {rollout.temperature}")
        if not 0 < rollout.top_p <= 1 or rollout.top_k < 0:
            raise UserError("rollout.top_p must be in (0, 1] and rollout.top_k at least 0")
        _check_ppo_algo(self.ppo, ptx=data.ptx)
        _check_estimator(self.ppo, rollout)
        _check_optim(self.critic_optim, "critic_optim")
        _check_model(self.critic, "critic")
        _check_reward(self.reward, self.data)
        _check_ensemble(self.reward_ensemble, self.reward)
        _check_gold(self.eval.gold, data.eval)
        _check_reasoning(self)
        _check_multi_turn(self)


def _check_multi_turn(cfg: PPOConfig) -> None:
    """rollout.env and its settings (the class is imported by the preflight); one line for the first that does not fit."""
    from rlhf.rollouts.rewards import parse_source

    rollout, ppo = cfg.rollout, cfg.ppo
    _at_least(1, {"rollout.max_turns": rollout.max_turns})
    if rollout.env is None:
        if rollout.max_turns != 1 or rollout.max_episode_tokens is not None or rollout.turn_rewards != "end":
            raise UserError("rollout.max_turns, rollout.max_episode_tokens and rollout.turn_rewards apply to multi-turn rollouts: "
                            "set rollout.env=python:package.module:Class (e.g. python:rlhf.tasks.envs:ToolEnv)")
        return
    if parse_source(rollout.env, key="rollout.env").kind != "python":
        raise UserError(f"rollout.env={rollout.env!r} is not python:package.module:Class (e.g. python:rlhf.tasks.envs:ToolEnv)")
    if rollout.max_episode_tokens is not None and rollout.max_episode_tokens < rollout.max_new_tokens:
        raise UserError(f"rollout.max_episode_tokens ({rollout.max_episode_tokens}) must be at least rollout.max_new_tokens "
                        f"({rollout.max_new_tokens}): one whole turn")
    refused = {"ppo.tis_cap": ppo.tis_cap, "ppo.max_mismatch_kl": ppo.max_mismatch_kl, "reward.overlong_buffer": cfg.reward.overlong_buffer}
    for key, value in refused.items():
        if value is not None:
            raise UserError(f"{key} is not supported with rollout.env (multi-turn rollouts take their old log-probs from the "
                            "actor's forward and have no single response length): set it to null")


def _check_ppo_algo(ppo: PPOAlgoConfig, *, ptx: str | None) -> None:
    _at_least(1, {"ppo.epochs": ppo.epochs, "ppo.kl_horizon": ppo.kl_horizon})
    if not 0 <= ppo.gamma <= 1 or not 0 <= ppo.lam <= 1:
        raise UserError(f"ppo.gamma and ppo.lam must be in [0, 1], got {ppo.gamma} and {ppo.lam}")
    if ppo.clip_range <= 0 or (ppo.value_clip_range is not None and ppo.value_clip_range <= 0):
        raise UserError("ppo.clip_range and ppo.value_clip_range must be positive (null turns value clipping off)")
    if ppo.beta < 0 or (ppo.kl_target is not None and ppo.kl_target <= 0):
        raise UserError("ppo.beta must be at least 0 and ppo.kl_target positive (or null for a fixed beta)")
    if ppo.kl_target is not None and ppo.beta == 0:
        raise UserError("ppo.kl_target adapts beta multiplicatively, so ppo.beta must start above 0")
    # null turns either off; 0 or less would flag every run (max_kl) or zero every score (score_clip).
    _positive({"ppo.max_kl": ppo.max_kl, "ppo.score_clip": ppo.score_clip})
    if ppo.ptx_coef < 0:
        raise UserError(f"ppo.ptx_coef must be at least 0, got {ppo.ptx_coef}")
    if ppo.ptx_coef > 0 and not ptx:
        raise UserError("ppo.ptx_coef > 0 needs data.ptx (pretraining or SFT data, e.g. data.ptx=toy)")


def _check_estimator(ppo: PPOAlgoConfig, rollout: RolloutConfig) -> None:
    """The advantage estimator's settings fit together (one line for the first that does not)."""
    k = rollout.samples_per_prompt
    _at_least(1, {"rollout.samples_per_prompt": k})
    if rollout.batch_size % k:
        raise UserError(f"rollout.batch_size ({rollout.batch_size}) must be a multiple of rollout.samples_per_prompt ({k}): "
                        "each rank samples whole groups")
    if ppo.estimator in GROUP_ESTIMATORS and k < 2:
        raise UserError(f"ppo.estimator={ppo.estimator} compares the responses to one prompt: set rollout.samples_per_prompt to "
                        f"at least 2 (e.g. 4), got {k}")
    if not ppo.scale_by_group_std and ppo.estimator != "grpo":
        raise UserError(f"ppo.scale_by_group_std=false applies to ppo.estimator=grpo only, not {ppo.estimator}")
    if ppo.whiten_rewards and ppo.estimator in GROUP_ESTIMATORS:
        raise UserError(f"ppo.whiten_rewards applies to per-token rewards (estimators gae, reinforce_pp), not {ppo.estimator}: "
                        "remove it")
    if ppo.kl_in == "loss" and ppo.kl_estimator == "k1":
        raise UserError("ppo.kl_in=loss needs ppo.kl_estimator k3 or k2 (k1's gradient is zero on average as a loss term)")


def _check_reasoning(cfg: PPOConfig) -> None:
    """The DAPO / GSPO / TIS settings (one line for the first that does not fit)."""
    ppo, reward, rollout = cfg.ppo, cfg.reward, cfg.rollout
    _positive({"ppo.clip_high": ppo.clip_high, "ppo.tis_cap": ppo.tis_cap, "ppo.max_mismatch_kl": ppo.max_mismatch_kl})
    if ppo.clip_low is not None and not 0 < ppo.clip_low < 1:
        raise UserError(f"ppo.clip_low must be in (0, 1) (the ratio's floor is 1 - clip_low), got {ppo.clip_low}")
    if ppo.tis_cap is not None and ppo.tis_cap < 1:
        raise UserError(f"ppo.tis_cap must be at least 1 (a cap below 1 scales every token down), got {ppo.tis_cap}")
    if checks_mismatch(ppo) and rollout.logprobs_from_generation and cfg.engine.precision == "fp32":
        key = "ppo.tis_cap" if ppo.tis_cap is not None else "ppo.max_mismatch_kl"
        raise UserError(f"{key} compares generation's log-probs with the actor's forward, but rollout.logprobs_from_generation "
                        "makes them the same under fp32 (every weight 1, mismatch 0): set rollout.logprobs_from_generation=false")
    if reward.overlong_buffer is not None and not 1 <= reward.overlong_buffer <= rollout.max_new_tokens:
        raise UserError(f"reward.overlong_buffer must be in [1, rollout.max_new_tokens={rollout.max_new_tokens}], "
                        f"got {reward.overlong_buffer}")
    if reward.overlong_penalty <= 0:
        raise UserError(f"reward.overlong_penalty must be positive (a null reward.overlong_buffer turns the penalty off), "
                        f"got {reward.overlong_penalty}")
    if reward.overlong_penalty != 1.0 and reward.overlong_buffer is None:
        raise UserError("reward.overlong_penalty has no effect without reward.overlong_buffer: set reward.overlong_buffer (e.g. 4)")
    _check_dynamic_sampling(cfg)


def _check_dynamic_sampling(cfg: PPOConfig) -> None:
    """ppo.dynamic_sampling needs groups (a group estimator; its K >= 2 is _check_estimator's) and one response per prompt."""
    ppo = cfg.ppo
    _at_least(1, {"ppo.max_sampling_rounds": ppo.max_sampling_rounds})
    if not ppo.dynamic_sampling:
        if ppo.max_sampling_rounds != PPOAlgoConfig.max_sampling_rounds:
            raise UserError("ppo.max_sampling_rounds has no effect without ppo.dynamic_sampling: set ppo.dynamic_sampling=true")
        return
    if ppo.estimator not in GROUP_ESTIMATORS:
        raise UserError(f"ppo.dynamic_sampling drops groups of responses to one prompt whose rewards are all equal: it needs "
                        f"ppo.estimator grpo or rloo (with rollout.samples_per_prompt >= 2), not {ppo.estimator}")
    if cfg.rollout.env is not None:
        raise UserError("ppo.dynamic_sampling is not supported with rollout.env (multi-turn episodes are not joined across "
                        "generation rounds): set ppo.dynamic_sampling=false")


def _check_gold(gold: str | None, eval_data: str | None) -> None:
    """eval.gold is a python: function or the oracle, never a model: a gold label is what a model is checked against."""
    from rlhf.rollouts.rewards import parse_source
    from rlhf.toy import TOY

    if gold is None:
        return
    kind = parse_source(gold, key="eval.gold").kind
    if kind == "learned":
        raise UserError(f"eval.gold: {gold!r} is neither python:package.module:function nor oracle; "
                        "the gold score is a function of the text (a grader), not a model")
    if eval_data is None or (kind == "oracle" and eval_data != TOY):
        raise UserError(f"eval.gold={gold} grades held-out answers, but data.eval={eval_data}; "
                        + ("the oracle grades the embedded default's task only (data.eval=toy)" if eval_data else "set data.eval"))
