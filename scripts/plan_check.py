"""`rlhf plan`'s model states against the tensors of real runs: python scripts/plan_check.py [--steps 3].

Runs `rlhf sft` and `rlhf rm` on the embedded default (the tiny toy model, CPU, gloo) at ZeRO 0 and 3 on 1 and 2
ranks for a few steps. A `sitecustomize` hook (this script's own, on PYTHONPATH of the runs only; nothing in rlhf
changes) wraps `rlhf.training.engine.build_engine` in each rank and, after every backward and every optimizer step, adds up
the bytes of distinct tensor storages the engine holds:
  weights    the module's parameters (under ZeRO-3 each rank's partition, `ds_tensor`)
  gradients  the parameters' `.grad` tensors after backward (ZeRO-0; ZeRO-3 keeps its gradients in its own buffers)
  optimizer  every tensor the DeepSpeed optimizer object and its inner torch optimizer hold (Adam's states, ZeRO's
             flat partitions and gradient buffers), less the storages already counted as weights
and writes the largest sum each rank saw. It prints that beside the estimate of `rlhf.launcher.memory_plan` for the same config.
Process memory (peak RSS) is printed too, but at this size it is the libraries (torch, DeepSpeed, transformers),
not the model: the toy's states are a few MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RLHF = str(Path(sys.executable).with_name("rlhf"))

HOOK = r'''
import importlib.abc, importlib.util, json, os, sys

OUT = os.environ.get("PLAN_CHECK_OUT")


def _bytes(t):
    return t.untyped_storage().nbytes() if t is not None and t.device.type != "meta" else 0


def _tensors(obj, depth=0):
    import torch
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 3 and isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x, depth + 1)


def _measure(engine, seen):
    weights, seen_ptrs = 0, set()
    for p in engine.module.parameters():
        t = getattr(p, "ds_tensor", None)
        t = p.data if t is None else t
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen_ptrs and t.numel():
            seen_ptrs.add(ptr); weights += _bytes(t)
    grads = 0
    for p in engine.module.parameters():
        if p.grad is not None and p.grad.numel() and p.grad.untyped_storage().data_ptr() not in seen_ptrs:
            seen_ptrs.add(p.grad.untyped_storage().data_ptr()); grads += _bytes(p.grad)
    optimizer = 0
    opt = engine.optimizer
    holders = [vars(opt)]
    inner = getattr(opt, "optimizer", None)
    for o in (opt, inner):
        if o is not None and hasattr(o, "state"):
            holders.append(dict(o.state))
    for holder in holders:
        for t in _tensors(holder):
            ptr = t.untyped_storage().data_ptr()
            if t.numel() and ptr not in seen_ptrs:
                seen_ptrs.add(ptr); optimizer += _bytes(t)
    row = {"weights": weights, "grads": grads, "optimizer": optimizer}
    for k, v in row.items():
        seen[k] = max(seen.get(k, 0), v)
    seen["total"] = max(seen.get("total", 0), sum(row.values()))
    with open("/proc/self/status") as f:
        hwm = [line for line in f if line.startswith("VmHWM")]
    seen["peak_rss"] = int(hwm[0].split()[1]) * 1024 if hwm else 0
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(OUT, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)


def _patch(module):
    original = module.build_engine

    def build_engine(*args, **kwargs):
        engine = original(*args, **kwargs)
        seen = {}
        backward, step = engine.backward, engine.step

        def after_backward(*a, **k):
            out = backward(*a, **k); _measure(engine, seen); return out

        def after_step(*a, **k):
            out = step(*a, **k); _measure(engine, seen); return out

        engine.backward, engine.step = after_backward, after_step
        return engine

    module.build_engine = build_engine


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "rlhf.training.engine":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        sys.meta_path.insert(0, self)
        loader = spec.loader
        exec_module = loader.exec_module

        def patched(module):
            exec_module(module); _patch(module)

        loader.exec_module = patched
        return spec


if OUT:
    sys.meta_path.insert(0, _Finder())
'''

RUNS = [(stage, zero, ranks) for stage in ("sft", "rm") for zero in (0, 3) for ranks in (1, 2)]


def overrides(stage: str, zero: int, steps: int) -> list[str]:
    common = [f"train.max_steps={steps}", f"engine.zero_stage={zero}", "train.save_every=0", "train.log_every=1",
              "optim.warmup_steps=1", "eval.max_rows=8"]
    return common + (["model.name_or_path=toy", "eval.reward_stats_rows=8"] if stage == "rm" else [])


def estimate(stage: str, zero: int, ranks: int, steps: int) -> dict[str, float]:
    from rlhf.config import STAGE_CONFIGS, load_config
    from rlhf.config.presets import config_file
    from rlhf.launcher.memory_plan import plan_stage
    from rlhf.launcher.memory_shapes import model_shapes
    from rlhf.store.registry import Registry

    cfg = load_config(STAGE_CONFIGS[stage], config_file(Path(f"{stage}-toy-quick")), overrides(stage, zero, steps))
    plan = plan_stage(stage, cfg, model_shapes(stage, cfg, Registry(Path(tempfile.gettempdir()))), ranks=ranks, memory=2**40)
    (row,) = plan.rows
    s = row.states
    return {"weights": s.weights, "grads": s.grads, "optimizer": s.optimizer, "total": s.device + s.cpu, "params": row.shape.params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hook_dir = Path(tmp) / "hook"
        hook_dir.mkdir()
        (hook_dir / "sitecustomize.py").write_text(HOOK)
        print("| stage | ZeRO | ranks | estimate: weights / grads / optimizer = states (KiB) | measured per rank, largest "
              "(KiB) | measured / estimate | peak RSS (MiB) | wall (s) |")
        print("|---|---|---|---|---|---|---|---|")
        for stage, zero, ranks in RUNS:
            out = Path(tmp) / f"{stage}-{zero}-{ranks}"
            out.mkdir()
            env = {**os.environ, "PLAN_CHECK_OUT": str(out), "RLHF_HOME": str(Path(tmp) / "home"),
                   "PYTHONPATH": os.pathsep.join([str(hook_dir), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
            cmd = [RLHF, stage, "-c", f"{stage}-toy-quick", "-n", str(ranks), *overrides(stage, zero, args.steps)]
            start = time.monotonic()
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
            wall = time.monotonic() - start
            if done.returncode:
                sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
            measured = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
            if len(measured) != ranks:
                sys.exit(f"{' '.join(cmd)}: {len(measured)} rank report(s) for {ranks} ranks")
            est = estimate(stage, zero, ranks, args.steps)
            m = max(measured, key=lambda r: r["total"])
            kib = 1024
            print(f"| {stage} | {zero} | {ranks} | {est['weights'] / kib:.0f} / {est['grads'] / kib:.0f} / {est['optimizer'] / kib:.0f} "
                  f"= {est['total'] / kib:.0f} | {m['weights'] / kib:.0f} / {m['grads'] / kib:.0f} / {m['optimizer'] / kib:.0f} "
                  f"= {m['total'] / kib:.0f} | {m['total'] / est['total']:.2f} | {max(r['peak_rss'] for r in measured) / 2**20:.0f} | "
                  f"{wall:.0f} |", flush=True)


if __name__ == "__main__":
    main()
