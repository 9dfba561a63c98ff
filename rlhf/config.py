"""Typed configs: one dataclass tree per stage, YAML files, dotted command-line overrides.

A config is built once, validated once and never mutated (the dataclasses are frozen). Every
mistake is a `UserError` that names the key and where it came from (`file.yaml:12` or the
command-line override), and suggests the closest valid key for a typo.

This module imports no torch so that `rlhf --help` and config errors stay fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhf.errors import UserError
from rlhf.fileio import atomic_write_text
from rlhf.named_configs import missing_hint
from rlhf.toy.model import ToyModelConfig
from rlhf.toy.task import ToyTaskConfig

# ----------------------------------------------------------------------------------------------
# Sections shared by the stages. Each field's docstring is its documentation (`rlhf config KEY`).


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters (peft) instead of all weights."""
    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] | None = None
    """Module names to adapt; null adapts every linear layer except the output head."""
    save: Literal["merged", "adapter"] = "merged"
    """Store the final model with adapters merged into the weights, or as a peft adapter folder."""


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = "toy"
    """'toy' (the embedded default), a registry reference (`sft:latest`), a local folder or a hub name."""
    tokenizer: str | None = None
    """Tokenizer folder or hub name; null = the model's own. It must match the tokenizer the parent entry was trained with."""
    trust_remote_code: bool = False
    """Allow model code from the hub; off unless you trust the repository."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    attn_implementation: str | None = None
    """transformers attention kernel ('sdpa', 'eager', 'flash_attention_2'); null = transformers' choice."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    toy: ToyModelConfig = field(default_factory=ToyModelConfig)
    """Size of the embedded default model (used when name_or_path is 'toy')."""


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    """Adam epsilon."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup; cosine and linear anneal to min_lr_ratio * lr at the last step."""
    warmup_steps: int = 20
    """Optimizer steps of linear warmup from zero."""
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass(frozen=True)
class EngineConfig:
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage: 0 plain data parallel, 1 optimizer, 2 + gradients, 3 + parameters partitioned."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision; bf16 on Ampere or newer GPUs, fp32 on the CPU."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory (ZeRO 1-3)."""
    offload_params: bool = False
    """Keep parameters in CPU memory (ZeRO 3 only)."""
    micro_batch_size: int = 32
    """Examples per rank per forward pass: sequences (sft), prompts with all their compared responses (rm)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; global batch = micro_batch_size * grad_accum * ranks."""


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps; the data is reshuffled each time it runs out."""
    seed: int = 42
    log_every: int = 10
    """Steps between metric rows."""
    eval_every: int = 250
    """Steps between held-out evaluations (0: only before and after training)."""
    save_every: int = 100
    """Steps between resumable DeepSpeed checkpoints (0: never)."""
    keep_checkpoints: int = 2
    """Resumable checkpoints kept on disk; older ones are deleted once a newer one is complete."""


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 64
    """Sequences per rank per evaluation forward or generation call."""
    max_rows: int = 200
    """Held-out rows evaluated (the first N); 0 = all."""
    max_new_tokens: int = 8
    """Generation length for the oracle's score on the embedded default."""
    temperature: float = 1.0
    """Sampling temperature of the oracle evaluation (greedy is reported too)."""


@dataclass(frozen=True)
class TrackingConfig:
    wandb: bool = False
    """Also log to Weights & Biases (metrics.jsonl is always written)."""
    wandb_project: str = "rlhf"
    wandb_mode: Literal["offline", "online"] = "offline"
    """offline writes the run folder locally (sync later with `wandb sync`); never blocks on a network."""


@dataclass(frozen=True)
class RunConfig:
    registry: str | None = None
    """Registry root folder; null = $RLHF_HOME or ./rlhf_runs."""
    tags: list[str] = field(default_factory=list)
    """Tags stored in the registry entry; usable as references."""


# ----------------------------------------------------------------------------------------------
# Stage configs


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


@dataclass(frozen=True)
class RMDataConfig:
    train: str = "toy"
    """'toy', a .jsonl/.json/.parquet file, or a hub dataset 'name[:split]': prompt/chosen/rejected (+margin),
    chosen/rejected whole conversations (hh-rlhf), chosen/rejected message lists, or prompt/responses ranked best first."""
    eval: str | None = "toy"
    """Held-out comparisons in the same forms (on 'toy': held-out pairs); null = no held-out evaluation."""
    max_length: int = 32
    """Tokens per scored sequence (prompt + response + EOS); longer responses are cut and counted."""
    long_prompts: Literal["error", "skip"] = "error"
    """What to do with a prompt that leaves no room for a response: stop with an error, or drop it (counted)."""
    use_margin: bool = True
    """Where the data has a 'margin' column, train on -log sigmoid(r_chosen - r_rejected - margin) (Llama 2)."""
    toy_format: Literal["ranked", "pairs"] = "ranked"
    """Training data on 'toy': ranked lists of toy.ranked_k responses (InstructGPT's K-way), or single pairs."""
    packing: bool = False
    """Padding-free training: each micro-batch's sequences laid end to end in rows of data.packing_tokens, position
    ids restarting per sequence and attention kept inside it; the same loss and gradients as unpacked (fp32 rounding)."""
    packing_tokens: int = 0
    """Tokens per packed row when data.packing is on; 0 = data.max_length."""
    # 40,000 ranked lists (ten times the other stages' rows; the candidates are drawn afresh, so the
    # reward model sees ten times the mistakes): oracle agreement 0.90 -> 0.94 at 800 steps, 0.97 at 2000.
    toy: ToyTaskConfig = field(default_factory=lambda: ToyTaskConfig(train_size=40_000))
    """The synthetic task of the embedded default."""


@dataclass(frozen=True)
class RMEvalConfig:
    batch_size: int = 64
    """Prompts (with all their compared responses) per rank per evaluation forward pass."""
    max_rows: int = 200
    """Held-out rows evaluated (the first N); 0 = all."""
    reward_stats_rows: int = 2000
    """Training rows whose responses are scored after training for the reward mean/std PPO normalizes with; 0 = all."""


