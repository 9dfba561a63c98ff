"""The pipeline's chaining: the stage order and which config keys of a later stage name an earlier run.

One home for what `rlhf pipeline` (runs the stages here, one after another) and `rlhf submit
pipeline` (three SLURM jobs chained with afterok) share, so both tie each stage to the exact runs
before it. Standard library only: `rlhf submit --dry-run` must answer at once on a login node.
"""

from __future__ import annotations

from rlhf.errors import UserError

PIPELINE = ("sft", "rm", "ppo")
"""The stages `rlhf pipeline` runs by default (InstructGPT); `--stages sft,dpo` picks others."""
STAGES = ("sft", "rm", "ppo", "dpo", "bon", "sample", "label")
ROUND_STAGES = ("sample", "label", "rm", "ppo")
"""One round of `rlhf pipeline --rounds N` (after SFT, once): sample the newest policy, label, reward model, PPO."""

# Which config keys of a later stage name an earlier stage's entry: a pipeline points each stage at
# the runs it just made, since `latest` could pick up someone else's run by the time the stage starts.
PARENT_KEYS = {
    "rm": {"model.name_or_path": "sft"},
    "ppo": {"model.name_or_path": "sft", "critic.name_or_path": "rm", "reward.name_or_path": "rm"},
    "dpo": {"model.name_or_path": "sft"},
    "bon": {"model.name_or_path": "sft", "reward.name_or_path": "rm"},
}


def parse_stages(text: str | None) -> tuple[str, ...]:
    """`--stages` as a tuple: comma-separated stage names, each once, every stage after the stages
    it starts from (PARENT_KEYS); None = PIPELINE. A parent left out is found by `latest` as usual."""
    if text is None:
        return PIPELINE
    stages = tuple(s.strip() for s in text.split(",") if s.strip())
    if not stages:
        raise UserError(f"--stages {text!r} names no stage; give e.g. sft,dpo")
    for i, stage in enumerate(stages):
        if stage not in STAGES:
            raise UserError(f"--stages: '{stage}' is not a stage; choose from {', '.join(STAGES)}")
        if stage in stages[:i]:
            raise UserError(f"--stages names '{stage}' twice; each stage runs once")
        late = [p for p in PARENT_KEYS.get(stage, {}).values() if p in stages[i + 1 :]]
        if late:
            raise UserError(f"--stages: {stage} starts from {late[0]}, so {late[0]} must come before it (e.g. {late[0]},{stage})")
    return stages


def split_stage_overrides(overrides: list[str], stages: tuple[str, ...]) -> dict[str, list[str]]:
    """`stage:key=value` goes to that stage, a plain `key=value` to every stage."""
    per_stage: dict[str, list[str]] = {stage: [] for stage in stages}
    for item in overrides:
        key = item.split("=", 1)[0]
        if ":" in key:
            stage, rest = item.split(":", 1)
            if stage not in per_stage:
                raise UserError(f"override {item!r} names stage '{stage}'; the stages here are {', '.join(stages)}")
            per_stage[stage].append(rest)
        else:
            for stage in stages:
                per_stage[stage].append(item)
    return per_stage


def with_parents(stage: str, args: list[str], run_ids: dict[str, str]) -> list[str]:
    """`stage`'s arguments plus `key=<parent>:<run id>` for each parent run in `run_ids`, unless the
    user set that key (options such as `-c FILE` are passed through and never count as keys)."""
    given = {a.split("=", 1)[0] for a in args if "=" in a and not a.startswith("-")}
    return [*args, *(f"{key}={parent}:{run_ids[parent]}" for key, parent in PARENT_KEYS.get(stage, {}).items()
                     if parent in run_ids and key not in given)]


def round_overrides(stage: str, args: list[str], *, sft: str, previous: dict[str, str], current: dict[str, str],
                    label_by: str) -> list[str]:
    """`stage`'s arguments in a round of `rlhf pipeline --rounds`, tied to this round's runs (`current`) and the
    previous round's (`previous`, empty in round 1); keys the user set win.

    sample: the newest policy (the previous round's PPO actor, else the SFT). label: this round's samples,
    keeping every earlier comparison (the previous prefs entry). rm: from the SFT model (not the previous
    reward model, which would see the old comparisons twice) on all comparisons so far. ppo: from the newest
    policy, against this round's reward model (critic too), KL to the SFT policy (InstructGPT's reference)."""
    policy = f"ppo:{previous['ppo']}" if "ppo" in previous else f"sft:{sft}"
    wanted = {
        "sample": {"model.name_or_path": policy},
        "label": {"data.samples": f"samples:{current.get('sample', '')}", "by": label_by,
                  **({"data.include": f"prefs:{previous['label']}"} if "label" in previous else {})},
        "rm": {"model.name_or_path": f"sft:{sft}", "data.train": f"prefs:{current.get('label', '')}"},
        "ppo": {"model.name_or_path": policy, "reference.name_or_path": f"sft:{sft}",
                "critic.name_or_path": f"rm:{current.get('rm', '')}", "reward.name_or_path": f"rm:{current.get('rm', '')}"},
    }[stage]
    given = {a.split("=", 1)[0] for a in args if "=" in a and not a.startswith("-")}
    return [*args, *(f"{key}={value}" for key, value in wanted.items() if key not in given)]
