"""The bookkeeping every training stage shares, so a stage file keeps only its algorithm.

A stage owns its loop; `RunKeeper` keeps what happens around it:

    keeper = RunKeeper(run, engines, dist)
    state = keeper.resume(MyState())       # the newest complete checkpoint, or `MyState()` at step 0
    if state.step == 0:
        keeper.record_baseline(state, evaluate(...))
    while state.step < max_steps:
        ...one optimizer step...; state.step += 1
        keeper.finish_step(state, loss=..., metrics=..., evaluate=lambda: evaluate(...))
        # = end_step (loss check, metrics), a periodic held-out evaluation when eval_due, then
        #   checkpoint_due: the periodic checkpoint, and the stop on SIGTERM/SIGUSR1
    keeper.log(state.step, evaluate(...))   # the final evaluation: printed as `final  ...`
    keeper.publish_model(...)               # each model folder and its registry entry
    keeper.close()

The state a stage carries across a resume is a dataclass it declares (a `LoopState` subclass):
saved in every checkpoint as plain values, restored with its type, never an untyped dict.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from rlhf.config import ModelConfig, TrainedConfig, to_dict
from rlhf.errors import StoppedBySignal, UserError
from rlhf.models.loading import ScalarModel
from rlhf.models.saving import save_final
from rlhf.models.sources import ModelSource, base_model_identity
from rlhf.models.tokenizer import tokenizer_fingerprint
from rlhf.protocols import CausalLM, Tokenizer, TrainEngine
from rlhf.store.registry import Entry, now_iso
from rlhf.store.runs import Run, mark_started
from rlhf.training.checkpoint import Engines, load_checkpoint, save_checkpoint
from rlhf.training.engine import Dist, full_state_dict
from rlhf.training.stop_signal import StopSignal
from rlhf.training.tracking import Tracker, print_warning


@dataclass
class LoopState:
    """What a stage's loop carries across a resume; stages subclass it to add their own fields."""

    step: int = 0
    """Optimizer steps done."""
    initial_eval: dict[str, float] = field(default_factory=dict)
    """The untrained model's held-out figures: the baseline every later figure is read against."""


State = TypeVar("State", bound=LoopState)


