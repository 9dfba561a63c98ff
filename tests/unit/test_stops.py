"""Turns that end in generation (rlhf/rollouts/stops.py) on the toy model: the tokens each row keeps are,
seed for seed, those that generating to the budget and cutting afterwards kept (the cut multi-turn
rollouts made before), and generation ends as soon as the last row has."""

from __future__ import annotations

import string

import pytest
import torch

from rlhf.rollouts.generation import Sampling, generate
from rlhf.rollouts.stops import generate_turns
from rlhf.toy import ToyModelConfig, build_model, build_tokenizer

MAX_NEW = 24
PROMPTS = ["12+34=", "7+5=", "40+60=1", "99+1=", "3+4=", "58+84=", "1+1=", "66+6="]


@pytest.fixture(scope="module")
def toy():
    tokenizer = build_tokenizer()
    return tokenizer, build_model(ToyModelConfig(), tokenizer, seed=0).eval()


def old_cut(tokenizer, tokens: list[int], stops: tuple[str, ...], budget: int) -> list[int]:
    """The cut of a turn generated to its end: after the first token with which its decoded text holds a
    stop string, then to the budget (the code this replaces)."""
    if stops and any(s in tokenizer.decode(tokens) for s in stops):
        tokens = tokens[: next(k for k in range(1, len(tokens) + 1) if any(s in tokenizer.decode(tokens[:k]) for s in stops))]
    return tokens[:budget]


def both_ways(toy, seed: int, stops: tuple[str, ...], *, budgets: list[int], temperature: float = 1.0, pad_is_eos: bool = False):
    tokenizer, model = toy
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    eos = tokenizer.eos_token_id
    sampling = Sampling(pad_id=eos if pad_is_eos else tokenizer.pad_token_id, eos_id=eos, max_new_tokens=MAX_NEW,
                        temperature=temperature)
    calls = [0]  # the model's forwards in the second call: one per generated column
    torch.manual_seed(seed)
    before = [old_cut(tokenizer, t, stops, b) for t, b in zip(generate(model, prompts, sampling), budgets)]
    torch.manual_seed(seed)
    hook = model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        after = generate_turns(model, prompts, sampling, tokenizer=tokenizer, stops=stops, budgets=budgets)
    finally:
        hook.remove()
    return before, after, calls[0]


def stops_in(tokenizer, turns: list[list[int]]) -> tuple[str, ...]:
    """Two-token stop strings that a stop-free run of this seed generated (so some rows meet one)."""
    return tuple(tokenizer.decode(t[4:6]) for t in turns[:3] if len(t) >= 6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_the_tokens_kept_are_those_the_old_cut_kept(toy, seed, pad_is_eos):
    tokenizer, model = toy
    budgets = [MAX_NEW] * len(PROMPTS)
    free = both_ways(toy, seed, (), budgets=budgets, pad_is_eos=pad_is_eos)[1]
    # Stops a third of the tokens meet (the random toy samples its 100 tokens about evenly), and rarer ones.
    frequent = tuple(string.digits + string.ascii_lowercase)
    for stops in (frequent, stops_in(tokenizer, free)):
        before, after, steps = both_ways(toy, seed, stops, budgets=budgets, pad_is_eos=pad_is_eos)
        assert after == before
        stopped = [t for t in after if t[-1] != tokenizer.eos_token_id and any(s in tokenizer.decode(t) for s in stops)]
        assert stopped, "no row met a stop string: the case proves nothing"
        for turn in stopped:  # each ends with the token that completes its first stop string
            assert not any(s in tokenizer.decode(turn[:-1]) for s in stops)
        # Generating to the budget took MAX_NEW steps (unless every row met EOS); this ends with its longest turn.
        assert steps == max(len(t) for t in after)
        assert steps < MAX_NEW or stops != frequent


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rows_end_at_their_own_budget(toy, seed, temperature):
    budgets = [1, 3, 24, 5, 2, 24, 7, 4]
    before, after, steps = both_ways(toy, seed, ("5", "x"), budgets=budgets, temperature=temperature)
    assert after == before and all(len(t) <= b for t, b in zip(after, budgets)) and len(after[0]) == 1
    assert steps == max(len(t) for t in after)


def test_no_stop_strings_and_no_budgets_is_plain_generation(toy):
    tokenizer, model = toy
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    sampling = Sampling(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=MAX_NEW)
    torch.manual_seed(3)
    plain = generate(model, prompts, sampling)
    torch.manual_seed(3)
    assert generate_turns(model, prompts, sampling, tokenizer=tokenizer, stops=()) == plain
