"""What a run's config lets run as code, and the confirmation `--resume` asks for before running it.

A run folder is writable by whoever shares the registry, so its config.yaml is not the user's word:
a resume takes from it only what runs no code of its own. Settings that do (a model's
`trust_remote_code`, a `python:` reward function, eval.gold grader or rollout.env class) must be repeated on the resume's command line,
as the user gave them when the run started (`rlhf submit` writes them into its requeue line).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.config import STAGE_CONFIGS, load_config, to_dict
from rlhf.errors import UserError

if TYPE_CHECKING:
    from rlhf.config import StageConfig

PYTHON_REWARD = "python:"


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def code_running_settings(cfg: StageConfig) -> dict[str, Any]:
    """{dotted key: value} of the settings in `cfg` that let code from outside rlhf run."""
    flat = _flat(to_dict(cfg))
    found: dict[str, Any] = {key: value for key, value in flat.items() if key.endswith("trust_remote_code") and value is True}
    rewards = flat.get("reward.name_or_path")
    if isinstance(rewards, list) and any(str(source).startswith(PYTHON_REWARD) for source in rewards):
        found["reward.name_or_path"] = rewards
    if str(flat.get("rollout.env") or "").startswith(PYTHON_REWARD):  # rlhf ppo's multi-turn environment class
        found["rollout.env"] = flat["rollout.env"]
    if str(flat.get("eval.gold") or "").startswith(PYTHON_REWARD):  # rlhf ppo's held-out grader
        found["eval.gold"] = flat["eval.gold"]
    if str(flat.get("by", "")).startswith(PYTHON_REWARD):  # rlhf label's labeler
        found["by"] = flat["by"]
    return found


def as_override(key: str, value: Any) -> str:
    """`key=value` as the command line takes it back (lists as `[a, b]`, booleans as true)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, list):
        text = "[" + ", ".join(str(v) for v in value) + "]"
    else:
        text = str(value)
    return f"{key}={text}"


def resume_command(stage: str, run_id: str, cfg: StageConfig) -> str:
    """The command that resumes the run, with the code-running settings of `cfg` repeated to confirm them."""
    repeat = [shlex.quote(as_override(key, value)) for key, value in code_running_settings(cfg).items()]
    return " ".join(["rlhf", stage, "--resume", "--run", run_id, *repeat])


def check_resume_overrides(stage: str, config_file: Path, cfg: StageConfig, overrides: list[str]) -> None:
    """A resume's overrides may only repeat the run's values, and must repeat each code-running one."""
    if overrides:
        again = _flat(to_dict(load_config(STAGE_CONFIGS[stage], config_file, overrides)))
        stored = _flat(to_dict(cfg))
        changed = [key for key in stored if again.get(key) != stored[key]]
        if changed:
            key = changed[0]
            raise UserError(f"--resume continues a run with its saved config, where {key} is {stored[key]!r}, not "
                            f"{again.get(key)!r}; an override on --resume may only repeat a value, to confirm it")
    confirmed = {item.split("=", 1)[0].strip() for item in overrides}
    missing = [key for key in code_running_settings(cfg) if key not in confirmed]
    if missing:
        raise UserError(
            f"{config_file} sets {', '.join(missing)}, which runs code from outside rlhf; a resume does not take that "
            f"from a run folder: if you trust it, repeat it: {resume_command(stage, config_file.parent.name, cfg)}"
        )
