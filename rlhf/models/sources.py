"""Where each model comes from: a name resolved once (the embedded default, a registry entry, a
folder or a hub name) and checked to be the kind of model its stage needs, before any weight loads.

The CLI runs these checks before launching, so they need neither DeepSpeed nor the weights.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from rlhf.config import BestOfNConfig, DPOConfig, ModelConfig, PPOConfig
from rlhf.errors import UserError, first_line
from rlhf.models.gguf import ensure_converted, is_gguf
from rlhf.models.gguf import origin as gguf_origin
from rlhf.models.tokenizer import check_entry_tokenizer, pretrained_tokenizer, tokenizer_differences, tokenizer_fingerprint
from rlhf.protocols import Tokenizer
from rlhf.store.entry import DATASET_FILES, Entry, is_reference
from rlhf.store.registry import Registry
from rlhf.toy import TOY

REWARD_STATS_FILE = "reward_stats.json"
"""In a reward model's folder: the mean and std of its rewards on training responses (PPO's normalization)."""
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
SCALAR_SUFFIX = "ForSequenceClassification"


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
        try:
            entry = registry.resolve(name_or_path)
        except UserError as error:  # say which key holds the reference: a PPO config has three
            raise UserError(f"{key}={name_or_path}: {error}") from None
        if entry.stage in DATASET_FILES:
            raise UserError(f"{key}={name_or_path} is a {entry.stage} entry (a dataset), not a model; give a model entry "
                            "(sft:latest, ppo:latest), a folder or a hub name")
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
) -> Tokenizer:
    """The tokenizer of a model (or `name_or_path` instead), with a pad token that is not EOS where
    one can be found. When the model comes from a registry entry, the tokenizer must be the one
    that entry was trained with: token ids mean nothing to a model trained on other ids."""
    if source.kind == "toy" and name_or_path is None:
        from rlhf.toy import build_tokenizer

        tokenizer = build_tokenizer()
    else:
        tokenizer = pretrained_tokenizer(name_or_path or source.location, trust_remote_code=trust_remote_code, key=key)
    if source.entry is not None and source.entry.tokenizer:
        check_entry_tokenizer(tokenizer, source.entry, where=f"{key}={name_or_path}" if name_or_path else source.location)
    return tokenizer


def check_same_tokenizer(tokenizer: Tokenizer, source: ModelSource, *, key: str, trust_remote_code: bool = False) -> None:
    """Stop when the model at `source` was trained with another tokenizer than `tokenizer`: PPO feeds
    the actor's token ids to the reference, critic and reward model alike."""
    if source.entry is not None and source.entry.tokenizer:
        theirs = source.entry.tokenizer
    else:
        theirs = tokenizer_fingerprint(load_tokenizer(source, trust_remote_code=trust_remote_code, key=key))
    detail = tokenizer_differences(theirs, tokenizer_fingerprint(tokenizer))
    if detail:
        raise UserError(
            f"{key}: {source.entry.id if source.entry else source.location} uses another tokenizer than the actor "
            f"({detail}); it would read the actor's token ids as other words, so use a model of the same lineage"
        )


def causal_lm_and_tokenizer(cfg: ModelConfig, registry: Registry) -> tuple[ModelSource, Tokenizer]:
    """Resolve `cfg.name_or_path` to a causal LM and load its tokenizer (or cfg.tokenizer, which
    must then match a registry parent's)."""
    source = resolve_model(cfg.name_or_path, registry)
    check_causal_lm(source)
    return source, load_tokenizer(source, trust_remote_code=cfg.trust_remote_code, name_or_path=cfg.tokenizer)


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
        also = " or a dpo entry trained with dpo.loss=dpo (its implicit reward)" if key == "reward.name_or_path" else ""
        raise UserError(f"{key}: {what} is a {archs[0]}, not a reward model; use an rm entry (rm:latest){also} or a reward model folder")


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


@dataclass(frozen=True)
class PPOSources:
    """Where PPO's other three models come from; reference None = the actor with its adapters off;
    critic None = a critic-free estimator (no critic is loaded); reward None = no reward model among
    the reward's sources (functions or the oracle only); ensemble: reward_ensemble's reward models."""

    reference: ModelSource | None
    critic: ModelSource | None
    reward: ModelSource | None
    ensemble: tuple[ModelSource, ...] = ()
    implicit: ImplicitSources | None = None
    """With a DPO policy as the reward model: its implicit reward's reference and beta."""

    @property
    def parents(self) -> tuple[str, ...]:
        models = (self.reward, *self.ensemble, self.critic, self.reference)
        ids = [s.entry.id for s in models if s is not None and s.entry is not None]
        return tuple(dict.fromkeys(ids))


