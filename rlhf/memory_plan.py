"""`rlhf plan`: how much memory each rank needs for a stage, estimated from its config and the models' shapes.

Pure functions on numbers (bytes per rank), plus `model_shapes`, which reads each model's config (never its
weights) and counts its parameters on the meta device. Every figure is per rank.

Model states: the ZeRO paper's accounting (Rajbhandari et al. 2020, section 3.1) for Adam. A trained model of
P parameters, T of them trained, with b = 4 bytes per value in fp32 and 2 in bf16/fp16 holds
  weights   P x b                (partitioned over the ranks under ZeRO-3; in CPU memory with engine.offload_params)
  gradients T x b                (partitioned under ZeRO-2 and 3)
  optimizer T x (8 + 4 if b = 2) (Adam's two fp32 moments, plus the fp32 master weights in mixed precision;
                                  partitioned under ZeRO-1, 2 and 3; in CPU memory with engine.offload_optimizer)
so fp32 and mixed precision both cost 16 bytes per trained parameter at ZeRO-0. With engine.offload_optimizer
under ZeRO-2/3 the gradient partition goes to CPU memory too, as fp32 (ZeRO-Offload). LoRA trains only its
adapters (r x (in + out) per adapted linear layer; a scalar head is trained whole). A frozen model (PPO's
reference and reward model, DPO's reference) holds only its weights, partitioned under ZeRO-3 or its `offload`.

Transients (one at a time: the models train, generate and score one after another):
  activations  per layer s x b x h x (34 + 5 a s / h) x (bytes / 2) (Korthikanti et al. 2022, eq. 2, a 4h-wide MLP,
               16-bit values); the 5 a s / h term (the attention matrix) only with attn_implementation=eager,
               since sdpa and flash attention never store it. With gradient checkpointing each layer keeps only its
               input (s x b x h x bytes) and one layer is recomputed whole at a time.
  logits       micro-batch x sequence x vocabulary x 4 bytes (the loss reads them in fp32).
  KV cache     2 x layers x kv_heads x head_dim x (prompt + new tokens) x batch x bytes (PPO's rollouts, best-of-N);
               under ZeRO-3 with rollout.gather_params the actor is gathered whole while it generates.
Not counted: DeepSpeed's communication buckets, the CUDA context and allocator fragmentation (keep ~10% spare),
temporary copies inside a kernel, and the data. Estimates, not measurements: scripts/plan_check.py compares
the model states with the tensors of real runs (BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.errors import UserError, first_line

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": KiB, "m": 10**6, "mb": 10**6, "mib": MiB,
          "g": 10**9, "gb": 10**9, "gib": GiB, "t": 10**12, "tb": 10**12, "tib": TiB}
TRAINED_STAGES = ("sft", "rm", "dpo", "ppo", "bon")


def parse_memory(text: str, *, key: str = "--memory") -> int:
    """'80GiB', '80GB' (10^9), '81920MiB', '40G' or a byte count -> bytes; UserError otherwise."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise UserError(f"{key} {text!r} is not a memory size; write e.g. 80GiB, 40GB or 24576MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def human(n: float) -> str:
    """Bytes as GiB/MiB/KiB with 3 significant figures."""
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


# ----------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model: its parameters (and how many LoRA would train) and its geometry."""

    params: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    lora_params: int = 0
    """Parameters LoRA trains (adapters, plus a scalar head); 0 = no LoRA: everything trains."""
    source: str = ""

    @property
    def trainable(self) -> int:
        return self.lora_params or self.params


def bytes_per_value(precision: str) -> int:
    return 4 if precision == "fp32" else 2


# ----------------------------------------------------------------------------------------------
# Model states


@dataclass(frozen=True)
class States:
    """One model's states on one rank: bytes on the device and in CPU memory."""

    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    cpu: float = 0.0

    @property
    def device(self) -> float:
        return self.weights + self.grads + self.optimizer