@dataclass(frozen=True)
class RMConfig:
    """Reward model: a causal LM backbone + scalar head, Bradley-Terry loss on comparisons."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="sft:latest"))
    data: RMDataConfig = field(default_factory=RMDataConfig)
    # Measured on the embedded default from the default SFT entry, 40,000 ranked lists, 64 prompts a
    # step: oracle agreement 0.94 after 800 steps at lr 3e-4 (0.87 at 1e-3), 0.97 after 2000 steps,
    # which PPO needs to gain without losing greedy quality (README, `rlhf ppo`).
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4))
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(micro_batch_size=64))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=2000, eval_every=500))
    eval: RMEvalConfig = field(default_factory=RMEvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        _check_common(self)
        _check_max_length(self.data.max_length)
        _check_packing_tokens(self.data)


@dataclass(frozen=True)
class PPODataConfig:
    train: str = "toy"
    """Prompts: 'toy', a .jsonl/.json/.parquet file, or a hub dataset 'name[:split]' with a prompt column or messages."""
    eval: str | None = "toy"
    """Held-out prompts in the same forms; null = no held-out evaluation."""
    max_prompt_length: int = 16
    """Tokens per prompt; prompts are never cut (a cut prompt asks another question)."""
    long_prompts: Literal["error", "skip"] = "skip"
    """What to do with a prompt longer than max_prompt_length: stop with an error, or drop it (counted)."""
    ptx: str | None = None
    """Pretraining or SFT data for the PPO-ptx term (used when ppo.ptx_coef > 0), in the forms `rlhf sft` reads."""
    ptx_max_length: int = 32
    """Tokens per ptx sequence; longer ones are cut."""
    # 800 held-out prompts (of the 810 the toy holds out) put the oracle's mean score within about
    # +-1.5 points (one standard error): PPO's gain is read against that.
    toy: ToyTaskConfig = field(default_factory=lambda: ToyTaskConfig(eval_size=800))
    """The synthetic task of the embedded default."""


@dataclass(frozen=True)
class FrozenModelConfig:
    name_or_path: str | None = None
    """Registry reference, folder or hub name; null = the actor's starting model (the reference policy)."""
    trust_remote_code: bool = False
    """Allow this model's own code from its repository (trusting the actor's does not trust this one); off unless you
    trust the repository. A null reference is the actor's model and loads under model.trust_remote_code."""
    offload: bool = False
    """Partition it with ZeRO-3 and keep its parameters in CPU memory (inference only), whatever engine.zero_stage is."""


@dataclass(frozen=True)
class RewardConfig:
    name_or_path: list[str] = field(default_factory=lambda: ["rm:latest"])
    """The reward's sources, one or several (summed with `weights`): a reward model (registry reference, folder or hub
    name; one at most), `python:package.module:function` (imported from the installed environment or PYTHONPATH,
    called with the prompts and responses as text, returning one float per response), or `oracle` (the embedded
    default's ground truth, 0 to 1; data.train and data.eval must be toy). On the command line: a,b or '[a, b]'."""
    weights: list[float] | None = None
    """One weight per source of name_or_path, in its order; null = 1 each. The reward model's score is normalized
    (ppo.normalize_score) before weighting, a function's is used as it is; then ppo.score_clip and ppo.no_eos_score."""
    trust_remote_code: bool = False
    """Allow the reward model's own code from its repository (trusting the actor's does not trust this one); off unless
    you trust the repository."""
    offload: bool = False
    """Partition the reward model with ZeRO-3 and keep its parameters in CPU memory (inference only), whatever
    engine.zero_stage is."""
    overlong_buffer: int | None = None
    """DAPO's soft overlong penalty (Yu et al. 2025): the last this many tokens before rollout.max_new_tokens (L_max) are
    a buffer; a response of length L in it gets overlong_penalty x ((L_max - buffer) - L) / buffer added to its score
    (after ppo.score_clip and ppo.no_eos_score), 0 before it, -overlong_penalty beyond; null = off."""
    overlong_penalty: float = 1.0
    """The scale of the overlong penalty (its value at L_max); needs reward.overlong_buffer."""


@dataclass(frozen=True)
class RolloutConfig:
    batch_size: int = 64
    """Rollouts (sampled responses) per rank per PPO step: batch_size / samples_per_prompt prompts, each sampled
    samples_per_prompt times."""
    max_new_tokens: int = 8
    """Longest response; a response cut here has no EOS (see ppo.no_eos_score)."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are taken from the same temperature-scaled logits."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0 = no limit (what PPO's log-probs assume)."""
    top_p: float = 1.0
    """Nucleus sampling; 1.0 = off (what PPO's log-probs assume)."""
    gather_params: bool = True
    """Under ZeRO-3, gather the actor's weights once per generation call (fast; needs the whole actor in memory)
    instead of per layer per token."""
    samples_per_prompt: int = 1
    """K responses sampled per training prompt, all on one rank (the group of ppo.estimator=grpo or rloo, which need
    K >= 2); rollout.batch_size must be a multiple of it. Evaluation samples one response per prompt."""
    score_batch_size: int = 0
    """Rollouts per forward pass when scoring them (reference, critic, reward model, and the actor where its log-probs
    are not generation's). 0 = as many as keep one model's response logits (rollouts x (max_new_tokens + 1) x
    vocabulary floats) under 256 MiB, at least engine.micro_batch_size and at most rollout.batch_size: on small models
    a forward costs per call, so fewer, larger ones are faster."""
    logprobs_from_generation: bool = True
    """Take PPO's old log-probs and entropies from the logits generation sampled with, instead of one more forward of
    the actor, where the two agree: fp32 (engine.precision), and the kept logits (rollouts x max_new_tokens x vocabulary
    floats) under 256 MiB. Elsewhere, or false, the actor's forward."""
    env: str | None = None
    """Multi-turn rollouts: `python:package.module:Class`, an environment class imported by dotted name (never a file path;
    repeat it on --resume), one instance per episode: `reset(prompt) -> messages` and `step(assistant_text) -> (observation
    messages, reward, done)`. The policy's and the environment's turns alternate up to max_turns; the environment's tokens
    are context only (no loss, KL or value target). Built in: python:rlhf.envs:ToolEnv (tool calls, rlhf.tools) and
    python:rlhf.envs:ToyRetryEnv (the embedded default). null = one response per prompt."""
    max_turns: int = 1
    """The policy's turns per episode (with env); each holds at most max_new_tokens tokens."""
    max_episode_tokens: int | None = None
    """Most tokens after the prompt in one episode, the policy's and the environment's (with env): a turn is cut to what
    is left, and an observation that would not leave room for one more token ends the episode; null = 2 x max_turns x
    max_new_tokens."""
    turn_rewards: Literal["end", "per_turn"] = "end"
    """Where the environment's rewards go (with env): end = their sum at the episode's last policy token, beside the
    reward's score; per_turn = each at the last token of the policy turn it answered."""

    def episode_tokens(self) -> int:
        """The longest a rollout's response side gets: max_new_tokens, or with env the episode's cap."""
        if self.env is None:
            return self.max_new_tokens
        return self.max_episode_tokens or 2 * self.max_turns * self.max_new_tokens


