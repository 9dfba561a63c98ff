"""A verifiable chat task for real chat models: arithmetic asked in plain English, answered exactly.

"What is 23 plus 5? Reply with the equation, like 2 + 2 = 4." has one right reply, "23 + 5 = 28",
so how often a model answers exactly right is measured without a judge. The reply restates the
question before the result because a 135M model computes (and, as a reward model, checks) a result
far better right after "23 + 5 =" than from the question alone: asked for the bare number,
SmolLM2-135M's reward model ranked a right result over a near miss no better than chance (0.47 on
77 held-out pairs). The task writes three of the embedded default's kinds of rows, in the chat
forms users bring (`messages`), and grades replies:

- demonstrations: the question and the exact reply (for `rlhf sft`);
- comparisons: the exact reply against one with a near-miss result or the result in a sentence
  (for `rlhf rm`);
- prompts: the question alone, with the exact reply as `answer` (for `rlhf ppo`);
- tool demonstrations (`demonstrations-tool-*`): the same questions worked with rlhf/tools'
  calculator, two rows each since `rlhf sft` learns a chat's last turn: the question answered by the
  call (`<tool name="calculator">23+5</tool>`), and the whole episode ending in the exact reply
  after the tool's result (for `rlhf sft`, then `rlhf ppo rollout.env=python:rlhf.tasks.envs:ToolEnv`);
- `exact_answer_rate(responses, answers)`: the share of replies that are the answer and nothing else;
- `exact_reward(prompts, responses)`: the grader as a PPO reward source
  (`reward.name_or_path=[python:rlhf.tasks.chat:exact_reward]`), 1 for the exact reply, else 0.

Train and held-out questions never share an (operation, a, b) triple.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from rlhf.tools.registry import call_tool, render_observation

OPERATIONS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
SYMBOLS = {"plus": "+", "minus": "-", "times": "*"}
SENTENCE = "The answer is "
# Each operation's operand ranges, (a's, b's) inclusive, as `questions` draws them.
OPERANDS = {"plus": ((10, 99), (1, 9)), "minus": ((10, 99), (1, 9)), "times": ((2, 9), (2, 19))}
QUESTION_COUNT = sum((high_a - low_a + 1) * (high_b - low_b + 1) for (low_a, high_a), (low_b, high_b) in OPERANDS.values())
PHRASINGS = (
    "What is {a} {op} {b}? Reply with the equation, like 2 + 2 = 4.",
    "Compute {a} {op} {b}. Answer with just the equation, as in 3 * 5 = 15.",
    "{a} {op} {b} equals what? Give only the equation, for example 9 - 4 = 5.",
)


@dataclass(frozen=True)
class Question:
    text: str
    answer: str  # the exact reply: "23 + 5 = 28"
    result: int


def questions(n: int, *, seed: int, exclude: frozenset[tuple[str, int, int]] = frozenset()) -> list[tuple[tuple[str, int, int], Question]]:
    """`n` distinct questions (with their (op, a, b) key) not in `exclude`: a two-digit number plus
    or minus a one-digit one, one digit times a number up to 19. Sized so a 135M chat model gets
    some right after SFT and a reward model from it can tell right from wrong: with two-digit
    operands on both sides SmolLM2-135M stays near 0.12 and PPO has no signal to follow."""
    if n > QUESTION_COUNT - len(exclude):
        raise ValueError(f"the task has {QUESTION_COUNT} distinct questions, so {n} cannot be drawn beside {len(exclude)} "
                         f"held apart; ask for at most {QUESTION_COUNT - len(exclude)}")
    rng = random.Random(seed)
    seen = set(exclude)
    out: list[tuple[tuple[str, int, int], Question]] = []
    while len(out) < n:
        op = rng.choice(sorted(OPERATIONS))
        (low_a, high_a), (low_b, high_b) = OPERANDS[op]
        a, b = rng.randint(low_a, high_a), rng.randint(low_b, high_b)
        key = (op, a, b)
        if key in seen:
            continue
        seen.add(key)
        text = rng.choice(PHRASINGS).format(a=a, op=op, b=b)
        result = OPERATIONS[op](a, b)
        out.append((key, Question(text, f"{a} {SYMBOLS[op]} {b} = {result}", result)))
    return out


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def tool_expression(q: Question) -> str:
    """What the calculator is asked to work `q` out: its equation's left side without spaces ("47+6")."""
    return q.answer.split(" = ")[0].replace(" ", "")


