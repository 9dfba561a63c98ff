"""`rlhf dpo`'s config: direct preference optimization (dpo, ipo, kto, simpo, orpo) and each loss's own keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf.algos.variants import REFERENCE_FREE_LOSSES, PreferenceLoss
from rlhf.config.common import (
    EngineConfig,
    FrozenModelConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
    _at_least,
    _check_common,
    _check_max_length,
    _check_packing_tokens,
    _positive,
    _within,
)
from rlhf.errors import UserError
from rlhf.toy.task import ToyTaskConfig


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
    loss: PreferenceLoss = "dpo"
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
    reward_stats_rows: int = 2000
    """dpo.loss=dpo: training rows whose chosen and rejected implicit rewards give the mean/std PPO normalizes them with
    when it scores with this policy's implicit reward (reward.name_or_path=[dpo:latest]); 0 = all."""
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
        _at_least(0, {"eval.max_prompts": self.eval.max_prompts, "eval.reward_stats_rows": self.eval.reward_stats_rows})
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
