"""Loading policy and reward models and tokenizers, LoRA, and the final `save_pretrained` folder."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from rlhf.config import LoraConfig, ModelConfig
from rlhf.errors import UserError, first_line
from rlhf.gguf import ensure_converted, is_gguf
from rlhf.gguf import origin as gguf_origin
from rlhf.registry import Entry, Registry, is_reference
from rlhf.toy import TOY


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved once: the embedded default, a registry entry, a folder or a hub name."""

    kind: str  # "toy" | "registry" | "path" | "hub"
    location: str  # the folder or hub name to load ("toy" for the embedded default)
    entry: Entry | None = None

    @property
    def parents(self) -> tuple[str, ...]:
        return (self.entry.id,) if self.entry else ()


def resolve_model(name_or_path: str, registry: Registry, *, key: str = "model.name_or_path") -> ModelSource:
    if not name_or_path.strip():
        raise UserError(f"{key} is empty; set it to 'toy', a registry reference (sft:latest), a save_pretrained folder or a hub name")
    if name_or_path == TOY:
        return ModelSource("toy", TOY)
    if is_gguf(name_or_path):
        # Converted once into a save_pretrained folder under the registry; later runs reuse it.
        return ModelSource("path", str(ensure_converted(name_or_path, registry.root, key=key)))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{key}={name_or_path}: the folder has no config.json; point it at a save_pretrained folder")
        return ModelSource("path", str(path.resolve()))
    if is_reference(name_or_path):
        entry = registry.resolve(name_or_path)
        _check_entry_folder(entry, f"{key}={name_or_path}")
        return ModelSource("registry", entry.path, entry)
    if _looks_like_path(name_or_path):
        raise UserError(f"{key}={name_or_path}: no such folder; check the path (a hub name is 'name' or 'org/name')")
    return ModelSource("hub", name_or_path)


def _looks_like_path(text: str) -> bool:
    """A local path rather than a hub name: hub ids are 'name' or 'org/name', never deeper."""
    return text.startswith((".", "/", "~")) or text.count("/") >= 2 or (os.sep != "/" and os.sep in text)


def _check_entry_folder(entry: Entry, where: str) -> None:
    """An entry outlives its folder when someone deletes the run: say so instead of a hub error."""
    folder = Path(entry.path)
    marker = "adapter_config.json" if entry.adapter == "adapter" else "config.json"
    fix = f"restore it, or take the entry out with `rlhf registry rm {entry.id}` and use another (rlhf registry ls)"
    if not folder.is_dir():
        raise UserError(f"{where}: the folder of {entry.stage} entry {entry.id} is gone ({folder}); {fix}")
    if not (folder / marker).is_file():
        raise UserError(f"{where}: the folder of {entry.stage} entry {entry.id} ({folder}) has no {marker}; {fix}")


def base_model_identity(source: ModelSource, cfg: ModelConfig) -> str:
    """The base model a lineage started from, carried unchanged through every later stage."""
    if source.kind == "toy":
        from rlhf.toy import model_identity

        return model_identity(cfg.toy)
    if source.entry:
        return source.entry.base_model
    made_from = gguf_origin(Path(source.location)) if source.kind == "path" else None
    return f"gguf:{made_from['gguf']}@sha256:{made_from['sha256']}" if made_from else source.location


def load_tokenizer(
    source: ModelSource, *, trust_remote_code: bool, name_or_path: str | None = None, key: str = "model.tokenizer"
) -> Any:
    """The tokenizer of a model (or `name_or_path` instead), with a pad token that is not EOS where
    one can be found. When the model comes from a registry entry, the tokenizer must be the one
    that entry was trained with: token ids mean nothing to a model trained on other ids."""
    if source.kind == "toy" and name_or_path is None:
        from rlhf.toy import build_tokenizer

        tokenizer = build_tokenizer()
    else:
        tokenizer = _pretrained_tokenizer(name_or_path or source.location, trust_remote_code=trust_remote_code, key=key)
    if source.entry is not None and source.entry.tokenizer:
        _check_same_tokenizer(tokenizer, source.entry, where=f"{key}={name_or_path}" if name_or_path else source.location)
    return tokenizer


