"""A model's shape (parameters, LoRA's trained share, geometry) for `rlhf plan`, read from its config alone:
parameters are counted on the meta device, so no weights load and no memory is used.

The toy, registry entries (an adapter entry by its base), folders, `.gguf` headers and hub names; a hub name is read
from the local cache only when `local_files_only` (the check before a launch, which must never wait on the network).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf.errors import UserError, first_line
from rlhf.launcher.memory_estimates import ModelShape

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from rlhf.config import BestOfNConfig, LoraConfig, ModelConfig, PPOConfig, StageConfig
    from rlhf.store.registry import Registry

TRAINED_STAGES = ("sft", "rm", "dpo", "ppo", "bon")


def shape_of_config(config: PretrainedConfig, *, head: str = "lm", lora: LoraConfig | None = None, source: str = "") -> ModelShape:
    """Count a transformers config's parameters on the meta device (no memory, no weights) and read its geometry.
    head 'scalar' is a *ForSequenceClassification with one label (a reward model, a critic)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = copy.deepcopy(config)
    if head == "scalar":
        config.num_labels = 1
    factory = AutoModelForSequenceClassification if head == "scalar" else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = factory.from_config(config)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{source}: cannot build a {config.model_type} {head} model from its config ({first_line(exc)})") from None
    params = sum(p.numel() for p in model.parameters())
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    lora_params = lora_trainable(model, lora, head=head) if lora is not None and lora.enabled else 0
    return ModelShape(params=params, hidden=hidden, layers=int(config.num_hidden_layers), heads=heads, kv_heads=kv_heads,
                      head_dim=head_dim, vocab=int(config.vocab_size), lora_params=lora_params, source=source)


def lora_trainable(model: PreTrainedModel, lora: LoraConfig, *, head: str) -> int:
    """Parameters peft trains: r x (in + out) for each adapted linear layer (every linear but the output head unless
    lora.target_modules names them), plus the whole scalar head for a reward model or critic (peft's SEQ_CLS)."""
    import torch

    out_layer = "score" if head == "scalar" else None
    out_embeddings = model.get_output_embeddings() if head == "lm" else None
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is out_embeddings or name.split(".")[-1] == out_layer:
            continue
        if lora.target_modules and not any(name == t or name.endswith("." + t) for t in lora.target_modules):
            continue
        total += lora.r * (module.in_features + module.out_features)
    if head == "scalar":
        total += sum(p.numel() for p in model.score.parameters())
    return total


def _hf_config(source: str, *, key: str, trust_remote_code: bool, local_files_only: bool = False) -> PretrainedConfig:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=local_files_only)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{key}={source}: cannot read its config ({first_line(exc)}); a hub name needs the network or the "
                        "local hub cache, a folder its config.json") from None


def model_shape(name_or_path: str, model_cfg: ModelConfig, registry: Registry, *, key: str, head: str = "lm",
                lora: LoraConfig | None = None, trust_remote_code: bool = False, local_files_only: bool = False) -> ModelShape:
    """The shape of the model `name_or_path` names (toy, a registry reference, a folder, a .gguf file, a hub name),
    from its config alone; with `local_files_only` a hub name not in the local cache is a UserError, not a download."""
    from rlhf.models.gguf import converted_folder, is_gguf
    from rlhf.toy import TOY

    if name_or_path == TOY:
        from rlhf.toy import build_tokenizer
        from rlhf.toy.model import llama_config

        return shape_of_config(llama_config(model_cfg.toy, build_tokenizer()), head=head, lora=lora, source=TOY)
    if is_gguf(name_or_path):
        path = Path(name_or_path).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"{key}: no such GGUF file {path}; give the path of a .gguf file")
        folder = converted_folder(path, Path(registry.root))
        if (folder / "config.json").is_file():
            config = _hf_config(str(folder), key=key, trust_remote_code=False)
        else:  # read the header's metadata only: converting would load every weight
            from transformers import AutoConfig

            try:
                config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            except (OSError, ValueError, KeyError, ImportError) as exc:
                raise UserError(f"{key}: cannot read {path} as a GGUF model ({first_line(exc)})") from None
        return shape_of_config(config, head=head, lora=lora, source=str(path))
    from rlhf.models.sources import resolve_model

    source = resolve_model(name_or_path, registry, key=key)
    if source.entry is not None and source.entry.adapter == "adapter":
        adapter = json.loads((Path(source.location) / "adapter_config.json").read_text())
        base = adapter.get("base_model_name_or_path") or ""
        return model_shape(base, model_cfg, registry, key=key, head=head, lora=lora, trust_remote_code=trust_remote_code,
                           local_files_only=local_files_only)
    config = _hf_config(source.location, key=key, trust_remote_code=trust_remote_code, local_files_only=local_files_only)
    return shape_of_config(config, head=head, lora=lora, source=name_or_path)


