"""`rlhf plan`: how much memory each rank needs for a stage, estimated from its config and the models' shapes.

A stage's models and their roles become rows of per-rank bytes (the formulas, and what they leave out, are in
rlhf.launcher.memory_estimates; the shapes come from rlhf.launcher.memory_shapes, never from weights); `smallest_fit` tries the
changes that lower them, smallest first, and `render` prints the tables `rlhf plan` shows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlhf.errors import UserError
from rlhf.launcher.memory_estimates import (
    MiB,
    ModelShape,
    States,
    activation_bytes,
    bytes_per_value,
    frozen_states,
    human,
    inference_activation_bytes,
    kv_cache_bytes,
    logits_bytes,
    trained_states,
)
from rlhf.launcher.memory_shapes import IMPLICIT_ROLES, TRAINED_STAGES

if TYPE_CHECKING:
    from rich.console import RenderableType

    from rlhf.config import (
        BestOfNConfig,
        DPODataConfig,
        EngineConfig,
        ModelConfig,
        PPOConfig,
        RMConfig,
        RMDataConfig,
        SFTDataConfig,
        StageConfig,
    )

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


def _eager(model_cfg: ModelConfig) -> bool:
    return model_cfg.attn_implementation == "eager"


def _trained_row(role: str, shape: ModelShape, engine: EngineConfig, model_cfg: ModelConfig, ranks: int, *, seq: int, batch: int,
                 vocab_logits: bool) -> ModelRow:
    states = trained_states(shape.params, shape.trainable, precision=engine.precision, zero_stage=engine.zero_stage, ranks=ranks,
                            offload_optimizer=engine.offload_optimizer, offload_params=engine.offload_params)
    acts = activation_bytes(shape, seq=seq, batch=batch, precision=engine.precision,
                            checkpointing=model_cfg.gradient_checkpointing, eager_attention=_eager(model_cfg))
    checkpointed = ", gradient checkpointing" if model_cfg.gradient_checkpointing else ""
    return ModelRow(role, shape, True, states, activations=acts, logits=logits_bytes(batch, seq, shape.vocab if vocab_logits else 1),
                    note=f"{batch} x {seq} tokens per micro-batch{checkpointed}")


def _frozen_row(role: str, shape: ModelShape, engine: EngineConfig, ranks: int, *, offload: bool, model_cfg: ModelConfig, seq: int,
                batch: int,
                vocab_logits: bool, note: str = "") -> ModelRow:
    states = frozen_states(shape.params, precision=engine.precision, ranks=ranks, partitioned=engine.zero_stage == 3, offload=offload)
    acts = inference_activation_bytes(shape, seq=seq, batch=batch, precision=engine.precision, eager_attention=_eager(model_cfg))
    return ModelRow(role, shape, False, states, activations=acts, logits=logits_bytes(batch, seq, shape.vocab if vocab_logits else 1),
                    note=note or f"frozen; forward of {batch} x {seq}")


def packed_shape(sequences: int, *, max_length: int, capacity: int) -> tuple[int, int]:
    """(rows, tokens per row) of `sequences` of up to `max_length` tokens packed first-fit decreasing into rows of
    `capacity` (rlhf.data.packing.pack_rows), at worst: any two of its rows hold more than `capacity` tokens
    together, so R rows hold more than floor(R/2) * capacity, at most sequences * max_length."""
    return min(sequences, 2 * -(-sequences * max_length // capacity) - 1), capacity


def _forward_shape(data: SFTDataConfig | RMDataConfig | DPODataConfig, sequences: int) -> tuple[int, int]:
    """(batch, seq) of a trained forward over `sequences` rows: padded to data.max_length, or packed (data.packing)."""
    if getattr(data, "packing", False):
        return packed_shape(sequences, max_length=data.max_length, capacity=data.packing_tokens or data.max_length)
    return sequences, data.max_length


def responses_per_prompt(cfg: RMConfig) -> int:
    """Sequences per RM micro-batch row: a ranked list's K on the toy task, else a pair (a file's lists may be longer)."""
    data = cfg.data
    return data.toy.ranked_k if data.train == "toy" and data.toy_format == "ranked" else 2


SCORE_LOGITS_CAP = 256 * MiB
"""rollout.score_batch_size=0 keeps one model's response logits under this (rlhf.config.RolloutConfig)."""