def causal_lm_and_tokenizer(cfg: ModelConfig, registry: Registry) -> tuple[ModelSource, Any]:
    """Resolve `cfg.name_or_path` to a causal LM and load its tokenizer (or cfg.tokenizer, which
    must then match a registry parent's)."""
    source = resolve_model(cfg.name_or_path, registry)
    check_causal_lm(source)
    return source, load_tokenizer(source, trust_remote_code=cfg.trust_remote_code, name_or_path=cfg.tokenizer)


def _tokenizer_differences(first: dict[str, Any], second: dict[str, Any]) -> str:
    """What differs between two tokenizer fingerprints ("vocab_size 101 vs 100, ..."); "" if nothing."""
    compared = ("vocab_size", "fingerprint", "eos_token_id", "pad_token_id")
    keys = [k for k in compared if k in first and k in second and first[k] != second[k]]
    return ", ".join(f"{k} {first[k]} vs {second[k]}" for k in keys)


def _check_same_tokenizer(tokenizer: Any, entry: Entry, *, where: str) -> None:
    detail = _tokenizer_differences(tokenizer_fingerprint(tokenizer), entry.tokenizer)
    if detail:
        raise UserError(
            f"the tokenizer of {where} differs from the one {entry.stage} entry {entry.id} was trained with "
            f"({detail}); use that entry's own tokenizer (drop model.tokenizer)"
        )


