"""Environments for the tests of `rollout.env=python:tests.envs:NAME`: importable by dotted name with the
repository root on PYTHONPATH (as the tests run)."""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

from rlhf.tasks.envs import ToyRetryEnv

LOG_ENV = "RLHF_TEST_ENV_LOG"
_EPISODES = itertools.count()
_STARTED = time.time()


class StopAtDigits(ToyRetryEnv):
    """ToyRetryEnv whose turns end at their first digit (the random toy policy samples one about every tenth
    token). With RLHF_TEST_ENV_LOG naming a folder, each episode's reset and turns are appended to
    <folder>/<RANK>-<pid>.jsonl: {"episode": n (this process's count), "started": the process's start,
    "text" and "reward" of a turn}, so a test can tell what each rank and each run did."""

    stop_strings = tuple("0123456789")

    def reset(self, prompt: str) -> list[dict]:
        messages = super().reset(prompt)
        self.episode = next(_EPISODES)
        _record({"episode": self.episode, "reset": True})
        return messages

    def step(self, text: str) -> tuple[list[dict], float, bool]:
        messages, reward, done = super().step(text)
        _record({"episode": self.episode, "text": text, "reward": reward})
        return messages, reward, done


def _record(row: dict) -> None:
    folder = os.environ.get(LOG_ENV)
    if folder:
        path = Path(folder) / f"{os.environ.get('RANK', '0')}-{os.getpid()}.jsonl"
        with path.open("a") as f:
            f.write(json.dumps({**row, "started": _STARTED}) + "\n")