def ppo_sources(cfg: PPOConfig, registry: Registry, actor: ModelSource, tokenizer: Tokenizer) -> PPOSources:
    """Resolve and check PPO's reference, critic and (when the reward has a learned component) reward
    models against the actor and its tokenizer.

    The critic and the reward model must be reward models; every model must share the actor's
    tokenizer, since all four read the same token ids. A critic-free estimator (ppo.estimator other
    than gae) resolves no critic: critic.name_or_path is not needed then.
    """
    critic = None if cfg.ppo.estimator != "gae" else scalar_source(
        cfg.critic.name_or_path, key="critic.name_or_path", registry=registry, tokenizer=tokenizer,
        trust_remote_code=cfg.critic.trust_remote_code)
    reward = reward_model_source(cfg, registry, tokenizer)
    implicit = implicit_sources(cfg, reward, registry, tokenizer)  # before the ensemble: it refuses one beside it
    return PPOSources(reference=reference_source(cfg, registry, actor, tokenizer), critic=critic, reward=reward,
                      ensemble=ensemble_sources(cfg, registry, tokenizer), implicit=implicit)


def reward_model_source(cfg: PPOConfig | BestOfNConfig, registry: Registry, tokenizer: Tokenizer) -> ModelSource | None:
    """The reward model among a config's reward sources (`reward.name_or_path`), checked to be a
    reward model that reads `tokenizer`'s ids (a scalar head, or a causal LM whose implicit_reward.json
    defines an implicit reward); None when no source is learned."""
    from rlhf.rollouts.implicit_reward import implicit_reward_spec
    from rlhf.rollouts.rewards import learned_source, parse_sources

    learned = learned_source(parse_sources(cfg.reward.name_or_path, cfg.reward.weights))
    if learned is None:
        return None
    key = "reward.name_or_path"
    source = resolve_model(learned.text, registry, key=key)
    if implicit_reward_spec(source, key=key) is None:
        check_scalar_model(source, key=key)
    else:
        check_causal_lm(source, key=key)
    check_same_tokenizer(tokenizer, source, key=key, trust_remote_code=cfg.reward.trust_remote_code)
    return source


@dataclass(frozen=True)
class ImplicitSources:
    """An implicit reward's reference model and beta (rlhf/rollouts/implicit_reward.py), its policy being the reward model."""

    reference: ModelSource
    beta: float


def implicit_sources(cfg: PPOConfig | BestOfNConfig, reward: ModelSource | None, registry: Registry,
                     tokenizer: Tokenizer) -> ImplicitSources | None:
    """When the reward model is a DPO policy (implicit_reward.json beside its weights): its reference, resolved and
    checked to be a causal LM reading `tokenizer`'s ids, and beta; else None. reward_ensemble combines scalar heads
    only, so it is refused beside an implicit reward."""
    from rlhf.rollouts.implicit_reward import IMPLICIT_REWARD_FILE, implicit_reward_spec

    spec = None if reward is None else implicit_reward_spec(reward)
    if spec is None:
        return None
    if cfg.reward_ensemble.name_or_path:
        raise UserError(f"reward_ensemble.name_or_path adds scalar-head reward models, but reward.name_or_path's model is a DPO "
                        f"policy scored by its implicit reward ({IMPLICIT_REWARD_FILE}); drop reward_ensemble or use an rm entry")
    key = f"reward.name_or_path's reference ({IMPLICIT_REWARD_FILE}: {spec.reference})"
    reference = resolve_model(spec.reference, registry, key=key)
    check_causal_lm(reference, key=key)
    check_same_tokenizer(tokenizer, reference, key=key, trust_remote_code=cfg.reward.trust_remote_code)
    return ImplicitSources(reference, spec.beta)


def ensemble_sources(cfg: PPOConfig | BestOfNConfig, registry: Registry, tokenizer: Tokenizer) -> tuple[ModelSource, ...]:
    """reward_ensemble.name_or_path's reward models, each checked like the main one (scalar head, the policy's tokenizer)
    and holding the statistics its scores are normalized with."""
    sources = []
    for i, name in enumerate(cfg.reward_ensemble.name_or_path):
        key = f"reward_ensemble.name_or_path[{i}]"
        source = scalar_source(name, key=key, registry=registry, tokenizer=tokenizer, trust_remote_code=cfg.reward.trust_remote_code)
        reward_stats(source, key=key)
        sources.append(source)
    return tuple(sources)


def scalar_source(name_or_path: str, *, key: str, registry: Registry, tokenizer: Tokenizer, trust_remote_code: bool) -> ModelSource:
    """`name_or_path` resolved and checked: a reward model (scalar head) reading `tokenizer`'s ids."""
    source = resolve_model(name_or_path, registry, key=key)
    check_scalar_model(source, key=key)
    check_same_tokenizer(tokenizer, source, key=key, trust_remote_code=trust_remote_code)
    return source


def reference_source(cfg: PPOConfig | DPOConfig, registry: Registry, actor: ModelSource, tokenizer: Tokenizer) -> ModelSource | None:
    """Where the frozen reference policy of a config with `model` and `reference` sections comes
    from: reference.name_or_path, or the actor's own starting model; None = the actor with its LoRA
    adapters switched off (LoRA on and no reference named), which needs no second copy. A named
    reference must be a causal LM reading the actor's tokens."""
    if cfg.reference.name_or_path is None and cfg.model.lora.enabled:
        return None
    key = "reference.name_or_path"
    reference = actor if cfg.reference.name_or_path is None else resolve_model(cfg.reference.name_or_path, registry, key=key)
    check_causal_lm(reference, key=key)
    if reference is not actor:
        check_same_tokenizer(tokenizer, reference, key=key, trust_remote_code=cfg.reference.trust_remote_code)
    return reference
