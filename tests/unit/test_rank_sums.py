"""RankSums: named float64 sums, reduced over ranks in one collective, aligned by name."""

from __future__ import annotations

import os

import pytest
import torch

from rlhf.rank_sums import RankSums
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
