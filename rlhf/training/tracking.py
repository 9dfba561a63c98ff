"""Console, progress and metrics: rich on the terminal, JSONL always, wandb when enabled.

Only rank 0 writes; other ranks get a tracker that does nothing, so stage code never asks.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, cast

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rlhf.config import TrackingConfig
from rlhf.store.fileio import atomic_write_text

METRICS_FILE = "metrics.jsonl"
VERBOSE_ENV = "RLHF_VERBOSE"
"""Set to 1 by `rlhf <stage> -v` for the ranks: they leave the libraries' logging as it is (quiet_libraries)."""

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


class Tracker:
    """Logs metric rows for one run: `metrics.jsonl` in the run folder, wandb, a progress bar."""

    def __init__(
        self,
        run_dir: Path,
        *,
        active: bool,
        tracking: TrackingConfig,
        config: dict[str, Any],
        run_id: str,
        total_steps: int,
        start_step: int,
        description: str,
        headline: tuple[str, ...] = ("loss", "eval/loss", "eval/oracle_score", "lr", "tokens_per_s"),
    ) -> None:
        self.active = active
        self.headline = headline  # the metrics shown on the progress line, in this order
        self.total_steps = total_steps
        self._wandb = None
        self._progress: Progress | None = None
        self._last_line = 0.0
        self._summary: dict[str, Any] = {}  # latest value of each headline metric, train and eval alike
        if not active:
            return
        self.path = run_dir / METRICS_FILE
        _truncate_after(self.path, start_step)
        self._file = open(self.path, "a", buffering=1)
        if tracking.wandb:
            self._wandb = _start_wandb(run_dir, tracking, config, run_id, resume=start_step > 0)
        if console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[summary]}"),
                console=console,
            )
            self._task = self._progress.add_task(description, total=total_steps, completed=start_step, summary="")
            self._progress.start()

    def log(self, step: int, metrics: Mapping[str, Any], *, final: bool = False) -> None:
        """One row of `metrics` at `step` (metrics.jsonl, wandb) and the progress line. `final`: the
        run's final evaluation, which comes after the last step's own row (same step, same row
        form); the console shows it once, as a `final  ...` line of the figures it measured, rather
        than as a second `step N/N` line."""
        if not self.active:
            return
        metrics = {k: v for k, v in metrics.items() if v is not None}  # a metric not measured is left out, not faked
        row = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        self._summary.update((k, v) for k, v in metrics.items() if k in self.headline)
        summary = "  ".join(f"{k}={_short(self._summary[k])}" for k in self.headline if k in self._summary)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, summary=summary)
        if final:
            self._print_final(metrics)
        elif self._progress is None:
            # No terminal (a log file, a SLURM job): a plain line now and then instead of a bar.
            now = time.monotonic()
            if now - self._last_line > 5 or step >= self.total_steps:
                print(f"step {step}/{self.total_steps}  {summary}", flush=True)
                self._last_line = now

    def _print_final(self, metrics: dict[str, Any]) -> None:
        """`final  eval/loss=...`: the final evaluation's own headline figures (all it measured when
        none is a headline one); no line when it measured nothing (no held-out data)."""
        shown = [k for k in self.headline if k in metrics] or list(metrics)
        if not shown:
            return
        line = "final  " + "  ".join(f"{k}={_short(metrics[k])}" for k in shown)
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, flush=True)

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def print(self, message: str) -> None:
        if self.active:
            (self._progress.console if self._progress else console).print(message)

    def close(self) -> None:
        if not self.active:
            return
        if self._progress is not None:
            self._progress.stop()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _truncate_after(path: Path, step: int) -> None:
    """After a resume, drop rows a killed run wrote past its last checkpoint (they will be redone),
    and rows that are not whole (the cut last line a full disk or a kill mid-write leaves), saying so."""
    if not path.is_file():
        return
    keep = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        row = _metrics_row(line)
        if row is None and line.strip():
            print_warning(f"{path}:{number} is not a whole metrics row (a write cut short); dropped")
        elif row is not None and row["step"] <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _metrics_row(line: str) -> dict[str, Any] | None:
    """A metrics.jsonl line as its row; None for a blank, cut or foreign line."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def _start_wandb(run_dir: Path, tracking: TrackingConfig, config: dict[str, Any], run_id: str, *, resume: bool) -> Any:
    import wandb

    # WANDB_MODE goes to wandb as it is: wandb checks it.
    mode = cast(Literal["online", "offline", "disabled", "shared"], os.environ.get("WANDB_MODE", tracking.wandb_mode))
    return wandb.init(
        project=tracking.wandb_project,
        name=run_id,
        id=run_id,
        dir=str(run_dir),
        config=config,
        mode=mode,
        resume="allow" if resume else None,
        settings=wandb.Settings(silent=True, init_timeout=60),
    )


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _short(value: Any) -> str:
    value = _plain(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_error(message: str) -> None:
    """One line on stderr, the way every user mistake is reported."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)


def print_warning(message: str) -> None:
    """One yellow line on stderr: something the user should know that does not stop the run."""
    from rich.markup import escape

    err_console.print(f"[bold yellow]warning:[/] {escape(message)}", soft_wrap=True, highlight=False)


def quiet_libraries(*, verbose: bool) -> None:
    """Keep the libraries' chatter off the console unless `-v` asked for it: DeepSpeed's INFO and
    WARNING lines, transformers' and datasets' logging below ERROR, their FutureWarnings and
    datasets' progress bars. Errors, tracebacks and our own warnings (print_warning) always show.

    Through the libraries' own switches, in this process: the stage programs call it first thing,
    and the CLI before its input checks (which load tokenizers and data).
    """
    import logging
    import warnings

    import datasets
    from transformers.utils import logging as hf_logging

    if verbose:
        return
    # A filter, not a level: DeepSpeed sets its logger's level when it is first imported, which in
    # a rank happens later (once the accelerator is chosen); a filter outlives that.
    logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)
    hf_logging.set_verbosity_error()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    # Deprecation notices about the libraries' own internals ("`is_gradient_checkpointing` is
    # deprecated"): nothing a user of rlhf can act on.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
