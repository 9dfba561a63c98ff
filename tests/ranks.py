"""Run a function on two gloo ranks in fresh processes and collect what each rank returns."""

from __future__ import annotations

import socket
from typing import Any, Callable

import torch.multiprocessing as mp


def on_ranks(fn: Callable[..., None], world: int = 2) -> dict[int, Any]:
    """`fn(rank, world, port, out)` on `world` spawned processes (a module-level function: spawn
    pickles it by name); each rank puts its result in `out[rank]`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(fn, args=(world, port, out), nprocs=world, join=True)
        return dict(out)
