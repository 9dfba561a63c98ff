"""Loading a policy (causal LM) or a scalar-head model (reward model, critic) ready for training:
weights from a folder, a hub name or the embedded default, optional gradient checkpointing, LoRA.

Loaders take the model's resolved `ModelSource` and its config section, never the registry. Under
ZeRO-3 they build straight into partitions through a `Partitioning` the caller passes
(`rlhf.training.engine.zero3_partitioning`), so this module never imports DeepSpeed.
"""

from __future__ import annotations

import contextlib
import math
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

import torch

from rlhf.config import LoraConfig, ModelConfig
from rlhf.errors import UserError, first_line, remote_code_hint
from rlhf.protocols import CausalLM, Module, Tokenizer

if TYPE_CHECKING:
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel
    from transformers import PreTrainedModel

    from rlhf.models.sources import ModelSource


class Partitioning(Protocol):
    """How a model's weights are laid out as it loads; None in a loader means whole on this rank."""

    def constructing(self) -> AbstractContextManager[None]:
        """While alive, from_pretrained builds the model already partitioned."""
        ...

    def gathered(self, param: torch.nn.Parameter) -> AbstractContextManager[None]:
        """`param` whole inside; what rank 0 writes into it is kept on every rank."""
        ...


class _Whole:
    """Each rank holds the whole model: nothing to set up, nothing to gather."""

    def constructing(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def gathered(self, param: torch.nn.Parameter) -> AbstractContextManager[None]:
        return contextlib.nullcontext()


_WHOLE = _Whole()


def load_causal_lm(
    source: ModelSource,
    cfg: ModelConfig,
    tokenizer: Tokenizer,
    *,
    seed: int,
    dtype: torch.dtype,
    partitioning: Partitioning | None = None,
    key: str = "model.name_or_path",
) -> CausalLM:
    """A causal LM ready for training: optional gradient checkpointing and LoRA (dropout as its
    config sets it; PPO turns it off with `disable_dropout`).

    With a ZeRO-3 `partitioning` a pretrained model is loaded straight into partitions, so no rank
    ever holds all of a large model's weights.
    """
    if source.kind == "toy":
        from rlhf.toy import build_model

        model = build_model(cfg.toy, tokenizer, seed=seed).to(dtype)
        _set_toy_attention(model, cfg)
    else:
        from transformers import AutoModelForCausalLM

        try:
            with (partitioning or _WHOLE).constructing():
                model = AutoModelForCausalLM.from_pretrained(source.location, **_load_kwargs(cfg, dtype))
        except (OSError, ValueError) as exc:
            raise UserError(
                f"{key}: cannot load '{source.location}' as a causal LM: {first_line(exc)}{remote_code_hint(exc, key)} "
                "(it must be a local save_pretrained folder, a registry reference, or a reachable hub model)"
            ) from None
    _check_vocab(model, tokenizer, source)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    return model


def _set_toy_attention(model: PreTrainedModel, cfg: ModelConfig) -> None:
    """The embedded default honours model.attn_implementation too (a loaded model gets it from from_pretrained)."""
    if cfg.attn_implementation:
        model.set_attn_implementation(cfg.attn_implementation)


def _load_kwargs(cfg: ModelConfig, dtype: torch.dtype, **extra: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code, "dtype": dtype, **extra}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    return kwargs


def _check_vocab(model: PreTrainedModel, tokenizer: Tokenizer, source: ModelSource) -> None:
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but '{source.location}' embeds only "
            f"{model.get_input_embeddings().num_embeddings}; use the model's own tokenizer"
        )


class ScalarModel(torch.nn.Module):
    """A transformer backbone with a scalar head, scoring every token: a reward model or a critic.

    Wraps a transformers `*ForSequenceClassification` model with one label (or its peft version)
    so its saved folder loads with transformers alone, but reads the head at every position:
    forward(input_ids, attention_mask) -> (B, T) float32 scores. The reward of a sequence is the
    score at its last real token (`rlhf.algos.reward.sequence_rewards`); a critic uses them all.
    Position ids come from the attention mask, so left and right padding give the same scores.
    """

    def __init__(self, model: PreTrainedModel | PeftModel) -> None:
        super().__init__()
        self.model = model

    @property
    def hf_model(self) -> PreTrainedModel:
        """The transformers model (inside peft's wrapper when LoRA is on)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Packed rows (rlhf.data.packing) pass their own position ids, and no mask or a 4D one."""
        hf = self.hf_model
        if position_ids is None:
            assert attention_mask is not None, "rows without a mask are packed and pass their position ids"
            position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
        hidden = hf.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (B, T, H)
        return hf.score(hidden).squeeze(-1).float()  # (B, T)


