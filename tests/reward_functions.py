"""Reward functions for the tests of `reward.name_or_path=python:tests.reward_functions:NAME`:
importable by dotted name with the repository root on PYTHONPATH (as the tests run)."""

from __future__ import annotations

import os

NOT_A_FUNCTION = 3


def response_length(prompts: list[str], responses: list[str]) -> list[float]:
    """A good one: each response's length in characters (its digits on the embedded default)."""
    return [float(len(r)) for r in responses]


def raises(prompts: list[str], responses: list[str]) -> list[float]:
    raise RuntimeError("reward server unreachable")


def one_too_few(prompts: list[str], responses: list[str]) -> list[float]:
    return [0.0] * (len(responses) - 1)


def not_finite(prompts: list[str], responses: list[str]) -> list[float]:
    return [float("nan")] * len(responses)


def strings(prompts: list[str], responses: list[str]) -> list[str]:
    return list(responses)


def raises_on_rank_1(prompts: list[str], responses: list[str]) -> list[float]:
    """Fails on the second rank only: every rank must still stop, and rank 0 must say why."""
    if os.environ.get("RANK") == "1":
        raise RuntimeError("reward server unreachable from rank 1")
    return [0.0] * len(responses)


def prompt_parity(prompts: list[str], responses: list[str]) -> list[float]:
    """0 for every response to a prompt whose last character before the end is even ("a+b=" with b even: a group of
    them is all equal, dynamic sampling drops it); else a number that varies with the response's text."""
    return [float(sum(map(ord, r)) % 7) if ord(p.rstrip()[-2]) % 2 else 0.0 for p, r in zip(prompts, responses)]


def constant(prompts: list[str], responses: list[str]) -> list[float]:
    """The same score for every response: every group is all equal."""
    return [0.5] * len(responses)