@dataclass(frozen=True)
class PPOAlgoConfig:
    epochs: int = 4
    """Passes over each rollout batch, in shuffled minibatches of engine.micro_batch_size."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """GAE lambda."""
    clip_range: float = 0.2
    """Policy ratio clip epsilon."""
    clip_low: float | None = None
    """The ratio's lower clip: ratio >= 1 - clip_low; null = clip_range."""
    clip_high: float | None = None
    """The ratio's upper clip: ratio <= 1 + clip_high; null = clip_range. Above clip_low is DAPO's clip-higher (Yu et al. 2025,
    0.2 / 0.28): unlikely tokens may gain more, which keeps the entropy from collapsing."""
    ratio: Literal["token", "sequence"] = "token"
    """The importance ratio: token = PPO's per token; sequence = GSPO's (Zheng et al. 2025) per response,
    exp(mean over its tokens of the log ratio), clipped with clip_low and clip_high and multiplying the response's
    advantage (the row's mean advantage with gae); the response's loss counts at each of its tokens in loss_aggregation."""
    overlong_filter: bool = False
    """DAPO's overlong filtering: a response cut at rollout.max_new_tokens without EOS has no weight in the actor's loss
    (policy and ppo.kl_in=loss terms); it still counts in its group's baseline. The count is logged as truncated_responses."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (Yu et al. 2025; group estimators grpo, rloo): a group whose shaped scores (the score after
    ppo.score_clip, ppo.no_eos_score and the overlong penalty; without the KL penalty) are all equal has no advantage and
    is dropped, and each rank's batch is refilled from more of the prompt stream until it holds rollout.batch_size /
    samples_per_prompt other groups or max_sampling_rounds generation rounds were drawn; a batch still short is filled with
    dropped groups. Logs kept_groups, dropped_groups, filler_groups, surplus_groups and sampling_rounds each step."""
    max_sampling_rounds: int = 4
    """With dynamic_sampling: the most generation rounds (each a whole rollout batch on every rank) in one step, the
    first included. Every rank draws while any rank is short (generation is collective under ZeRO-3)."""
    tis_cap: float | None = None
    """Truncated importance sampling (Yao et al. 2025): each token's policy loss times min(pi_train / pi_sampler, tis_cap),
    the trained forward's old log-prob against generation's; null = off. Needs the old log-probs from the actor's forward
    (rollout.logprobs_from_generation=false under fp32); keeps generation's logits (rollouts x max_new_tokens x vocabulary
    floats)."""
    max_mismatch_kl: float | None = None
    """Stop the run when train/mismatch_kl (mean k3 KL(sampler || trainer) per response token) passes this; null = off.
    Measured (and logged) when it or tis_cap is set."""
    value_clip_range: float | None = 0.2
    """Value clip around the rollout's values; null = unclipped value loss."""
    # Chosen on the embedded default with its reward model (README, `rlhf ppo`): 0.05 (TRL's) gains as much
    # sampled score but loses a point of greedy score; 0.2 keeps greedy at SFT's. Not yet measured on a real model.
    beta: float = 0.2
    """KL penalty coefficient (the starting value when kl_target is set)."""
    kl_estimator: Literal["k1", "k2", "k3"] | None = None
    """Per-token KL estimate in the penalty: k1 = log ratio (InstructGPT), k2 = half squared, k3 = unbiased low-variance;
    null = k1 with kl_in=reward, k3 with kl_in=loss (GRPO's)."""
    kl_target: float | None = None
    """Adapt beta toward this mean KL per response (Ziegler et al. 2019); null = fixed beta."""
    kl_horizon: int = 10000
    """Responses over which the adaptive controller corrects a KL error."""
    max_kl: float | None = 2.0
    """Held-out mean KL per response (nats) beyond which the run warns that the policy drifted far from the reference; null = no check."""
    value_head: Literal["zero", "reward"] = "zero"
    """The critic's head at the start: zero (values start at 0, the scale of normalized scores; the backbone is the
    RM's), or the reward model's trained head."""
    whiten_advantages: bool = True
    """Whiten advantages over the valid tokens of the whole rollout batch (all ranks): estimators gae and reinforce_pp
    (REINFORCE++'s global normalization); grpo and rloo advantages are already relative to their group and are not."""
    whiten_rewards: bool = False
    """Scale the per-token rewards to unit variance before GAE or REINFORCE++'s returns (estimators gae, reinforce_pp)."""
    normalize_score: bool = True
    """(score - mean) / std with the reward model's stored statistics (reward_stats.json). With reward_ensemble each member
    is normalized with its own statistics whatever this says (the models' scales differ), and never twice."""
    score_clip: float | None = 5.0
    """Clip the (normalized) score to +-this; null = no clipping."""
    no_eos_score: float | None = -1.0
    """Score given instead of the reward model's to a response cut by max_new_tokens (no EOS); null = keep the RM's."""
    ptx_coef: float = 0.0
    """gamma_ptx: weight of the LM loss on data.ptx added to the actor's loss (PPO-ptx); 0 = off."""
    length_grouped_minibatches: bool = False
    """Put rollouts of similar response length in the same minibatch, each padded only to its own longest response:
    faster when lengths vary a lot, at the cost of less random minibatches."""
    estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "gae"
    """Advantage estimator. gae: a critic (4 models); critic-free (3 models, critic.* and critic_optim.* unused):
    grpo = each response's reward against its group of rollout.samples_per_prompt (Shao et al. 2024), rloo = against
    the mean of the group's other responses (Ahmadian et al. 2024), reinforce_pp = per-token returns-to-go whitened over
    the whole batch (REINFORCE++, Hu 2025)."""
    kl_in: Literal["reward", "loss"] = "reward"
    """Where beta * KL to the reference goes: reward = a per-token penalty in the reward (InstructGPT; grpo and rloo
    compare the responses' summed penalized rewards); loss = a term beta * KL per token of the current policy,
    aggregated like the policy loss and added to it (GRPO's form; needs kl_estimator k2 or k3)."""
    scale_by_group_std: bool = True
    """grpo: divide each group's centred rewards by the group's std; false = Dr. GRPO (Liu et al. 2025)."""
    loss_aggregation: Literal["token_mean", "sequence_mean", "token_sum"] | None = None
    """How per-token policy (and kl_in=loss) losses become a minibatch's loss: token_mean = over all valid tokens (long
    responses weigh more), sequence_mean = mean of each response's token mean (GRPO), token_sum = token sum /
    (responses x rollout.max_new_tokens) (Dr. GRPO); null = sequence_mean for grpo, token_mean otherwise."""