def _pretrained_tokenizer(location: str, *, trust_remote_code: bool, key: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the tokenizer of '{location}': {first_line(exc)}{_remote_code_hint(exc, key)}") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer of '{location}' has no EOS token; set one in its tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        # A distinct pad keeps EOS learnable: padding is masked, EOS is a real target.
        candidate = tokenizer.unk_token or None
        if candidate is not None and tokenizer.convert_tokens_to_ids(candidate) != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
        else:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _remote_code_hint(exc: Exception, key: str) -> str:
    """transformers refuses a repository's own code unless trusted: name the one flag that trusts
    this model (`reward.name_or_path` -> `reward.trust_remote_code`), each model having its own."""
    if "custom code" not in str(exc):
        return ""
    return f" (set {key.partition('.')[0]}.trust_remote_code=true only if you trust that code)"


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """A short identity that tells two tokenizers apart (vocabulary and special tokens)."""
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]
    return {
        "name": getattr(tokenizer, "name_or_path", "") or "",
        "vocab_size": len(tokenizer),
        "fingerprint": digest,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


REWARD_STATS_FILE = "reward_stats.json"
"""In a reward model's folder: the mean and std of its rewards on training responses (PPO's normalization)."""
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
SCALAR_SUFFIX = "ForSequenceClassification"


def architectures(source: ModelSource) -> list[str]:
    """The model classes a local folder's config.json names (empty for the toy model and hub names,
    whose config is only read when the model loads)."""
    if source.kind not in ("registry", "path"):
        return []
    config = Path(source.location) / "config.json"
    if not config.is_file():
        return []
    try:
        return list(json.loads(config.read_text()).get("architectures") or [])
    except (OSError, ValueError):
        return []


def check_causal_lm(source: ModelSource, *, key: str = "model.name_or_path") -> None:
    """Stop with one line when `source` is not a causal LM (e.g. a reward model, or a LoRA adapter
    folder with no weights of its own), before any weight is loaded the wrong way."""
    what = f"{source.entry.stage} entry {source.entry.id}" if source.entry else f"'{source.location}'"
    if source.entry is not None and source.entry.adapter == "adapter":
        raise UserError(
            f"{key}: {what} stores only a LoRA adapter, not a whole causal LM; rerun that stage with "
            "model.lora.save=merged and use the new entry"
        )
    archs = architectures(source)
    if archs and not any(a.endswith(CAUSAL_LM_SUFFIXES) for a in archs):
        raise UserError(
            f"{key}: {what} is a {archs[0]}, not a causal LM; use an sft entry (sft:latest), "
            "a base model folder or a hub model name"
        )


def check_scalar_model(source: ModelSource, *, key: str) -> None:
    """Stop with one line when `source` is not a reward model (a `*ForSequenceClassification` with a
    trained head): PPO's reward and critic start from one. Hub names are checked when they load."""
    what = f"{source.entry.stage} entry {source.entry.id}" if source.entry else f"'{source.location}'"
    if source.kind == "toy":
        raise UserError(f"{key}: 'toy' is a language model with no trained score head, not a reward model; use rm:latest")
    if source.entry is not None and source.entry.adapter == "adapter":
        raise UserError(
            f"{key}: {what} stores only a LoRA adapter, not a whole reward model; rerun that stage with "
            "model.lora.save=merged and use the new entry"
        )
    archs = architectures(source)
    if archs and not any(a.endswith(SCALAR_SUFFIX) for a in archs):
        raise UserError(f"{key}: {what} is a {archs[0]}, not a reward model; use an rm entry (rm:latest) or a reward model folder")


def check_same_tokenizer(tokenizer: Any, source: ModelSource, *, key: str, trust_remote_code: bool = False) -> None:
    """Stop when the model at `source` was trained with another tokenizer than `tokenizer`: PPO feeds
    the actor's token ids to the reference, critic and reward model alike."""
    if source.entry is not None and source.entry.tokenizer:
        theirs = source.entry.tokenizer
    else:
        theirs = tokenizer_fingerprint(load_tokenizer(source, trust_remote_code=trust_remote_code, key=key))
    detail = _tokenizer_differences(theirs, tokenizer_fingerprint(tokenizer))
    if detail:
        raise UserError(
            f"{key}: {source.entry.id if source.entry else source.location} uses another tokenizer than the actor "
            f"({detail}); it would read the actor's token ids as other words, so use a model of the same lineage"
        )


def disable_dropout(model: torch.nn.Module) -> None:
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


def load_causal_lm(
    source: ModelSource,
    cfg: ModelConfig,
    tokenizer: Any,
    *,
    seed: int,
    dtype: torch.dtype,
    zero3_config: dict[str, Any] | None = None,
    key: str = "model.name_or_path",
) -> Any:
    """A causal LM ready for training: dropout off, optional gradient checkpointing and LoRA.

    With `zero3_config` (the DeepSpeed config of a ZeRO-3 engine) a pretrained model is loaded
    straight into partitions, so no rank ever holds all of a large model's weights.
    """
    if source.kind == "toy":
        from rlhf.toy import build_model

        model = build_model(cfg.toy, tokenizer, seed=seed).to(dtype)
        _set_toy_attention(model, cfg)
    else:
        from transformers import AutoModelForCausalLM

        try:
            with _partitioned_loading(zero3_config):
                model = AutoModelForCausalLM.from_pretrained(source.location, **_load_kwargs(cfg, dtype))
        except (OSError, ValueError) as exc:
            raise UserError(
                f"{key}: cannot load '{source.location}' as a causal LM: {first_line(exc)}{_remote_code_hint(exc, key)} "
                "(it must be a local save_pretrained folder, a registry reference, or a reachable hub model)"
            ) from None
    _check_vocab(model, tokenizer, source)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    return model


def _set_toy_attention(model: Any, cfg: ModelConfig) -> None:
    """The embedded default honours model.attn_implementation too (a loaded model gets it from from_pretrained)."""
    if cfg.attn_implementation:
        model.set_attn_implementation(cfg.attn_implementation)


def _load_kwargs(cfg: ModelConfig, dtype: torch.dtype, **extra: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code, "dtype": dtype, **extra}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    return kwargs


def _check_vocab(model: Any, tokenizer: Any, source: ModelSource) -> None:
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but '{source.location}' embeds only "
            f"{model.get_input_embeddings().num_embeddings}; use the model's own tokenizer"
        )


