"""The memory check before a stage launches: `rlhf plan`'s estimate for the run's ranks against the devices' memory.

One yellow warning line when the estimate is over, with the smallest change `rlhf plan` finds and the `rlhf plan`
command that shows the tables; never an error, and never slow: it reads the models' configs (parameters counted on
the meta device, no weights), a hub name from the local cache only (no download, no network retries), and when it
cannot estimate (a config it cannot read, a stage `rlhf plan` does not cover) it says so only under -v.

The device memory, per rank, from RLHF_PLAN_MEMORY:
  unset        the smallest total memory of the CUDA devices the ranks will use; no check on a machine without CUDA
  a size       that (e.g. 24GiB, as `rlhf plan --memory` reads it), on any machine: another machine's GPUs, or a test
  0, off, no   no check
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from rlhf.errors import UserError, first_line
from rlhf.launcher.memory_estimates import MiB, human, parse_memory

if TYPE_CHECKING:
    from rlhf.config import StageConfig

PLAN_MEMORY_ENV = "RLHF_PLAN_MEMORY"
_OFF = ("0", "off", "no", "false")


class PlanCheck(NamedTuple):
    warning: str | None
    """The line to show as a warning; None when the estimate fits or there was nothing to check."""
    detail: str
    """What the check did, for -v: the estimate, or why there was none."""


def device_memory(devices: int) -> int | None:
    """The smallest total memory of the first `devices` visible CUDA devices (those the local ranks take); None
    without CUDA. Total, not free: free memory (cudaMemGetInfo) needs a CUDA context, which this process would then
    hold on every device for the whole run, while the device properties need none."""
    import torch

    if not torch.cuda.is_available():
        return None
    count = max(1, min(devices, torch.cuda.device_count()))
    return min(torch.cuda.get_device_properties(i).total_memory for i in range(count))


def world_size(per_node: int, *, launcher: str, hostfile: Path | None, env: Mapping[str, str] = os.environ) -> int:
    """The ranks ZeRO partitions over: `per_node` (--num-gpus) times the nodes, SLURM's under srun or the hostfile's
    hosts (the deepspeed launcher starts --num-gpus ranks on each)."""
    nodes = 1
    if launcher == "srun":
        nodes = int(env["SLURM_NNODES"]) if env.get("SLURM_NNODES", "").isdigit() else 1
    elif hostfile is not None and hostfile.is_file():
        nodes = sum(1 for line in hostfile.read_text().splitlines() if line.split("#")[0].strip())
    return per_node * max(nodes, 1)


def plan_memory(per_node: int, env: Mapping[str, str] = os.environ) -> tuple[int | None, str]:
    """The memory per rank to check against and how to write it for `rlhf plan --memory`; (None, why) for no check."""
    given = env.get(PLAN_MEMORY_ENV, "").strip()
    if given.lower() in _OFF:
        return None, f"{PLAN_MEMORY_ENV}={given}: no memory check"
    if given:
        return parse_memory(given, key=PLAN_MEMORY_ENV), given
    memory = device_memory(per_node)
    if memory is None:
        return None, f"no CUDA device, so no memory check (set {PLAN_MEMORY_ENV}, e.g. 80GiB, to check against a size)"
    return memory, f"{memory // MiB}MiB"


def check_plan(stage: str, cfg: StageConfig, *, ranks: int, per_node: int, plan_args: list[str],
               env: Mapping[str, str] = os.environ) -> PlanCheck:
    """`rlhf plan`'s verdict on `stage` with the resolved `cfg` over `ranks` ranks (`per_node` of them on this
    machine's devices); `plan_args` are the -c file and overrides, repeated in the `rlhf plan` command it suggests."""
    from rlhf.launcher.memory_plan import plan_stage, smallest_fit
    from rlhf.launcher.memory_shapes import TRAINED_STAGES, model_shapes
    from rlhf.store.registry import Registry, default_root

    if stage not in TRAINED_STAGES:
        return PlanCheck(None, f"plan: `rlhf plan` does not estimate {stage}; no memory check")
    try:
        memory, memory_text = plan_memory(per_node, env)
    except UserError as exc:  # the user's own setting: worth a line, but not worth stopping the launch
        return PlanCheck(f"plan: {exc}; no memory check", str(exc))
    if memory is None:
        return PlanCheck(None, f"plan: {memory_text}")
    try:
        shapes = model_shapes(stage, cfg, Registry(cfg.run.registry or default_root()), local_files_only=True)
        plan = plan_stage(stage, cfg, shapes, ranks=ranks, memory=memory)
        fix = None if plan.fits else smallest_fit(stage, cfg, shapes, ranks=ranks, memory=memory)
    except Exception as exc:  # advice only: a config it cannot read (a hub name not cached, remote code with
        # unusual attributes) must never stop the launch the user asked for
        return PlanCheck(None, f"plan: no memory estimate ({type(exc).__name__}: {first_line(exc)})")
    estimate = f"plan: ~{human(plan.total)} per rank of {human(memory)} ({ranks} rank{'s' if ranks > 1 else ''})"
    if plan.fits:
        return PlanCheck(None, f"{estimate}: fits")
    command = shlex.join(["rlhf", "plan", stage, *plan_args, "--ranks", str(ranks), "--memory", memory_text])
    advice = f"try {fix[0]}" if fix else "nothing `rlhf plan` tries fits: add ranks, shorten sequences or use LoRA"
    return PlanCheck(f"{estimate}: may not fit; {advice} (`{command}` for details)", estimate)


def warn_before_launch(stage: str, cfg: StageConfig, *, per_node: int, launcher: str, hostfile: Path | None, plan_args: list[str],
                       verbose: bool) -> None:
    """Run `check_plan` for a launch about to start: its warning in yellow on stderr, what it did under -v."""
    from rich.markup import escape

    from rlhf.training.tracking import err_console, print_warning

    ranks = world_size(per_node, launcher=launcher, hostfile=hostfile)
    check = check_plan(stage, cfg, ranks=ranks, per_node=per_node, plan_args=plan_args)
    if check.warning:
        print_warning(check.warning)
    elif verbose:
        err_console.print(f"[dim]{escape(check.detail)}[/]", soft_wrap=True, highlight=False)
