"""`rlhf plan` (rlhf.launcher.memory_plan, memory_estimates, memory_shapes): the ZeRO accounting against a plain computation,
the toy model's exact parameter count, LoRA's trained parameters against peft's, and the command's table, JSON,
suggestion and errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from rlhf.cli import app
from rlhf.config import LoraConfig, ModelConfig, PPOConfig, SFTConfig, load_config
from rlhf.data.packing import pack_rows
from rlhf.errors import UserError
from rlhf.launcher.memory_estimates import (
    GiB,
    ModelShape,
    activation_bytes,
    frozen_states,
    kv_cache_bytes,
    logits_bytes,
    parse_memory,
    trained_states,
)
from rlhf.launcher.memory_plan import packed_shape, plan_stage, smallest_fit
from rlhf.launcher.memory_shapes import model_shape, model_shapes
from rlhf.store.registry import Registry

P = 1_300_000_000  # a 1.3B-parameter model
# OPT-1.3B's geometry (hidden 2048, 24 layers, 32 heads, vocabulary 50272)
OPT = ModelShape(params=P, hidden=2048, layers=24, heads=32, kv_heads=32, head_dim=64, vocab=50272, source="opt-1.3b")


def device_per_param(states) -> float:
    return states.device / P


def test_zero0_adam_costs_16_bytes_per_parameter_in_fp32_and_in_mixed_precision():
    fp32 = trained_states(P, P, precision="fp32", zero_stage=0, ranks=8)
    assert (fp32.weights, fp32.grads, fp32.optimizer) == (4 * P, 4 * P, 8 * P)  # Adam's m and v, no master copy
    bf16 = trained_states(P, P, precision="bf16", zero_stage=0, ranks=8)
    assert (bf16.weights, bf16.grads, bf16.optimizer) == (2 * P, 2 * P, 12 * P)  # + fp32 master weights
    assert device_per_param(fp32) == device_per_param(bf16) == 16


@pytest.mark.parametrize("stage, divided", [(1, {"optimizer"}), (2, {"optimizer", "grads"}), (3, {"optimizer", "grads", "weights"})])
def test_each_zero_stage_partitions_its_states_over_the_ranks(stage, divided):
    whole = trained_states(P, P, precision="bf16", zero_stage=0, ranks=8)
    part = trained_states(P, P, precision="bf16", zero_stage=stage, ranks=8)
    for name in ("weights", "grads", "optimizer"):
        expected = getattr(whole, name) / 8 if name in divided else getattr(whole, name)
        assert getattr(part, name) == pytest.approx(expected)
    assert part.cpu == 0


def test_zero3_over_8_ranks_is_an_eighth_of_zero0():
    assert trained_states(P, P, precision="fp32", zero_stage=3, ranks=8).device == pytest.approx(16 * P / 8)


def test_offload_moves_optimizer_states_and_then_weights_to_cpu():
    opt = trained_states(P, P, precision="bf16", zero_stage=1, ranks=8, offload_optimizer=True)
    assert opt.optimizer == 0 and opt.grads == 2 * P and opt.weights == 2 * P
    assert opt.cpu == pytest.approx(12 * P / 8)
    both = trained_states(P, P, precision="bf16", zero_stage=3, ranks=8, offload_optimizer=True, offload_params=True)
    assert both.device == 0
    assert both.cpu == pytest.approx((2 + 4 + 12) * P / 8)  # bf16 weights, fp32 gradient partition (ZeRO-Offload), Adam + master


def test_lora_trains_only_the_adapters():
    adapters = 6_000_000
    lora = trained_states(P, adapters, precision="bf16", zero_stage=0, ranks=1)
    assert lora.weights == 2 * P  # every weight is held
    assert lora.grads == 2 * adapters and lora.optimizer == 12 * adapters


def test_frozen_models_hold_weights_only_partitioned_under_zero3_or_offload():
    assert frozen_states(P, precision="bf16", ranks=8, partitioned=False).device == 2 * P
    assert frozen_states(P, precision="bf16", ranks=8, partitioned=True).device == pytest.approx(2 * P / 8)
    offloaded = frozen_states(P, precision="bf16", ranks=8, partitioned=False, offload=True)
    assert offloaded.device == 0 and offloaded.cpu == pytest.approx(2 * P / 8)


def test_kv_cache_logits_and_activations_formulas():
    # 2 x layers x kv_heads x head_dim x tokens x batch x bytes
    assert kv_cache_bytes(OPT, tokens=512, batch=16, precision="bf16") == 2 * 24 * 32 * 64 * 512 * 16 * 2
    assert logits_bytes(4, 512, 50272) == 4 * 512 * 50272 * 4
    sbh = 512 * 4 * 2048
    assert activation_bytes(OPT, seq=512, batch=4, precision="bf16", checkpointing=False) == 24 * 34 * sbh
    eager = activation_bytes(OPT, seq=512, batch=4, precision="bf16", checkpointing=False, eager_attention=True)
    assert eager == pytest.approx(24 * sbh * (34 + 5 * 32 * 512 / 2048))  # Korthikanti et al. 2022, eq. 2
    # Checkpointing keeps each layer's input and recomputes one layer at a time.
    assert activation_bytes(OPT, seq=512, batch=4, precision="bf16", checkpointing=True) == 24 * sbh * 2 + 34 * sbh
    assert activation_bytes(OPT, seq=512, batch=4, precision="fp32", checkpointing=False) == 2 * 24 * 34 * sbh


@pytest.mark.parametrize("text, expected", [("80GiB", 80 * GiB), ("40GB", 40 * 10**9), ("24576MiB", 24 * GiB), ("1.5g", 1.5e9),
                                            ("1024", 1024)])
def test_memory_sizes(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["12XB", "", "GiB", "-3GiB", "0"])
def test_bad_memory_sizes_are_one_line(text):
    with pytest.raises(UserError, match="not a memory size"):
        parse_memory(text)


@pytest.fixture(scope="module")
def toy_tokenizer():
    from rlhf.toy import build_tokenizer

    return build_tokenizer()


@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_toy_parameter_count_is_the_real_models(tmp_path, toy_tokenizer, head):
    from rlhf.toy import build_model

    cfg = ModelConfig()
    real = build_model(cfg.toy, toy_tokenizer, seed=0, head=head)
    shape = model_shape("toy", cfg, Registry(tmp_path), key="model.name_or_path", head=head)
    assert shape.params == sum(p.numel() for p in real.parameters())
    assert (shape.hidden, shape.layers, shape.vocab) == (cfg.toy.hidden_size, cfg.toy.num_layers, len(toy_tokenizer))


@pytest.mark.parametrize("head, targets", [("lm", None), ("scalar", None), ("lm", ["q_proj", "v_proj"])])
def test_lora_trainable_count_is_peft_s(tmp_path, toy_tokenizer, head, targets):
    from rlhf.models.loading import apply_lora
    from rlhf.toy import build_model

    lora = LoraConfig(enabled=True, r=4, target_modules=targets)
    real = apply_lora(build_model(ModelConfig().toy, toy_tokenizer, seed=0, head=head), lora,
                      task_type="SEQ_CLS" if head == "scalar" else "CAUSAL_LM")
    shape = model_shape("toy", ModelConfig(lora=lora), Registry(tmp_path), key="model.name_or_path", head=head, lora=lora)
    assert shape.lora_params == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert 0 < shape.trainable < shape.params


def test_a_folder_is_read_from_its_config_alone(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=1000).save_pretrained(tmp_path / "m")
    shape = model_shape(str(tmp_path / "m"), ModelConfig(), Registry(tmp_path), key="model.name_or_path")
    with torch.device("meta"):
        from transformers import LlamaForCausalLM

        expected = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig.from_pretrained(tmp_path / "m")).parameters())
    assert shape.params == expected and shape.kv_heads == 2 and shape.head_dim == 16


def test_a_missing_gguf_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no such GGUF file"):
        model_shape(str(tmp_path / "x.gguf"), ModelConfig(), Registry(tmp_path), key="model.name_or_path")


def test_ppo_plan_counts_four_models_and_suggests_the_smallest_change():
    cfg = load_config(PPOConfig, None, ["engine.precision=bf16", "engine.micro_batch_size=4", "rollout.batch_size=16",
                                        "data.max_prompt_length=256", "rollout.max_new_tokens=256"])
    small = ModelShape(params=331_000_000, hidden=1024, layers=24, heads=16, kv_heads=16, head_dim=64, vocab=50272)
    shapes = {"actor": OPT, "critic": small, "reference": OPT, "reward": small}
    plan = plan_stage("ppo", cfg, shapes, ranks=8, memory=80 * GiB)
    assert [r.role for r in plan.rows] == ["actor", "critic", "reference", "reward"]
    states = 16 * P + 16 * small.params + 2 * P + 2 * small.params  # ZeRO-0: everything whole on every rank
    assert plan.states == pytest.approx(states)
    assert plan.fits
    tight = plan_stage("ppo", cfg, shapes, ranks=8, memory=28 * GiB)
    assert not tight.fits
    change, fixed = smallest_fit("ppo", cfg, shapes, ranks=8, memory=28 * GiB)
    assert fixed.fits and fixed.total <= 28 * GiB
    assert change == "engine.zero_stage=1"  # the rollout KV cache alone overflows: no micro-batch or checkpointing helps


def test_ppo_plan_counts_each_reward_ensemble_member_as_a_frozen_reward_model(tmp_path):
    cfg = load_config(PPOConfig, None, ["model.name_or_path=toy", "critic.name_or_path=toy", "reward.name_or_path=toy",
                                        "reward_ensemble.name_or_path=[toy, toy]"])
    shapes = model_shapes("ppo", cfg, Registry(tmp_path))
    assert list(shapes)[-3:] == ["reward", "reward 2", "reward 3"]
    plan = plan_stage("ppo", cfg, shapes, ranks=1, memory=80 * GiB)
    rows = {r.role: r for r in plan.rows}
    assert rows["reward 2"].states == rows["reward 3"].states == rows["reward"].states and rows["reward"].states.weights > 0


def test_sft_suggestion_lowers_the_micro_batch_first():
    cfg = load_config(SFTConfig, None, ["data.max_length=2048", "engine.micro_batch_size=16", "engine.precision=bf16"])
    plan = plan_stage("sft", cfg, {"policy": OPT}, ranks=8, memory=64 * GiB)
    assert not plan.fits
    change, fixed = smallest_fit("sft", cfg, {"policy": OPT}, ranks=8, memory=64 * GiB)
    assert change.startswith("engine.micro_batch_size=") and "engine.grad_accum=" in change
    micro = int(change.split()[0].split("=")[1])
    accum = int(change.split()[1].split("=")[1])
    assert micro * accum == 16 and fixed.fits


def test_packed_shape_bounds_every_packing_of_random_lengths():
    gen = torch.Generator().manual_seed(0)
    for _ in range(500):
        n, max_length = int(torch.randint(1, 40, (1,), generator=gen)), int(torch.randint(1, 300, (1,), generator=gen))
        capacity = max_length * int(torch.randint(1, 5, (1,), generator=gen))
        lengths = torch.randint(1, max_length + 1, (n,), generator=gen).tolist()
        rows, width = packed_shape(n, max_length=max_length, capacity=capacity)
        bins = pack_rows(lengths, capacity=capacity)
        assert len(bins) <= rows and width == capacity
    # and the bound is reached: sequences just over half a row each get a row of their own
    assert len(pack_rows([51] * 7, capacity=100)) == packed_shape(7, max_length=51, capacity=100)[0] == 7


def test_a_packed_plan_is_the_unpacked_one_at_a_row_of_max_length_and_its_worst_case_beyond():
    base = ["data.max_length=1024", "engine.micro_batch_size=16", "engine.precision=bf16", "model.attn_implementation=eager"]
    unpacked = plan_stage("sft", load_config(SFTConfig, None, base), {"policy": OPT}, ranks=8, memory=80 * GiB)
    packed = plan_stage("sft", load_config(SFTConfig, None, [*base, "data.packing=true"]), {"policy": OPT}, ranks=8, memory=80 * GiB)
    assert packed.total == unpacked.total
    wide = plan_stage("sft", load_config(SFTConfig, None, [*base, "data.packing=true", "data.packing_tokens=8192"]),
                      {"policy": OPT}, ranks=8, memory=80 * GiB)
    # 16 rows of 1,024 fill at most 3 rows of 8,192 (2 * ceil(16 * 1024 / 8192) - 1): 3 x 8,192 tokens, eager attention quadratic in 8,192
    (row,) = wide.rows
    assert row.activations == activation_bytes(OPT, seq=8192, batch=3, precision="bf16", checkpointing=False, eager_attention=True)


# ----------------------------------------------------------------------------------------------
# The command


def run_plan(args, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path))
    return CliRunner().invoke(app, ["plan", *args])


def test_plan_prints_a_table_per_model_and_the_total(tmp_path, monkeypatch):
    result = run_plan(["sft", "-c", "sft-toy-quick", "--ranks", "2", "--memory", "1GiB"], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "policy: toy" in result.output and "optimizer states" in result.output
    assert "(fits)" in result.output


def test_plan_json(tmp_path, monkeypatch, toy_tokenizer):
    from rlhf.toy import build_model

    result = run_plan(["sft", "--json", "engine.zero_stage=3", "--ranks", "2"], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    params = sum(p.numel() for p in build_model(ModelConfig().toy, toy_tokenizer, seed=0).parameters())
    (policy,) = data["models"]
    assert policy["params"] == params
    assert policy["weights_bytes"] == params * 4 / 2 and policy["optimizer_bytes"] == params * 8 / 2
    assert data["fits"] is True and data["suggestion"] is None


def test_plan_that_does_not_fit_prints_the_change_and_exits_0(tmp_path, monkeypatch):
    args = ["sft", "--memory", "20MiB", "engine.micro_batch_size=64", "data.max_length=64"]
    result = run_plan(args, tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "does NOT fit" in result.output
    assert "smallest change that fits: engine.micro_batch_size=" in " ".join(result.output.split())
    data = json.loads(run_plan([*args, "--json"], tmp_path, monkeypatch).output)
    assert data["fits"] is False and data["suggestion"].startswith("engine.micro_batch_size=")
    assert data["suggestion_total_bytes"] <= 20 * 2**20


@pytest.mark.parametrize("args, message", [(["sft", "--memory", "12XB"], "--memory '12XB' is not a memory size"),
                                           (["sample"], "rlhf plan estimates"),
                                           (["sft", "--ranks", "0"], "--ranks must be at least 1"),
                                           (["sft", "engine.zero_stage=7"], "engine.zero_stage")])
def test_bad_values_are_one_line_and_exit_2(tmp_path, monkeypatch, args, message):
    result = run_plan(args, tmp_path, monkeypatch)
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
