"""Per-rank memory arithmetic for `rlhf plan`: pure functions on numbers (bytes per rank) and a model's shape.

Every figure is per rank; rlhf.launcher.memory_plan adds them up for a stage, rlhf.launcher.memory_shapes reads the shapes.

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
import re
from dataclasses import dataclass

from rlhf.errors import UserError

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": KiB, "m": 10**6, "mb": 10**6, "mib": MiB,
          "g": 10**9, "gb": 10**9, "gib": GiB, "t": 10**12, "tb": 10**12, "tib": TiB}


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