def trained_states(params: int, trainable: int, *, precision: str, zero_stage: int, ranks: int,
                   offload_optimizer: bool = False, offload_params: bool = False) -> States:
    """Weights, gradients and Adam's states of a trained model per rank (the ZeRO paper's accounting)."""
    b = bytes_per_value(precision)
    weights = params * b / (ranks if zero_stage == 3 else 1)
    grads = trainable * b / (ranks if zero_stage >= 2 else 1)
    optimizer = trainable * (8 + (4 if b == 2 else 0)) / (ranks if zero_stage >= 1 else 1)
    cpu = 0.0
    if offload_params:
        cpu, weights = cpu + weights, 0.0
    if offload_optimizer:
        cpu, optimizer = cpu + optimizer, 0.0
        if zero_stage >= 2:  # ZeRO-Offload: the gradient partition is reduced into CPU memory, as fp32
            cpu, grads = cpu + trainable * 4 / ranks, 0.0
    return States(weights=weights, grads=grads, optimizer=optimizer, cpu=cpu)


def frozen_states(params: int, *, precision: str, ranks: int, partitioned: bool, offload: bool = False) -> States:
    """An inference-only model: its weights, ZeRO-3 partitioned or whole, in CPU memory with offload."""
    weights = params * bytes_per_value(precision) / (ranks if partitioned or offload else 1)
    return States(cpu=weights) if offload else States(weights=weights)


# ----------------------------------------------------------------------------------------------
# Transients


def activation_bytes(shape: ModelShape, *, seq: int, batch: int, precision: str, checkpointing: bool,
                     eager_attention: bool = False) -> float:
    """Activations kept for the backward pass of one micro-batch (see the module docstring)."""
    b = bytes_per_value(precision)
    sbh = seq * batch * shape.hidden
    per_layer = sbh * (34 + (5 * shape.heads * seq / shape.hidden if eager_attention else 0)) * b / 2
    if checkpointing:
        return shape.layers * sbh * b + per_layer
    return shape.layers * per_layer


def inference_activation_bytes(shape: ModelShape, *, seq: int, batch: int, precision: str, eager_attention: bool = False) -> float:
    """A forward without gradients keeps about one layer's activations at a time."""
    return activation_bytes(dataclasses.replace(shape, layers=1), seq=seq, batch=batch, precision=precision,
                            checkpointing=False, eager_attention=eager_attention)


def logits_bytes(batch: int, seq: int, vocab: int) -> float:
    return batch * seq * vocab * 4


def kv_cache_bytes(shape: ModelShape, *, tokens: int, batch: int, precision: str) -> float:
    """2 (keys, values) x layers x kv_heads x head_dim x tokens x batch x bytes."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * tokens * batch * bytes_per_value(precision)


# ----------------------------------------------------------------------------------------------
# A stage's plan


@dataclass(frozen=True)
class ModelRow:
    role: str
    shape: ModelShape
    trains: bool
    states: States
    activations: float = 0.0
    logits: float = 0.0
    kv_cache: float = 0.0
    gathered: float = 0.0
    """Weights gathered whole for generation under ZeRO-3 (rollout.gather_params), beyond this rank's partition."""
    note: str = ""

    @property
    def transient(self) -> float:
        """This model's peak working memory: while it trains or while it generates (not both at once)."""
        return max(self.activations + self.logits, self.kv_cache + self.gathered)


@dataclass(frozen=True)
class Plan:
    stage: str
    ranks: int
    memory: int
    rows: tuple[ModelRow, ...]

    @property
    def states(self) -> float:
        return sum(r.states.device for r in self.rows)

    @property
    def transient(self) -> float:
        return max((r.transient for r in self.rows), default=0.0)

    @property
    def total(self) -> float:
        return self.states + self.transient

    @property
    def cpu(self) -> float:
        return sum(r.states.cpu for r in self.rows)

    @property
    def fits(self) -> bool:
        return self.total <= self.memory

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "ranks": self.ranks, "memory_bytes": self.memory, "fits": self.fits,
            "total_bytes": self.total, "states_bytes": self.states, "transient_bytes": self.transient, "cpu_bytes": self.cpu,
            "models": [{"role": r.role, "source": r.shape.source, "params": r.shape.params,
                        "trainable": r.shape.trainable if r.trains else 0, "weights_bytes": r.states.weights,
                        "grads_bytes": r.states.grads, "optimizer_bytes": r.states.optimizer, "cpu_bytes": r.states.cpu,
                        "activations_bytes": r.activations, "logits_bytes": r.logits, "kv_cache_bytes": r.kv_cache,
                        "gathered_bytes": r.gathered, "note": r.note} for r in self.rows],
        }