def model_shapes(stage: str, cfg: StageConfig, registry: Registry, *, local_files_only: bool = False) -> dict[str, ModelShape]:
    """Every model `stage` holds, by role, read from configs (no weights load; hub names from the local cache only
    with `local_files_only`)."""
    def shape(name: str, model_cfg: ModelConfig, key: str, head: str = "lm", lora: LoraConfig | None = None,
              trust: bool = False) -> ModelShape:
        return model_shape(name, model_cfg, registry, key=key, head=head, lora=lora, trust_remote_code=trust,
                           local_files_only=local_files_only)

    from rlhf.config import REFERENCE_FREE_LOSSES, BestOfNConfig, DPOConfig, PPOConfig, RMConfig, SFTConfig

    # isinstance picks the same cases as `stage` (cfg is STAGE_CONFIGS[stage]) and lets mypy see each one's sections.
    if isinstance(cfg, SFTConfig):
        model = cfg.model
        return {"policy": shape(model.name_or_path, model, "model.name_or_path", lora=model.lora, trust=model.trust_remote_code)}
    if isinstance(cfg, RMConfig):
        model = cfg.model
        return {"reward model": shape(model.name_or_path, model, "model.name_or_path", "scalar", model.lora, model.trust_remote_code)}
    if isinstance(cfg, (DPOConfig, PPOConfig)):
        model = cfg.model
        actor = shape(model.name_or_path, model, "model.name_or_path", lora=model.lora, trust=model.trust_remote_code)
        shapes = {"policy" if isinstance(cfg, DPOConfig) else "actor": actor}
        if isinstance(cfg, PPOConfig) and cfg.ppo.estimator == "gae":
            shapes["critic"] = shape(cfg.critic.name_or_path, cfg.critic, "critic.name_or_path", "scalar", cfg.critic.lora,
                                     cfg.critic.trust_remote_code)
        needs_reference = isinstance(cfg, PPOConfig) or cfg.dpo.loss not in REFERENCE_FREE_LOSSES or cfg.eval.kl
        if needs_reference and cfg.reference.name_or_path is not None:
            shapes["reference"] = shape(cfg.reference.name_or_path, model, "reference.name_or_path", trust=cfg.reference.trust_remote_code)
        elif needs_reference and not model.lora.enabled:  # with LoRA the reference is the actor with its adapters off
            shapes["reference"] = dataclasses.replace(actor, lora_params=0)
        if isinstance(cfg, PPOConfig):
            shapes.update(_reward_shapes(cfg, model, shape, registry))
        return shapes
    if isinstance(cfg, BestOfNConfig):
        model = cfg.model
        shapes = {"policy": shape(model.name_or_path, model, "model.name_or_path", trust=model.trust_remote_code)}
        shapes.update(_reward_shapes(cfg, model, shape, registry))
        return shapes
    raise UserError(f"rlhf plan estimates {', '.join(TRAINED_STAGES)}, not {stage!r}")


IMPLICIT_ROLES = ("reward (implicit)", "reward reference")
"""The two models of a DPO policy's implicit reward (rlhf/rollouts/implicit_reward.py): each scores with its LM head."""


def _implicit_reference(name_or_path: str, registry: Registry) -> str | None:
    """The reference of the implicit reward `name_or_path` defines, when it is a folder or registry entry with an
    implicit_reward.json; else None (a scalar-head reward model, or a name whose folder is not here)."""
    from rlhf.models.gguf import is_gguf
    from rlhf.models.sources import resolve_model
    from rlhf.rollouts.implicit_reward import implicit_reward_spec
    from rlhf.toy import TOY

    if is_gguf(name_or_path) or name_or_path == TOY:
        return None
    spec = implicit_reward_spec(resolve_model(name_or_path, registry, key="reward.name_or_path"))
    return None if spec is None else spec.reference


def _reward_shapes(cfg: PPOConfig | BestOfNConfig, model: ModelConfig, shape: Callable[..., ModelShape],
                   registry: Registry) -> dict[str, ModelShape]:
    from rlhf.rollouts.rewards import learned_source, parse_sources

    learned = learned_source(parse_sources(cfg.reward.name_or_path, cfg.reward.weights))
    if learned is None:
        return {}
    reference = _implicit_reference(learned.text, registry)
    if reference is not None:  # a DPO policy and its reference, both with their LM heads
        return {IMPLICIT_ROLES[0]: shape(learned.text, model, "reward.name_or_path", "lm", None, cfg.reward.trust_remote_code),
                IMPLICIT_ROLES[1]: shape(reference, model, "reward.name_or_path's reference", "lm", None, cfg.reward.trust_remote_code)}
    shapes = {"reward": shape(learned.text, model, "reward.name_or_path", "scalar", None, cfg.reward.trust_remote_code)}
    for i, name in enumerate(cfg.reward_ensemble.name_or_path):  # PPO's and best-of-N's members, frozen like the reward model
        shapes[f"reward {i + 2}"] = shape(name, model, f"reward_ensemble.name_or_path[{i}]", "scalar", None, cfg.reward.trust_remote_code)
    return shapes
