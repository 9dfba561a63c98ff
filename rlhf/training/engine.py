"""DeepSpeed: distributed set-up, the one engine factory, resumable checkpoints, final weights,
and loading a model straight into ZeRO-3 partitions.

Every stage builds its engines here so ZeRO stage, offload, precision, accumulation, clipping and
the learning-rate schedule mean the same thing everywhere.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, TypeVar

import torch

from rlhf.config import EngineConfig, OptimConfig
from rlhf.launcher.ports import free_port
from rlhf.protocols import Module, TrainEngine

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

ModelT = TypeVar("ModelT", bound=Module)

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Start the process group (gloo on the CPU, nccl on GPUs) and return this rank's place in it.

    Works the same under the deepspeed launcher, torchrun, srun (via torchrun) and plain python
    (one rank: a local rendezvous is made up).
    """
    if not torch.cuda.is_available():
        # DeepSpeed must pick its CPU accelerator before it is first imported.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed

    if not torch.cuda.is_available():
        _skip_shared_memory_allreduce()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return Dist(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=local_rank,
        device=device,
    )


SHARED_MEMORY_ALLREDUCE_OP = "deepspeed_shm_comm"


def _skip_shared_memory_allreduce() -> None:
    """Keep DeepSpeed's CPU backend on plain gloo.

    Its shared-memory all-reduce op serves only tensor-parallel inference, which no stage uses, yet
    it is compiled at start-up (minutes on a fresh machine) and leaves a 69 MB buffer per rank in
    /dev/shm that is never unlinked: a few hundred runs fill the machine's memory.
    """
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible[SHARED_MEMORY_ALLREDUCE_OP] = False


RANK_SEED_STRIDE = 1_000_003  # a large prime keeps per-rank seeds of nearby runs apart


def seed_everything(seed: int, *, rank: int = 0) -> None:
    """Seed Python and torch; each rank draws from its own stream (seed + rank * a large prime)."""
    seed = seed + rank * RANK_SEED_STRIDE
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def deepspeed_config(engine: EngineConfig, optim: OptimConfig) -> dict[str, Any]:
    """Translate our engine section into DeepSpeed's JSON config."""
    zero: dict[str, Any] = {"stage": engine.zero_stage}
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if engine.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if engine.zero_stage == 3:
        # Gather 16-bit weights when saving so the final folder holds whole tensors.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": engine.micro_batch_size,
        "gradient_accumulation_steps": engine.grad_accum,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if engine.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif engine.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if engine.offload_optimizer:
        # Offloaded states need DeepSpeed's CPU Adam (a compiled op); a torch optimizer would be slow.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": [optim.beta1, optim.beta2],
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
            },
        }
    return config


def lr_multiplier(step: int, *, optim: OptimConfig, total_steps: int) -> float:
    """Learning-rate factor at optimizer step `step`: linear warmup, then decay to min_lr_ratio."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    if optim.schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * shape


# Trainable parameters from which AdamW runs fused on the CPU as well. torch's default there is a
# per-tensor loop: for SmolLM2-135M's 272 tensors a step took 0.271 s against 0.049 s fused (and
# 0.439 s with foreach), 2 threads. Below it the step is noise, and fused kernels round differently:
# on the embedded default they moved the RM's held-out accuracy from 0.925 to 0.84 (issue 16).
FUSED_ADAMW_MIN_PARAMS_ON_CPU = 10_000_000


def fused_adamw(params: list[torch.nn.Parameter]) -> bool:
    """Whether AdamW steps `params` with its fused kernel: always on a GPU, on the CPU from
    FUSED_ADAMW_MIN_PARAMS_ON_CPU trainable parameters (SmolLM2-135M's LoRA adapters stay below it)."""
    if torch.cuda.is_available():
        return True
    return sum(p.numel() for p in params) >= FUSED_ADAMW_MIN_PARAMS_ON_CPU


def build_engine(
    model: ModelT, *, engine: EngineConfig, optim: OptimConfig, total_steps: int
) -> TrainEngine[ModelT]:
    """Wrap a model in a DeepSpeed engine with its optimizer and warmup/decay schedule."""
    import deepspeed

    config = deepspeed_config(engine, optim)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    if "optimizer" not in config:
        optimizer = torch.optim.AdamW(
            params,
            lr=optim.lr,
            betas=(optim.beta1, optim.beta2),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            fused=fused_adamw(params),
        )
    # A factory, not a scheduler: DeepSpeed hands it the inner torch optimizer (a ZeRO wrapper is
    # not a torch Optimizer), steps it once per optimizer step and keeps it in checkpoints.
    def schedule(inner: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            inner, lambda step: lr_multiplier(step, optim=optim, total_steps=total_steps)
        )

    ds_engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=schedule, config=config
    )
    if ds_engine.zero_optimization_stage() == 0:
        if ds_engine.dp_world_size == 1:
            # One rank: DeepSpeed's gradient all-reduce would flatten every gradient, multiply it by
            # 1/1 and copy it back: an exact no-op, about 6% of a toy PPO update under cProfile.
            ds_engine.enable_backward_allreduce = False
        if engine.precision == "fp32":
            _keep_clipped_norm(ds_engine)
    return ds_engine