def _eager(model_cfg: Any) -> bool:
    return model_cfg.attn_implementation == "eager"


def _trained_row(role: str, shape: ModelShape, engine: Any, model_cfg: Any, ranks: int, *, seq: int, batch: int,
                 vocab_logits: bool) -> ModelRow:
    states = trained_states(shape.params, shape.trainable, precision=engine.precision, zero_stage=engine.zero_stage, ranks=ranks,
                            offload_optimizer=engine.offload_optimizer, offload_params=engine.offload_params)
    acts = activation_bytes(shape, seq=seq, batch=batch, precision=engine.precision,
                            checkpointing=model_cfg.gradient_checkpointing, eager_attention=_eager(model_cfg))
    checkpointed = ", gradient checkpointing" if model_cfg.gradient_checkpointing else ""
    return ModelRow(role, shape, True, states, activations=acts, logits=logits_bytes(batch, seq, shape.vocab if vocab_logits else 1),
                    note=f"{batch} x {seq} tokens per micro-batch{checkpointed}")


def _frozen_row(role: str, shape: ModelShape, engine: Any, ranks: int, *, offload: bool, model_cfg: Any, seq: int, batch: int,
                vocab_logits: bool, note: str = "") -> ModelRow:
    states = frozen_states(shape.params, precision=engine.precision, ranks=ranks, partitioned=engine.zero_stage == 3, offload=offload)
    acts = inference_activation_bytes(shape, seq=seq, batch=batch, precision=engine.precision, eager_attention=_eager(model_cfg))
    return ModelRow(role, shape, False, states, activations=acts, logits=logits_bytes(batch, seq, shape.vocab if vocab_logits else 1),
                    note=note or f"frozen; forward of {batch} x {seq}")


def responses_per_prompt(cfg: Any) -> int:
    """Sequences per RM micro-batch row: a ranked list's K on the toy task, else a pair (a file's lists may be longer)."""
    data = cfg.data
    return data.toy.ranked_k if data.train == "toy" and data.toy_format == "ranked" else 2


SCORE_LOGITS_CAP = 256 * MiB
"""rollout.score_batch_size=0 keeps one model's response logits under this (rlhf.config.RolloutConfig)."""


def plan_stage(stage: str, cfg: Any, shapes: dict[str, ModelShape], *, ranks: int, memory: int) -> Plan:
    """Per-rank memory of `stage` run with `cfg` on `ranks` ranks, from the models' `shapes` (model_shapes)."""
    engine = cfg.engine
    rows: list[ModelRow] = []
    if stage == "sft":
        rows.append(_trained_row("policy", shapes["policy"], engine, cfg.model, ranks, seq=cfg.data.max_length,
                                 batch=engine.micro_batch_size, vocab_logits=True))
    elif stage == "rm":
        rows.append(_trained_row("reward model", shapes["reward model"], engine, cfg.model, ranks, seq=cfg.data.max_length,
                                 batch=engine.micro_batch_size * responses_per_prompt(cfg), vocab_logits=False))
    elif stage == "dpo":
        per_row = 1 if cfg.dpo.loss == "kto" else 2
        batch, seq = engine.micro_batch_size * per_row, cfg.data.max_length
        rows.append(_trained_row("policy", shapes["policy"], engine, cfg.model, ranks, seq=seq, batch=batch, vocab_logits=True))
        if "reference" in shapes:
            rows.append(_frozen_row("reference", shapes["reference"], engine, ranks, offload=cfg.reference.offload, model_cfg=cfg.model,
                                    seq=seq, batch=batch, vocab_logits=True))
    elif stage == "ppo":
        rows += _ppo_rows(cfg, shapes, ranks)
    elif stage == "bon":
        rows += _bon_rows(cfg, shapes, ranks)
    else:
        raise UserError(f"rlhf plan estimates {', '.join(TRAINED_STAGES)}, not {stage!r}")
    return Plan(stage, ranks, memory, tuple(rows))


