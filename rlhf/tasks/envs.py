"""Built-in environments for multi-turn rollouts (rollout.env; the protocol is in rlhf/rollouts/multiturn.py).

ToolEnv: the policy may call a tool of rlhf/tools (`<tool name="calculator">47+6</tool>`); the
observation is the tool's result (`<result>\\n53\\n</result>`) and the policy goes on. A turn without
a call ends the episode; the reward (reward.name_or_path) scores that last turn.

ToyRetryEnv: the embedded default's addition, with second chances. A wrong answer is told so and
the question asked again; each answer earns its oracle score (0 to 1).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from rlhf.tools.registry import TOOL_CALL_STOP, TOOLS, call_tool, parse_tool_call, render_observation
from rlhf.tools.sandbox import ToolResult
from rlhf.toy.task import oracle_score

_QUESTION = re.compile(r"(\d+)\+(\d+)=")


class ToolEnv:
    """Tool calls in the format of rlhf.tools.registry; the episode ends at the first turn without one.

    The observation is one message of `observation_role` ("tool"): a chat template renders it as its
    tool results (a template without a tool role may refuse it: subclass with "user"); without a
    template its content follows the call as it is. Rewards: 0 per call; the score is the reward's."""

    stop_strings: tuple[str, ...] = (TOOL_CALL_STOP,)
    observation_role = "tool"
    tools: Mapping[str, Callable[[str], ToolResult]] = TOOLS

    def reset(self, prompt: str) -> list[dict]:
        return []

    def step(self, text: str) -> tuple[list[dict], float, bool]:
        call = parse_tool_call(text)
        if call is None:
            return [], 0.0, True
        result = call_tool(*call, tools=self.tools)
        return [{"role": self.observation_role, "content": render_observation(result)}], 0.0, False


class ToyRetryEnv:
    """The embedded default's "a+b=" with retries: each answer earns its oracle score; the exact sum ends
    the episode, anything else gets "\\nno. a+b=" (the question again) and another turn. Plain text, so
    the toy tokenizer encodes every observation."""

    def reset(self, prompt: str) -> list[dict]:
        matches = _QUESTION.findall(prompt)
        if not matches:
            raise ValueError(f"no 'a+b=' question in the prompt {prompt!r}")
        self.question = "{}+{}=".format(*matches[-1])
        return []

    def step(self, text: str) -> tuple[list[dict], float, bool]:
        score = oracle_score(self.question, text)
        if score == 1.0:
            return [], score, True
        return [{"role": "user", "content": f"\nno. {self.question}"}], score, False
