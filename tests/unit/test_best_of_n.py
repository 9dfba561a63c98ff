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


def kept_by_sorting(rewards: list[float], ended: list[bool], n: int) -> int:
    """The documented order, spelled out in float64: ended first, then any number before NaN, then
    the larger reward, then the earlier sample."""
    nan = [math.isnan(r) for r in rewards]
    return min((not ended[i], nan[i], 0.0 if nan[i] else -rewards[i], i) for i in range(n))[3]


@pytest.mark.parametrize("seed", range(20))
def test_nan_and_inf_rewards_are_ranked_per_row_like_the_sorted_order(seed):
    rng = random.Random(seed)
    prompts, samples = rng.randint(1, 6), rng.randint(1, 9)
    pool = [math.nan, math.inf, -math.inf, 1e308, -1e308, 3e38, 0.0, 1.0, -2.0]
    rewards = [[rng.choice(pool) if rng.random() < 0.4 else round(rng.gauss(0, 3), 0) for _ in range(samples)] for _ in range(prompts)]
    ended = [[rng.random() < 0.5 for _ in range(samples)] for _ in range(prompts)]
    for dtype in (torch.float64, torch.float32):
        r = torch.tensor(rewards, dtype=torch.float64).to(dtype)  # 1e308 becomes inf in float32
        as_float = r.double().tolist()
        for n in range(1, samples + 1):
            got = best_of_first(r, torch.tensor(ended), n).tolist()
            assert got == [kept_by_sorting(v, e, n) for v, e in zip(as_float, ended)], (rewards, ended, n, dtype)


def test_one_nan_inf_or_huge_spread_in_the_batch_does_not_let_cut_responses_win():
    # The old batch-wide lift (max - min + 1) became NaN or inf here and a cut response won row 0.
    eos = torch.tensor([[False, True, True], [True, False, False]])
    assert best_of_first(torch.tensor([[2.0, 2.0, 3.0], [0.0, 5.0, math.nan]]), eos, 3).tolist() == [2, 0]
    assert best_of_first(torch.tensor([[2.0, 2.0, 3.0], [0.0, math.inf, 1.0]]), eos, 3).tolist() == [2, 0]
    huge = torch.tensor([[1e308, -1e308, -1e308], [-1e308, 1e308, 0.0]], dtype=torch.float64)
    assert best_of_first(huge, eos, 3).tolist() == [1, 0]
    # NaN never beats a number, -inf included; an all-NaN row keeps its first candidate.
    nans = torch.tensor([[math.nan, -math.inf, math.nan], [math.nan, math.nan, 7.0]])
    assert best_of_first(nans, torch.ones(2, 3, dtype=torch.bool), 3).tolist() == [1, 2]
    assert best_of_first(nans, torch.tensor([[True, False, True], [False, True, False]]), 3).tolist() == [0, 1]
    assert best_of_first(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.bool), 2).tolist() == []


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