@contextlib.contextmanager
def _partitioned_loading(zero3_config: dict[str, Any] | None) -> Iterator[None]:
    """While alive, an HfDeepSpeedConfig makes from_pretrained build the model under zero.Init.

    It is dropped right after loading: left alive it would also partition models we build later
    on purpose whole (the CPU copy used to merge LoRA weights at save time).
    """
    if zero3_config is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    marker = HfDeepSpeedConfig(zero3_config)
    try:
        yield
    finally:
        del marker


class ScalarModel(torch.nn.Module):
    """A transformer backbone with a scalar head, scoring every token: a reward model or a critic.

    Wraps a transformers `*ForSequenceClassification` model with one label (or its peft version)
    so its saved folder loads with transformers alone, but reads the head at every position:
    forward(input_ids, attention_mask) -> (B, T) float32 scores. The reward of a sequence is the
    score at its last real token (`rlhf.algos.reward.sequence_rewards`); a critic uses them all.
    Position ids come from the attention mask, so left and right padding give the same scores.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    @property
    def hf_model(self) -> Any:
        """The transformers model (inside peft's wrapper when LoRA is on)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hf = self.hf_model
        position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
        hidden = hf.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (B, T, H)
        return hf.score(hidden).squeeze(-1).float()  # (B, T)


def load_scalar_model(
    source: ModelSource,
    cfg: ModelConfig,
    tokenizer: Any,
    *,
    seed: int,
    dtype: torch.dtype,
    zero3_config: dict[str, Any] | None = None,
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
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the missing-head report is expected; we check it below
        try:
            with _partitioned_loading(zero3_config):
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    source.location, output_loading_info=True, **_load_kwargs(cfg, dtype, num_labels=1)
                )
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(
                f"{key}: cannot load '{source.location}' as a backbone with a scalar head: "
                f"{first_line(exc)}{_remote_code_hint(exc, key)} (it must be a causal LM or reward model: "
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
        new_head = any(k.startswith("score.") for k in info["missing_keys"])
    if trained_head and new_head:
        raise UserError(f"{key}: '{source.location}' has no trained score head, so it is not a reward model; use an rm entry (rm:latest)")
    _check_vocab(model, tokenizer, source)
    # transformers' own pooling (a user scoring with the saved folder alone) finds the last real
    # token through the pad id, so the saved config must carry ours.
    model.config.pad_token_id = tokenizer.pad_token_id
    if new_head:
        _init_scalar_head(model.score.weight, seed=seed)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, task_type="SEQ_CLS")
    return ScalarModel(model)


def zero_scalar_head(model: ScalarModel) -> None:
    """Set the head's weights to zero: a critic that starts predicting 0, the scale of normalized
    scores, rather than the reward model's raw scores (the backbone keeps the RM's features)."""
    weight = model.hf_model.score.weight
    with _gathered_for_init(weight), torch.no_grad():
        weight.zero_()


def _init_scalar_head(weight: torch.nn.Parameter, *, seed: int) -> None:
    """N(0, 1/sqrt(hidden + 1)), seeded; under ZeRO-3 rank 0 draws it and every rank gets its part."""
    hidden = weight.ds_shape[-1] if hasattr(weight, "ds_shape") else weight.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    with _gathered_for_init(weight):
        values = torch.randn(tuple(weight.shape), generator=generator) / math.sqrt(hidden + 1)
        with torch.no_grad():
            weight.copy_(values.to(weight.dtype))


@contextlib.contextmanager
def _gathered_for_init(param: torch.nn.Parameter) -> Iterator[None]:
    if not hasattr(param, "ds_id"):  # not partitioned by ZeRO-3
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
        yield


def apply_lora(model: Any, lora: LoraConfig, *, task_type: str = "CAUSAL_LM") -> Any:
    """Wrap `model` with peft adapters. task_type SEQ_CLS also trains (and saves) the scalar head."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules or "all-linear",
        task_type=task_type,
    )
    if getattr(model, "is_gradient_checkpointing", False):
        # Frozen embeddings give inputs without grad; checkpointed blocks need one to backprop into adapters.
        model.enable_input_require_grads()
    return get_peft_model(model, peft_config)


def save_final(
    model: Any,
    state: dict[str, torch.Tensor],
    tokenizer: Any,
    out_dir: Path,
    *,
    lora: LoraConfig,
    extra_files: dict[str, str] | None = None,
) -> str:
    """Write a `save_pretrained` folder atomically (temp folder, then rename); returns the adapter mode.

    `model` is the (possibly partitioned) transformers or peft model, used only for its config and
    structure; `state` holds its full weights gathered on this rank. `extra_files` (name -> text)
    are written into the folder before it appears.
    """
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    adapter = "none"
    if lora.enabled:
        adapter = lora.save
        if lora.save == "adapter":
            model.save_pretrained(tmp, state_dict=_adapter_state(model, state))
        else:
            _merged_copy(model, state).save_pretrained(tmp)
    else:
        model.save_pretrained(tmp, state_dict=state)
    tokenizer.save_pretrained(tmp)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return adapter


def _adapter_state(peft_model: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model, state_dict=state)


def _merged_copy(peft_model: Any, state: dict[str, torch.Tensor]) -> Any:
    """A plain CPU model of the same class with the LoRA deltas folded into its weights."""
    import copy

    base = peft_model.get_base_model()
    with torch.device("meta"):
        skeleton = type(base)(copy.deepcopy(base.config))
    pc = peft_model.peft_config["default"]
    fresh = apply_lora(skeleton, _lora_from_peft(pc), task_type=getattr(pc.task_type, "value", pc.task_type))
    fresh.load_state_dict(state, strict=False, assign=True)
    merged = fresh.merge_and_unload()
    merged.tie_weights()
    return merged


def _lora_from_peft(pc: Any) -> LoraConfig:
    return LoraConfig(
        enabled=True,
        r=pc.r,
        alpha=pc.lora_alpha,
        dropout=0.0,
        target_modules=sorted(pc.target_modules) if not isinstance(pc.target_modules, str) else None,
    )


@dataclass(frozen=True)
class PPOSources:
    """Where PPO's other three models come from; reference None = the actor with its adapters off."""

    reference: ModelSource | None
    critic: ModelSource
    reward: ModelSource

    @property
    def parents(self) -> tuple[str, ...]:
        ids = [s.entry.id for s in (self.reward, self.critic, self.reference) if s is not None and s.entry is not None]
        return tuple(dict.fromkeys(ids))


def ppo_sources(cfg: Any, registry: Registry, actor: ModelSource, tokenizer: Any) -> PPOSources:
    """Resolve and check PPO's reference, critic and reward models against the actor and its tokenizer.

    The critic and the reward model must be reward models; every model must share the actor's
    tokenizer, since all four read the same token ids.
    """
    scalar: dict[str, ModelSource] = {}
    for name in ("critic", "reward"):
        key = f"{name}.name_or_path"
        source = resolve_model(getattr(cfg, name).name_or_path, registry, key=key)
        check_scalar_model(source, key=key)
        check_same_tokenizer(tokenizer, source, key=key, trust_remote_code=getattr(cfg, name).trust_remote_code)
        scalar[name] = source
    reference = None
    if cfg.reference.name_or_path is not None or not cfg.model.lora.enabled:
        key = "reference.name_or_path"
        reference = actor if cfg.reference.name_or_path is None else resolve_model(cfg.reference.name_or_path, registry, key=key)
        check_causal_lm(reference, key=key)
        if reference is not actor:
            check_same_tokenizer(tokenizer, reference, key=key, trust_remote_code=cfg.reference.trust_remote_code)
    return PPOSources(reference=reference, critic=scalar["critic"], reward=scalar["reward"])


@dataclass(frozen=True)
class PPOModels:
    """PPO's four models: the actor and critic as DeepSpeed engines with their optimizers; the
    reference and reward frozen (ZeRO-3 partitions under ZeRO-3 or offload, else plain modules).
    reference None = the actor with its LoRA adapters switched off."""

    actor: Any
    critic: Any
    reference: Any | None
    reward: Any


def frozen_model_config(cfg: Any, name: str) -> ModelConfig:
    """How PPO loads its frozen `name` ('reference' or 'reward'): the actor's kernel choice, no
    adapters or recomputed activations (they never backpropagate), and that model's own
    trust_remote_code, since trusting the actor's repository says nothing about another's. A null
    reference is the actor's own model, already loaded under model.trust_remote_code."""
    own = getattr(cfg, name)
    trust = cfg.model.trust_remote_code if name == "reference" and own.name_or_path is None else own.trust_remote_code
    return dataclasses.replace(cfg.model, lora=LoraConfig(), gradient_checkpointing=False, trust_remote_code=trust)


def build_ppo_models(
    cfg: Any, sources: PPOSources, actor_source: ModelSource, tokenizer: Any, *, dist: Any, total_updates: int
) -> PPOModels:
    """Load and wrap PPO's four models from their resolved sources, dropout off in all four.

    Under ZeRO-3 each model loads straight into partitions. The critic keeps the reward model's
    backbone; its head is zeroed with ppo.value_head=zero. `total_updates` (optimizer steps of the
    whole run) sets both learning-rate schedules.
    """
    from rlhf.engine import PRECISION_DTYPES, build_engine, build_frozen, deepspeed_config, frozen_zero3_config

    engine = cfg.engine
    zero3 = engine.zero_stage == 3
    dtype = PRECISION_DTYPES[engine.precision]
    seed = cfg.train.seed
    actor = load_causal_lm(actor_source, cfg.model, tokenizer, seed=seed, dtype=dtype,
                           zero3_config=deepspeed_config(engine, cfg.optim) if zero3 else None)
    critic = load_scalar_model(sources.critic, cfg.critic, tokenizer, seed=seed, dtype=dtype, trained_head=True,
                               key="critic.name_or_path", zero3_config=deepspeed_config(engine, cfg.critic_optim) if zero3 else None)
    if cfg.ppo.value_head == "zero":
        zero_scalar_head(critic)
    reference = None
    if sources.reference is not None:
        reference = load_causal_lm(sources.reference, frozen_model_config(cfg, "reference"), tokenizer, seed=seed, dtype=dtype,
                                   zero3_config=frozen_zero3_config(engine, cfg.reference.offload), key="reference.name_or_path")
        disable_dropout(reference)
        reference = build_frozen(reference, engine=engine, offload=cfg.reference.offload, dist=dist)
    reward = load_scalar_model(sources.reward, frozen_model_config(cfg, "reward"), tokenizer, seed=seed, dtype=dtype,
                               trained_head=True, key="reward.name_or_path", zero3_config=frozen_zero3_config(engine, cfg.reward.offload))
    for model in (actor, critic, reward):
        disable_dropout(model)
    reward = build_frozen(reward, engine=engine, offload=cfg.reward.offload, dist=dist)
    actor = build_engine(actor, engine=engine, optim=cfg.optim, total_steps=total_updates)
    critic = build_engine(critic, engine=engine, optim=cfg.critic_optim, total_steps=total_updates)
    return PPOModels(actor=actor, critic=critic, reference=reference, reward=reward)


def reward_stats(source: ModelSource, *, key: str = "reward.name_or_path") -> dict[str, float]:
    """The mean and std of a reward model's scores on its training responses (saved by `rlhf rm`)."""
    path = Path(source.location) / REWARD_STATS_FILE
    fix = "use an rm entry, which stores them, or set ppo.normalize_score=false"
    if not path.is_file():
        raise UserError(f"{key}: '{source.location}' has no {REWARD_STATS_FILE} to normalize scores with; {fix}")
    try:
        stats = json.loads(path.read_text())
        mean, std = float(stats["mean"]), float(stats["std"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: unreadable reward statistics ({first_line(exc)}); {fix}") from None
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise UserError(f"{path}: reward statistics mean={mean}, std={std} cannot normalize scores (std must be positive); {fix}")
    return {"mean": mean, "std": std}