@dataclass(frozen=True)
class PPOEvalConfig:
    batch_size: int = 64
    """Prompts per rank per evaluation generation call."""
    max_rows: int = 800
    """Held-out prompts evaluated (the first N); 0 = all."""
    gold: str | None = None
    """The task's ground truth for held-out answers, where it has one: `python:pkg.mod:fn` (called like a reward function:
    prompts and responses as text, one float each) or `oracle`. Logs eval/gold_score (its mean over the held-out samples)
    and eval/reward_gold_agreement (the reward's pair agreement with it on the policy's own samples); the report draws gold
    and proxy against KL. null = none (the embedded default's oracle is measured anyway)."""


@dataclass(frozen=True)
class RewardEnsembleConfig:
    name_or_path: list[str] = field(default_factory=list)
    """More reward models of the same kind (e.g. `rlhf rm` again with other train.seed values) scored beside the one in
    reward.name_or_path; each score is normalized with its model's stored statistics, then the learned score is
    mean - penalty x std over the members (Coste et al. 2023); empty = that one model alone."""
    penalty: float = 1.0
    """k in mean - k x std: how much the members' disagreement counts against a response."""


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
    from rlhf.rewards import parse_source

    rollout, ppo = cfg.rollout, cfg.ppo
    _at_least(1, {"rollout.max_turns": rollout.max_turns})
    if rollout.env is None:
        if rollout.max_turns != 1 or rollout.max_episode_tokens is not None or rollout.turn_rewards != "end":
            raise UserError("rollout.max_turns, rollout.max_episode_tokens and rollout.turn_rewards apply to multi-turn rollouts: "
                            "set rollout.env=python:package.module:Class (e.g. python:rlhf.envs:ToolEnv)")
        return
    if parse_source(rollout.env, key="rollout.env").kind != "python":
        raise UserError(f"rollout.env={rollout.env!r} is not python:package.module:Class (e.g. python:rlhf.envs:ToolEnv)")
    if rollout.max_episode_tokens is not None and rollout.max_episode_tokens < rollout.max_new_tokens:
        raise UserError(f"rollout.max_episode_tokens ({rollout.max_episode_tokens}) must be at least rollout.max_new_tokens "
                        f"({rollout.max_new_tokens}): one whole turn")
    refused = {"ppo.tis_cap": ppo.tis_cap, "ppo.max_mismatch_kl": ppo.max_mismatch_kl, "reward.overlong_buffer": cfg.reward.overlong_buffer}
    for key, value in refused.items():
        if value is not None:
            raise UserError(f"{key} is not supported with rollout.env (multi-turn rollouts take their old log-probs from the "
                            "actor's forward and have no single response length): set it to null")


def _check_reward(reward: RewardConfig, data: Any) -> None:
    """The sources parse (the functions are imported by the preflight); the oracle grades the toy task only."""
    from rlhf.rewards import ORACLE, parse_sources
    from rlhf.toy import TOY

    parse_sources(reward.name_or_path, reward.weights)
    if ORACLE in reward.name_or_path and (data.train not in (TOY, None) or data.eval not in (TOY, None)):
        raise UserError(f"reward.name_or_path={ORACLE} grades the embedded default's task only, but data.train={data.train} "
                        f"and data.eval={data.eval}; set both to {TOY}, or use a reward model or a python: function")


@dataclass(frozen=True)
class DPODataConfig:
    train: str = "toy"
    """'toy', a .jsonl/.json/.parquet file, or a hub dataset 'name[:split]'. The paired losses read what `rlhf rm` reads:
    prompt/chosen/rejected, chosen/rejected whole conversations (hh-rlhf), chosen/rejected message lists, or prompt/responses
    ranked best first (each ranked list gives all its pairs); a margin column is ignored. dpo.loss=kto reads unpaired
    prompt/completion/label rows (label true = desirable)."""
    eval: str | None = "toy"
    """Held-out rows in the same forms; null = no held-out pairs (the KL and oracle figures still need held-out prompts)."""
    max_length: int = 32
    """Tokens per sequence (prompt + response + EOS); longer responses are cut and counted."""
    long_prompts: Literal["error", "skip"] = "error"
    """What to do with a prompt that leaves no room for a response: stop with an error, or drop it (counted)."""
    packing: bool = False
    """Padding-free training: each micro-batch's chosen and rejected (or unpaired) sequences laid end to end in rows of
    data.packing_tokens, position ids restarting per sequence and attention kept inside it; the same log-probs, loss and
    gradients as unpacked (within fp32 rounding)."""
    packing_tokens: int = 0
    """Tokens per packed row when data.packing is on; 0 = data.max_length."""
    toy_format: Literal["pairs", "ranked"] = "pairs"
    """Paired training data on 'toy': single comparisons, or ranked lists of toy.ranked_k responses (all their pairs).
    With dpo.loss=kto 'toy' gives the oracle's unpaired feedback instead."""
    toy: ToyTaskConfig = field(default_factory=lambda: ToyTaskConfig(eval_size=800))
    """The synthetic task of the embedded default."""