class RunKeeper:
    """Resume, metrics and progress, periodic checkpoints, stop signals and the registry entries
    of one stage run. `engines` is one DeepSpeed engine or a {name: engine} dict (PPO's actor and
    critic), checkpointed together."""

    def __init__(self, run: Run[TrainedConfig], engines: Engines, dist: Dist, *, headline: tuple[str, ...] | None = None) -> None:
        self.run, self.engines, self.dist, self.headline = run, engines, dist, headline
        self.cfg = run.config
        self.started = time.time()
        self._tracker: Tracker | None = None
        self.stop_signal = StopSignal(dist)

    @property
    def tracker(self) -> Tracker:
        """The run's metrics and console, opened by resume()."""
        assert self._tracker is not None, "resume() opens the tracker"
        return self._tracker

    def resume(self, fresh: State) -> State:
        """The state of the newest complete checkpoint of this run (engines and RNG restored with
        it), else `fresh`. Marks the run started, opens the metrics, listens for stop signals."""
        saved = load_checkpoint(self.engines, self.run.checkpoint_dir, dist=self.dist, warn=print_warning)
        state = fresh if saved is None else _restored(type(fresh), saved, self.run.checkpoint_dir)
        self.stop_signal.listen()
        if self.dist.is_main:
            mark_started(self.run)
        extra = {"headline": self.headline} if self.headline else {}
        self._tracker = Tracker(
            self.run.run_dir, active=self.dist.is_main, tracking=self.cfg.tracking, config=to_dict(self.cfg),
            run_id=self.run.run_id, total_steps=self.cfg.train.max_steps, start_step=state.step,
            description=f"{self.run.stage} {self.run.run_id}", **extra,
        )
        if state.step:
            self.tracker.print(f"resumed {self.run.run_id} at step {state.step}")
        return state

    def record_baseline(self, state: LoopState, metrics: dict[str, float]) -> None:
        """Keep and log the untrained model's held-out figures (step 0)."""
        state.initial_eval = metrics
        self.tracker.log(0, metrics)

    def print(self, text: str) -> None:
        self.tracker.print(text)

    def log(self, step: int, metrics: Mapping[str, float | None]) -> None:
        """Log held-out figures. One logged at train.max_steps is the stage's final evaluation
        (`eval_due` never falls on the last step): the same metrics row, printed as a `final  ...`
        line rather than a second `step N/N` line with other figures than the first."""
        self.tracker.log(step, metrics, final=step >= self.cfg.train.max_steps)

    def should_log(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.max_steps

    def eval_due(self, step: int) -> bool:
        """A periodic held-out evaluation after `step` (the final one is the stage's own)."""
        every = self.cfg.train.eval_every
        return bool(every) and step < self.cfg.train.max_steps and step % every == 0

    def end_step(self, state: LoopState, *, loss: float, metrics: Mapping[str, float | None] | None) -> None:
        """After optimizer step `state.step`: stop on a non-finite loss, log `metrics` (when given)."""
        if not math.isfinite(loss):
            raise UserError(
                f"the training loss became {loss} at step {state.step}; the run stopped. Lower optim.lr, "
                "or use engine.precision=bf16/fp32 instead of fp16, and start a new run"
            )
        if metrics is not None:
            self.tracker.log(state.step, metrics)
        else:
            self.tracker.advance(state.step)

    def finish_step(self, state: LoopState, *, loss: float, metrics: Mapping[str, float | None] | None,
                    evaluate: Callable[[], dict[str, float]]) -> None:
        """After optimizer step `state.step`, in the one order every stage's loop keeps: `end_step` (the
        step's loss checked, its metrics logged), the periodic held-out `evaluate()` when eval_due, then
        `checkpoint_due` (a stop signal stops the run there, after the step's figures are written)."""
        self.end_step(state, loss=loss, metrics=metrics)
        if self.eval_due(state.step):
            self.log(state.step, evaluate())
        self.checkpoint_due(state)

    def checkpoint_due(self, state: LoopState) -> None:
        """The periodic resumable checkpoint; on a stop signal (any rank), a checkpoint and a stop."""
        train = self.cfg.train
        if state.step >= train.max_steps:
            return
        saved = bool(train.save_every) and state.step % train.save_every == 0
        if saved:
            self.save(state)
        if self.stop_signal.requested():
            self._stop(state, saved=saved)

    def save(self, state: LoopState) -> None:
        """A resumable checkpoint of every engine and of `state`, as of `state.step` finished steps."""
        save_checkpoint(self.engines, self.run.checkpoint_dir, step=state.step, client_state=dataclasses.asdict(state),
                        keep=self.cfg.train.keep_checkpoints, dist=self.dist)

    def stop_nonfinite(self, state: LoopState, what: str) -> None:
        """Stop the run because `what` is NaN or inf during step `state.step` + 1 (every rank calls
        this together), after saving the last state for inspection."""
        self.stop(state, f"{what} became NaN or inf in step {state.step + 1}; the run stopped and saved its state in "
                         f"{self.run.checkpoint_dir}. Lower optim.lr (or critic_optim.lr), use engine.precision=bf16/fp32 "
                         "instead of fp16, and start a new run")

    def stop(self, state: LoopState, message: str) -> None:
        """Save the state of `state.step` finished steps and stop with `message` (every rank calls this together)."""
        self.save(state)
        self.tracker.close()
        raise UserError(message)

    def _stop(self, state: LoopState, *, saved: bool) -> None:
        if not saved:
            self.save(state)
        name = self.stop_signal.name
        self.tracker.print(
            f"[yellow]{name}: stopped after step {state.step} with a checkpoint[/]; `rlhf {self.run.stage} --resume "
            f"--run {self.run.run_id}` continues it (a requeued SLURM job does so itself)"
        )
        self.tracker.close()
        raise StoppedBySignal(name)

    def summary(self, state: LoopState, final_eval: dict[str, float]) -> dict[str, float]:
        """The final and the initial held-out figures, named for the registry (`initial_` prefixed)."""
        return {
            **{k.removeprefix("eval/"): v for k, v in final_eval.items()},
            **{f"initial_{k.removeprefix('eval/')}": v for k, v in state.initial_eval.items()},
        }

    def publish_model(self, engine: TrainEngine[CausalLM] | TrainEngine[ScalarModel], *, source: ModelSource, model_cfg: ModelConfig,
                      tokenizer: Tokenizer, metrics: dict[str, Any], parents: tuple[str, ...] = (), companion: str | None = None,
                      extra_files: dict[str, str] | None = None) -> None:
        """Gather `engine`'s full weights (every rank calls this), save them as a `save_pretrained`
        folder on the main rank, then publish its registry entry (so an entry only ever points at a
        complete folder). The run's own model is entry `<run id>` in `run.final_dir`; a `companion`
        (PPO's critic) is entry `<run id>-<companion>` in its own folder of the run. `parents`
        defaults to the source's entry."""
        weights = full_state_dict(engine, dist=self.dist)
        if not self.dist.is_main:
            return
        assert weights is not None  # gathered on the main rank
        folder = self.run.final_dir if companion is None else self.run.run_dir / companion
        adapter = save_final(engine.module, weights, tokenizer, folder, lora=model_cfg.lora, extra_files=extra_files)
        if companion is None:
            metrics = {**metrics, "wall_time_s": round(time.time() - self.started, 1)}
        entry = self.run.publish(Entry(
            id=self.run.run_id if companion is None else f"{self.run.run_id}-{companion}",
            stage=companion or self.run.stage, status="completed", created=now_iso(), path=str(folder),
            run_dir=str(self.run.run_dir), config=to_dict(self.cfg), parents=(parents or source.parents) + self._data_parents(),
            base_model=base_model_identity(source, model_cfg), tokenizer=tokenizer_fingerprint(tokenizer),
            metrics=metrics, adapter=adapter, tags=tuple(self.cfg.run.tags),
        ))
        if companion is not None:
            self.tracker.print(f"[green]{companion} saved[/]: {entry.id} -> {entry.path}")
            return
        self.tracker.print(f"[green]{self.run.stage} finished[/]: {entry.id} -> {entry.path}")
        self.tracker.print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))

    def _data_parents(self) -> tuple[str, ...]:
        """The dataset entries (labeled comparisons, best-of-N rows) whose files this run trained on, for lineage."""
        found = []
        for name in ("train", "eval"):
            value = getattr(self.cfg.data, name, None)
            holder = self.run.registry.entry_holding(value) if isinstance(value, str) and Path(value).is_file() else None
            if holder is not None:
                found.append(holder.id)
        return tuple(dict.fromkeys(found))

    def close(self) -> None:
        """Close the metrics and wait for every rank (after the last publish)."""
        self.tracker.close()
        torch.distributed.barrier()


def _restored(kind: type[State], saved: dict[str, Any], where: Path) -> State:
    """`kind` from a checkpoint's saved state; a field this version does not know means the
    checkpoint came from another stage or version, which resuming would silently misread."""
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise UserError(f"the checkpoint in {where} holds state this stage does not know ({', '.join(unknown)}); "
                        "it was written by another stage or version: start a new run")
    return kind(**saved)