def load_scalar_model(
    source: ModelSource,
    cfg: ModelConfig,
    tokenizer: Tokenizer,
    *,
    seed: int,
    dtype: torch.dtype,
    partitioning: Partitioning | None = None,
    trained_head: bool = False,
    key: str = "model.name_or_path",
) -> ScalarModel:
    """A `ScalarModel` from a causal LM (new head) or from a reward model (its trained head).

    With `trained_head` (PPO's reward and critic) a source without a trained score head is an error.

    A new head is initialized N(0, 1/sqrt(hidden + 1)), as in Stiennon et al. 2020: the initial
    rewards have unit-scale spread whatever the width. The head has no bias: Bradley-Terry is blind
    to a constant shift, and PPO normalizes scores with the stored mean and std.
    """
    if source.kind == "toy":
        from rlhf.toy import build_model

        model = build_model(cfg.toy, tokenizer, seed=seed, head="scalar").to(dtype)
        _set_toy_attention(model, cfg)
        new_head = True
    else:
        model, new_head = _pretrained_with_scalar_head(source, cfg, dtype, partitioning, key)
    if trained_head and new_head:
        raise UserError(f"{key}: '{source.location}' has no trained score head, so it is not a reward model; use an rm entry (rm:latest)")
    _check_vocab(model, tokenizer, source)
    # transformers' own pooling (a user scoring with the saved folder alone) finds the last real
    # token through the pad id, so the saved config must carry ours.
    model.config.pad_token_id = tokenizer.pad_token_id
    if new_head:
        _init_scalar_head(model.score.weight, seed=seed, partitioning=partitioning or _WHOLE)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, task_type="SEQ_CLS")
    return ScalarModel(model)


def _pretrained_with_scalar_head(source: ModelSource, cfg: ModelConfig, dtype: torch.dtype,
                                 partitioning: Partitioning | None, key: str) -> tuple[PreTrainedModel, bool]:
    """A hub/folder backbone with a one-output score head; whether that head is new (not in the weights)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the missing-head report is expected; we check it below
    try:
        with (partitioning or _WHOLE).constructing():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                source.location, output_loading_info=True, **_load_kwargs(cfg, dtype, num_labels=1)
            )
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(
            f"{key}: cannot load '{source.location}' as a backbone with a scalar head: "
            f"{first_line(exc)}{remote_code_hint(exc, key)} (it must be a causal LM or reward model: "
            "a save_pretrained folder, a registry reference or a hub model)"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = [k for k in info["missing_keys"] if not k.startswith("score.")]
    if missing:
        raise UserError(
            f"'{source.location}' lacks backbone weights ({', '.join(missing[:3])}...); "
            "point model.name_or_path at a complete save_pretrained folder"
        )
    return model, any(k.startswith("score.") for k in info["missing_keys"])


def zero_scalar_head(model: ScalarModel, *, partitioning: Partitioning | None = None) -> None:
    """Set the head's weights to zero: a critic that starts predicting 0, the scale of normalized
    scores, rather than the reward model's raw scores (the backbone keeps the RM's features).
    `partitioning` is the one the model was loaded with."""
    weight = model.hf_model.score.weight
    with (partitioning or _WHOLE).gathered(weight), torch.no_grad():
        weight.zero_()


def _init_scalar_head(weight: torch.nn.Parameter, *, seed: int, partitioning: Partitioning) -> None:
    """N(0, 1/sqrt(hidden + 1)), seeded; under ZeRO-3 rank 0 draws it and every rank gets its part."""
    generator = torch.Generator().manual_seed(seed)
    with partitioning.gathered(weight):
        hidden = weight.shape[-1]  # read once gathered: a ZeRO-3 partition's own shape is empty
        values = torch.randn(tuple(weight.shape), generator=generator) / math.sqrt(hidden + 1)
        with torch.no_grad():
            weight.copy_(values.to(weight.dtype))


def apply_lora(model: PreTrainedModel, lora: LoraConfig, *, task_type: str = "CAUSAL_LM") -> PeftModel:
    """Wrap `model` with peft adapters. task_type SEQ_CLS also trains (and saves) the scalar head."""
    from peft import get_peft_model

    if getattr(model, "is_gradient_checkpointing", False):
        # Frozen embeddings give inputs without grad; checkpointed blocks need one to backprop into adapters.
        model.enable_input_require_grads()
    return get_peft_model(model, peft_lora_config(lora, task_type=task_type))


def peft_lora_config(lora: LoraConfig, *, task_type: str = "CAUSAL_LM") -> PeftLoraConfig:
    """Our LoRA settings as peft's config (every linear layer but the output head unless named)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules or "all-linear", task_type=task_type)


def disable_dropout(model: Module) -> None:
    """Zero every dropout probability: PPO's ratios compare log-probs of the same weights, which
    must not change between two forward passes, in train mode as in eval mode.

    Architectures apply dropout in three ways: `nn.Dropout` modules (GPT-2, GPT-NeoX), a float
    attribute passed to `nn.functional.dropout` or an attention kernel (OPT's `dropout` and
    `activation_dropout`, Llama's `attention_dropout`), and layer drop (OPT's `layerdrop`); some
    read the probability from the config at each forward. All three, and the config, are zeroed.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if _is_dropout_name(name) and isinstance(value, float):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for name, value in config.to_dict().items():
                if _is_dropout_name(name) and isinstance(value, float):
                    setattr(config, name, 0.0)


def _is_dropout_name(name: str) -> bool:
    return "dropout" in name or name.endswith("pdrop") or name in ("layerdrop", "dropout_p", "attn_dropout_p")
