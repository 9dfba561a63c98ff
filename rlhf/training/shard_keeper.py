"""The bookkeeping of a stage that writes its output shard by shard (bon, sample, label), so a stage
file keeps only what it writes. `RunKeeper`'s counterpart for stages with no optimizer: a shard file
on disk is done, so the shards already written are the resume, and a stop comes between shards.

    keeper = ShardKeeper(run, dist, shards=len(shards), headline=...)
    done = keeper.resume()              # shards already on disk (written in order)
    for index in range(done, len(shards)):
        ...rank 0 writes keeper.shard_path(index) whole...
        keeper.finish_shard(index, metrics)
        # = the shard's metrics logged as step index + 1, then the stop on SIGTERM/SIGUSR1
    ...the dataset folder and the registry entry...
    keeper.close()
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf.config import StageConfig, to_dict
from rlhf.errors import StoppedBySignal
from rlhf.store.runs import Run, mark_started
from rlhf.training.engine import Dist
from rlhf.training.stop_signal import StopSignal
from rlhf.training.tracking import Tracker

SHARDS = "shards"


class ShardKeeper:
    """Resume, metrics and progress, and stop signals of one run writing `shards` shards. The
    progress counts `total_steps` (default: the shards); `stop_note` ends the stop message."""

    def __init__(self, run: Run[StageConfig], dist: Dist, *, shards: int, headline: tuple[str, ...], total_steps: int | None = None,
                 stop_note: str = "") -> None:
        self.run, self.dist, self.shards, self.headline, self.stop_note = run, dist, shards, headline, stop_note
        self.total_steps = shards if total_steps is None else total_steps
        self.stop_signal = StopSignal(dist)
        self._tracker: Tracker | None = None

    @property
    def tracker(self) -> Tracker:
        """The run's metrics and console, opened by resume()."""
        assert self._tracker is not None, "resume() opens the tracker"
        return self._tracker

    def shard_path(self, index: int) -> Path:
        return self.run.run_dir / SHARDS / f"{index:05d}.jsonl"

    def resume(self) -> int:
        """How many shards are on disk already (rank 0 writes them in order). Listens for stop
        signals, marks the run started, opens the metrics at that shard, makes the shards folder."""
        self.stop_signal.listen()
        if self.dist.is_main:
            mark_started(self.run)
        done = sum(1 for index in range(self.shards) if self.shard_path(index).exists())
        run = self.run
        self._tracker = Tracker(run.run_dir, active=self.dist.is_main, tracking=run.config.tracking, config=to_dict(run.config),
                                run_id=run.run_id, total_steps=self.total_steps, start_step=done,
                                description=f"{run.stage} {run.run_id}", headline=self.headline)
        (run.run_dir / SHARDS).mkdir(exist_ok=True)
        return done

    def print(self, text: str) -> None:
        self.tracker.print(text)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.tracker.log(step, metrics)

    def finish_shard(self, index: int, metrics: dict[str, float]) -> None:
        """After shard `index` is written, in the one order every shard stage keeps: its
        metrics logged (as step index + 1), then a stop signal (any rank) stops the run there."""
        self.tracker.log(index + 1, metrics)
        if self.stop_signal.requested():
            name = self.stop_signal.name
            self.tracker.print(f"[yellow]{name}: stopped after shard {index + 1} of {self.shards}[/]; "
                               f"`rlhf {self.run.stage} --resume --run {self.run.run_id}` continues it{self.stop_note}")
            self.tracker.close()
            raise StoppedBySignal(name)

    def close(self) -> None:
        """Close the metrics and wait for every rank (after the main rank published)."""
        self.tracker.close()
        torch.distributed.barrier()
