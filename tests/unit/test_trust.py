"""What a resume takes from a run folder's config and what it asks the user to repeat (rlhf.store.trust)."""

from __future__ import annotations

import re
import shlex

import pytest

from rlhf.cli.slurm import Resources, StageJob, render_script
from rlhf.config import PPOConfig, SFTConfig, load_config, save_config
from rlhf.errors import UserError
from rlhf.store.trust import as_override, check_resume_overrides, code_running_settings

FUNCTION = "python:my_rewards.brevity:short"


def saved(tmp_path, cls, *overrides: str):
    cfg = load_config(cls, None, list(overrides))
    folder = tmp_path / "runs" / "ppo-20260101-000000-aaaa0001"
    folder.mkdir(parents=True)
    save_config(cfg, folder / "config.yaml")
    return folder / "config.yaml", cfg


def test_the_settings_that_run_code_are_found_and_nothing_else():
    plain = load_config(PPOConfig, None, [])
    assert code_running_settings(plain) == {}
    cfg = load_config(PPOConfig, None, ["model.trust_remote_code=true", "reward.trust_remote_code=true",
                                        f"reward.name_or_path=[rm:latest, {FUNCTION}]", "critic.trust_remote_code=false"])
    assert code_running_settings(cfg) == {"model.trust_remote_code": True, "reward.trust_remote_code": True,
                                          "reward.name_or_path": ["rm:latest", FUNCTION]}
    # What the command line takes back, unchanged.
    for key, value in code_running_settings(cfg).items():
        assert code_running_settings(load_config(PPOConfig, None, [as_override(key, value)])).get(key) == value


def test_a_resume_asks_to_repeat_each_code_running_setting(tmp_path):
    config_file, cfg = saved(tmp_path, PPOConfig, "model.trust_remote_code=true", f"reward.name_or_path=[rm:latest, {FUNCTION}]")
    with pytest.raises(UserError) as refused:
        check_resume_overrides("ppo", config_file, cfg, [])
    message = str(refused.value)
    assert "sets model.trust_remote_code, reward.name_or_path, which runs code from outside rlhf" in message
    command = message.split("if you trust it, repeat it: ")[1]
    words = shlex.split(command)
    assert words[:5] == ["rlhf", "ppo", "--resume", "--run", config_file.parent.name] and "\n" not in message
    args = words[5:]
    check_resume_overrides("ppo", config_file, cfg, args)  # the command it names goes through
    with pytest.raises(UserError, match="sets reward.name_or_path"):  # one confirmed, one not
        check_resume_overrides("ppo", config_file, cfg, ["model.trust_remote_code=true"])


def test_an_override_on_resume_may_only_repeat_a_value(tmp_path):
    config_file, cfg = saved(tmp_path, SFTConfig)
    check_resume_overrides("sft", config_file, cfg, [])
    check_resume_overrides("sft", config_file, cfg, [f"optim.lr={cfg.optim.lr}"])
    with pytest.raises(UserError, match=re.escape("where optim.lr is 0.001, not 1.0; an override on --resume may only repeat")):
        check_resume_overrides("sft", config_file, cfg, ["optim.lr=1"])
    with pytest.raises(UserError, match="where model.trust_remote_code is False, not True"):
        check_resume_overrides("sft", config_file, cfg, ["model.trust_remote_code=true"])


def test_a_requeued_job_repeats_what_its_submission_trusted(tmp_path):
    job = StageJob("ppo", "ppo-abc", tmp_path / "runs" / "ppo-abc", ("model.trust_remote_code=true",),
                   ("model.trust_remote_code=true", f"reward.name_or_path=[rm:latest, {FUNCTION}]"))
    script = render_script(job, Resources(), registry_root=tmp_path, workdir=tmp_path, rlhf_exe="rlhf")
    assert ('--resume --run "$RUN_ID" --registry "$RLHF_HOME" model.trust_remote_code=true '
            f"'reward.name_or_path=[rm:latest, {FUNCTION}]'") in script


def test_a_python_grader_in_eval_gold_runs_code_and_the_oracle_does_not():
    grader = "python:rlhf.tasks.chat:exact_reward"
    assert code_running_settings(load_config(PPOConfig, None, [f"eval.gold={grader}"])) == {"eval.gold": grader}
    assert code_running_settings(load_config(PPOConfig, None, ["eval.gold=oracle"])) == {}


@pytest.mark.parametrize(("overrides", "says"), [
    (["eval.gold=rm:latest"], "eval.gold: 'rm:latest' is neither python:package.module:function nor oracle"),
    (["eval.gold=python:no-dots"], "eval.gold: 'python:no-dots' is not python:package.module:function"),
    (["eval.gold=oracle", "data.eval=prompts.jsonl"], "eval.gold=oracle grades held-out answers, but data.eval=prompts.jsonl"),
    (["eval.gold=python:rlhf.tasks.chat:exact_reward", "data.eval=null"], "set data.eval"),
])
def test_eval_gold_is_a_grader_of_held_out_answers(overrides, says):
    with pytest.raises(UserError) as refused:
        load_config(PPOConfig, None, overrides)
    assert says in str(refused.value) and "\n" not in str(refused.value)
