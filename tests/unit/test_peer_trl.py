"""scripts/peer_trl.py's translation of our PPO config into TRL's PPOConfig fields (no TRL needed):
the issue-16 settings land on the fields TRL reads, and what TRL cannot run stops with the key."""

import importlib.util
from pathlib import Path

import pytest

from rlhf.config import PPOConfig, load_config
from rlhf.errors import UserError

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "peer_trl.py"
spec = importlib.util.spec_from_file_location("peer_trl", SCRIPT)
peer_trl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peer_trl)


def bench_config(*extra: str) -> PPOConfig:
    overrides = peer_trl.bench_overrides(sft="sft:latest", rm="rm:latest", steps=150, seed=7, registry="/tmp/unused")
    return load_config(PPOConfig, None, [*overrides, *extra])


def test_issue_settings_translate_to_trl_fields():
    s = peer_trl.trl_settings(bench_config())
    assert (s["per_device_train_batch_size"], s["gradient_accumulation_steps"], s["num_mini_batches"], s["num_ppo_epochs"]) == (64, 1, 2, 4)
    assert (s["total_episodes"], s["response_length"], s["seed"]) == (150 * 64, 8, 7)
    assert (s["kl_coef"], s["kl_estimator"], s["cliprange"], s["cliprange_value"]) == (0.05, "k1", 0.2, 0.2)
    assert (s["gamma"], s["lam"], s["whiten_rewards"], s["stop_token"]) == (1.0, 0.95, False, "eos")
    # 10 warmup optimizer steps of ours are 10 / (4 epochs x 2 minibatches) = 1.25 of TRL's per-PPO-step schedule.
    assert (s["learning_rate"], s["lr_scheduler_type"], s["warmup_steps"]) == (1e-4, "cosine", 1)
    assert s["missing_eos_penalty"] == 1.0  # our no-EOS score is -1 after normalization


@pytest.mark.parametrize("batch, micro, epochs", [(64, 32, 4), (128, 16, 2), (48, 48, 1)])
def test_trl_minibatches_match_ours(batch, micro, epochs):
    """TRL's derived sizes (its PPOTrainer.__init__ arithmetic) give our minibatch size and update count per step."""
    cfg = bench_config(f"rollout.batch_size={batch}", f"engine.micro_batch_size={micro}", f"ppo.epochs={epochs}")
    s = peer_trl.trl_settings(cfg)
    local_batch = s["per_device_train_batch_size"] * s["gradient_accumulation_steps"]
    assert local_batch == batch
    assert local_batch // s["num_mini_batches"] == micro  # TRL's local_mini_batch_size: one optimizer step each
    assert s["num_ppo_epochs"] * s["num_mini_batches"] == epochs * batch // micro
    assert s["total_episodes"] // local_batch == cfg.train.max_steps


@pytest.mark.parametrize("override, key", [
    ("ppo.kl_target=6", "ppo.kl_target"),
    ("critic_optim.lr=5e-5", "optim.lr"),
    ("ppo.value_clip_range=null", "ppo.value_clip_range"),
    ("ppo.whiten_advantages=false", "ppo.whiten_advantages"),
    ("ppo.kl_estimator=k2", "ppo.kl_estimator"),
    ("engine.grad_accum=2", "engine.grad_accum"),
])
def test_settings_trl_cannot_run_are_refused_by_key(override, key):
    with pytest.raises(UserError, match=f"^{key}: TRL"):
        peer_trl.trl_settings(bench_config(override))
