"""Best-of-N selection against a plain loop, the curve's n, and the KL of best-of-n."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rlhf.algos.best_of_n import best_of_first, best_of_n_kl, curve_ns


def kept_by_loop(rewards: list[float], ended: list[bool], n: int) -> int:
    best = None
    for i in range(n):
        key = (ended[i], rewards[i])
        if best is None or key > best[0]:
            best = (key, i)
    return best[1]


@pytest.mark.parametrize("seed", range(20))
def test_matches_a_loop_on_random_rewards_with_ties_and_cut_responses(seed):
    rng = random.Random(seed)
    prompts, samples = rng.randint(1, 6), rng.randint(1, 9)
    # Rounded rewards make ties common; the loop keeps the first of equal keys, as argmax must.
    rewards = [[round(rng.gauss(0, 3), 0) for _ in range(samples)] for _ in range(prompts)]
    ended = [[rng.random() < 0.6 for _ in range(samples)] for _ in range(prompts)]
    for n in range(1, samples + 1):
        got = best_of_first(torch.tensor(rewards, dtype=torch.float32), torch.tensor(ended), n).tolist()
        assert got == [kept_by_loop(r, e, n) for r, e in zip(rewards, ended)], (rewards, ended, n)


def test_an_ended_response_beats_a_cut_one_whatever_their_rewards():
    rewards = torch.tensor([[100.0, -100.0, 5.0]])
    assert best_of_first(rewards, torch.tensor([[False, True, False]]), 3).tolist() == [1]
    assert best_of_first(rewards, torch.tensor([[False, False, False]]), 3).tolist() == [0]


def test_the_kept_reward_never_falls_as_n_grows():
    torch.manual_seed(0)
    rewards, ended = torch.randn(50, 16), torch.rand(50, 16) < 0.7
    kept = [rewards.gather(1, best_of_first(rewards, ended, n)[:, None]).squeeze(1) for n in range(1, 17)]
    ends = [ended.gather(1, best_of_first(rewards, ended, n)[:, None]).squeeze(1) for n in range(1, 17)]
    for (r0, e0), (r1, e1) in zip(zip(kept, ends), zip(kept[1:], ends[1:])):
        # Per prompt, (ended, reward) of the kept response is non-decreasing in n.
        assert bool(((e1.int() > e0.int()) | ((e1 == e0) & (r1 >= r0))).all())


def test_n_out_of_range():
    with pytest.raises(ValueError, match="n must be in"):
        best_of_first(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), 4)


def test_curve_and_kl():
    assert curve_ns(1) == [1] and curve_ns(8) == [1, 2, 4, 8] and curve_ns(12) == [1, 2, 4, 8, 12]
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    # The closed form against the exact KL of the best-of-n distribution over M equally likely
    # outcomes with distinct rewards (outcome k is kept with probability (k^n - (k-1)^n) / M^n).
    for n in (2, 4, 16):
        m = 20000
        exact = sum(((k**n - (k - 1) ** n) / m**n) * math.log((k**n - (k - 1) ** n) / m**n * m) for k in range(1, m + 1))
        assert exact == pytest.approx(best_of_n_kl(n), abs=1e-3)
