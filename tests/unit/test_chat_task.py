"""The verifiable chat task: right answers, held-out questions unseen in training, an exact grader."""

from __future__ import annotations

import json
import operator
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.tasks.chat import QUESTION_COUNT, exact_answer_rate, exact_reward, questions, write_task

WORKED = {"plus": ("+", operator.add), "minus": ("-", operator.sub), "times": ("*", operator.mul)}


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def solve(question: str) -> str:
    """The exact reply to a question, worked out independently of the task's writer."""
    a, op, b = re.search(r"(\d+) (plus|minus|times) (\d+)", question).groups()
    symbol, apply = WORKED[op]
    return f"{a} {symbol} {b} = {apply(int(a), int(b))}"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("task"), train_size=200, eval_size=40, seed=3)


def test_every_demonstration_and_prompt_carries_the_right_answer(task):
    for split, size in (("train", 200), ("eval", 40)):
        # Not vacuous: every question of the split is written, each kind one row per question.
        assert len(rows(task[f"demonstrations-{split}"])) == len(rows(task[f"prompts-{split}"])) == size
        for row in rows(task[f"demonstrations-{split}"]):
            user, assistant = row["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            assert assistant["content"] == solve(user["content"]) and int(assistant["content"].split("=")[1]) >= 0
        for row in rows(task[f"prompts-{split}"]):
            assert [m["role"] for m in row["messages"]] == ["user"] and row["answer"] == solve(row["messages"][0]["content"])


def test_comparisons_prefer_the_exact_reply_over_a_near_miss_or_a_sentence(task):
    kinds = set()
    for row in rows(task["comparisons-train"]):
        assert row["chosen"][0] == row["rejected"][0]
        right, other = row["chosen"][1]["content"], row["rejected"][1]["content"]
        assert right == solve(row["chosen"][0]["content"]) and other != right
        equation, result = right.split(" = ")
        if other.startswith(equation + " = "):
            kinds.add("near miss")
            assert 0 < abs(int(other.split(" = ")[1]) - int(result)) <= 10
        else:
            kinds.add("sentence")
            assert other == f"The answer is {result}."
    assert kinds == {"near miss", "sentence"}


def test_held_out_questions_never_occur_in_training(task):
    def keys(path):
        return {re.search(r"(\d+) (plus|minus|times) (\d+)", r["messages"][0]["content"]).groups() for r in rows(path)}

    train, held_out = keys(task["prompts-train"]), keys(task["prompts-eval"])
    assert len(train) == 200 and len(held_out) == 40 and not train & held_out


def test_the_same_seed_writes_the_same_files(task, tmp_path):
    again = write_task(tmp_path, train_size=200, eval_size=40, seed=3)
    assert all(again[name].read_bytes() == path.read_bytes() for name, path in task.items())


def test_more_pairs_per_question_pair_each_training_question_with_distinct_wrong_replies(tmp_path):
    more = write_task(tmp_path, train_size=200, eval_size=40, seed=3, pairs_per_question=3)
    by_question: dict[str, list[str]] = {}
    for row in rows(more["comparisons-train"]):
        assert row["chosen"][1]["content"] == solve(row["chosen"][0]["content"])
        by_question.setdefault(row["chosen"][0]["content"], []).append(row["rejected"][1]["content"])
    assert len(by_question) == 200 and all(len(set(replies)) == len(replies) == 3 for replies in by_question.values())
    assert len(rows(more["comparisons-eval"])) == 40  # the held-out measure keeps one pair a question
    one = write_task(tmp_path / "one", train_size=200, eval_size=40, seed=3)
    assert more["prompts-train"].read_bytes() == one["prompts-train"].read_bytes()
    with pytest.raises(ValueError, match="pairs per question"):
        write_task(tmp_path / "bad", train_size=4, eval_size=2, pairs_per_question=8)
    assert not (tmp_path / "bad").exists()


def test_every_distinct_question_can_be_drawn_and_no_more():
    every = questions(QUESTION_COUNT, seed=5)
    assert len({key for key, _ in every}) == QUESTION_COUNT == 1764
    assert all(q.answer == solve(q.text) for _, q in every)
    held_apart = frozenset(key for key, _ in every[:1000])
    assert len(questions(QUESTION_COUNT - 1000, seed=6, exclude=held_apart)) == 764
    with pytest.raises(ValueError, match="at most 764"):  # unchecked, the draw would never end
        questions(765, seed=6, exclude=held_apart)


def test_the_script_refuses_more_questions_than_the_task_has_and_writes_nothing(tmp_path):
    script = Path(__file__).resolve().parents[2] / "scripts" / "chat_task.py"
    done = subprocess.run([sys.executable, str(script), "write", str(tmp_path / "task"), "--train-size", "4096"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and not (tmp_path / "task").exists()
    assert done.stderr.strip().splitlines() == ["chat_task.py write: the task has 1764 distinct questions, so 4096 cannot be "
                                                "drawn beside 0 held apart; ask for at most 1764"]


def test_exact_answer_rate():
    replies = ["2 + 10 = 12", " 3 + 4 = 7\n", "The answer is 3.", "2 * 2 = 5"]
    assert exact_answer_rate(replies, ["2 + 10 = 12", "3 + 4 = 7", "1 + 2 = 3", "2 * 2 = 4"]) == 0.5
    with pytest.raises(ValueError):
        exact_answer_rate(["1"], ["1", "2"])


def rendered(question: str) -> str:
    """A prompt as PPO hands it to a reward function: SmolLM2's chat template decoded without its
    special tokens, a system turn first."""
    return f"system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\nuser\n{question}\nassistant\n"


def test_exact_reward_grades_every_held_out_prompt_as_the_grader_does(task):
    comparisons = rows(task["comparisons-train"])
    prompts = [rendered(r["chosen"][0]["content"]) for r in comparisons]
    right = [" " + r["chosen"][1]["content"] + "\n" for r in comparisons]
    wrong = [r["rejected"][1]["content"] for r in comparisons]
    assert exact_reward(prompts, right) == [1.0] * len(prompts)
    assert exact_reward(prompts, wrong) == [0.0] * len(prompts)
    held_out = rows(task["prompts-eval"])
    replies = [solve(r["messages"][0]["content"]) for r in held_out]
    assert exact_reward([rendered(r["messages"][0]["content"]) for r in held_out], replies) == [1.0] * len(held_out)


def test_exact_reward_refuses_a_prompt_without_a_question():
    with pytest.raises(ValueError, match="prompt 1 holds no question"):
        exact_reward([rendered("What is 12 plus 3? Reply with the equation, like 2 + 2 = 4."), rendered("Hello")], ["", ""])


def test_tool_demonstrations_are_the_episodes_tool_env_plays_out(task):
    """Each question's two rows: the calculator call alone, and the episode after it. The environment
    answers the call with the row's observation, and the template renders the episode row as the
    rollout lays it out (prompt, call, observation as the Renderer appends it, reply)."""
    from rlhf.data.templates import DEFAULT_CHAT_TEMPLATE, render_chat
    from rlhf.rollouts.multiturn import Renderer
    from rlhf.tasks.envs import ToolEnv
    from rlhf.toy import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    demos = rows(task["demonstrations-tool-train"])
    assert len(demos) == 2 * 200
    for call_row, episode in zip(demos[::2], demos[1::2]):
        user, call, observation, reply = episode["messages"]
        assert call_row["messages"] == [user, call] and reply["content"] == solve(user["content"])
        assert [m["role"] for m in episode["messages"]] == ["user", "assistant", "tool", "assistant"]
        answered, result, done = ToolEnv().step(call["content"])
        assert answered == [observation] and result == 0.0 and not done
        assert observation["content"] == f"<result>\n{reply['content'].split(' = ')[1]}\n</result>"
        assert ToolEnv().step(reply["content"])[2]  # the reply calls nothing: the episode ends
        prompt = render_chat(tokenizer, [user], add_generation_prompt=True)
        rollout = prompt + call["content"] + Renderer(tokenizer)._chat_observation([observation], closed=False) + reply["content"]
        assert render_chat(tokenizer, episode["messages"], add_generation_prompt=False).startswith(rollout)
        assert render_chat(tokenizer, call_row["messages"], add_generation_prompt=False).startswith(prompt + call["content"])