def plan_stage(stage: str, cfg: StageConfig, shapes: dict[str, ModelShape], *, ranks: int, memory: int) -> Plan:
    """Per-rank memory of `stage` run with `cfg` on `ranks` ranks, from the models' `shapes` (model_shapes)."""
    from rlhf.config import BestOfNConfig, DPOConfig, PPOConfig, RMConfig, SFTConfig

    # isinstance picks the same cases as `stage` (cfg is STAGE_CONFIGS[stage]) and lets mypy see each one's sections.
    rows: list[ModelRow] = []
    if isinstance(cfg, SFTConfig):
        engine = cfg.engine
        batch, seq = _forward_shape(cfg.data, engine.micro_batch_size)
        rows.append(_trained_row("policy", shapes["policy"], engine, cfg.model, ranks, seq=seq, batch=batch, vocab_logits=True))
    elif isinstance(cfg, RMConfig):
        engine = cfg.engine
        batch, seq = _forward_shape(cfg.data, engine.micro_batch_size * responses_per_prompt(cfg))
        rows.append(_trained_row("reward model", shapes["reward model"], engine, cfg.model, ranks, seq=seq, batch=batch,
                                 vocab_logits=False))
    elif isinstance(cfg, DPOConfig):
        engine = cfg.engine
        per_row = 1 if cfg.dpo.loss == "kto" else 2
        batch, seq = _forward_shape(cfg.data, engine.micro_batch_size * per_row)
        rows.append(_trained_row("policy", shapes["policy"], engine, cfg.model, ranks, seq=seq, batch=batch, vocab_logits=True))
        if "reference" in shapes:
            rows.append(_frozen_row("reference", shapes["reference"], engine, ranks, offload=cfg.reference.offload, model_cfg=cfg.model,
                                    seq=seq, batch=batch, vocab_logits=True))
    elif isinstance(cfg, PPOConfig):
        rows += _ppo_rows(cfg, shapes, ranks)
    elif isinstance(cfg, BestOfNConfig):
        rows += _bon_rows(cfg, shapes, ranks)
    else:
        raise UserError(f"rlhf plan estimates {', '.join(TRAINED_STAGES)}, not {stage!r}")
    return Plan(stage, ranks, memory, tuple(rows))


def _ppo_rows(cfg: PPOConfig, shapes: dict[str, ModelShape], ranks: int) -> list[ModelRow]:
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
                                seq=seq, batch=score_rows, vocab_logits=role in IMPLICIT_ROLES))
    return rows


def _bon_rows(cfg: BestOfNConfig, shapes: dict[str, ModelShape], ranks: int) -> list[ModelRow]:
    engine, sampling = cfg.engine, cfg.sampling
    seq, batch = cfg.data.max_prompt_length + sampling.max_new_tokens, sampling.batch_size * sampling.n
    policy = shapes["policy"]
    rows = [dataclasses.replace(
        _frozen_row("policy", policy, engine, ranks, offload=False, model_cfg=cfg.model, seq=seq, batch=0, vocab_logits=True),
        kv_cache=kv_cache_bytes(policy, tokens=seq, batch=batch, precision=engine.precision), note=f"generates {batch} x {seq}")]
    for role, shape in shapes.items():
        if role != "policy":
            rows.append(_frozen_row(role, shape, engine, ranks, offload=False, model_cfg=cfg.model, seq=seq, batch=batch,
                                    vocab_logits=role in IMPLICIT_ROLES))
    return rows


# ----------------------------------------------------------------------------------------------
# The smallest change that fits


def _trained_sections(stage: str, cfg: StageConfig) -> list[str]:
    sections = ["model"] if stage in ("sft", "rm", "dpo", "ppo") else []
    from rlhf.config import PPOConfig

    if isinstance(cfg, PPOConfig) and cfg.ppo.estimator == "gae":  # the same case as stage == "ppo"
        sections.append("critic")
    return sections


def _apply(cfg: StageConfig, changes: dict[str, Any]) -> StageConfig:
    """`cfg` with dotted `changes` set (engine.* and <section>.gradient_checkpointing only)."""
    for key, value in changes.items():
        section, name = key.split(".")
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
    return cfg


def candidate_changes(stage: str, cfg: StageConfig) -> list[dict[str, Any]]:
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


def smallest_fit(stage: str, cfg: StageConfig, shapes: dict[str, ModelShape], *, ranks: int, memory: int) -> tuple[str, Plan] | None:
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
# Output


def render(plan: Plan, fix: tuple[str, Plan] | None) -> list[RenderableType]:
    """The plan as a rich table per model plus a verdict line (what `rlhf plan` prints)."""
    from rich.table import Table

    out: list[RenderableType] = []
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
