"""Our engine section -> DeepSpeed's JSON, and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest

from rlhf.config import EngineConfig, OptimConfig
from rlhf.training.engine import deepspeed_config, lr_multiplier


def test_zero3_offload_bf16_mapping():
    engine = EngineConfig(zero_stage=3, precision="bf16", offload_optimizer=True, offload_params=True, micro_batch_size=4, grad_accum=8)
    optim = OptimConfig(lr=2e-5, grad_clip=0.5, beta2=0.99, eps=1e-6, weight_decay=0.1)
    ds = deepspeed_config(engine, optim)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 8
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    # Offloaded optimizer states use DeepSpeed's optimizer, configured from ours.
    assert ds["optimizer"]["params"] == {"lr": 2e-5, "betas": [0.9, 0.99], "eps": 1e-6, "weight_decay": 0.1}


def test_plain_fp32_has_no_precision_or_optimizer_section():
    ds = deepspeed_config(EngineConfig(), OptimConfig())
    assert "bf16" not in ds and "fp16" not in ds and "optimizer" not in ds
    assert ds["zero_optimization"] == {"stage": 0}


def test_fp16_uses_dynamic_loss_scaling():
    ds = deepspeed_config(EngineConfig(precision="fp16"), OptimConfig())
    assert ds["fp16"]["enabled"] is True and ds["fp16"]["loss_scale"] == 0


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_against_closed_form(schedule):
    optim = OptimConfig(schedule=schedule, warmup_steps=10, min_lr_ratio=0.1)
    total = 110
    for step in range(total):
        got = lr_multiplier(step, optim=optim, total_steps=total)
        if step < 10:
            expected = (step + 1) / 10
        elif schedule == "constant":
            expected = 1.0
        else:
            p = (step - 10) / 100
            shape = 1 - p if schedule == "linear" else (1 + math.cos(math.pi * p)) / 2
            expected = 0.1 + 0.9 * shape
        assert got == pytest.approx(expected), step
    # Annealed to the floor at the end of the run (InstructGPT anneals to zero by default).
    if schedule != "constant":
        assert lr_multiplier(total, optim=optim, total_steps=total) == pytest.approx(0.1)
