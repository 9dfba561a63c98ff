"""At one rank the engine skips DeepSpeed's gradient all-reduce and clips with multi-tensor ops:
both are exact no-op changes, so an engine trains to bit-identical weights either way."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from tests.ranks import on_ranks

STEPS = 4


def _train_both(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from deepspeed.runtime.utils import clip_grad_norm_
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.config import EngineConfig, OptimConfig
    from rlhf.training.engine import build_engine, init_distributed

    init_distributed()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))
    # A small clip so every step is clipped: the coefficient's arithmetic is exercised too.
    initial = copy.deepcopy(model.state_dict())
    optim = OptimConfig(lr=1e-2, grad_clip=0.05, warmup_steps=0)
    fast = build_engine(model, engine=EngineConfig(micro_batch_size=4), optim=optim, total_steps=STEPS)
    reference = build_engine(copy.deepcopy(model), engine=EngineConfig(micro_batch_size=4), optim=optim, total_steps=STEPS)
    # The reference takes DeepSpeed's own path: the all-reduce and its per-tensor clip_grad_norm_.
    reference.enable_backward_allreduce = True

    def deepspeed_clip() -> None:
        norm = clip_grad_norm_(parameters=reference.module.parameters(), max_norm=reference.gradient_clipping(), mpu=reference.mpu)
        reference._global_grad_norm = float(norm)

    reference.clip_fp32_gradients = deepspeed_clip
    norms = {"fast": [], "reference": []}
    for step in range(STEPS):
        ids = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(step))
        for name, engine in (("fast", fast), ("reference", reference)):
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
            norms[name].append(engine.get_global_grad_norm())
    out[rank] = {
        "skipped_allreduce": not fast.enable_backward_allreduce,
        "norms": norms,
        "identical": all(torch.equal(a, b) for a, b in zip(fast.module.state_dict().values(), reference.module.state_dict().values())),
        "moved": not all(torch.equal(a, b) for a, b in zip(fast.module.state_dict().values(), initial.values())),
    }


def test_one_rank_shortcuts_train_bit_identical_weights():
    result = on_ranks(_train_both, world=1)[0]
    assert result["skipped_allreduce"]
    assert result["norms"]["fast"] == result["norms"]["reference"]
    assert all(n > 0.05 for n in result["norms"]["fast"])  # every step clipped
    assert result["moved"] and result["identical"]


def _optimizer_kernels(rank: int, world: int, port: int, out: dict) -> None:
    """Which AdamW kernel the engine gives a small model, a 10M-parameter one, and LoRA adapters on it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from peft import LoraConfig, get_peft_model

    from rlhf.config import EngineConfig, OptimConfig
    from rlhf.training.engine import FUSED_ADAMW_MIN_PARAMS_ON_CPU, build_engine, init_distributed

    init_distributed()
    torch.manual_seed(0)
    side = int(FUSED_ADAMW_MIN_PARAMS_ON_CPU**0.5) + 1
    models = {"small": torch.nn.Sequential(torch.nn.Linear(64, 64)),
              "large": torch.nn.Sequential(torch.nn.Linear(side, side, bias=False))}
    models["lora"] = get_peft_model(torch.nn.Sequential(torch.nn.Linear(side, side, bias=False)),
                                    LoraConfig(r=4, target_modules=["0"]))
    models["large-zero2"] = torch.nn.Sequential(torch.nn.Linear(side, side, bias=False))  # under DeepSpeed's ZeRO optimizer
    kernels = {}
    for name, model in models.items():
        engine = build_engine(model, engine=EngineConfig(micro_batch_size=2, zero_stage=2 if name == "large-zero2" else 0),
                              optim=OptimConfig(lr=1e-3, warmup_steps=0), total_steps=1)
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        engine.backward(engine(torch.randn(2, model[0].in_features if name == "small" else side)).square().mean())
        engine.step()
        after = [p.detach() for p in model.parameters() if p.requires_grad]
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer a ZeRO one wraps
        kernels[name] = {"fused": inner.param_groups[0]["fused"],
                         "trained": all(a.isfinite().all() for a in after) and any(not a.equal(b) for a, b in zip(after, before))}
    out[rank] = kernels  # the shared dict takes whole values only


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU every engine is fused: nothing to tell apart")
def test_adamw_runs_fused_on_the_cpu_for_large_models_only():
    """Fused from FUSED_ADAMW_MIN_PARAMS_ON_CPU trainable parameters: the embedded default keeps its
    trajectories, a real model's step runs about 5x faster; LoRA adapters count, the frozen base does not."""
    kernels = on_ranks(_optimizer_kernels, world=1)[0]
    assert {name: k["fused"] for name, k in kernels.items()} == {"small": False, "large": True, "lora": False, "large-zero2": True}
    assert all(k["trained"] for k in kernels.values())
