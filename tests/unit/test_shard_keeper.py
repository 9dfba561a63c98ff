"""ShardKeeper, what bon, sample and label share: the shards on disk are the resume, and a stop
signal stops the run between shards, after the shard's figures are written."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from rlhf.config import SampleConfig, load_config
from rlhf.errors import StoppedBySignal
from rlhf.store.runs import STARTED_FILE, Run
from rlhf.training.engine import Dist
from rlhf.training.shard_keeper import ShardKeeper
from rlhf.training.stop_signal import STOP_SIGNALS
from rlhf.training.tracking import METRICS_FILE

ONE_RANK = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture
def keeper(tmp_path):
    """A keeper of 4 shards of a sample run; the stop-signal handlers it installs are put back after."""
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    run = Run("sample", "sample-x", tmp_path, load_config(SampleConfig), registry=None)
    yield ShardKeeper(run, ONE_RANK, shards=4, headline=("ended",), stop_note=" (or a requeued job)")
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def rows(keeper: ShardKeeper) -> list[dict]:
    return [json.loads(line) for line in (keeper.run.run_dir / METRICS_FILE).read_text().splitlines()]


def test_a_resume_starts_after_the_shards_on_disk_and_logs_each_shard_as_its_step(keeper):
    keeper.run.run_dir.joinpath("shards").mkdir()
    for index in (0, 1):
        keeper.shard_path(index).write_text("{}\n")
    assert keeper.resume() == 2
    assert (keeper.run.run_dir / STARTED_FILE).exists()
    keeper.finish_shard(2, {"ended": 0.5})
    keeper.tracker.close()
    assert [(row["step"], row["ended"]) for row in rows(keeper)] == [(3, 0.5)]
    assert keeper.shard_path(3) == keeper.run.run_dir / "shards" / "00003.jsonl"


def test_a_stop_signal_stops_after_the_shard_it_came_in_with_the_shards_figures_written(keeper, capsys):
    assert keeper.resume() == 0
    keeper.finish_shard(0, {"ended": 1.0})  # no signal yet: goes on
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(StoppedBySignal):
        keeper.finish_shard(1, {"ended": 0.25})
    assert [row["step"] for row in rows(keeper)] == [1, 2]
    printed = " ".join(capsys.readouterr().out.split())
    assert ("SIGTERM: stopped after shard 2 of 4; `rlhf sample --resume --run sample-x` continues it (or a requeued job)"
            in printed), printed