@dataclass(frozen=True)
class DPOAlgoConfig:
    loss: Literal["dpo", "ipo", "kto", "simpo", "orpo"] = "dpo"
    """dpo (Rafailov et al. 2023; cDPO with label_smoothing), ipo (Azar et al. 2023), kto (Ethayarajh et al. 2024, unpaired
    data), simpo (Meng et al. 2024, no reference), orpo (Hong et al. 2024, no reference). See rlhf/algos/preference.py."""
    beta: float | None = None
    """The loss's beta (ipo: its tau): how far the policy may move from the reference (simpo: the reward scale).
    null = the loss's usual value: 0.1 for dpo, ipo and kto, 2.0 for simpo; orpo has none."""
    label_smoothing: float = 0.0
    """dpo only: the probability that a label is flipped (conservative DPO), in [0, 0.5)."""
    desirable_weight: float = 1.0
    """kto only: lambda_D, the weight of desirable examples."""
    undesirable_weight: float = 1.0
    """kto only: lambda_U, the weight of undesirable examples. The paper keeps lambda_D n_D / (lambda_U n_U) in [1, 1.5]."""
    simpo_gamma: float = 0.5
    """simpo only: the target reward margin gamma, in reward units (the authors' gamma_beta_ratio x beta)."""
    orpo_lambda: float = 0.1
    """orpo only: the weight of the odds-ratio term added to the chosen responses' NLL."""
    precompute_reference: bool = False
    """Compute the reference's log-probs of every training and held-out row once, before training, instead of one
    reference forward pass per step (dpo, ipo, kto). The reference is still kept for eval.kl when that is on."""


REFERENCE_FREE_LOSSES = ("simpo", "orpo")
"""Losses that load no reference model for training (rlhf.algos.preference says the same)."""
DEFAULT_BETAS = {"dpo": 0.1, "ipo": 0.1, "kto": 0.1, "simpo": 2.0}
# Each loss-specific key, its default, and the losses that read it: a value set for another loss is refused.
_LOSS_ONLY_KEYS = {"label_smoothing": ("dpo",), "desirable_weight": ("kto",), "undesirable_weight": ("kto",),
                   "simpo_gamma": ("simpo",), "orpo_lambda": ("orpo",)}


def loss_beta(dpo: DPOAlgoConfig) -> float | None:
    """dpo.beta, or the loss's usual value when it is null (None for orpo, which has no beta)."""
    return dpo.beta if dpo.beta is not None else DEFAULT_BETAS.get(dpo.loss)


@dataclass(frozen=True)
class DPOEvalConfig:
    batch_size: int = 64
    """Rows per rank per evaluation forward pass or generation call."""
    max_rows: int = 200
    """Held-out rows (pairs; unpaired rows for kto) whose loss, reward accuracy and margin are measured (the first N); 0 = all."""
    max_prompts: int = 800
    """Held-out prompts whose sampled answers give the KL to the reference and, on the embedded default, the oracle's
    score (the first N); 0 = all."""
    max_new_tokens: int = 8
    """Generation length of those answers."""
    temperature: float = 1.0
    """Sampling temperature of those answers; their log-probs are taken at the same temperature (greedy answers are
    graded by the oracle too)."""
    kl: bool = True
    """Measure the KL to the reference on sampled held-out answers. For simpo and orpo this loads a frozen reference for
    the measurement alone (with LoRA none: the model without its adapters); false loads none."""


