"""The sections every stage shares (model, optim, engine, train, eval, tracking, run; the frozen models and the
reward of ppo and bon) and the checks their `validate` methods share. Each field's docstring is its documentation
(`rlhf config STAGE --docs`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from rlhf.algos.variants import CRITIC_FREE_ESTIMATORS
from rlhf.errors import UserError
from rlhf.toy.model import ToyModelConfig
from rlhf.toy.task import ToyTaskConfig


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
    name; one at most; a dpo entry of dpo.loss=dpo scores by its implicit reward), `python:package.module:function`
    (imported from the installed environment or PYTHONPATH, called with the prompts and responses as text, returning one
    float per response), or `oracle` (the embedded default's ground truth, 0 to 1; data.train and data.eval must be
    toy). On the command line: a,b or '[a, b]'."""
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
class RewardEnsembleConfig:
    name_or_path: list[str] = field(default_factory=list)
    """More reward models of the same kind (e.g. `rlhf rm` again with other train.seed values) scored beside the one in
    reward.name_or_path; each score is normalized with its model's stored statistics, then the learned score is
    mean - penalty x std over the members (Coste et al. 2023); empty = that one model alone."""
    penalty: float = 1.0
    """k in mean - k x std: how much the members' disagreement counts against a response."""


# The largest seed every consumer takes: ShuffledBatches multiplies it by ~1e6 into torch's int64 seed.
MAX_SEED = 2**32 - 1


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


# What the shared checks read of the stage configs: Protocols, since the stage modules import this one.
class _Sources(Protocol):
    @property
    def train(self) -> str | None: ...
    @property
    def eval(self) -> str | None: ...


class _TrainedData(_Sources, Protocol):
    @property
    def train(self) -> str: ...
    @property
    def toy(self) -> ToyTaskConfig: ...


class _PackedData(Protocol):
    @property
    def max_length(self) -> int: ...
    @property
    def packing_tokens(self) -> int: ...


class _BatchedEval(Protocol):
    @property
    def batch_size(self) -> int: ...


class TrainedStage(Protocol):
    """The sections every training stage's config (SFT, RM, PPO, DPO) has, as `_check_common` reads them."""

    @property
    def model(self) -> ModelConfig: ...
    @property
    def data(self) -> _TrainedData: ...
    @property
    def optim(self) -> OptimConfig: ...
    @property
    def engine(self) -> EngineConfig: ...
    @property
    def train(self) -> TrainConfig: ...
    @property
    def eval(self) -> _BatchedEval: ...
    @property
    def run(self) -> RunConfig: ...


def _check_common(cfg: TrainedStage) -> None:
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


def _check_warmup(cfg: TrainedStage) -> None:
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


def _check_packing_tokens(data: _PackedData) -> None:
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
    from rlhf.store.registry import check_tags

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


def _check_reward(reward: RewardConfig, data: _Sources) -> None:
    """The sources parse (the functions are imported by the preflight); the oracle grades the toy task only."""
    from rlhf.rollouts.rewards import ORACLE, parse_sources
    from rlhf.toy import TOY

    parse_sources(reward.name_or_path, reward.weights)
    if ORACLE in reward.name_or_path and (data.train not in (TOY, None) or data.eval not in (TOY, None)):
        raise UserError(f"reward.name_or_path={ORACLE} grades the embedded default's task only, but data.train={data.train} "
                        f"and data.eval={data.eval}; set both to {TOY}, or use a reward model or a python: function")


def _check_ensemble(ensemble: RewardEnsembleConfig, reward: RewardConfig) -> None:
    from rlhf.rollouts.rewards import learned_source, parse_sources

    if not ensemble.name_or_path:
        return
    if learned_source(parse_sources(reward.name_or_path, reward.weights)) is None:
        raise UserError("reward_ensemble.name_or_path adds reward models to the one in reward.name_or_path, which names none; "
                        "put a reward model there, or drop reward_ensemble")
    _at_least(0, {"reward_ensemble.penalty": ensemble.penalty})
