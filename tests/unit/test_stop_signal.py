"""StopSignal: a stop signal to any rank stops every rank at the same point."""

from __future__ import annotations

import os
import signal

import torch

from rlhf.training.engine import Dist
from rlhf.training.stop_signal import StopSignal
from tests.ranks import on_ranks


def test_one_rank_sees_its_own_signal():
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        previous = signal.getsignal(sig)
        stop = StopSignal(Dist(0, 1, 0, torch.device("cpu")))
        stop.listen()
        try:
            assert not stop.requested()
            os.kill(os.getpid(), sig)
            assert stop.requested() and stop.name == sig.name
        finally:
            signal.signal(sig, previous)


def _rank(rank: int, world: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    stop = StopSignal(Dist(rank, world, rank, torch.device("cpu")))
    stop.listen()
    seen = [stop.requested()]
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is told
    seen.append(stop.requested())
    out[rank] = (seen, stop.name if stop.signum else None)
    torch.distributed.destroy_process_group()


def test_a_signal_to_one_rank_stops_every_rank():
    out = on_ranks(_rank)
    assert out[0] == out[1] == ([False, True], "SIGUSR1")