def _ppo_rows(cfg: Any, shapes: dict[str, ModelShape], ranks: int) -> list[ModelRow]:
    engine, rollout = cfg.engine, cfg.rollout
    seq = cfg.data.max_prompt_length + rollout.max_new_tokens
    actor = shapes["actor"]
    row = _trained_row("actor", actor, engine, cfg.model, ranks, seq=seq, batch=engine.micro_batch_size, vocab_logits=True)
    kv = kv_cache_bytes(actor, tokens=seq, batch=rollout.batch_size, precision=engine.precision)
    gathered = 0.0
    if engine.zero_stage == 3 and rollout.gather_params:
        gathered = actor.params * bytes_per_value(engine.precision) - row.states.weights
    rows = [dataclasses.replace(row, kv_cache=kv, gathered=gathered,
                                note=f"trains {engine.micro_batch_size} x {seq}; generates {rollout.batch_size} x {seq}")]
    if "critic" in shapes:
        rows.append(_trained_row("critic", shapes["critic"], engine, cfg.critic, ranks, seq=seq, batch=engine.micro_batch_size,
                                 vocab_logits=False))
    score_rows = rollout.score_batch_size or max(engine.micro_batch_size, min(
        rollout.batch_size, int(SCORE_LOGITS_CAP // ((rollout.max_new_tokens + 1) * actor.vocab * 4)) or 1))
    if "reference" in shapes:
        rows.append(_frozen_row("reference", shapes["reference"], engine, ranks, offload=cfg.reference.offload, model_cfg=cfg.model,
                                seq=seq, batch=score_rows, vocab_logits=True))
    for role in (r for r in shapes if r.startswith("reward")):  # the reward model and reward_ensemble's ("reward 2", ...)
        rows.append(_frozen_row(role, shapes[role], engine, ranks, offload=cfg.reward.offload, model_cfg=cfg.model,
                                seq=seq, batch=score_rows, vocab_logits=False))
    return rows


def _bon_rows(cfg: Any, shapes: dict[str, ModelShape], ranks: int) -> list[ModelRow]:
    engine, sampling = cfg.engine, cfg.sampling
    seq, batch = cfg.data.max_prompt_length + sampling.max_new_tokens, sampling.batch_size * sampling.n
    policy = shapes["policy"]
    rows = [dataclasses.replace(
        _frozen_row("policy", policy, engine, ranks, offload=False, model_cfg=cfg.model, seq=seq, batch=0, vocab_logits=True),
        kv_cache=kv_cache_bytes(policy, tokens=seq, batch=batch, precision=engine.precision), note=f"generates {batch} x {seq}")]
    for role, shape in shapes.items():
        if role != "policy":
            rows.append(_frozen_row(role, shape, engine, ranks, offload=False, model_cfg=cfg.model, seq=seq, batch=batch,
                                    vocab_logits=False))
    return rows


# ----------------------------------------------------------------------------------------------
# The smallest change that fits


def _trained_sections(stage: str, cfg: Any) -> list[str]:
    sections = ["model"] if stage in ("sft", "rm", "dpo", "ppo") else []
    if stage == "ppo" and cfg.ppo.estimator == "gae":
        sections.append("critic")
    return sections


def _apply(cfg: Any, changes: dict[str, Any]) -> Any:
    """`cfg` with dotted `changes` set (engine.* and <section>.gradient_checkpointing only)."""
    for key, value in changes.items():
        section, name = key.split(".")
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
    return cfg


def candidate_changes(stage: str, cfg: Any) -> list[dict[str, Any]]:
    """Changes to try, smallest first: a lower micro-batch (grad_accum raised to keep the global batch), gradient
    checkpointing, a higher ZeRO stage, optimizer offload, parameter offload; then the same cumulatively."""
    engine = cfg.engine
    steps: list[dict[str, Any]] = []
    trained = _trained_sections(stage, cfg)
    micro = engine.micro_batch_size // 2
    while trained and micro >= 1:
        steps.append({"engine.micro_batch_size": micro, "engine.grad_accum": engine.grad_accum * engine.micro_batch_size // micro})
        micro //= 2
    micro_steps = list(steps)
    checkpointing = {f"{s}.gradient_checkpointing": True for s in trained if not getattr(cfg, s).gradient_checkpointing}
    if checkpointing:
        steps.append(checkpointing)
    for stage_no in range(engine.zero_stage + 1, 4):
        steps.append({"engine.zero_stage": stage_no})
    if trained and not engine.offload_optimizer:
        steps.append({"engine.zero_stage": max(engine.zero_stage, 1), "engine.offload_optimizer": True})
    offload = {}
    if trained and not engine.offload_params:
        offload = {"engine.zero_stage": 3, "engine.offload_params": True}
    for section in ("reference", "reward"):
        if stage in ("ppo", "dpo") and hasattr(cfg, section) and hasattr(getattr(cfg, section), "offload") \
                and not getattr(cfg, section).offload:
            offload[f"{section}.offload"] = True
    if offload:
        steps.append(offload)
    cumulative: dict[str, Any] = {}
    for step in steps[len(micro_steps):]:
        stage_no = max(cumulative.get("engine.zero_stage", 0), step.get("engine.zero_stage", 0))
        cumulative = {**cumulative, **step, **({"engine.zero_stage": stage_no} if stage_no else {})}
        steps.append(dict(cumulative))
    steps += [{**cumulative, **m} for m in micro_steps]
    return steps


def smallest_fit(stage: str, cfg: Any, shapes: dict[str, ModelShape], *, ranks: int, memory: int) -> tuple[str, Plan] | None:
    """The first of `candidate_changes` whose plan fits, as override text, with that plan; None if none does."""
    for changes in candidate_changes(stage, cfg):
        try:
            changed = _apply(cfg, changes)
        except (TypeError, ValueError):
            continue
        plan = plan_stage(stage, changed, shapes, ranks=ranks, memory=memory)
        if plan.fits:
            return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changes.items()), plan
    return None


# ----------------------------------------------------------------------------------------------
# Shapes from configs, without weights


def shape_of_config(config: Any, *, head: str = "lm", lora: Any = None, source: str = "") -> ModelShape:
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


def lora_trainable(model: Any, lora: Any, *, head: str) -> int:
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


def _hf_config(source: Any, *, key: str, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{key}={source}: cannot read its config ({first_line(exc)}); a hub name needs the network or the "
                        "local hub cache, a folder its config.json") from None


def model_shape(name_or_path: str, model_cfg: Any, registry: Any, *, key: str, head: str = "lm", lora: Any = None,
                trust_remote_code: bool = False) -> ModelShape:
    """The shape of the model `name_or_path` names (toy, a registry reference, a folder, a .gguf file, a hub name),
    from its config alone."""
    from rlhf.gguf import converted_folder, is_gguf
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
    from rlhf.model_sources import resolve_model

    source = resolve_model(name_or_path, registry, key=key)
    if source.entry is not None and source.entry.adapter == "adapter":
        adapter = json.loads((Path(source.location) / "adapter_config.json").read_text())
        base = adapter.get("base_model_name_or_path") or ""
        return model_shape(base, model_cfg, registry, key=key, head=head, lora=lora, trust_remote_code=trust_remote_code)
    config = _hf_config(source.location, key=key, trust_remote_code=trust_remote_code)
    return shape_of_config(config, head=head, lora=lora, source=name_or_path)


def model_shapes(stage: str, cfg: Any, registry: Any) -> dict[str, ModelShape]:
    """Every model `stage` holds, by role, read from configs (no weights load)."""
    def shape(name: str, model_cfg: Any, key: str, head: str = "lm", lora: Any = None, trust: bool = False) -> ModelShape:
        return model_shape(name, model_cfg, registry, key=key, head=head, lora=lora, trust_remote_code=trust)

    model = cfg.model
    if stage == "sft":
        return {"policy": shape(model.name_or_path, model, "model.name_or_path", lora=model.lora, trust=model.trust_remote_code)}
    if stage == "rm":
        return {"reward model": shape(model.name_or_path, model, "model.name_or_path", "scalar", model.lora, model.trust_remote_code)}
    if stage in ("dpo", "ppo"):
        actor = shape(model.name_or_path, model, "model.name_or_path", lora=model.lora, trust=model.trust_remote_code)
        shapes = {"policy" if stage == "dpo" else "actor": actor}
        if stage == "ppo" and cfg.ppo.estimator == "gae":
            shapes["critic"] = shape(cfg.critic.name_or_path, cfg.critic, "critic.name_or_path", "scalar", cfg.critic.lora,
                                     cfg.critic.trust_remote_code)
        from rlhf.config import REFERENCE_FREE_LOSSES

        needs_reference = stage == "ppo" or cfg.dpo.loss not in REFERENCE_FREE_LOSSES or cfg.eval.kl
        if needs_reference and cfg.reference.name_or_path is not None:
            shapes["reference"] = shape(cfg.reference.name_or_path, model, "reference.name_or_path", trust=cfg.reference.trust_remote_code)
        elif needs_reference and not model.lora.enabled:  # with LoRA the reference is the actor with its adapters off
            shapes["reference"] = dataclasses.replace(actor, lora_params=0)
        if stage == "ppo":
            shapes.update(_reward_shapes(cfg, model, shape))
        return shapes
    if stage == "bon":
        shapes = {"policy": shape(model.name_or_path, model, "model.name_or_path", trust=model.trust_remote_code)}
        shapes.update(_reward_shapes(cfg, model, shape))
        return shapes
    raise UserError(f"rlhf plan estimates {', '.join(TRAINED_STAGES)}, not {stage!r}")


def _reward_shapes(cfg: Any, model: Any, shape: Any) -> dict[str, ModelShape]:
    from rlhf.rewards import learned_source, parse_sources

    learned = learned_source(parse_sources(cfg.reward.name_or_path, cfg.reward.weights))
    if learned is None:
        return {}
    shapes = {"reward": shape(learned.text, model, "reward.name_or_path", "scalar", None, cfg.reward.trust_remote_code)}
    for i, name in enumerate(cfg.reward_ensemble.name_or_path):  # PPO's and best-of-N's members, frozen like the reward model
        shapes[f"reward {i + 2}"] = shape(name, model, f"reward_ensemble.name_or_path[{i}]", "scalar", None, cfg.reward.trust_remote_code)
    return shapes


# ----------------------------------------------------------------------------------------------
# Output


def render(plan: Plan, fix: tuple[str, Plan] | None) -> list[Any]:
    """The plan as a rich table per model plus a verdict line (what `rlhf plan` prints)."""
    from rich.table import Table

    out: list[Any] = []
    for row in plan.rows:
        shape = row.shape
        table = Table(title=f"{row.role}: {shape.source} ({shape.params / 1e6:,.2f}M parameters"
                      + (f", {row.shape.trainable / 1e6:,.3g}M trained" if row.trains and shape.lora_params else "")
                      + ("" if row.trains else ", frozen") + ")", title_justify="left")
        table.add_column("per rank")
        table.add_column("device", justify="right")
        table.add_column("CPU", justify="right")
        table.add_row("weights", human(row.states.weights), "")
        if row.trains:
            table.add_row("gradients", human(row.states.grads), "")
            table.add_row("optimizer states", human(row.states.optimizer), "")
        if row.states.cpu:
            table.add_row("offloaded states", "", human(row.states.cpu))
        table.add_row("activations", human(row.activations), "")
        table.add_row("logits", human(row.logits), "")
        if row.kv_cache or row.gathered:
            table.add_row("KV cache (generation)", human(row.kv_cache), "")
            table.add_row("weights gathered to generate", human(row.gathered), "")
        table.caption = row.note
        out.append(table)
    verdict = "fits" if plan.fits else "does NOT fit"
    out.append(f"[bold]total per rank[/]: {human(plan.total)} of {human(plan.memory)} ({verdict}) = model states {human(plan.states)} "
               f"+ the largest transient {human(plan.transient)} (training, generating and scoring take turns); "
               f"CPU memory per rank {human(plan.cpu)}; {plan.ranks} rank(s)")
    if not plan.fits:
        if fix:
            out.append(f"smallest change that fits: [bold]{fix[0]}[/] ({human(fix[1].total)} per rank)")
        else:
            out.append("nothing tried fits (micro-batch 1, gradient checkpointing, ZeRO-3, offload): add ranks or memory, "
                       "shorten sequences, or use LoRA")
    return out
