"""Loading policy models and tokenizers, LoRA, and the final `save_pretrained` folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from rlhf.config import LoraConfig, ModelConfig
from rlhf.errors import UserError, first_line
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
    if name_or_path == TOY:
        return ModelSource("toy", TOY)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{key}={name_or_path}: the folder has no config.json; point it at a save_pretrained folder")
        return ModelSource("path", str(path.resolve()))
    if is_reference(name_or_path):
        entry = registry.resolve(name_or_path)
        return ModelSource("registry", entry.path, entry)
    if name_or_path.startswith((".", "/", "~")):
        raise UserError(f"{key}={name_or_path}: no such folder; check the path")
    return ModelSource("hub", name_or_path)


def base_model_identity(source: ModelSource, cfg: ModelConfig) -> str:
    """The base model a lineage started from, carried unchanged through every later stage."""
    if source.kind == "toy":
        from rlhf.toy import model_identity

        return model_identity(cfg.toy)
    return source.entry.base_model if source.entry else source.location


def load_tokenizer(source: ModelSource, *, trust_remote_code: bool) -> Any:
    """The tokenizer of a model, with a pad token that is not EOS where one can be found."""
    if source.kind == "toy":
        from rlhf.toy import build_tokenizer

        return build_tokenizer()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise UserError(f"cannot load the tokenizer of '{source.location}': {first_line(exc)}") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer of '{source.location}' has no EOS token; set one in its tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        # A distinct pad keeps EOS learnable: padding is masked, EOS is a real target.
        candidate = tokenizer.unk_token or None
        if candidate is not None and tokenizer.convert_tokens_to_ids(candidate) != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
        else:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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


def load_causal_lm(
    source: ModelSource,
    cfg: ModelConfig,
    tokenizer: Any,
    *,
    seed: int,
    dtype: torch.dtype,
    zero3_config: dict[str, Any] | None = None,
) -> Any:
    """A causal LM ready for training: dropout off, optional gradient checkpointing and LoRA.

    With `zero3_config` (the DeepSpeed config of a ZeRO-3 engine) a pretrained model is loaded
    straight into partitions, so no rank ever holds all of a large model's weights.
    """
    if source.kind == "toy":
        from rlhf.toy import build_model

        model = build_model(cfg.toy, tokenizer, seed=seed).to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code, "dtype": dtype}
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        try:
            with _partitioned_loading(zero3_config):
                model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"cannot load '{source.location}' as a causal LM: {first_line(exc)} "
                "(it must be a local save_pretrained folder, a registry reference, or a reachable hub model)"
            ) from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but '{source.location}' embeds only "
            f"{model.get_input_embeddings().num_embeddings}; use the model's own tokenizer"
        )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    return model


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


def apply_lora(model: Any, lora: LoraConfig) -> Any:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )
    if getattr(model, "is_gradient_checkpointing", False):
        # Frozen embeddings give inputs without grad; checkpointed blocks need one to backprop into adapters.
        model.enable_input_require_grads()
    return get_peft_model(model, peft_config)


def save_final(
    model: Any, state: dict[str, torch.Tensor], tokenizer: Any, out_dir: Path, *, lora: LoraConfig
) -> str:
    """Write a `save_pretrained` folder atomically (temp folder, then rename); returns the adapter mode.

    `model` is the (possibly partitioned) training module, used only for its config and structure;
    `state` holds the full weights gathered on this rank.
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
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return adapter


def _adapter_state(peft_model: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model, state_dict=state)


def _merged_copy(peft_model: Any, state: dict[str, torch.Tensor]) -> Any:
    """A plain CPU model with the LoRA deltas folded into its weights."""
    import copy

    from transformers import AutoModelForCausalLM

    base_config = copy.deepcopy(peft_model.get_base_model().config)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(base_config)
    fresh = apply_lora(skeleton, _lora_from_peft(peft_model))
    fresh.load_state_dict(state, strict=False, assign=True)
    merged = fresh.merge_and_unload()
    merged.tie_weights()
    return merged


def _lora_from_peft(peft_model: Any) -> LoraConfig:
    pc = peft_model.peft_config["default"]
    return LoraConfig(
        enabled=True,
        r=pc.r,
        alpha=pc.lora_alpha,
        dropout=0.0,
        target_modules=sorted(pc.target_modules) if not isinstance(pc.target_modules, str) else None,
    )
