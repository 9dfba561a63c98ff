"""`rlhf compare`: every method of the toolkit on the embedded default, ranked on ground truth.

One SFT and one RM entry are made first (the `make pipeline` stages); then each method runs from
them the way a user runs it, through the CLI on one rank, one after another: SFT alone (PPO's own
measurement of its starting policy), best-of-N, PPO (gae), GRPO, RLOO, REINFORCE++ and each
`rlhf dpo` loss. The RL methods sample the same number of responses (rollout.batch_size x
train.max_steps, K samples per prompt for the group methods); best-of-N spends n samples per
held-out prompt at inference; the DPO losses train for their default steps on the oracle's
comparisons (no sampling).

Written to the output folder: compare.md (the table and each method's command), compare.json (the
figures), and PNG plots: the oracle's score (sampled, greedy), the KL to the SFT policy, wall time
and peak memory per method, and along each RL run the oracle's score and the reward model's score
against the KL (the reward-overoptimization picture of Gao et al. 2023).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.config.presets import preset
from rlhf.errors import UserError

if TYPE_CHECKING:
    import psutil

# Held-out evaluations along each RL run: enough points for a curve, on fewer prompts than the default.
RL_EVAL = ("train.eval_every=15", "eval.max_rows=400")
QUICK_RL = ("train.max_steps=4", "rollout.batch_size=16", "engine.micro_batch_size=8", "train.eval_every=2",
            "eval.max_rows=32", "train.save_every=0")
QUICK_DPO = ("train.max_steps=6", "optim.warmup_steps=1", "train.eval_every=3", "eval.max_rows=32", "eval.max_prompts=32",
             "train.save_every=0")


@dataclass(frozen=True)
class Method:
    key: str
    """What `rlhf compare --methods` calls it."""
    name: str
    stage: str
    args: tuple[str, ...]


@dataclass
class Measured:
    method: str
    stage: str
    command: str
    entry: str
    wall_s: float | None
    peak_mib: float | None
    oracle_sampled: float | None
    oracle_greedy: float | None
    kl: float | None
    """To the SFT policy, per response, on held-out prompts (best-of-N: its closed-form bound)."""


def methods(*, quick: bool) -> list[Method]:
    rl = QUICK_RL if quick else RL_EVAL
    dpo = QUICK_DPO if quick else ()
    group = ("rollout.samples_per_prompt=4",)
    bon = ("data.train=null", "sampling.n=4", *(("eval.max_rows=32",) if quick else ()))
    return [
        Method("bon", "best-of-4", "bon", bon),
        Method("ppo", "PPO (gae)", "ppo", rl),
        Method("grpo", "GRPO", "ppo", (*rl, "ppo.estimator=grpo", *group)),
        Method("rloo", "RLOO", "ppo", (*rl, "ppo.estimator=rloo", *group)),
        Method("reinforce_pp", "REINFORCE++", "ppo", (*rl, "ppo.estimator=reinforce_pp")),
        # The recipe options on GRPO's groups, as the ppo-dapo and ppo-gspo presets set them (not their run lengths).
        Method("dapo", "DAPO", "ppo", (*rl, "ppo.estimator=grpo", *group, "ppo.loss_aggregation=token_mean", "ppo.clip_low=0.2",
                                       "ppo.clip_high=0.28", "ppo.beta=0", "ppo.no_eos_score=null", "ppo.overlong_filter=true",
                                       "reward.overlong_buffer=2", "ppo.dynamic_sampling=true", "ppo.max_sampling_rounds=3")),
        Method("gspo", "GSPO", "ppo", (*rl, "ppo.estimator=grpo", *group, "ppo.ratio=sequence", "ppo.loss_aggregation=sequence_mean",
                                       "ppo.clip_low=0.0003", "ppo.clip_high=0.0004")),
        *(Method(loss, f"DPO ({loss})", "dpo", (*dpo, f"dpo.loss={loss}")) for loss in ("dpo", "ipo", "kto", "simpo", "orpo")),
    ]


def chosen_methods(text: str | None, *, quick: bool) -> list[Method]:
    """`--methods` (comma-separated keys; None = all) as methods, in the table's order."""
    every = methods(quick=quick)
    if text is None:
        return every
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in {m.key for m in every}]
    if unknown or not keys:
        raise UserError(f"--methods {text!r}: choose from {', '.join(m.key for m in every)} (comma-separated)")
    return [m for m in every if m.key in keys]


def base_stages(home: Path, *, quick: bool, rlhf: str) -> None:
    """The SFT and RM entries every method starts from."""
    configs = ("--sft-config", str(preset("sft-toy-quick")), "--rm-config", str(preset("rm-toy-quick")))
    args = [rlhf, "pipeline", "--stages", "sft,rm", "--no-report", "--launcher", "python", *(configs if quick else ())]
    done = subprocess.run(args, env=_env(home), cwd=home, capture_output=True, text=True)
    if done.returncode:
        raise UserError(f"the SFT and RM stages failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")