@dataclass(frozen=True)
class DPOConfig:
    """Direct preference optimization of the SFT policy: DPO, IPO, KTO, SimPO or ORPO (dpo.loss), no reward model."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="sft:latest"))
    """The policy, trained."""
    reference: FrozenModelConfig = field(default_factory=FrozenModelConfig)
    """The frozen reference policy (with LoRA on the model and no name here: the model without its adapters)."""
    data: DPODataConfig = field(default_factory=DPODataConfig)
    dpo: DPOAlgoConfig = field(default_factory=DPOAlgoConfig)
    # Measured on the embedded default from the default SFT entry, 300 steps at lr 1e-4 (untuned):
    # the oracle's sampled score 61 -> 71 (dpo), 71 (ipo), 77 (kto); see the README's dpo section.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=10))
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(micro_batch_size=32))
    """micro_batch_size = pairs (kto: unpaired rows) per rank per forward pass."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=300, log_every=10, eval_every=100, save_every=100))
    eval: DPOEvalConfig = field(default_factory=DPOEvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        _check_common(self)
        _check_max_length(self.data.max_length)
        _check_packing_tokens(self.data)
        _at_least(1, {"eval.max_new_tokens": self.eval.max_new_tokens})
        _at_least(0, {"eval.max_prompts": self.eval.max_prompts})
        if self.eval.kl and self.eval.temperature <= 0:
            raise UserError(f"eval.kl samples answers and scores them at eval.temperature, which must be positive "
                            f"(got {self.eval.temperature}); raise it or set eval.kl=false")
        _at_least(0, {"eval.temperature": self.eval.temperature})
        _check_dpo_algo(self.dpo)
        if self.dpo.loss in REFERENCE_FREE_LOSSES and not self.eval.kl and self.reference.name_or_path is not None:
            raise UserError(f"dpo.loss={self.dpo.loss} uses no reference model and eval.kl is off, so reference.name_or_path "
                            "would be unused; drop it (or set eval.kl=true to measure the KL to it)")


def _check_dpo_algo(dpo: DPOAlgoConfig) -> None:
    if dpo.beta is not None and dpo.loss == "orpo":
        raise UserError("dpo.beta has no part in dpo.loss=orpo; drop it (orpo's weight is dpo.orpo_lambda)")
    _positive({"dpo.beta": dpo.beta})
    defaults = DPOAlgoConfig()
    for key, losses in _LOSS_ONLY_KEYS.items():
        if getattr(dpo, key) != getattr(defaults, key) and dpo.loss not in losses:
            raise UserError(f"dpo.{key} is read by dpo.loss={'/'.join(losses)} only, and dpo.loss is {dpo.loss}; drop it")
    _within(0, 0.5, {"dpo.label_smoothing": dpo.label_smoothing}, open_high=True)
    _positive({"dpo.desirable_weight": dpo.desirable_weight, "dpo.undesirable_weight": dpo.undesirable_weight})
    _at_least(0, {"dpo.orpo_lambda": dpo.orpo_lambda})
    if dpo.precompute_reference and dpo.loss in REFERENCE_FREE_LOSSES:
        raise UserError(f"dpo.precompute_reference: dpo.loss={dpo.loss} uses no reference log-probs; drop it")


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


def _check_gold(gold: str | None, eval_data: str | None) -> None:
    """eval.gold is a python: function or the oracle, never a model: a gold label is what a model is checked against."""
    from rlhf.rewards import parse_source
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


def _check_ensemble(ensemble: RewardEnsembleConfig, reward: RewardConfig) -> None:
    from rlhf.rewards import learned_source, parse_sources

    if not ensemble.name_or_path:
        return
    if learned_source(parse_sources(reward.name_or_path, reward.weights)) is None:
        raise UserError("reward_ensemble.name_or_path adds reward models to the one in reward.name_or_path, which names none; "
                        "put a reward model there, or drop reward_ensemble")
    _at_least(0, {"reward_ensemble.penalty": ensemble.penalty})


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
        from rlhf.labelers import parse_labeler

        _check_data_source("data.samples", self.data.samples)
        parse_labeler(self.by)
        _at_least(0, {"tie_tolerance": self.tie_tolerance})
        _at_least(1, {"judge.batch_size": self.judge.batch_size})
        missing = [name for name in ("{prompt}", "{a}", "{b}") if name not in self.judge.template]
        if missing:
            raise UserError(f"judge.template lacks {', '.join(missing)}; it must hold {{prompt}}, {{a}} and {{b}}")
        if len(self.judge.choices) != 2 or len(set(self.judge.choices)) != 2:
            raise UserError(f"judge.choices must be two different texts (naming {{a}} and {{b}}), got {self.judge.choices}")


STAGE_CONFIGS: dict[str, type] = {"sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig, "dpo": DPOConfig, "bon": BestOfNConfig,
                                  "sample": SampleConfig, "label": LabelConfig}

# The largest seed every consumer takes: ShuffledBatches multiplies it by ~1e6 into torch's int64 seed.
MAX_SEED = 2**32 - 1
def clip_bounds(ppo: PPOAlgoConfig) -> tuple[float, float]:
    """(clip_low, clip_high) in use: the ratio is clamped to [1 - low, 1 + high]; null = ppo.clip_range."""
    return (ppo.clip_range if ppo.clip_low is None else ppo.clip_low, ppo.clip_range if ppo.clip_high is None else ppo.clip_high)


def checks_mismatch(ppo: PPOAlgoConfig) -> bool:
    """Whether the run compares generation's log-probs with the training forward's (ppo.tis_cap, ppo.max_mismatch_kl)."""
    return ppo.tis_cap is not None or ppo.max_mismatch_kl is not None


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


MAX_STEPS = 10**12
"""More steps than any run takes: a larger train.max_steps is a typo (an extra digit, a token count)."""


def _at_least(minimum: int, values: dict[str, int | float]) -> None:
    for key, value in values.items():
        if value < minimum:
            raise UserError(f"{key} must be at least {minimum}, got {value}")


def _positive(values: dict[str, float | None]) -> None:
    """Each value must be above 0; None (where a field allows it) means off and passes."""
    for key, value in values.items():
        if value is not None and value <= 0:
            raise UserError(f"{key} must be positive, got {value}")


def _within(low: float, high: float, values: dict[str, float], *, open_high: bool = False) -> None:
    for key, value in values.items():
        if not (low <= value < high if open_high else low <= value <= high):
            raise UserError(f"{key} must be in [{low}, {high}{')' if open_high else ']'}, got {value}")


def _check_toy(section: ToyModelConfig | ToyTaskConfig, key: str) -> None:
    try:
        section.validate()
    except ValueError as exc:
        raise UserError(f"{key}: {exc}") from None


def _check_common(cfg: Any) -> None:
    """Checks every training stage needs: its engine, optim, train, eval, model and data sections."""
    engine, train, evaluation = cfg.engine, cfg.train, cfg.eval
    _check_toy(cfg.model.toy, "model.toy")
    _check_toy(cfg.data.toy, "data.toy")
    _check_data_source("data.train", cfg.data.train)
    if cfg.data.eval is not None:
        _check_data_source("data.eval", cfg.data.eval)
    _at_least(1, {
        "engine.micro_batch_size": engine.micro_batch_size,
        "engine.grad_accum": engine.grad_accum,
        "train.log_every": train.log_every,
        "train.keep_checkpoints": train.keep_checkpoints,
        "eval.batch_size": evaluation.batch_size,
    })
    # 0 means "off" (or "all rows"); a negative value would silently act like some other setting
    # (save_every=-1 saved every step, eval.max_rows=-1 dropped the last row).
    rows = {f"eval.{name}": getattr(evaluation, name) for name in ("max_rows", "reward_stats_rows") if hasattr(evaluation, name)}
    _at_least(0, {"train.eval_every": train.eval_every, "train.save_every": train.save_every, **rows})
    _within(0, MAX_SEED, {"train.seed": train.seed})
    _within(1, MAX_STEPS, {"train.max_steps": train.max_steps})
    if isinstance(evaluation, EvalConfig):
        _at_least(1, {"eval.max_new_tokens": evaluation.max_new_tokens})
        _at_least(0, {"eval.temperature": evaluation.temperature})  # 0 decodes greedily
    _check_optim(cfg.optim, "optim")
    _check_warmup(cfg)
    _check_model(cfg.model, "model")
    _check_tags(cfg.run.tags)
    if engine.offload_params and engine.zero_stage != 3:
        raise UserError("engine.offload_params needs engine.zero_stage=3 (parameters are only partitioned there)")
    if engine.offload_optimizer and engine.zero_stage == 0:
        raise UserError("engine.offload_optimizer needs engine.zero_stage of 1, 2 or 3")


def _check_warmup(cfg: Any) -> None:
    """A warmup longer than the run never reaches the learning rate it names (a typo, or max_steps cut short)."""
    steps = cfg.optimizer_steps() if hasattr(cfg, "optimizer_steps") else cfg.train.max_steps
    for prefix in ("optim", "critic_optim"):
        optim = getattr(cfg, prefix, None)
        if prefix == "critic_optim" and getattr(getattr(cfg, "ppo", None), "estimator", None) in CRITIC_FREE_ESTIMATORS:
            continue  # no critic is trained: its optimizer's warmup does not matter
        if optim is not None and optim.warmup_steps > steps > 0:  # 0 steps: a batch size of 0, refused after
            raise UserError(f"{prefix}.warmup_steps={optim.warmup_steps} is longer than the run's {steps} optimizer steps "
                            f"(train.max_steps={cfg.train.max_steps}); lower it, e.g. {prefix}.warmup_steps={steps // 10}")


def _check_optim(optim: OptimConfig, prefix: str) -> None:
    _positive({f"{prefix}.lr": optim.lr, f"{prefix}.eps": optim.eps})
    _at_least(0, {f"{prefix}.weight_decay": optim.weight_decay, f"{prefix}.warmup_steps": optim.warmup_steps,
                  f"{prefix}.grad_clip": optim.grad_clip})
    _within(0, 1, {f"{prefix}.beta1": optim.beta1, f"{prefix}.beta2": optim.beta2}, open_high=True)
    _within(0, 1, {f"{prefix}.min_lr_ratio": optim.min_lr_ratio})


def _check_model(model: ModelConfig, prefix: str) -> None:
    if model.lora.enabled:
        _at_least(1, {f"{prefix}.lora.r": model.lora.r, f"{prefix}.lora.alpha": model.lora.alpha})
        _within(0, 1, {f"{prefix}.lora.dropout": model.lora.dropout}, open_high=True)


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


CRITIC_FREE_ESTIMATORS = ("grpo", "rloo", "reinforce_pp")
GROUP_ESTIMATORS = ("grpo", "rloo")


def kl_estimator_of(ppo: PPOAlgoConfig) -> str:
    """The KL estimator in use: ppo.kl_estimator, or its default for where the KL goes."""
    return ppo.kl_estimator or ("k3" if ppo.kl_in == "loss" else "k1")


def loss_aggregation_of(ppo: PPOAlgoConfig) -> str:
    """The loss aggregation in use: ppo.loss_aggregation, or the estimator's paper's."""
    return ppo.loss_aggregation or ("sequence_mean" if ppo.estimator == "grpo" else "token_mean")


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


def _check_packing_tokens(data: Any) -> None:
    if data.packing_tokens and data.packing_tokens < data.max_length:
        raise UserError(f"data.packing_tokens ({data.packing_tokens}) must be 0 or at least data.max_length "
                        f"({data.max_length}): a row is never split")


def _check_max_length(value: int, *, key: str = "data.max_length") -> None:
    if value < 2:
        raise UserError(f"{key} must be at least 2 (one prompt and one response token), got {value}")


def _check_data_source(key: str, value: str) -> None:
    # An empty source would pass the launcher's checks (nothing to look at) and stop inside the stage.
    if not value.strip():
        raise UserError(f"{key} is empty; set it to 'toy', a .jsonl/.json/.parquet file or a hub dataset 'name[:split]'")


# The registry's rule for tags (`rlhf registry tag`): a tag is also a reference and a file name.
def _check_tags(tags: list[str]) -> None:
    """The registry's own tag rule, before the run starts rather than when it publishes at the end
    (no entry ids yet: a tag an id would shadow is refused again at publish)."""
    from rlhf.registry import check_tags

    try:
        check_tags(tags, stage="")
    except UserError as exc:
        raise UserError(f"run.tags: {exc}") from None


def check_precision(engine: EngineConfig, *, cuda_available: bool) -> None:
    """Stop before launch when this machine cannot train at engine.precision (the CLI passes
    torch.cuda.is_available(); this module imports no torch). fp16 needs a CUDA GPU (its loss
    scaler and kernels are GPU-only); bf16 and fp32 run on the CPU too."""
    if engine.precision == "fp16" and not cuda_available:
        raise UserError("engine.precision=fp16 needs a CUDA GPU and this machine has none; use engine.precision=bf16 or fp32 here")


# ----------------------------------------------------------------------------------------------
# Loading


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Build a `cls` config from defaults, then the YAML file at `path`, then `key=value` overrides."""
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        data, lines = _read_yaml(Path(path))
    for override in overrides:
        key, raw = _split_override(override)
        _set_dotted(data, key, _OverrideValue(raw, override))
    cfg = _build(cls(), data, prefix="", source=source, lines=lines)
    cfg.validate()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: Path) -> None:
    """Write the resolved config as YAML, atomically (a reader never sees half a file)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def field_docs(cls: type) -> dict[str, str]:
    """Dotted key -> the docstring under that field (for `rlhf config`)."""
    import ast
    import inspect

    docs: dict[str, str] = {}

    def walk(klass: type, prefix: str) -> None:
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError):
            tree = None
        body = tree.body[0].body if tree else []
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[prefix + node.target.id] = " ".join(nxt.value.value.split())
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")

    walk(cls, "")
    return docs


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config class."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


