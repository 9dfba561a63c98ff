"""The sections of `rlhf ppo`'s config that are its own (data, rollout, ppo, eval), and the settings in use that
their null defaults stand for; the whole config and its checks are in rlhf/config/ppo.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf.algos.variants import AdvantageEstimator, KLEstimator, LossAggregation
from rlhf.toy.task import ToyTaskConfig


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
    packing: bool = False
    """Padding-free forwards: the rollout's prompt + response sequences laid end to end in rows of data.packing_tokens,
    position ids restarting per sequence and attention kept inside it, for the scoring (actor, reference, critic, reward
    model) and the PPO epochs (actor, critic, ptx loss); the same log-probs, values, losses and gradients as unpacked (within
    fp32 rounding)."""
    packing_tokens: int = 0
    """Tokens per packed row when data.packing is on; 0 = data.max_prompt_length + the longest response side."""
    # 800 held-out prompts (of the 810 the toy holds out) put the oracle's mean score within about
    # +-1.5 points (one standard error): PPO's gain is read against that.
    toy: ToyTaskConfig = field(default_factory=lambda: ToyTaskConfig(eval_size=800))
    """The synthetic task of the embedded default."""


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
    are context only (no loss, KL or value target). Built in: python:rlhf.tasks.envs:ToolEnv (tool calls, rlhf.tools) and
    python:rlhf.tasks.envs:ToyRetryEnv (the embedded default). null = one response per prompt."""
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
    kl_estimator: KLEstimator | None = None
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
    estimator: AdvantageEstimator = "gae"
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
    loss_aggregation: LossAggregation | None = None
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


def clip_bounds(ppo: PPOAlgoConfig) -> tuple[float, float]:
    """(clip_low, clip_high) in use: the ratio is clamped to [1 - low, 1 + high]; null = ppo.clip_range."""
    return (ppo.clip_range if ppo.clip_low is None else ppo.clip_low, ppo.clip_range if ppo.clip_high is None else ppo.clip_high)


def checks_mismatch(ppo: PPOAlgoConfig) -> bool:
    """Whether the run compares generation's log-probs with the training forward's (ppo.tis_cap, ppo.max_mismatch_kl)."""
    return ppo.tis_cap is not None or ppo.max_mismatch_kl is not None


def kl_estimator_of(ppo: PPOAlgoConfig) -> KLEstimator:
    """The KL estimator in use: ppo.kl_estimator, or its default for where the KL goes."""
    return ppo.kl_estimator or ("k3" if ppo.kl_in == "loss" else "k1")


def loss_aggregation_of(ppo: PPOAlgoConfig) -> LossAggregation:
    """The loss aggregation in use: ppo.loss_aggregation, or the estimator's paper's."""
    return ppo.loss_aggregation or ("sequence_mean" if ppo.estimator == "grpo" else "token_mean")
