"""RankSums: named float64 sums, reduced over ranks in one collective, aligned by name; and
masked_moments, whose two all-reduces give every rank the moments of all ranks' values."""

from __future__ import annotations

import math
import os

import pytest
import torch

from rlhf.algos.ppo import masked_moments, masked_whiten
from rlhf.training.rank_sums import RankSums
from tests.ranks import on_ranks


def test_sums_by_name_each_tensor_in_its_own_dtype_then_in_float64():
    sums = RankSums(("correct", "pairs", "gap", "gap64"))
    gaps = torch.tensor([0.5, -0.25, 1e-9], dtype=torch.float32)
    sums.add(correct=(gaps > 0), pairs=float(len(gaps)), gap=gaps, gap64=gaps.double())
    sums.add(gap=torch.tensor([[1.0, 2.0]]), pairs=2, gap64=1e-12)
    out = sums.over_ranks()
    assert list(out) == ["correct", "pairs", "gap", "gap64"]
    assert out["correct"] == 2.0 and out["pairs"] == 5.0
    # As `.sum().item()` gives: float32 loses the 1e-9 inside the tensor, float64 keeps both.
    assert out["gap"] == gaps.sum().item() + 3.0 == 3.25
    assert out["gap64"] == pytest.approx(0.25 + float(torch.tensor(1e-9, dtype=torch.float32)) + 1e-12, abs=1e-18)


def test_an_undeclared_or_repeated_name_is_refused():
    with pytest.raises(KeyError, match="kl"):
        RankSums(("score",)).add(kl=1.0)
    with pytest.raises(ValueError):
        RankSums(("score", "score"))


def _rank(rank: int, world: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    sums = RankSums(("a", "b"))
    # Ranks add in different orders and different counts: the reduction still lines up by name.
    if rank == 0:
        sums.add(a=torch.tensor([1.0, 2.0]))
        sums.add(b=10.0)
    else:
        sums.add(b=torch.tensor(5.0), a=0.5)
        sums.add(b=1.0)
    out[rank] = sums.over_ranks()
    torch.distributed.destroy_process_group()


def test_two_ranks_sum_by_name():
    out = on_ranks(_rank)
    assert out[0] == out[1] == {"a": 3.5, "b": 16.0}


def _rows_of(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s rows: values near 1e8 (where one-pass E[x^2] - E[x]^2 has no digits left), a
    spread and a mean that differ by rank, and 1e30 garbage at the padding."""
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(3 + rank, 6, generator=gen, dtype=torch.float64) * (1 + 3 * rank) + 1e8 + 2.5 * rank
    mask = torch.rand(x.shape, generator=gen) < 0.7
    return torch.where(mask, x, 1e30), mask


def _moments_rank(rank: int, world: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    x, mask = _rows_of(rank)
    mean, var = masked_moments(x, mask, all_reduce=torch.distributed.all_reduce)
    out[rank] = (mean, var, masked_whiten(x, mask, mean=mean, var=var)[mask].tolist())
    torch.distributed.destroy_process_group()


def test_two_ranks_whiten_values_far_from_zero_like_their_concatenation():
    out = on_ranks(_moments_rank)
    valid = []
    for rank in (0, 1):
        x, mask = _rows_of(rank)
        valid += x[mask].tolist()
    mean = math.fsum(valid) / len(valid)
    var = math.fsum((v - mean) ** 2 for v in valid) / len(valid)
    assert out[0][:2] == out[1][:2]  # every rank whitens with the same statistics
    assert out[0][:2] == pytest.approx((mean, var), rel=1e-12)
    whitened = out[0][2] + out[1][2]
    assert whitened == pytest.approx([(v - mean) / math.sqrt(var + 1e-8) for v in valid], rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_pearson_and_pair_agreement_equal_plain_float64_computations(seed):
    import numpy as np

    from rlhf.training.evaluation import pair_agreement, pearson

    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=50) * 3 + 100, rng.normal(size=50)
    y = y + 0.5 * x
    expected = float(np.corrcoef(x, y)[0, 1])
    got = pearson(50, x.sum(), (x * x).sum(), y.sum(), (y * y).sum(), (x * y).sum())
    assert got == pytest.approx(expected, abs=1e-9)
    assert math.isnan(pearson(3, 3.0, 3.0, 1.0, 1.0, 1.0))  # x constant
    gold = rng.integers(0, 3, size=12).astype(float).tolist()
    proxy = rng.normal(size=12).tolist()
    pairs = [(i, j) for i in range(12) for j in range(i + 1, 12) if gold[i] != gold[j]]
    agreed = sum((proxy[i] > proxy[j]) == (gold[i] > gold[j]) for i, j in pairs)
    assert pair_agreement(proxy, gold) == (len(pairs), agreed)