def build_frozen(model: ModelT, *, engine: EngineConfig, offload: bool, dist: Dist) -> ModelT | TrainEngine[ModelT]:
    """An inference-only model (PPO's reference and reward): no optimizer, no gradients, eval mode.

    Under ZeRO-3 (or with `offload`) it is a DeepSpeed engine whose parameters stay partitioned
    across ranks (in CPU memory with `offload`); otherwise each rank holds a plain copy on its device.
    Callers run it as `model(...)` either way; under ZeRO-3 every rank must join each forward.
    """
    model.requires_grad_(False)
    model.eval()
    if engine.zero_stage != 3 and not offload:
        return model.to(dist.device)
    import deepspeed

    zero: dict[str, Any] = {"stage": 3}
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {"train_micro_batch_size_per_gpu": engine.micro_batch_size, "zero_optimization": zero,
                              "steps_per_print": 10**9}
    if engine.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif engine.precision == "fp16":
        config["fp16"] = {"enabled": True}
    frozen, _, _, _ = deepspeed.initialize(model=model, config=config)
    frozen.eval()
    return frozen


def frozen_zero3_config(engine: EngineConfig, offload: bool) -> dict[str, Any] | None:
    """The DeepSpeed config to load a frozen model straight into ZeRO-3 partitions, or None when it is replicated."""
    if engine.zero_stage != 3 and not offload:
        return None
    return {"train_micro_batch_size_per_gpu": engine.micro_batch_size, "zero_optimization": {"stage": 3}}


def _keep_clipped_norm(ds_engine: DeepSpeedEngine) -> None:
    """Without ZeRO, DeepSpeed clips fp32 gradients but throws their norm away (the ZeRO optimizers
    keep it); keep it, so `get_global_grad_norm()` reports it at every stage. At one rank the norm
    and the clipping are computed as DeepSpeed's `clip_grad_norm_` does, bit for bit, with
    multi-tensor ops instead of a Python loop per parameter."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_keep() -> None:
        if ds_engine.dp_world_size == 1:
            norm = clip_grads_one_rank(ds_engine.module.parameters(), max_norm=ds_engine.gradient_clipping())
        else:
            norm = clip_grad_norm_(parameters=ds_engine.module.parameters(), max_norm=ds_engine.gradient_clipping(), mpu=ds_engine.mpu)
        ds_engine._global_grad_norm = float(norm)

    ds_engine.clip_fp32_gradients = clip_and_keep


def clip_grads_one_rank(parameters: Iterator[torch.nn.Parameter], *, max_norm: float) -> torch.Tensor:
    """Scale the gradients in place so their global 2-norm is at most `max_norm`; returns the norm
    before clipping (a 0-dim tensor). The same operations in the same order as
    DeepSpeed's `clip_grad_norm_` on one rank: (sum of squared per-tensor norms) ** 0.5, coefficient
    max_norm / (norm + 1e-6) capped at 1."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norms = torch._foreach_norm([g.float() for g in grads], 2.0)
    total = torch.stack(norms).pow(2.0).sum().float().pow(0.5) * 1.0
    coef = torch.min(torch.tensor([1.0], device=total.device), torch.tensor([float(max_norm)], device=total.device) / (total + 1e-6))
    torch._foreach_mul_(grads, coef.squeeze(0))
    return total


def global_grad_norm(engine: TrainEngine[object]) -> float | None:
    """The gradient norm of the last optimizer step (before clipping), or None where DeepSpeed
    measured none (gradient clipping off without ZeRO)."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


# ----------------------------------------------------------------------------------------------
# Final weights


def full_state_dict(engine: TrainEngine[Module], *, dist: Dist) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (None elsewhere), gathering ZeRO-3 shards one at a time."""
    module = engine.module
    if engine.zero_optimization_stage() != 3:
        if not dist.is_main:
            return None
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    import deepspeed

    # The keys a plain state_dict() would hold: persistent buffers only (not e.g. rotary inv_freq).
    keys = set(module.state_dict().keys())
    state: dict[str, torch.Tensor] = {}
    # One parameter gathered at a time bounds device memory by the largest tensor; rank 0 still
    # collects the whole model in CPU memory, as the save_pretrained folder needs.
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if dist.is_main:
                state[name] = param.detach().cpu().clone()
    if dist.is_main:
        state.update((name, buf.detach().cpu().clone()) for name, buf in module.named_buffers() if name in keys)
    return state if dist.is_main else None


# ----------------------------------------------------------------------------------------------
# Loading straight into ZeRO-3 partitions


@dataclass(frozen=True)
class Zero3Partitioning:
    """How `rlhf.models.loading` builds a model under ZeRO-3 (its `Partitioning`): each rank
    constructs only its own slice of the weights, so no rank ever holds a whole large model."""

    ds_config: dict[str, Any]
    """The DeepSpeed config of the engine the model will go into."""

    @contextlib.contextmanager
    def constructing(self) -> Iterator[None]:
        """While alive, an HfDeepSpeedConfig makes from_pretrained build the model under zero.Init.

        It is dropped right after loading: left alive it would also partition models we build later
        on purpose whole (the CPU copy used to merge LoRA weights at save time).
        """
        from transformers.integrations import HfDeepSpeedConfig

        marker = HfDeepSpeedConfig(self.ds_config)
        try:
            yield
        finally:
            del marker

    @contextlib.contextmanager
    def gathered(self, param: torch.nn.Parameter) -> Iterator[None]:
        """`param` whole on every rank inside; what rank 0 writes into it is scattered back to every rank."""
        if not hasattr(param, "ds_id"):  # not partitioned (the toy model is built whole, then wrapped)
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            yield


def zero3_partitioning(ds_config: dict[str, Any] | None) -> Zero3Partitioning | None:
    """Load into partitions under this DeepSpeed config; None (no ZeRO-3) loads the model whole."""
    return None if ds_config is None else Zero3Partitioning(ds_config)
