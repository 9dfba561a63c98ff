"""The plumbing every training stage shares, so a stage file keeps only its algorithm.

`StageLoop` resumes a run (or measures the untrained baseline), keeps the metrics and progress,
runs the periodic evaluations and checkpoints, stops on a non-finite loss, stops with a checkpoint
when asked to (SIGTERM or SIGUSR1: a preempted or requeued SLURM job), and at the end publishes
the registry entry after the final folder is complete.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch

from rlhf.checkpoint import load_checkpoint, save_checkpoint
from rlhf.config import to_dict
from rlhf.engine import Dist
from rlhf.errors import StoppedBySignal, UserError
from rlhf.model_sources import ModelSource, base_model_identity
from rlhf.registry import Entry, now_iso
from rlhf.runs import Run, mark_started
from rlhf.tokenizer import tokenizer_fingerprint
from rlhf.tracking import Tracker, print_warning

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Signals that mean "save and stop": SLURM sends SIGTERM before it preempts or requeues a job."""


class StageLoop:
    def __init__(
        self,
        run: Run,
        engines: Any,
        dist: Dist,
        *,
        evaluate: Callable[[], dict[str, float]],
        headline: tuple[str, ...] | None = None,
    ) -> None:
        # One engine, or a {name: engine} dict (PPO's actor and critic) checkpointed together.
        self.run, self.engines, self.dist, self.evaluate = run, engines, dist, evaluate
        self.cfg = run.config
        self.started = time.time()
        self._stop_signal = 0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._request_stop)
        # Resume from the last complete checkpoint of this run, if any.
        self.state: dict[str, Any] = load_checkpoint(engines, run.checkpoint_dir, dist=dist, warn=print_warning) or {"step": 0}
        if dist.is_main:
            mark_started(run)
        extra = {"headline": headline} if headline else {}
        self.tracker = Tracker(
            run.run_dir, active=dist.is_main, tracking=self.cfg.tracking, config=to_dict(self.cfg), run_id=run.run_id,
            total_steps=self.cfg.train.max_steps, start_step=self.step, description=f"{run.stage} {run.run_id}", **extra,
        )
        if self.step:
            self.tracker.print(f"resumed {run.run_id} at step {self.step}")
        else:
            # The untrained model's figures, the baseline every later score is read against.
            self.state["initial_eval"] = evaluate()
            self.tracker.log(0, self.state["initial_eval"])

    @property
    def step(self) -> int:
        """Optimizer steps done (restored on resume)."""
        return self.state["step"]

    def should_log(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.max_steps

    def end_step(self, step: int, loss: float, metrics: dict[str, float] | None) -> None:
        """After optimizer step `step`: stop on a non-finite loss, log `metrics` (when given),
        then the periodic held-out evaluation and resumable checkpoint."""
        if not math.isfinite(loss):
            raise UserError(
                f"the training loss became {loss} at step {step}; the run stopped. Lower optim.lr, "
                "or use engine.precision=bf16/fp32 instead of fp16, and start a new run"
            )
        train = self.cfg.train
        if metrics is not None:
            self.tracker.log(step, metrics)
        else:
            self.tracker.advance(step)
        if step < train.max_steps:
            if train.eval_every and step % train.eval_every == 0:
                self.tracker.log(step, self.evaluate())
            if train.save_every and step % train.save_every == 0:
                self.save(step)
            if self._stop_requested_on_any_rank():
                self._stop(step, saved=bool(train.save_every) and step % train.save_every == 0)

    def _request_stop(self, signum: int, frame: Any) -> None:
        # Only a flag: the step in flight finishes, then every rank saves at the same step.
        self._stop_signal = signum

    def _stop_requested_on_any_rank(self) -> bool:
        """True on every rank once any rank got a stop signal (ranks may see it a step apart)."""
        if self.dist.world_size == 1:
            return self._stop_signal != 0
        flag = torch.tensor([self._stop_signal], dtype=torch.int32, device=self.dist.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self._stop_signal = int(flag.item())
        return self._stop_signal != 0

    def _stop(self, step: int, *, saved: bool) -> None:
        if not saved:
            self.save(step)
        name = signal.Signals(self._stop_signal).name
        self.tracker.print(
            f"[yellow]{name}: stopped after step {step} with a checkpoint[/]; `rlhf {self.run.stage} --resume "
            f"--run {self.run.run_id}` continues it (a requeued SLURM job does so itself)"
        )
        self.tracker.close()
        raise StoppedBySignal(name)

    def save(self, step: int) -> None:
        """A resumable checkpoint of every engine and of `state`, as of `step` finished steps."""
        self.state["step"] = step
        save_checkpoint(self.engines, self.run.checkpoint_dir, step=step, client_state=self.state,
                        keep=self.cfg.train.keep_checkpoints, dist=self.dist)

    def stop_nonfinite(self, step: int, what: str) -> None:
        """Stop the run because `what` is NaN or inf during step `step` + 1 (every rank must call
        this together), after saving the last state for inspection."""
        self.save(step)
        self.tracker.close()
        raise UserError(
            f"{what} became NaN or inf in step {step + 1}; the run stopped and saved its state in "
            f"{self.run.checkpoint_dir}. Lower optim.lr (or critic_optim.lr), use engine.precision=bf16/fp32 "
            "instead of fp16, and start a new run"
        )

    def summary(self, final_eval: dict[str, float]) -> dict[str, float]:
        """The final and the initial held-out figures, named for the registry (`initial_` prefixed)."""
        return {
            **{k.removeprefix("eval/"): v for k, v in final_eval.items()},
            **{f"initial_{k.removeprefix('eval/')}": v for k, v in self.state.get("initial_eval", {}).items()},
        }

    def publish_companion(self, *, stage: str, path: Path, parents: tuple[str, ...], base_model: str, tokenizer: Any,
                          metrics: dict[str, Any], adapter: str) -> None:
        """Publish a second model of this run (PPO's critic) as entry `<run id>-<stage>` (main rank)."""
        if self.dist.is_main:
            entry = self.run.registry.publish(Entry(
                id=f"{self.run.run_id}-{stage}", stage=stage, status="completed", created=now_iso(), path=str(path),
                run_dir=str(self.run.run_dir), config=to_dict(self.cfg), parents=parents, base_model=base_model,
                tokenizer=tokenizer_fingerprint(tokenizer), metrics=metrics, adapter=adapter, tags=tuple(self.cfg.run.tags),
            ))
            self.tracker.print(f"[green]{stage} saved[/]: {entry.id} -> {entry.path}")

    def publish(self, *, source: ModelSource, tokenizer: Any, metrics: dict[str, Any], adapter: str,
                parents: tuple[str, ...] = ()) -> None:
        """Publish the registry entry (call on the main rank once `run.final_dir` is complete), then
        close the tracker and wait for every rank. `parents` defaults to the source's entry."""
        if self.dist.is_main:
            metrics = {**metrics, "wall_time_s": round(time.time() - self.started, 1)}
            entry = self.run.registry.publish(Entry(
                id=self.run.run_id, stage=self.run.stage, status="completed", created=now_iso(),
                path=str(self.run.final_dir), run_dir=str(self.run.run_dir), config=to_dict(self.cfg),
                parents=parents or source.parents, base_model=base_model_identity(source, self.cfg.model),
                tokenizer=tokenizer_fingerprint(tokenizer), metrics=metrics, adapter=adapter, tags=tuple(self.cfg.run.tags),
            ))
            self.tracker.print(f"[green]{self.run.stage} finished[/]: {entry.id} -> {entry.path}")
            self.tracker.print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        self.tracker.close()
        torch.distributed.barrier()
