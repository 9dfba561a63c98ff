"""Throughput, peak memory and reference ratios of the three stages: `make bench`.

    python scripts/bench.py [--quick] [--models toy,100m] [--ranks 1,2] [--zero-stage 0] [--no-grid] [--out FILE]
                            [--ppo-override KEY=VALUE ...]   (e.g. ppo.estimator=grpo rollout.samples_per_prompt=4)

For each (model, ranks) case the parent launches one worker under the DeepSpeed launcher
(rlhf.launcher.command, as `rlhf <stage> -n N` does). Every rank of the worker runs the stage programs'
own `main()` in sequence on a scratch registry: sft, then rm from that SFT entry, then ppo from
both. Each stage logs every step; a step's time is the gap between its metrics row and the
previous one (PPO's rows also split it into generation, scoring and training), the first steps
are warm-up and not timed. Peak memory is the rank's peak RSS on the CPU (VmHWM, reset before
each stage) and torch.cuda.max_memory_allocated on a GPU. In the same process, half of each
reference's rounds just before the stage it refers to and half just after (one rank):

  (a) rollout generation (rlhf.rollouts.generation.sample_rollout, what the PPO stage samples with) against
      plain transformers `generate` on the same model, prompts and seed (so the same lengths);
  (b) the PPO stage's step, and each of its phases (generate, score, train; each within 1.1x),
      against its essential parts timed alone with plain torch and transformers calls on the same
      models (built by the library as the stage builds them): one `generate`; one forward of each
      model the stage runs (no actor forward where the stage takes its log-probs from generation,
      no critic for a critic-free estimator); the training passes, forward, backward, clipping
      and a torch AdamW step per minibatch as the engine builds it (through the engines under ZeRO).
      The whole step is the stage's main() loop against the parts bracketing it; each phase is
      the stage's own step function (`ppo_step`, with its timers) taking turns with a round of
      the parts on the same models and prompts, the median of each round's ratio;
  (c) SFT stage tokens/s against a plain single-process torch loop (the same model, AdamW
      settings and batches), at one rank.

Every other figure is a median over the timed steps or rounds; both sides of a ratio hold as many, half
of the reference's taken before the stage and half after, since the machine this runs on may be
shared and busy. The fastest step of each side is kept beside (other processes only ever add
time). The references run in the one-rank cases; the two-rank cases give data-parallel scaling.
Every stage trains at a tiny learning rate, so the policy stays near its random init and responses
mostly run to rollout.max_new_tokens (a random policy picks EOS about once in 100 tokens): a case's
cost is set by its config, not by what the model happened to learn.

Prints one Markdown table and writes one JSON line per case to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]

# A random-init Llama of about 100M parameters (99.3M with the toy's 100-token vocabulary):
# GPT-2-small depth and width with a SwiGLU MLP.
MODEL_SHAPES: dict[str, dict[str, int]] = {
    "toy": {},  # the embedded default (428k parameters)
    "100m": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 2560},
    "tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},  # --quick
}


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long each stage runs for one case. Every stage logs every step; the first `warmup`
    steps of each stage (and the first round of each reference) are not timed."""

    sft_micro: int
    rm_micro: int  # ranked prompts (4 sequences each)
    ppo_batch: int  # rollouts per rank per step
    ppo_micro: int
    ppo_epochs: int
    max_new_tokens: int
    warmup: int
    sft_steps: int  # timed steps
    rm_steps: int
    ppo_steps: int
    reps: int  # timed rounds of the PPO parts (half before the PPO stage, half after)
    paired_rounds: int  # timed rounds of the PPO stage's step and its plain parts in turn (per-phase ratios)
    generation_reps: int  # timed rounds of (a), each rollout and plain generation in turn


BUDGETS = {
    # The embedded default at its own batch sizes: sft 32 sequences, rm 64 ranked prompts, ppo 64
    # rollouts of 8 new tokens in minibatches of 32, 4 epochs.
    "toy": Budget(sft_micro=32, rm_micro=64, ppo_batch=64, ppo_micro=32, ppo_epochs=4, max_new_tokens=8,
                  warmup=3, sft_steps=40, rm_steps=12, ppo_steps=8, reps=8, paired_rounds=16, generation_reps=20),
    # Sized so that a case takes about a minute and a half on one CPU core per rank.
    "100m": Budget(sft_micro=8, rm_micro=2, ppo_batch=8, ppo_micro=8, ppo_epochs=1, max_new_tokens=8,
                   warmup=1, sft_steps=4, rm_steps=3, ppo_steps=4, reps=4, paired_rounds=4, generation_reps=4),
    "tiny": Budget(sft_micro=8, rm_micro=4, ppo_batch=8, ppo_micro=4, ppo_epochs=1, max_new_tokens=4,
                   warmup=1, sft_steps=2, rm_steps=2, ppo_steps=2, reps=1, paired_rounds=1, generation_reps=1),
}

# PPO's cost against batch size and response length: (rollouts per rank, max new tokens,
# minibatch size, length-grouped minibatches), each a run of the PPO stage on the first case.
# The last pair compares random and length-grouped minibatches where response lengths vary.
GRID = [(16, 8, 16, False), (16, 32, 16, False), (16, 64, 16, False), (64, 8, 32, False), (64, 32, 32, False),
        (64, 64, 32, False), (64, 64, 8, False), (64, 64, 8, True)]