def tool_demonstrations(q: Question) -> list[dict]:
    """Two SFT rows: the question answered by the calculator call, and the episode the rollout
    builds after it (the call, the tool's observation as ToolEnv renders it, the exact reply)."""
    expression = tool_expression(q)
    call = _assistant(f'<tool name="calculator">{expression}</tool>')
    observation = {"role": "tool", "content": render_observation(call_tool("calculator", expression))}
    return [{"messages": [_user(q.text), call]}, {"messages": [_user(q.text), call, observation, _assistant(q.answer)]}]


def _worse_reply(q: Question, rng: random.Random) -> str:
    """A reply a grader marks wrong: mostly the equation with a near-miss result (what the reward
    model must learn to check), else the right result in a sentence."""
    if rng.random() < 0.25:
        return f"{SENTENCE}{q.result}."
    left = q.answer.rsplit("=", 1)[0]
    return f"{left}= {q.result + rng.choice([-10, -2, -1, 1, 2, 10])}"


def rejected_kind(reply: str) -> str:
    """Which kind of wrong reply a comparison's rejected side is: "sentence" or "near miss"."""
    return "sentence" if reply.startswith(SENTENCE) else "near miss"


def _check_pairs_per_question(count: int) -> None:
    if not 1 <= count <= 7:
        raise ValueError(f"pairs per question must be in [1, 7] (a question has 7 wrong replies), got {count}")


def _worse_replies(q: Question, rng: random.Random, count: int) -> list[str]:
    """`count` distinct wrong replies to `q` (at most 7 exist: six near misses and the sentence); the
    first is drawn exactly as a single one is, so count=1 writes the same rows as before."""
    _check_pairs_per_question(count)
    replies: list[str] = []
    while len(replies) < count:
        reply = _worse_reply(q, rng)
        if reply not in replies:
            replies.append(reply)
    return replies


def split_rows(qs: list[Question], *, seed: int, pairs_per_question: int = 1) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    return {
        "demonstrations": [{"messages": [_user(q.text), _assistant(q.answer)]} for q in qs],
        "demonstrations-tool": [row for q in qs for row in tool_demonstrations(q)],
        "comparisons": [
            {"chosen": [_user(q.text), _assistant(q.answer)], "rejected": [_user(q.text), _assistant(worse)]}
            for q in qs
            for worse in _worse_replies(q, rng, pairs_per_question)
        ],
        "prompts": [{"messages": [_user(q.text)], "answer": q.answer} for q in qs],
    }


def write_task(
    folder: Path, *, train_size: int = 512, eval_size: int = 128, seed: int = 0, pairs_per_question: int = 1
) -> dict[str, Path]:
    """Write `<kind>-<split>.jsonl` for each kind and split into `folder`; returns {name: path}.

    pairs_per_question: comparisons per training question, each against a different wrong reply
    (more near misses for the reward model to learn checking from); held-out keeps one each."""
    _check_pairs_per_question(pairs_per_question)  # every size is checked before the folder is made
    train = questions(train_size, seed=seed)
    held_out = questions(eval_size, seed=seed + 1, exclude=frozenset(k for k, _ in train))
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, qs in (("train", train), ("eval", held_out)):
        pairs = pairs_per_question if split == "train" else 1
        for kind, rows in split_rows([q for _, q in qs], seed=seed, pairs_per_question=pairs).items():
            path = folder / f"{kind}-{split}.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            written[f"{kind}-{split}"] = path
    return written


def exact_answer_rate(responses: list[str], answers: list[str]) -> float:
    """Share of replies that are exactly the answer (surrounding whitespace aside)."""
    if len(responses) != len(answers) or not answers:
        raise ValueError("need one response per answer, and at least one")
    return sum(r.strip() == a for r, a in zip(responses, answers)) / len(answers)


# A question's operands and operation as the phrasings write them ("47 plus 6"); the examples in
# the phrasings use symbols ("2 + 2 = 4"), so only the question itself matches.
_QUESTION = re.compile(r"\b(\d+) (plus|minus|times) (\d+)\b")


def answer_of(prompt: str) -> str | None:
    """The exact reply to the last question in `prompt` (rendered chat text, system turn and all),
    or None where it holds no question of this task."""
    found = _QUESTION.findall(prompt)
    if not found:
        return None
    a, op, b = found[-1]
    return f"{a} {SYMBOLS[op]} {b} = {OPERATIONS[op](int(a), int(b))}"


def exact_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The grader as a reward: 1.0 where a response is exactly its prompt's answer (surrounding
    whitespace aside), else 0.0. A prompt with no question of this task is an error, not a zero."""
    answers = [answer_of(p) for p in prompts]
    missing = [i for i, a in enumerate(answers) if a is None]
    if missing:
        raise ValueError(f"prompt {missing[0]} holds no question of the chat task: {prompts[missing[0]][-80:]!r}")
    return [float(r.strip() == a) for r, a in zip(responses, answers)]