@dataclass(frozen=True)
class _OverrideValue:
    """A value typed on the command line: kept as text, converted by the field's type."""

    raw: str
    origin: str


def _split_override(text: str) -> tuple[str, str]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override '{text}' is not key=value (for example optim.lr=1e-4)")
    return key.strip(), raw


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


MAX_YAML_VALUES = 100_000
"""Values a config file may hold once its aliases are expanded: a config has a few hundred; a file of
nested aliases (a "billion laughs") would otherwise take minutes and gigabytes to read."""


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse a YAML mapping, remembering the line of every dotted key for error messages."""
    if path.is_dir():
        raise UserError(f"config file {path} is a folder; give -c a YAML file")
    if not path.is_file():
        raise UserError(f"config file not found: {path}{missing_hint(path)}")
    text = _read_text(path)
    try:
        root = yaml.compose(text)
        if root is not None:
            _check_expanded_size(root, path)
    except yaml.YAMLError as exc:
        position = getattr(exc, "position", None)  # a ReaderError (a control character) has no mark
        raise _yaml_error(path, exc, line=text.count("\n", 0, position) + 1 if position is not None else None) from None
    except RecursionError:
        raise UserError(f"{path}: nested too deep to be a config; fix the YAML") from None
    if root is None:
        return {}, {}
    if not isinstance(root, yaml.MappingNode):
        raise UserError(f"{path}:1: a config file must be a mapping of keys (model:, data:, ...)")
    lines: dict[str, int] = {}

    def convert(node: yaml.Node, prefix: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            return convert_collection(node, prefix)
        try:
            return yaml.safe_load(yaml.serialize(node))
        except yaml.YAMLError as exc:  # a tag safe_load refuses, e.g. !!python/object
            raise _yaml_error(path, exc, line=node.start_mark.line + 1) from None

    def convert_collection(node: yaml.Node, prefix: str) -> Any:
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                line = key_node.start_mark.line + 1
                if not isinstance(key_node, yaml.ScalarNode):
                    raise UserError(f"{path}:{line}: a key must be a plain name, not a list or mapping; fix the YAML")
                key = str(key_node.value)
                if key in out:  # YAML would silently keep the last one
                    raise UserError(f"{path}:{line}: '{prefix}{key}' is set twice (first on line {lines[prefix + key]}); keep one")
                lines[prefix + key] = line
                out[key] = convert(value_node, f"{prefix}{key}.")
            return out
        return [convert(item, prefix) for item in node.value]

    return convert(root, ""), lines


def _check_expanded_size(root: yaml.Node, path: Path) -> None:
    """Refuse a file whose aliases contain themselves or expand past MAX_YAML_VALUES values, counting
    each shared node once (so a "billion laughs" is measured in milliseconds, never built)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        if isinstance(node, yaml.ScalarNode):
            return 1
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise UserError(f"{path}:{node.start_mark.line + 1}: a YAML alias that contains itself; write the values out")
        open_nodes.add(id(node))
        children = [v for pair in node.value for v in pair] if isinstance(node, yaml.MappingNode) else node.value
        sizes[id(node)] = min(MAX_YAML_VALUES + 1, 1 + sum(size(child) for child in children))
        open_nodes.discard(id(node))
        return sizes[id(node)]

    if size(root) > MAX_YAML_VALUES:
        raise UserError(f"{path}: more than {MAX_YAML_VALUES:,} values once its YAML aliases are expanded "
                        "(an alias bomb?); write the values out")