# ----------------------------------------------------------------------------------------------
# Parent: plan the cases, launch one worker per case, print the table, write the JSON lines.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="toy,100m", help="comma-separated: toy, 100m")
    parser.add_argument("--ranks", default="1,2", help="comma-separated rank counts")
    parser.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3))
    parser.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                        help="default: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True,
                        help="PPO cost against batch size and response length, on the first case (not with --quick)")
    parser.add_argument("--ppo-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a PPO config override for every PPO run, e.g. ppo.estimator=grpo (repeatable)")
    parser.add_argument("--quick", action="store_true", help="one tiny case at one rank, a few steps (for tests)")
    parser.add_argument("--out", type=Path, default=None, help="JSON lines file (appended); default $RLHF_HOME/bench/<time>.jsonl")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker.read_text()))
        return 0
    from rlhf.store.registry import default_root
    from rlhf.toy import ToyTask, ToyTaskConfig

    models = ["tiny"] if args.quick else args.models.split(",")
    ranks = [1] if args.quick else [int(r) for r in args.ranks.split(",")]
    for name in models:
        if name not in MODEL_SHAPES:
            raise SystemExit(f"unknown model case '{name}'; choose from {', '.join(k for k in MODEL_SHAPES if k != 'tiny')}")
    out = args.out or default_root() / "bench" / f"{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="rlhf-bench-"))
    command = " ".join(["python scripts/bench.py", *(sys.argv[1:] if argv is None else argv)])
    results = []
    try:
        data_dir = scratch / "data"
        ToyTask(ToyTaskConfig()).write(data_dir)
        for model in models:
            for n in ranks:
                grid = args.grid and (model, n) == (models[0], ranks[0]) and not args.quick
                print(f"{model} x{n}: sft, rm, ppo{', references' if n == 1 else ''}{', PPO cost grid' if grid else ''} ... ",
                      end="", flush=True)
                started = time.time()
                result = run_case(scratch / f"{model}-x{n}", model=model, ranks=n, args=args, data_dir=data_dir,
                                  command=command, grid=grid)
                if result is None:
                    return 1
                print(f"{time.time() - started:.0f} s")
                results.append(result)
        add_scaling_efficiency(results)
        with open(out, "a") as sink:
            for result in results:
                sink.write(json.dumps(result) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(format_table(results))
    print(f"\none JSON line per case appended to {out}")
    return 0


def run_case(case_dir: Path, *, model: str, ranks: int, args: argparse.Namespace, data_dir: Path, command: str,
             grid: bool) -> dict | None:
    """Launch one worker on `ranks` ranks; its result, or None (with its log shown) if it failed."""
    from rlhf.launcher.command import LaunchSpec, build_command, launch_env

    spec = {
        "model": model, "ranks": ranks, "zero_stage": args.zero_stage, "precision": args.precision,
        "data_dir": str(data_dir), "registry": str(case_dir / "registry"), "result": str(case_dir / "result.json"),
        "grid": grid, "command": command, "ppo_overrides": args.ppo_override,
    }
    case_dir.mkdir(parents=True)
    (case_dir / "spec.json").write_text(json.dumps(spec))
    launcher = "python" if args.quick else "deepspeed"  # --quick: one rank, without the launcher's start-up
    cmd = build_command(LaunchSpec(program=Path(__file__).resolve(), program_args=("--worker", str(case_dir / "spec.json")),
                                   num_procs=ranks, launcher=launcher))  # type: ignore[arg-type]
    env = launch_env(ranks)
    log = case_dir / "worker.log"
    with open(log, "w") as sink:
        code = subprocess.call(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        if code != 0 or not Path(spec["result"]).is_file():
            print(f"failed (exit {code}); the worker's log ends:\n{log.read_text()[-6000:]}")
            return None
        result = json.loads(Path(spec["result"]).read_text())
        result["omp_num_threads"] = env.get("OMP_NUM_THREADS")
        return result
    finally:
        shutil.rmtree(case_dir / "registry", ignore_errors=True)  # model folders: up to GBs per case


def add_scaling_efficiency(results: list[dict]) -> None:
    """Tokens/s at N ranks over N times tokens/s at one rank, per stage (1.0 = perfect data parallelism)."""
    single = {r["model"]: r for r in results if r["ranks"] == 1}
    for result in results:
        base = single.get(result["model"])
        if base is None or result["ranks"] == 1:
            continue
        result["scaling_efficiency"] = {
            stage: result[stage]["tokens_per_s"] / (result["ranks"] * base[stage]["tokens_per_s"]) for stage in ("sft", "rm", "ppo")
        }


def format_table(results: list[dict]) -> str:
    lines = [
        "| model | ranks | stage | samples/s | tokens/s | peak MB/rank | step s | PPO split gen / score / train / other |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        label = f"{r['model']} ({r['parameters'] / 1e6:.2f}M)"
        for stage in ("sft", "rm", "ppo"):
            s = r[stage]
            split = ""
            if stage == "ppo":
                split = " / ".join(f"{100 * s['split'][k]:.0f}%" for k in ("generate", "score", "train", "other"))
            lines.append(f"| {label} | {r['ranks']} | {stage} | {s['samples_per_s']:.1f} | {s['tokens_per_s']:.0f} | "
                         f"{s['peak_memory_mb']:.0f} | {s['step_s']:.3f} | {split} |")
    lines += ["", "Reference ratios at one rank: medians (a: of each round's ratio), (fastest of each side).", "",
              "| model | (a) rollout generation / plain generate, target >= 0.9 | (b) PPO step / sum of its parts, target <= 1.2 "
              "| (b) per phase, generate / score / train, each target <= 1.1 | (c) SFT stage / plain torch loop, target >= 0.85 |",
              "|---|---|---|---|---|"]
    for r in results:
        if "ratios" in r:
            ratios = r["ratios"]
            a, b, c = (f"{ratios[k]:.2f} ({ratios[f]:.2f})" for k, f in (("a_rollout_vs_plain_generate", "a_fastest"),
                                                                          ("b_ppo_step_vs_parts", "b_fastest"),
                                                                          ("c_sft_vs_plain_loop", "c_fastest")))
            phases = " / ".join(f"{ratios[k]:.2f}" for k in PHASE_RATIOS)
            lines.append(f"| {r['model']} | {a} | {b} | {phases} | {c} |")
    scaled = [r for r in results if "scaling_efficiency" in r]
    if scaled:
        lines += ["", "Data-parallel scaling: tokens/s at N ranks / (N x tokens/s at one rank).", "",
                  "| model | ranks | sft | rm | ppo |", "|---|---|---|---|---|"]
        for r in scaled:
            eff = r["scaling_efficiency"]
            lines.append(f"| {r['model']} | {r['ranks']} | {eff['sft']:.2f} | {eff['rm']:.2f} | {eff['ppo']:.2f} |")
    for r in results:
        if r.get("grid"):
            lines += ["", f"PPO cost against batch size and response length ({r['model']}, {r['ranks']} rank(s), "
                      f"{r['budget']['ppo_epochs']} PPO epochs; medians of 3 steps):", "",
                      "| rollouts/rank | max new tokens | minibatches | mean response | step ms | generate ms | score ms | "
                      "train ms | response tokens/s |", "|---|---|---|---|---|---|---|---|---|"]
            for row in r["grid"]:
                kind = "length-grouped" if row["length_grouped"] else "random"
                lines.append(f"| {row['batch']} | {row['max_new_tokens']} | {row['minibatch']}, {kind} | "
                             f"{row['response_length']:.1f} | {1000 * row['step_s']:.0f} | {1000 * row['generate_s']:.0f} | "
                             f"{1000 * row['score_s']:.0f} | {1000 * row['train_s']:.0f} | {row['response_tokens_per_s']:.0f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Worker: every rank runs this.


def worker(spec: dict[str, Any]) -> None:
    import torch

    from rlhf.store.runs import resolve_config
    from rlhf.training.engine import init_distributed

    dist = init_distributed()
    model, budget = spec["model"], BUDGETS[spec["model"]]
    on_gpu = dist.device.type == "cuda"
    precision = spec["precision"] or ("bf16" if on_gpu else "fp32")
    data = Path(spec["data_dir"])
    # Shared by every stage: a scratch registry, local data files (the toy task written out: no
    # held-out evaluation, which would dwarf these short runs), no checkpoints, a learning rate
    # that keeps the policy near its random init (see the module docstring).
    common = [f"run.registry={spec['registry']}", "data.eval=null", "train.save_every=0", "train.eval_every=0", "train.log_every=1",
              "optim.lr=1e-8", "optim.warmup_steps=0", f"engine.zero_stage={spec['zero_stage']}", f"engine.precision={precision}"]
    if on_gpu:
        common.append("model.attn_implementation=sdpa")
    shape = [f"model.toy.{k}={v}" for k, v in MODEL_SHAPES[model].items()]
    result: dict[str, Any] = {
        "model": model, "ranks": dist.world_size, "zero_stage": spec["zero_stage"], "precision": precision,
        "device": torch.cuda.get_device_name(dist.device) if on_gpu else f"cpu ({platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores)",
        "versions": versions(), "command": spec["command"], "budget": dataclasses.asdict(budget),
    }

    # 1. SFT, bracketed in time by a plain torch loop of the same model over the same batches (one
    #    rank): half of its steps before the stage, half after, so a busy spell weighs on both sides.
    sft_cfg = common + shape + ["model.name_or_path=toy", f"data.train={data / 'sft_train.jsonl'}",
                                f"engine.micro_batch_size={budget.sft_micro}", f"train.max_steps={budget.warmup + budget.sft_steps}"]
    single = dist.world_size == 1  # the references run at one rank (2-rank cases report DP scaling instead)
    plain_before = plain_sft_loop(resolve_config("sft", None, sft_cfg), budget, half=0) if single else None
    sft = run_stage("sft", sft_cfg, dist)
    plain_after = plain_sft_loop(sft.cfg, budget, half=1) if single else None
    result["parameters"] = sft.parameters
    result["sft"] = stage_throughput(sft, dist, "loss", warmup=budget.warmup)
    plain_sft = None
    if single:
        plain = rates(plain_before[0] + plain_after[0], plain_before[1] + plain_after[1])
        plain_sft = {"step_s": plain["step_s"], "tokens_per_s": plain["per_s"], "tokens_per_s_best": plain["best_per_s"]}

    # 2. The reward model from that SFT entry, on ranked lists of 4 responses.
    rm_cfg = ["model.name_or_path=sft:latest", f"data.train={data / 'ranked_train.jsonl'}", f"engine.micro_batch_size={budget.rm_micro}",
              f"train.max_steps={budget.warmup + budget.rm_steps}", "eval.reward_stats_rows=8", "eval.batch_size=8"]
    rm = run_stage("rm", common + rm_cfg, dist)
    result["rm"] = stage_throughput(rm, dist, "loss", warmup=budget.warmup)

    # 3. PPO from both, bracketed by the reference measurements (a) and (b) on the same four models.
    ppo_cfg = common + ppo_overrides(data, budget.ppo_batch, budget.ppo_micro, budget.max_new_tokens, budget.ppo_epochs,
                                     budget.warmup + budget.ppo_steps) + spec["ppo_overrides"]
    before = ppo_references(resolve_config("ppo", None, ppo_cfg), dist, budget=budget, half=0) if single else None
    ppo = run_stage("ppo", ppo_cfg, dist)
    after = ppo_references(ppo.cfg, dist, budget=budget, half=1) if single else None
    result["ppo"] = stage_throughput(ppo, dist, "policy_loss", warmup=budget.warmup)
    if single:
        phases = paired_phases(ppo.cfg, dist, budget=budget)
        generation, parts = summarize_references([before, after])
        result["reference"] = {"rollout_generation": generation, "ppo_parts": parts, "plain_sft": plain_sft,
                               "paired_phase_ratios": phases}
        result["ratios"] = reference_ratios(result["sft"], result["ppo"], plain_sft, generation, parts, phases)

    # 4. PPO's cost against batch size and response length (3 timed steps each).
    if spec["grid"]:
        result["grid"] = []
        for batch, length, micro, grouped in GRID:
            overrides = ppo_overrides(data, batch, micro, length, budget.ppo_epochs, 4)
            run = run_stage("ppo", common + overrides + [f"ppo.length_grouped_minibatches={grouped}"] + spec["ppo_overrides"], dist)
            t = stage_throughput(run, dist, "policy_loss", warmup=1)
            timings = ("step_s", "generate_s", "score_s", "train_s", "response_length", "response_tokens_per_s")
            result["grid"].append({"batch": batch, "max_new_tokens": length, "minibatch": micro, "length_grouped": grouped,
                                   **{k: t[k] for k in timings}})

    if dist.is_main:
        Path(spec["result"]).write_text(json.dumps(result))
    torch.distributed.barrier()


def ppo_overrides(data: Path, batch: int, micro: int, max_new_tokens: int, epochs: int, steps: int) -> list[str]:
    return [f"data.train={data / 'prompts_train.jsonl'}", f"rollout.batch_size={batch}", f"engine.micro_batch_size={micro}",
            f"rollout.max_new_tokens={max_new_tokens}", f"ppo.epochs={epochs}", f"train.max_steps={steps}",
            "critic_optim.lr=1e-8", "critic_optim.warmup_steps=0"]


def versions() -> dict[str, str]:
    import deepspeed
    import torch
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
             "transformers": transformers.__version__}
    if torch.cuda.is_available():
        found["cuda"] = str(torch.version.cuda)
    return found


# ----------------------------------------------------------------------------------------------
# Running a stage program's main() and reading its figures.


@dataclasses.dataclass
class StageRun:
    stage: str
    cfg: Any
    rows: list[dict]  # its metrics.jsonl (rank 0; the same figures are broadcast to every rank)
    peak_memory_mb: float  # the largest of any rank
    parameters: int


def run_stage(stage: str, overrides: list[str], dist: Any) -> StageRun:
    """Run `rlhf/stages/<stage>.py`'s main() in this process, on every rank, as its program would."""
    import torch

    from rlhf.store.runs import create_run, open_run, resolve_config

    cfg = resolve_config(stage, None, overrides)
    run_dir = [str(create_run(stage, cfg).run_dir) if dist.is_main else None]
    torch.distributed.broadcast_object_list(run_dir, src=0)
    run = open_run(stage, run_dir[0])
    stage_main: Callable = importlib.import_module(f"rlhf.stages.{stage}").main
    release_freed_memory()
    reset_peak_memory(dist.device)
    with handlers_restored():
        stage_main(run)
    peak = torch.tensor([peak_memory_mb(dist.device)], device=dist.device)
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()] if dist.is_main else None
    shared = [rows, count_parameters(run) if dist.is_main else None]
    torch.distributed.broadcast_object_list(shared, src=0)
    release_freed_memory()
    return StageRun(stage, cfg, shared[0], float(peak.item()), shared[1])


@contextlib.contextmanager
def handlers_restored() -> Iterator[None]:
    """Put back the signal handlers a stage installs: a handler bound to the stage's loop would
    keep its engines, and their memory, alive after main() returns (a stage program just exits)."""
    saved = {sig: signal.getsignal(sig) for sig in signal.valid_signals() if sig not in (signal.SIGKILL, signal.SIGSTOP)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None and signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)


def count_parameters(run: Any) -> int:
    """Parameters of the model the stage saved (read from its safetensors headers)."""
    import math

    from safetensors import safe_open

    total = 0
    for path in run.final_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as weights:
            total += sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())
    return total


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS, so the next stage's peak RSS
    starts from what is really in use (glibc keeps freed tensors of a few MB in its heap: 2 GB
    after the 100M PPO stage here, with no tensor alive)."""
    import ctypes
    import ctypes.util

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    libc = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and libc:
        ctypes.CDLL(libc).malloc_trim(0)


def reset_peak_memory(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        # Linux: "5" resets the peak resident set size (VmHWM) to the current one.
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: Any) -> float:
    """Peak GPU memory allocated by torch, or this process's peak RSS on the CPU, since the last reset."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if status.exists():
        match = re.search(r"VmHWM:\s+(\d+) kB", status.read_text())
        if match:
            return int(match.group(1)) / 1024
    # Elsewhere the lifetime peak (not resettable): kB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def rates(seconds: list[float], work: list[float]) -> dict[str, float]:
    """Per-step durations and work (samples or tokens): the median step and rate, and the fastest
    step's rate. On a shared machine other processes only ever add time, so the fastest step is
    the least disturbed measure of what the code costs; the median is what a run gets."""
    per_step = [w / t for w, t in zip(work, seconds)]
    return {"step_s": statistics.median(seconds), "per_s": statistics.median(per_step), "best_per_s": max(per_step)}


def stage_throughput(run: StageRun, dist: Any, loss_key: str, *, warmup: int) -> dict[str, Any]:
    """A stage's speed from its metric rows (one per step): step k took the time between rows
    k - 1 and k; the first `warmup` steps are left out. Samples and real (unpadded) tokens per
    step are over every rank."""
    logged = {row["step"]: row for row in run.rows if loss_key in row}
    steps = sorted(k for k in logged if k > warmup and k - 1 in logged)
    if not steps:
        raise RuntimeError(f"{run.stage}: no timed step among {len(logged)} metric rows")
    seconds = [logged[k]["time"] - logged[k - 1]["time"] for k in steps]
    samples, tokens = replay_batches(run, dist, [k - 1 for k in steps])
    figures: dict[str, Any] = {"timed_steps": len(steps), "peak_memory_mb": run.peak_memory_mb}
    if run.stage == "ppo":
        # Each row holds the step's time split and mean response length over every rank.
        rows = [logged[k] for k in steps]
        responses = [row["response_length"] * n for row, n in zip(rows, samples)]
        tokens = [t + r for t, r in zip(tokens, responses)]
        phases = {k: statistics.median(row[f"time_{k}_s"] for row in rows) for k in ("generate", "score", "train")}
        figures.update({f"{k}_s": v for k, v in phases.items()})
        figures["step_s_best"] = min(seconds)
        figures["response_length"] = statistics.mean(row["response_length"] for row in rows)
        figures["response_tokens_per_s"] = rates(seconds, responses)["per_s"]
    sample_rates, token_rates = rates(seconds, samples), rates(seconds, tokens)
    figures.update(step_s=sample_rates["step_s"], samples_per_s=sample_rates["per_s"], tokens_per_s=token_rates["per_s"],
                   tokens_per_s_best=token_rates["best_per_s"])
    if run.stage == "ppo":
        # Shares of the timed steps' total; "other" (metrics, logging) is outside the stage's timers.
        total = sum(seconds)
        shares = {k: sum(row[f"time_{k}_s"] for row in rows) / total for k in ("generate", "score", "train")}
        figures["split"] = {**shares, "other": max(1.0 - sum(shares.values()), 0.0)}
    return figures


def replay_batches(run: StageRun, dist: Any, steps: list[int]) -> tuple[list[float], list[float]]:
    """Samples and real tokens of each 0-based step in `steps`, over every rank (PPO: prompt
    tokens only). A stage's batches are a function of the step alone (ShuffledBatches), so the
    same sampler with the same seed names them again."""
    from rlhf.data.load import stage_datasets
    from rlhf.data.sampler import ShuffledBatches
    from rlhf.toy import build_tokenizer

    cfg = run.cfg
    train_set, _, _, _ = stage_datasets(run.stage, cfg, build_tokenizer(), world_size=dist.world_size)
    batch_size = cfg.rollout.batch_size if run.stage == "ppo" else cfg.engine.micro_batch_size
    accum = 1 if run.stage == "ppo" else cfg.engine.grad_accum
    batches = ShuffledBatches(len(train_set), batch_size=batch_size, world_size=dist.world_size, seed=cfg.train.seed)
    samples, tokens = [], []
    for step in steps:
        examples = [train_set[i] for m in range(accum) for rows in batches.global_batch(step * accum + m) for i in rows]
        if run.stage == "ppo":  # prompts
            sequences = examples
        elif run.stage == "sft":
            sequences = [ex.input_ids for ex in examples]
        else:  # rm: every scored sequence of every ranked prompt
            sequences = [seq for group in examples for seq in group.sequences]
        samples.append(float(len(sequences)))
        tokens.append(float(sum(len(seq) for seq in sequences)))
    return samples, tokens


# ----------------------------------------------------------------------------------------------
# (c) A plain single-process torch loop: the same model, optimizer settings and batches as SFT.


def plain_sft_loop(cfg: Any, budget: Budget, *, half: int) -> tuple[list[float], list[float]]:
    """Seconds and real tokens of each timed step of half `half` (0 or 1) of the stage's timed
    steps, the stage's own batches; the first `budget.warmup` steps are not timed."""
    import torch
    import torch.nn.functional as F

    from rlhf.data.collate import collate_sft
    from rlhf.data.load import stage_datasets
    from rlhf.data.sampler import ShuffledBatches
    from rlhf.toy import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    train_set, _, _, _ = stage_datasets("sft", cfg, tokenizer, world_size=1)
    batches = ShuffledBatches(len(train_set), batch_size=cfg.engine.micro_batch_size, world_size=1, seed=cfg.train.seed)
    model = build_model(cfg.model.toy, tokenizer, seed=cfg.train.seed).train()
    optim = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                                  weight_decay=optim.weight_decay)
    seconds, tokens = [], []
    for step in range(budget.warmup + split_rounds(budget.sft_steps, half)):
        started = time.perf_counter()
        batch = collate_sft([train_set[i] for i in batches.global_batch(step)[0]], pad_id=tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # Position t predicts token t + 1; only response tokens are targets.
        targets = batch["input_ids"][:, 1:].masked_fill(~batch["response_mask"][:, 1:], -100)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the stage reads its loss every step too
        if step >= budget.warmup:
            seconds.append(time.perf_counter() - started)
            tokens.append(float(batch["attention_mask"].sum()))
    return seconds, tokens


# ----------------------------------------------------------------------------------------------
# (a) and (b): the PPO stage's models, rebuilt by the library as the stage builds them.


def ppo_references(cfg: Any, dist: Any, *, budget: Budget, half: int) -> dict[str, dict[str, list[float]]]:
    """Half `half` (0 or 1) of the rounds of (a) and (b), on PPO's four models built as the stage
    builds them (from the same entries): per-round seconds, by measurement."""
    from rlhf.data.load import stage_datasets
    from rlhf.data.sampler import ShuffledBatches
    from rlhf.models.sources import causal_lm_and_tokenizer, ppo_sources
    from rlhf.models.stage_models import build_ppo_models
    from rlhf.store.registry import Registry

    registry = Registry(cfg.run.registry)
    actor_source, tokenizer = causal_lm_and_tokenizer(cfg.model, registry)
    sources = ppo_sources(cfg, registry, actor_source, tokenizer)
    minibatches = cfg.rollout.batch_size // cfg.engine.micro_batch_size
    models = build_ppo_models(cfg, sources, actor_source, tokenizer, dist=dist,
                              total_updates=(1 + budget.reps) * cfg.ppo.epochs * minibatches)
    generation_reps, reps = split_rounds(budget.generation_reps, half), split_rounds(budget.reps, half)
    prompts_all, _, _, _ = stage_datasets("ppo", cfg, tokenizer, world_size=dist.world_size)
    batches = ShuffledBatches(len(prompts_all), batch_size=cfg.rollout.batch_size, world_size=dist.world_size, seed=cfg.train.seed)
    prompts = [prompts_all[i] for i in batches.global_batch(0)[dist.rank]]
    generation = rollout_vs_plain_generate(models, cfg, prompts, tokenizer, dist, reps=generation_reps)
    parts = ppo_parts(models, cfg, prompts, tokenizer, dist, reps=reps)
    del models
    release_freed_memory()
    return {"generation": generation, "parts": parts}


def paired_phases(cfg: Any, dist: Any, *, budget: Budget) -> dict[str, list[float]]:
    """(b) per phase: the stage's own step (rlhf/stages/ppo.py `ppo_step`, what its loop runs each step,
    with its timers) and a round of the plain parts (`plain_ppo_round`) on the same prompts take
    turns on one set of the stage's models, `budget.paired_rounds` times after `budget.warmup` of
    warm-up, the order swapped every round. Each round's phase ratios are then free of the
    machine's drift between rounds, which on a shared machine moves a minute-long run by 30%."""
    from rlhf.models.stage_models import build_ppo_models
    from rlhf.stages.ppo import ppo_step
    from rlhf.stages.ppo_context import PPOContext, PPOState, load_data, minibatches_per_epoch, sampling_of
    from rlhf.stages.ppo_rollout import step_prompts
    from rlhf.store.runs import create_run
    from rlhf.training.run_keeper import RunKeeper

    run = create_run("ppo", cfg)  # one rank: the references run only there
    data = load_data(cfg, run, dist)
    rounds = budget.warmup + budget.paired_rounds
    models = build_ppo_models(cfg, data.sources, data.actor_source, data.tokenizer, dist=dist,
                              total_updates=rounds * cfg.ppo.epochs * minibatches_per_epoch(cfg))
    sampling = sampling_of(cfg, data, models, dist)
    engines = {"actor": models.actor, **({"critic": models.critic} if models.critic is not None else {})}
    one_round = plain_ppo_round(models, cfg, data.tokenizer, dist)
    ratios: dict[str, list[float]] = {"generate": [], "score": [], "train": []}
    with handlers_restored():
        keeper = RunKeeper(run, engines, dist)
        ctx = PPOContext(models=models, data=data, cfg=cfg, sampling=sampling, dist=dist, keeper=keeper)
        state = keeper.resume(PPOState(beta=cfg.ppo.beta))
        for r in range(rounds):
            prompts = step_prompts(ctx, step=state.step)
            if r % 2:
                plain = one_round(prompts, seed=3000 + r)
            metrics = ppo_step(ctx, state)
            if not r % 2:
                plain = one_round(prompts, seed=3000 + r)
            if r >= budget.warmup:
                forwards = sum(plain[k] for k in SCORING_FORWARDS)
                for phase, part in (("generate", plain["generate"]), ("score", forwards), ("train", plain["train"])):
                    ratios[phase].append(metrics[f"time_{phase}_s"] / part)
        keeper.close()
    del models, engines
    release_freed_memory()
    return ratios


def reference_ratios(sft: dict, ppo: dict, plain_sft: dict, generation: dict, parts: dict,
                     phases: dict[str, list[float]]) -> dict[str, float]:
    """(a) and (b) per phase: the median of each round's ratio (the two sides take turns); (b) and
    (c) from medians (both sides hold as many timed steps or rounds, half of the reference's taken
    before the stage and half after). Beside each, the ratio of the fastest of each side."""
    return {
        "a_rollout_vs_plain_generate": generation["paired_ratio"],
        "a_fastest": generation["plain_s_best"] / generation["rollout_s_best"],
        "b_ppo_step_vs_parts": ppo["step_s"] / parts["sum_s"],
        "b_fastest": ppo["step_s_best"] / parts["sum_s_best"],
        # Phase by phase, to see where a step's overhead sits (paired_phases).
        "b_generate_vs_part": statistics.median(phases["generate"]),
        "b_score_vs_forwards": statistics.median(phases["score"]),
        "b_train_vs_passes": statistics.median(phases["train"]),
        "c_sft_vs_plain_loop": sft["tokens_per_s"] / plain_sft["tokens_per_s"],
        "c_fastest": sft["tokens_per_s_best"] / plain_sft["tokens_per_s_best"],
    }


SCORING_FORWARDS = ("actor", "reference", "critic", "reward")  # the plain parts a stage's scoring phase is compared with
PHASE_RATIOS = ("b_generate_vs_part", "b_score_vs_forwards", "b_train_vs_passes")  # each phase of a step / its plain part


def split_rounds(total: int, half: int) -> int:
    """Rounds of the first (0) or second (1) half of `total`, at least one each."""
    return max(1, (total + 1 - half) // 2)


def summarize_references(halves: list[dict[str, dict[str, list[float]]]]) -> tuple[dict[str, float], dict[str, float]]:
    """Medians and bests of (a) and (b) over the rounds of both halves."""
    generation = {k: [t for h in halves for t in h["generation"][k]] for k in ("rollout", "plain")}
    times = {k: [t for h in halves for t in h["parts"][k]] for k in halves[0]["parts"]}
    gen = {"rollout_s": statistics.median(generation["rollout"]), "plain_s": statistics.median(generation["plain"]),
           "rollout_s_best": min(generation["rollout"]), "plain_s_best": min(generation["plain"]),
           # Each round times both, one right after the other: the round's own ratio is free of
           # the drift between rounds.
           "paired_ratio": statistics.median(p / r for p, r in zip(generation["plain"], generation["rollout"])),
           "rounds": len(generation["rollout"])}
    parts = {f"{k}_s": statistics.median(v) for k, v in times.items()}
    parts["forwards_s"] = sum(parts[f"{k}_s"] for k in SCORING_FORWARDS)
    sums = [sum(values) for values in zip(*times.values())]  # each round's parts added up
    parts.update(sum_s=statistics.median(sums), sum_s_best=min(sums), rounds=len(sums))
    return gen, parts


def left_padded(prompts: list[list[int]], pad_id: int, device: Any) -> dict[str, Any]:
    """Plain left padding: every prompt ends at the last column."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return {"input_ids": ids, "attention_mask": mask}


def plain_generate(module: Any, padded: dict[str, Any], cfg: Any, tokenizer: Any) -> Any:
    """transformers' generate, as a user would call it, with the stage's sampling settings."""
    import contextlib

    import torch

    gathered: Any = contextlib.nullcontext()
    zero3 = cfg.engine.zero_stage == 3
    if zero3:  # a partitioned model must be whole to generate at a useful speed
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    with torch.no_grad(), gathered:
        return module.generate(**padded, max_new_tokens=cfg.rollout.max_new_tokens, do_sample=True,
                               temperature=cfg.rollout.temperature, top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True,
                               synced_gpus=zero3)


def timed(fn: Callable[[], Any], device: Any) -> tuple[float, Any]:
    """Seconds `fn` takes, started on every rank at once (as in a stage, where ranks meet at each
    collective), and its result."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    torch.distributed.barrier()
    started = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, out


def rollout_vs_plain_generate(
    models: Any, cfg: Any, prompts: list[list[int]], tokenizer: Any, dist: Any, *, reps: int
) -> dict[str, list[float]]:
    """(a) The PPO stage's sampling path against plain `generate`, alternated, each from the same
    seed so both produce the same tokens (the same lengths)."""
    import torch

    from rlhf.rollouts.generation import Sampling, sample_rollout

    module = models.actor.module
    module.eval()
    rollout = cfg.rollout
    padded = left_padded(prompts, tokenizer.pad_token_id, dist.device)

    sampling = Sampling(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=rollout.max_new_tokens,
                        temperature=rollout.temperature, top_k=rollout.top_k, top_p=rollout.top_p,
                        zero3_engine=models.actor if cfg.engine.zero_stage == 3 else None, gather=rollout.gather_params,
                        device=dist.device)

    def ours() -> Any:
        return sample_rollout(module, prompts, sampling)

    def plain() -> Any:
        return plain_generate(module, padded, cfg, tokenizer)

    times: dict[str, list[float]] = {"rollout": [], "plain": []}
    for rep in range(1 + reps):  # the first round is warm-up
        order = [("rollout", ours), ("plain", plain)] if rep % 2 == 0 else [("plain", plain), ("rollout", ours)]
        widths = []
        for name, fn in order:
            torch.manual_seed(1000 + rep)
            seconds, out = timed(fn, dist.device)
            widths.append(out.input_ids.shape[1] if name == "rollout" else out.shape[1])
            if rep:
                times[name].append(seconds)
        if widths[0] != widths[1]:
            raise RuntimeError(f"rollout and plain generate produced different lengths ({widths}); the comparison would be unfair")
    return times


def ppo_parts(models: Any, cfg: Any, prompts: list[list[int]], tokenizer: Any, dist: Any, *, reps: int) -> dict[str, list[float]]:
    """(b) `reps` timed rounds (after one of warm-up) of a PPO step's essential parts, each timed
    alone with plain torch and transformers calls (see `plain_ppo_round`)."""
    one_round = plain_ppo_round(models, cfg, tokenizer, dist)
    rounds = [one_round(prompts, seed=2000 + rep) for rep in range(1 + reps)][1:]  # the first round is warm-up
    return {k: [r[k] for r in rounds] for k in rounds[0]}


def plain_ppo_round(models: Any, cfg: Any, tokenizer: Any, dist: Any) -> Callable[..., dict[str, float]]:
    """A function that times one round of a PPO step's essential parts on `prompts` with plain
    torch and transformers calls: one `generate`; one forward of each model the stage runs over
    the rollout (the actor's only where the stage does not take its log-probs from generation,
    the critic's only with one); the training passes, ppo.epochs over minibatches of forward, a
    loss, `backward`, clipping and a torch AdamW step of each trained model (through the engines
    under ZeRO, where the module alone holds only a partition). The phases of a stage step are
    compared with these."""
    import torch

    from rlhf.stages.ppo_rollout import logprobs_from_generation

    actor, critic, reference, reward = models.actor, models.critic, models.reference, models.reward
    temperature = cfg.rollout.temperature
    eos = tokenizer.eos_token_id
    actor_forward = not logprobs_from_generation(cfg, actor.module.config.vocab_size)
    trained = {"actor": actor, **({"critic": critic} if critic is not None else {})}
    passes = plain_passes(trained, cfg) if cfg.engine.zero_stage == 0 else {name: engine_pass(e) for name, e in trained.items()}

    def one_round(prompts: list[list[int]], *, seed: int) -> dict[str, float]:
        padded = left_padded(prompts, tokenizer.pad_token_id, dist.device)
        width = padded["input_ids"].shape[1]

        def logprobs(model: Any, ids: Any, mask: Any, positions: Any) -> Any:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, width - 1 : -1]
            return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, ids[:, width:, None]).squeeze(-1)

        actor.eval()
        torch.manual_seed(seed)
        seconds, ids = timed(lambda: plain_generate(actor.module, padded, cfg, tokenizer), dist.device)
        record = {"generate": seconds, "actor": 0.0, "critic": 0.0}
        # Masks: a response counts up to and including its first EOS.
        response = ids[:, width:]
        ended_before = (response == eos).long().cumsum(dim=1) - (response == eos).long() > 0
        response_mask = ~ended_before
        mask = torch.cat([padded["attention_mask"], response_mask.long()], dim=1)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        with torch.no_grad():
            if actor_forward:
                record["actor"], _ = timed(lambda: logprobs(actor.module, ids, mask, positions), dist.device)
            if reference is not None:
                record["reference"], _ = timed(lambda: logprobs(reference, ids, mask, positions), dist.device)
            else:  # LoRA: the actor without its adapters
                with actor.module.disable_adapter():
                    record["reference"], _ = timed(lambda: logprobs(actor.module, ids, mask, positions), dist.device)
            if critic is not None:
                record["critic"], _ = timed(lambda: critic.module(ids, mask), dist.device)
            record["reward"], _ = timed(lambda: reward(ids, mask), dist.device) if reward is not None else (0.0, None)
        advantages = torch.randn(response_mask.shape, device=dist.device)
        returns = torch.randn(response_mask.shape, device=dist.device)
        weights = response_mask.float()

        def losses(name: str, model: Any, rows: Any) -> Any:
            n = weights[rows].sum().clamp(min=1)
            if name == "actor":
                return -(logprobs(model, ids[rows], mask[rows], positions[rows]) * advantages[rows] * weights[rows]).sum() / n
            values = model(ids[rows], mask[rows])[:, width - 1 : -1]
            return (((values - returns[rows]) ** 2) * weights[rows]).sum() / n

        def train() -> None:
            micro = cfg.engine.micro_batch_size
            for _ in range(cfg.ppo.epochs):
                order = torch.randperm(ids.shape[0], device=dist.device)
                for m in range(ids.shape[0] // micro):
                    rows = order[m * micro : (m + 1) * micro]
                    for name, (model, update) in passes.items():
                        update(losses(name, model, rows))

        for engine in trained.values():
            engine.train()
        record["train"], _ = timed(train, dist.device)
        return record

    return one_round


def plain_passes(engines: dict[str, Any], cfg: Any) -> dict[str, tuple[Any, Callable[[Any], None]]]:
    """For each trained model: its module, and one plain torch update of it from a loss: backward,
    clip to the stage's grad_clip, an AdamW step as the engine builds it (`rlhf.training.engine.fused_adamw`
    picks the kernel) at a tiny lr, zero_grad."""
    import torch

    from rlhf.training.engine import fused_adamw

    passes = {}
    for name, engine in engines.items():
        module = engine.module
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-8, fused=fused_adamw(params))
        clip = (cfg.optim if name == "actor" else cfg.critic_optim).grad_clip

        def update(loss: Any, params: list = params, optimizer: Any = optimizer, clip: float = clip) -> None:
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        passes[name] = (module, update)
    return passes


def engine_pass(engine: Any) -> tuple[Any, Callable[[Any], None]]:
    """Under ZeRO the module holds a partition: the update goes through the engine."""

    def update(loss: Any) -> None:
        engine.backward(loss)
        engine.step()

    return engine, update


if __name__ == "__main__":
    sys.exit(main())
