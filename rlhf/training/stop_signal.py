"""SIGTERM/SIGUSR1 as "finish what is in flight, save, stop", agreed on by every rank.

SLURM sends SIGTERM (or the `--signal` of the job) before it preempts or requeues a job. The handler
only sets a flag; the stage asks `requested()` between units of work (a training step, a best-of-N
shard), where one all-reduce makes every rank see the signal any rank got, so all of them stop at
the same point (ranks may receive it a step apart).
"""

from __future__ import annotations

import signal
from types import FrameType

import torch

from rlhf.training.engine import Dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Signals that mean "save and stop"."""


class StopSignal:
    def __init__(self, dist: Dist) -> None:
        self.dist, self.signum = dist, 0

    def listen(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._request)

    def _request(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def requested(self) -> bool:
        """True on every rank once any rank got a stop signal; a collective call on every rank."""
        if self.dist.world_size > 1:
            flag = torch.tensor([self.signum], dtype=torch.int32, device=self.dist.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.signum = int(flag.item())
        return self.signum != 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name