def read_yaml_file(path: Path) -> dict[str, Any]:
    """A YAML mapping as a config file is read (aliases bounded, tags refused); UserError otherwise."""
    return _read_yaml(path)[0]


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"config file {path}: cannot read it ({exc.strerror}); check its permissions") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); re-encode the file as UTF-8") from None


def _yaml_error(path: Path, exc: yaml.YAMLError, *, line: int | None = None) -> UserError:
    mark = getattr(exc, "problem_mark", None)
    if line is None and mark is not None:
        line = mark.line + 1
    where = f"{path}:{line}" if line else str(path)
    problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or "invalid YAML"
    return UserError(f"{where}: {problem}; fix the YAML syntax")


def _build(base: Any, data: dict[str, Any], *, prefix: str, source: str, lines: dict[str, int]) -> Any:
    """`base` (a config dataclass instance) with the values in `data` set on it.

    Sections start from the parent's default for them, not from their class defaults, so a stage
    that changes a shared section's default (rm's model.name_or_path) keeps it when a file or an
    override sets another key of that section.
    """
    cls = type(base)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = prefix + key
        where = _where(dotted, _first_leaf(value), source, lines)
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys here: {', '.join(names)}"
            raise UserError(f"{where}: unknown config key '{dotted}'; {hint}")
        target = hints[key]
        if isinstance(value, dict) and not dataclasses.is_dataclass(target):
            raise UserError(f"{where}: '{dotted}' is a single value, not a section; set it as {dotted}=VALUE")
        if dataclasses.is_dataclass(target):
            if not isinstance(value, dict):
                raise UserError(f"{where}: '{dotted}' is a section; give its keys ({dotted}.KEY=...)")
            kwargs[key] = _build(getattr(base, key), value, prefix=dotted + ".", source=source, lines=lines)
        else:
            kwargs[key] = _coerce(value, target, dotted, where)
    return dataclasses.replace(base, **kwargs)


def _first_leaf(value: Any) -> Any:
    """The first non-mapping value inside nested mappings (an override's value carries its origin)."""
    while isinstance(value, dict) and value:
        value = next(iter(value.values()))
    return value


def _where(dotted: str, value: Any, source: str, lines: dict[str, int]) -> str:
    if isinstance(value, _OverrideValue):
        return f"override '{value.origin}'"
    line = lines.get(dotted)
    return f"{source}:{line}" if line else source


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Convert `value` (parsed YAML, or raw override text) to type `tp`, or say what is wrong."""
    from_cli = isinstance(value, _OverrideValue)
    raw = value.raw if from_cli else value

    def fail() -> UserError:
        return UserError(f"{where}: '{key}' expects {_type_name(tp)}, got {raw!r}")

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if from_cli and raw.strip().lower() in ("null", "none", "~", ""):
            return None
        if raw is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, where) if len(inner) == 1 else raw
    if origin is Literal:
        for choice in args:
            try:
                converted = _coerce(value, type(choice), key, where)
            except UserError:
                continue
            if converted == choice:
                return choice
        raise UserError(f"{where}: '{key}' must be one of {_type_name(tp)}, got {raw!r}")
    if origin is list:
        items = raw
        if from_cli:
            try:
                parsed = yaml.safe_load(raw) if raw.strip() else []
            except yaml.YAMLError as exc:
                problem = getattr(exc, "problem", None) or "invalid YAML"
                raise UserError(f"{where}: '{key}' is not a valid list ({problem}); write a,b or '[a, b]'") from None
            items = parsed if isinstance(parsed, list) else [s.strip() for s in raw.split(",") if s.strip()]
        if isinstance(items, str):
            items = [items]  # one value where a list may hold several (reward.name_or_path: rm:latest)
        if not isinstance(items, list):
            raise fail()
        return [_coerce(item, args[0], key, where) for item in items]
    if tp is bool:
        if from_cli:
            lowered = raw.strip().lower()
            if lowered in ("true", "yes", "on", "1"):
                return True
            if lowered in ("false", "no", "off", "0"):
                return False
            raise fail()
        if isinstance(raw, bool):
            return raw
        raise fail()
    if tp is int:
        if isinstance(raw, bool):
            raise fail()
        if isinstance(raw, int):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                raise fail() from None
        raise fail()
    if tp is float:
        number = _to_float(raw)
        if number is None:
            raise fail()
        # No field means anything by nan or inf (null turns the optional ones off): nan would pass
        # every range check, since every comparison with it is false.
        if not math.isfinite(number):
            raise UserError(f"{where}: '{key}' must be a finite number, got {raw!r}")
        return number
    if tp is str:
        if from_cli:
            return raw
        if isinstance(raw, str):
            return raw
        raise fail()
    raise TypeError(f"config field {key} has unsupported type {tp}")


def _to_float(raw: Any) -> float | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return float(raw) if abs(raw) < 2**1000 else math.inf  # float() of a bigger int overflows
    if isinstance(raw, float):
        return raw
    if isinstance(raw, str):  # PyYAML reads 1e-5 (no dot) as a string
        try:
            return float(raw.strip())
        except ValueError:
            return None
    return None
