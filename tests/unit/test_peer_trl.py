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


def chat_config(*, lora: bool, extra: tuple[str, ...] = ()) -> PPOConfig:
    overrides = peer_trl.bench_overrides(sft="sft:latest", rm="rm:latest", steps=20, seed=3, registry="/tmp/unused",
                                         task="chat", data="/data/task", lora=lora)
    return load_config(PPOConfig, None, [*overrides, *extra])


@pytest.mark.parametrize("lora, lr", [(False, 1e-5), (True, 1e-4)])
def test_chat_task_settings_translate_to_trl_fields(lora, lr):
    cfg = chat_config(lora=lora)
    assert cfg.data.train == "/data/task/prompts-train.jsonl" and cfg.data.eval == "/data/task/prompts-eval.jsonl"
    assert cfg.model.lora.enabled is lora and not cfg.critic.lora.enabled
    s = peer_trl.trl_settings(cfg)
    assert (s["per_device_train_batch_size"], s["num_mini_batches"], s["num_ppo_epochs"]) == (16, 2, 2)
    assert (s["total_episodes"], s["response_length"], s["seed"]) == (20 * 16, 16, 3)
    assert (s["learning_rate"], s["kl_coef"], s["cliprange_value"]) == (lr, 0.05, 0.2)


def test_chat_task_needs_its_folder_and_trl_cannot_adapt_the_value_model():
    with pytest.raises(UserError, match="^--data: "):
        peer_trl.bench_overrides(sft="a", rm="b", steps=1, seed=0, registry="/r", task="chat")
    with pytest.raises(UserError, match="^critic.lora.enabled: TRL"):
        peer_trl.trl_settings(chat_config(lora=True, extra=("critic.lora.enabled=true",)))


def test_lora_settings_become_the_peft_config_trl_applies():
    from rlhf.models.loading import peft_lora_config

    peft = peft_lora_config(chat_config(lora=True).model.lora)
    assert (peft.r, peft.lora_alpha, peft.lora_dropout, peft.target_modules, peft.task_type) == (8, 16, 0.0, "all-linear", "CAUSAL_LM")


def test_trl_pads_with_a_token_other_than_eos():
    """TRL masks every pad id: a pad that is the EOS would mask the chat template's turn ends."""
    from rlhf.toy.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    pad = tokenizer.pad_token_id
    peer_trl.distinct_pad_token(tokenizer)
    assert tokenizer.pad_token_id == pad  # already distinct: untouched
    tokenizer.pad_token = tokenizer.eos_token
    peer_trl.distinct_pad_token(tokenizer)
    assert tokenizer.pad_token_id == tokenizer.bos_token_id != tokenizer.eos_token_id
    tokenizer.pad_token = tokenizer.bos_token = tokenizer.unk_token = tokenizer.eos_token
    with pytest.raises(UserError, match="pad token is its EOS"):
        peer_trl.distinct_pad_token(tokenizer)


def test_unknown_variant_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as exit_info:
        peer_trl.parse_args(["--variants", "rlhf,trll"])
    assert exit_info.value.code == 2 and "unknown run 'trll'" in capsys.readouterr().err
    assert peer_trl.parse_args(["--variants", "rlhf,trl-nogc"]).variants == ["rlhf", "trl-nogc"]
