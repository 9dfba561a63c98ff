"""What every part of the PPO stage shares: the state a resume restores (`PPOState`), the data and
settings loaded once (`Data`), and the frozen `PPOContext` each step function takes with that state.

The context is built once in `rlhf.stages.ppo.main` (and by scripts/bench.py) and never changes;
everything that moves from step to step lives in `PPOState`, which the checkpoints carry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.config import PPOConfig
from rlhf.data.load import ptx_data_config, sft_examples, stage_datasets
from rlhf.data.sampler import ShuffledBatches
from rlhf.data.tokenize import SFTExample, TruncationStats
from rlhf.models.sources import ModelSource, PPOSources, causal_lm_and_tokenizer, ppo_sources, reward_stats
from rlhf.models.stage_models import PPOModels
from rlhf.protocols import Tokenizer
from rlhf.rollouts.generation import Sampling
from rlhf.rollouts.multiturn import load_env_class
from rlhf.rollouts.rewards import Reward, learned_source, parse_source, parse_sources
from rlhf.store.runs import Run
from rlhf.toy import TOY
from rlhf.training.engine import Dist
from rlhf.training.run_keeper import LoopState, RunKeeper


@dataclass
class PPOState(LoopState):
    beta: float = 0.0
    """The KL coefficient now (moves with ppo.kl_target)."""
    negative_kl_steps: int = 0
    """Consecutive steps whose mean KL to the reference was negative."""
    extra_rounds: int = 0
    """Generation rounds beyond one per step so far (ppo.dynamic_sampling): step s draws the prompt sampler's batches
    from s + extra_rounds on, so the prompt stream, and a resume, follow from the saved state alone."""


@dataclass
class Data:
    tokenizer: Tokenizer
    actor_source: ModelSource
    sources: PPOSources
    reward: Reward
    """The reward's components (reward.name_or_path), with the reward model's statistics when it normalizes."""
    train_prompts: list
    prompt_stats: TruncationStats
    eval_prompts: list
    eval_texts: list[str]
    """On the embedded default, the held-out prompts as text: the oracle grades their answers."""
    batches: ShuffledBatches
    ptx_set: list
    ptx_batches: ShuffledBatches | None
    env_class: type | None = None
    """rollout.env's class (imported on every rank), or None: one response per prompt."""
    gold: Reward | None = None
    """eval.gold, the task's ground truth for held-out answers (a function or the oracle), or None."""


@dataclass(frozen=True)
class PPOContext:
    """One PPO run's fixed parts, built once before the first step: what the step functions share."""

    models: PPOModels
    """Actor and critic engines (the critic None for a critic-free estimator), frozen reference and reward."""
    data: Data
    cfg: PPOConfig
    sampling: Sampling
    """Generation settings for rollouts and held-out samples alike."""
    dist: Dist
    keeper: RunKeeper
    """Metrics, checkpoints and stops: a step that must stop the run stops it through the keeper."""


def sampling_of(cfg: PPOConfig, data: Data, models: PPOModels, dist: Dist) -> Sampling:
    r = cfg.rollout
    return Sampling(pad_id=data.tokenizer.pad_token_id, eos_id=data.tokenizer.eos_token_id, max_new_tokens=r.max_new_tokens,
                    temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                    zero3_engine=models.actor if cfg.engine.zero_stage == 3 else None, gather=r.gather_params, device=dist.device)


def load_data(cfg: PPOConfig, run: Run, dist: Dist) -> Data:
    actor_source, tokenizer = causal_lm_and_tokenizer(cfg.model, run.registry)
    sources = ppo_sources(cfg, run.registry, actor_source, tokenizer)
    reward = ppo_reward(cfg, sources)
    train_prompts, prompt_stats, eval_prompts, _ = stage_datasets("ppo", cfg, tokenizer, world_size=dist.world_size)
    batches = ShuffledBatches(len(train_prompts), batch_size=prompts_per_rank(cfg), world_size=dist.world_size, seed=cfg.train.seed)
    ptx_set: list[SFTExample] = []
    ptx_batches: ShuffledBatches | None = None
    if cfg.ppo.ptx_coef > 0:
        assert cfg.data.ptx is not None  # PPOConfig requires it with ppo.ptx_coef > 0
        ptx_set, _ = sft_examples(cfg.data.ptx, split="train", tokenizer=tokenizer, data=ptx_data_config(cfg.data), key="data.ptx")
        ptx_batches = ShuffledBatches(len(ptx_set), batch_size=cfg.engine.micro_batch_size, world_size=dist.world_size,
                                      seed=cfg.train.seed)
    eval_texts = [tokenizer.decode(p, skip_special_tokens=True) for p in eval_prompts] if cfg.data.eval == TOY else []
    env_class = load_env_class(cfg.rollout.env) if cfg.rollout.env is not None else None
    gold = Reward([parse_source(cfg.eval.gold, key="eval.gold")]) if cfg.eval.gold is not None else None
    return Data(tokenizer, actor_source, sources, reward, train_prompts, prompt_stats, eval_prompts, eval_texts, batches,
                ptx_set, ptx_batches, env_class, gold)


def prompts_per_rank(cfg: PPOConfig) -> int:
    """Prompts a rank draws per step: each is sampled rollout.samples_per_prompt times."""
    return cfg.rollout.batch_size // cfg.rollout.samples_per_prompt


def ppo_reward(cfg: PPOConfig, sources: PPOSources) -> Reward:
    """The reward's components; only a reward model's scores are normalized (ppo.normalize_score),
    with the statistics stored beside it. An ensemble's combined score arrives normalized (each member with
    its own statistics) and is used as it is. Functions are imported here, on every rank."""
    components = parse_sources(cfg.reward.name_or_path, cfg.reward.weights)
    if learned_source(components) is None or not cfg.ppo.normalize_score or sources.ensemble:
        return Reward(components)
    assert sources.reward is not None  # the learned component's model
    return Reward(components, **reward_stats(sources.reward), normalize=True)


def minibatches_per_epoch(cfg: PPOConfig) -> int:
    return cfg.rollout.batch_size // cfg.engine.micro_batch_size


def packing_capacity(cfg: PPOConfig) -> int | None:
    """Tokens per packed row of the rollout's forwards (data.packing), None when off: data.packing_tokens, or (0) the
    longest sequence a rollout can hold (a prompt of data.max_prompt_length and the longest response side)."""
    if not cfg.data.packing:
        return None
    return cfg.data.packing_tokens or cfg.data.max_prompt_length + cfg.rollout.episode_tokens()


def total_updates(cfg: PPOConfig) -> int:
    """Optimizer steps of the whole run: what both learning-rate schedules anneal over."""
    return cfg.optimizer_steps()


def stop_if_nonfinite(ctx: PPOContext, state: PPOState, what: str, *tensors: torch.Tensor | None) -> None:
    """Stop every rank, with a checkpoint, if any rank's `tensors` hold NaN or inf. One all-reduce
    and host sync per call (per minibatch in the update loop): a non-finite loss must stop every
    rank before any rank applies it."""
    bad = torch.stack([~torch.isfinite(t).all() for t in tensors if t is not None]).any().float()
    if ctx.dist.world_size > 1:
        torch.distributed.all_reduce(bad)  # every rank stops together (and saves together)
    if bad.item():
        ctx.keeper.stop_nonfinite(state, what)
