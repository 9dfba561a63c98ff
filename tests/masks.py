"""Test-only: random response masks for checking masked math against plain loops."""

from __future__ import annotations

import torch

PATTERNS = ["prefix", "holes"]


def random_mask(gen: torch.Generator, pattern: str, *, rows: int, cols: int) -> torch.Tensor:
    """(rows, cols) bool mask: random-length prefixes or random holes; no row is all padding."""
    if pattern == "prefix":
        lengths = torch.randint(1, cols + 1, (rows,), generator=gen)
        return torch.arange(cols).unsqueeze(0) < lengths.unsqueeze(1)
    mask = torch.rand(rows, cols, generator=gen) < 0.6
    keep = torch.randint(0, cols, (rows,), generator=gen)
    mask[torch.arange(rows), keep] = True
    return mask