def run_method(method: Method, home: Path, *, rlhf: str) -> tuple[str, float, float]:
    """Run one method to completion; (its entry id, wall seconds, peak resident memory of its process tree in MiB)."""
    import psutil

    before = {e["id"] for e in _entries(home, rlhf)}
    args = [rlhf, method.stage, "--launcher", "python", *method.args]
    started, peak = time.time(), 0
    with subprocess.Popen(args, env=_env(home), cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        tree = psutil.Process(proc.pid)
        while proc.poll() is None:
            peak = max(peak, _tree_rss(tree))
            time.sleep(0.2)
        assert proc.stderr is not None  # stderr=PIPE
        error = proc.stderr.read()
    if proc.returncode:
        raise UserError(f"{method.name} failed (exit {proc.returncode}): {' '.join(args[1:])}: {error.strip().splitlines()[-1:]}")
    [entry] = [e["id"] for e in _entries(home, rlhf) if e["id"] not in before and e["stage"] == method.stage]
    return entry, time.time() - started, peak / 2**20


def _tree_rss(process: psutil.Process) -> int:
    import psutil

    try:
        return sum(p.memory_info().rss for p in (process, *process.children(recursive=True)))
    except psutil.Error:  # a process ended between listing and reading
        return 0


def _env(home: Path) -> dict[str, str]:
    import os

    return {**os.environ, "RLHF_HOME": str(home)}


def _entries(home: Path, rlhf: str) -> list[dict[str, Any]]:
    listed = subprocess.run([rlhf, "registry", "ls", "--json"], env=_env(home), cwd=home, capture_output=True, text=True, check=True)
    return json.loads(listed.stdout)


def measured(method: Method, entry: dict[str, Any], wall_s: float, peak_mib: float) -> Measured:
    """A method's row from its registry entry's summary metrics."""
    m = entry["metrics"]
    command = f"rlhf {method.stage} --launcher python {' '.join(method.args)}".strip()
    if method.stage == "bon":
        n = max(int(k.split("_")[2]) for k in m if k.startswith("best_of_") and k.endswith("_oracle_score"))
        return Measured(method.name, method.stage, command, entry["id"], wall_s, peak_mib, m[f"best_of_{n}_oracle_score"],
                        None, m[f"best_of_{n}_kl_bound"])
    return Measured(method.name, method.stage, command, entry["id"], wall_s, peak_mib, m.get("oracle_score"),
                    m.get("oracle_greedy"), m.get("kl"))


def sft_row(ppo_entry: dict[str, Any]) -> Measured:
    """SFT alone, as PPO measured its starting policy before its first step (same prompts, same sampling)."""
    m = ppo_entry["metrics"]
    return Measured("SFT alone", "sft", "(PPO's step-0 evaluation)", ppo_entry["parents"][0], None, None,
                    m.get("initial_oracle_score"), m.get("initial_oracle_greedy"), 0.0)


def compare(out: Path, home: Path, *, quick: bool, rlhf: str | None = None, say: Callable[[str], object] = print,
            chosen: list[Method] | None = None) -> list[Measured]:
    """Make the base entries, run each method (every one unless `chosen`), write the table and the plots;
    the rows, best first."""
    rlhf = rlhf or str(Path(sys.executable).with_name("rlhf"))
    out.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    say(f"compare: SFT and RM entries in {home}")
    base_stages(home, quick=quick, rlhf=rlhf)
    rows: list[Measured] = []
    for method in chosen or methods(quick=quick):
        say(f"compare: {method.name}")
        entry_id, wall_s, peak_mib = run_method(method, home, rlhf=rlhf)
        entry = next(e for e in _entries(home, rlhf) if e["id"] == entry_id)
        rows.append(measured(method, entry, wall_s, peak_mib))
        if method.name == "PPO (gae)":
            rows.append(sft_row(entry))
    rows.sort(key=lambda r: -(r.oracle_sampled or 0.0))
    (out / "compare.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    (out / "compare.md").write_text(markdown(rows, quick=quick))
    from rlhf.cli.compare_plots import write_plots

    write_plots(out, rows, home, rlhf=rlhf)
    return rows


def markdown(rows: list[Measured], *, quick: bool) -> str:
    def fmt(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        f"# rlhf compare{' --quick' if quick else ''}: every method on the embedded default",
        "",
        "Oracle score (0-100) of sampled and greedy answers to held-out prompts; KL to the SFT policy per response "
        "(best-of-N: the bound log n - (n-1)/n); wall time and peak resident memory of the method's run on 1 rank.",
        "",
        "| method | oracle, sampled | oracle, greedy | KL to SFT | wall time (s) | peak memory (MiB) | entry |",
        "|---|---|---|---|---|---|---|",
        *(f"| {r.method} | {fmt(r.oracle_sampled)} | {fmt(r.oracle_greedy)} | {fmt(r.kl, 2)} | {fmt(r.wall_s, 0)} | "
          f"{fmt(r.peak_mib, 0)} | `{r.entry}` |" for r in rows),
        "",
        "Commands (each from the same SFT and RM entries):",
        "",
        *(f"- {r.method}: `{r.command}`" for r in rows),
        "",
    ]
    return "\n".join(lines)
