"""Named sums over every rank, accumulated on the device and reduced in one collective.

Metrics that are means over all ranks' rows (accuracy, mean KL, mean loss) are sums of numerators
and denominators first. Naming them keeps a stage from matching a positional list by hand, and
accumulating tensors keeps the loop free of per-batch host syncs: the one sync is `over_ranks`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class RankSums:
    """Float64 running sums of a fixed set of names.

    Every rank declares the same names, so the reduced vector lines up across ranks whatever order
    each rank adds in; adding an undeclared name is a KeyError, not a silent misalignment.
    """

    def __init__(self, names: Iterable[str], device: torch.device | None = None) -> None:
        self._names = tuple(names)
        if len(set(self._names)) != len(self._names):
            raise ValueError(f"names must be distinct: {self._names}")
        self._totals = torch.zeros(len(self._names), dtype=torch.float64, device=device)
        self._index = {name: i for i, name in enumerate(self._names)}

    def add(self, **values: torch.Tensor | float) -> None:
        """Add each value to the sum of its name. A tensor is summed over all its elements in its own
        dtype, as `.sum().item()` would (pass `.double()` for a float64 sum), then added in float64."""
        for name, value in values.items():
            if name not in self._index:
                raise KeyError(f"{name!r} is not one of the declared sums {self._names}")
            if isinstance(value, torch.Tensor):
                value = value.detach().sum().to(torch.float64)
            self._totals[self._index[name]] += value

    def over_ranks(self) -> dict[str, float]:
        """Each name's sum over every rank (one all-reduce, one host sync)."""
        totals = self._totals.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        return dict(zip(self._names, totals.tolist()))
