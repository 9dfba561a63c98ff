"""The final `save_pretrained` folder of a stage: whole weights, LoRA adapters alone or merged into
them, the tokenizer, and any extra files, written atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlhf.config import LoraConfig
from rlhf.models.loading import ScalarModel, apply_lora
from rlhf.protocols import CausalLM, Tokenizer

if TYPE_CHECKING:
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel
    from transformers import PreTrainedModel


def save_final(
    model: CausalLM | ScalarModel,
    state: dict[str, torch.Tensor],
    tokenizer: Tokenizer,
    out_dir: Path,
    *,
    lora: LoraConfig,
    extra_files: dict[str, str] | None = None,
) -> str:
    """Write a `save_pretrained` folder atomically (temp folder, then rename); returns the adapter mode.

    `model` is the (possibly partitioned) transformers or peft model, or a `ScalarModel` around
    one, used only for its config and structure; `state` holds its full weights gathered on this
    rank. `extra_files` (name -> text) are written into the folder before it appears.
    """
    model, state = _unwrapped(model, state)
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


def _unwrapped(model: CausalLM | ScalarModel, state: dict[str, torch.Tensor]) -> tuple[CausalLM, dict[str, torch.Tensor]]:
    """A `ScalarModel` saves as the transformers (or peft) model it wraps, so its folder loads with
    transformers alone: that model, and the weights with the wrapper's `model.` prefix dropped."""
    if not isinstance(model, ScalarModel):
        return model, state
    return model.model, {name.removeprefix("model."): tensor for name, tensor in state.items()}


def _adapter_state(peft_model: PeftModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model, state_dict=state)


def _merged_copy(peft_model: PeftModel, state: dict[str, torch.Tensor]) -> PreTrainedModel:
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


def _lora_from_peft(pc: PeftLoraConfig) -> LoraConfig:
    return LoraConfig(
        enabled=True,
        r=pc.r,
        alpha=pc.lora_alpha,
        dropout=0.0,
        target_modules=sorted(pc.target_modules) if not isinstance(pc.target_modules, str) else None,
    )
