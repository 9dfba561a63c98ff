"""The plumbing every training stage shares, so a stage file keeps only its algorithm.

`StageLoop` resumes a run (or measures the untrained baseline), keeps the metrics and progress,
runs the periodic evaluations and checkpoints, stops on a non-finite loss, and at the end
publishes the registry entry after the final folder is complete.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from rlhf.config import to_dict
from rlhf.engine import Dist, load_checkpoint, save_checkpoint
from rlhf.errors import UserError
from rlhf.models import ModelSource, base_model_identity, tokenizer_fingerprint
from rlhf.registry import Entry, now_iso
from rlhf.runs import Run
from rlhf.tracking import Tracker


class StageLoop:
    def __init__(
        self,
        run: Run,
        engine: Any,
        dist: Dist,
        *,
        evaluate: Callable[[], dict[str, float]],
        headline: tuple[str, ...] | None = None,
    ) -> None:
        self.run, self.engine, self.dist, self.evaluate = run, engine, dist, evaluate
        self.cfg = run.config
        self.started = time.time()
        # Resume from the last complete checkpoint of this run, if any.
        self.state: dict[str, Any] = load_checkpoint(engine, run.checkpoint_dir, dist=dist) or {"step": 0}
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
                self.state["step"] = step
                save_checkpoint(self.engine, self.run.checkpoint_dir, step=step, client_state=self.state,
                                keep=train.keep_checkpoints, dist=self.dist)

    def summary(self, final_eval: dict[str, float]) -> dict[str, float]:
        """The final and the initial held-out figures, named for the registry (`initial_` prefixed)."""
        return {
            **{k.removeprefix("eval/"): v for k, v in final_eval.items()},
            **{f"initial_{k.removeprefix('eval/')}": v for k, v in self.state.get("initial_eval", {}).items()},
        }

    def publish(self, *, source: ModelSource, tokenizer: Any, metrics: dict[str, Any], adapter: str) -> None:
        """Publish the registry entry (call on the main rank once `run.final_dir` is complete), then
        close the tracker and wait for every rank."""
        if self.dist.is_main:
            metrics = {**metrics, "wall_time_s": round(time.time() - self.started, 1)}
            entry = self.run.registry.publish(Entry(
                id=self.run.run_id, stage=self.run.stage, status="completed", created=now_iso(),
                path=str(self.run.final_dir), run_dir=str(self.run.run_dir), config=to_dict(self.cfg),
                parents=source.parents, base_model=base_model_identity(source, self.cfg.model),
                tokenizer=tokenizer_fingerprint(tokenizer), metrics=metrics, adapter=adapter, tags=tuple(self.cfg.run.tags),
            ))
            self.tracker.print(f"[green]{self.run.stage} finished[/]: {entry.id} -> {entry.path}")
            self.tracker.print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        self.tracker.close()
        torch.distributed.barrier()
