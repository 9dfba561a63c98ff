"""sbatch scripts and the srun launch command (the scripts run on a real SLURM in tests/integration)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhf.cli.slurm import Resources, StageJob, render_script, round_jobs, sbatch_command, stage_jobs, submit_script
from rlhf.errors import UserError
from rlhf.launcher.command import LaunchSpec, build_command, srun_command


def ids():
    """A stand-in for Registry.new_run_id: distinct, predictable ids."""
    counter = itertools.count(1)
    return lambda stage: f"{stage}-run{next(counter)}"


def test_pipeline_jobs_point_each_stage_at_the_runs_before_it(tmp_path):
    jobs = stage_jobs(("sft", "rm", "ppo"), registry_root=tmp_path, new_run_id=ids(),
                      stage_args={"sft": ["train.max_steps=3"], "rm": [], "ppo": ["critic.name_or_path=rm:mine"]})
    sft, rm, ppo = jobs
    assert sft.stage_args == ("train.max_steps=3",)
    assert rm.stage_args == (f"model.name_or_path=sft:{sft.run_id}",)
    # What the user set wins; the rest follows the chain.
    assert ppo.stage_args == ("critic.name_or_path=rm:mine", f"model.name_or_path=sft:{sft.run_id}",
                              f"reward.name_or_path=rm:{rm.run_id}")
    assert rm.run_dir == tmp_path / "runs" / rm.run_id and rm.script_path.name == "job.sbatch"


def test_script_directives_and_resume_branch(tmp_path):
    job = StageJob("rm", "rm-abc", tmp_path / "runs" / "rm-abc", ("-c", "/cfg/rm.yaml", "optim.lr=1e-4"))
    res = Resources(nodes=2, gpus_per_node=8, partition="gpu", time="04:00:00", account="proj", requeue=True,
                    warn_before_s=300, sbatch_args=("--qos=high",))
    script = render_script(job, res, registry_root=tmp_path, workdir=Path("/work dir"), rlhf_exe="/venv/bin/rlhf",
                           python="/venv/bin/python")
    directives = [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH")]
    assert directives == [
        "--job-name=rlhf-rm", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu",
        "--time=04:00:00", "--account=proj", f"--output={tmp_path}/runs/rm-abc/slurm-%j.out", "--open-mode=append",
        "--requeue", "--signal=B:USR1@300", "--qos=high",
    ]
    assert "cd '/work dir'" in script
    assert "--launcher srun -n 8 --resume --run \"$RUN_ID\"" in script
    assert "--launcher srun -n 8 --run \"$RUN_ID\" -c /cfg/rm.yaml optim.lr=1e-4" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    # The script is valid bash.
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


def test_cpu_job_without_requeue_asks_for_no_gpu():
    job = StageJob("sft", "sft-1", Path("/r/runs/sft-1"), ())
    script = render_script(job, Resources(ranks_per_node=2, cpus_per_task=2), registry_root=Path("/r"),
                           workdir=Path("/w"), rlhf_exe="rlhf")
    assert "--gpus-per-node" not in script and "#SBATCH --cpus-per-task=2" in script
    assert "#SBATCH --no-requeue" in script and "--signal" not in script
    assert "--launcher srun -n 2 --run \"$RUN_ID\"\n" in script


@pytest.mark.parametrize("res, message", [
    (Resources(nodes=0), "--nodes must be at least 1"),
    (Resources(gpus_per_node=-1), "--gpus-per-node must be 0"),
    (Resources(gpus_per_node=2, ranks_per_node=4), "each rank needs a GPU"),
])
def test_impossible_resources(res, message):
    with pytest.raises(UserError, match=message):
        res.check()


SLURM_ENV = {"SLURM_JOB_ID": "77", "SLURM_NNODES": "3", "MASTER_ADDR": "node01", "MASTER_PORT": "29555"}


def test_srun_starts_one_torchrun_per_node_with_a_rendezvous_on_the_first():
    cmd = srun_command(LaunchSpec("rlhf.stages.ppo", ("--run-dir", "/r"), num_procs=4), python="py", env=SLURM_ENV)
    assert cmd[:4] == ["srun", "--nodes=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert cmd[4:7] == ["py", "-m", "torch.distributed.run"]
    assert {"--nnodes=3", "--nproc-per-node=4", "--rdzv-backend=c10d", "--rdzv-endpoint=node01:29555",
            "--rdzv-id=77"} <= set(cmd)
    assert cmd[-4:] == ["-m", "rlhf.stages.ppo", "--run-dir", "/r"]


def test_srun_outside_a_job_says_to_submit(monkeypatch):
    for name in SLURM_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match="rlhf submit"):
        build_command(LaunchSpec(Path("p.py"), (), launcher="srun"))


# --- values in the script are data, never code ---------------------------------------------------


def sbatch_reads(line: str) -> list[str]:
    """The arguments sbatch takes from one `#SBATCH` line: blanks split them, quotes group, a
    backslash escapes the next character (inside quotes too), an unquoted `#` starts a comment."""
    words, word, quote, escaped, started = [], "", None, False, False
    for ch in line.removeprefix("#SBATCH"):
        if escaped:
            word, escaped = word + ch, False
        elif ch == "\\":
            escaped = started = True
        elif quote:
            quote, word = (None, word) if ch == quote else (quote, word + ch)
        elif ch in "'\"":
            quote, started = ch, True
        elif ch == "#":
            break
        elif ch.isspace():
            if started:
                words.append(word)
            word, started = "", False
        else:
            word, started = word + ch, True
    assert quote is None and not escaped, line
    return words + [word] if started else words


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


# Each would create a file named pwned* if a shell or sbatch ran it instead of passing it on.
HOSTILE = ["$(touch pwned1)", "`touch pwned2`", "x; touch pwned3", "y && touch pwned4 | cat > pwned5",
           "it's \"quoted\" \\ back\\slash", "#not a comment", "$HOME ${IFS} * ~ ! {a,b} [x]", "-e", ""]


def test_hostile_values_arrive_as_single_literal_arguments(tmp_path):
    work = tmp_path / "work $(touch pwned6) `touch pwned7`"
    home = tmp_path / "home; touch pwned8 'q' \"dq\""
    fake_rlhf = executable(tmp_path / "bin $(touch pwned9)" / "rlhf", '#!/bin/bash\nprintf \'%s\\0\' "$@" > "$ARGS_OUT"\n')
    executable(tmp_path / "fakebin" / "scontrol", "#!/bin/bash\necho node01\n")
    work.mkdir()
    stage_args = ("-c", str(tmp_path / "cfg dir" / "a'b $(touch pwned10).yaml"), *HOSTILE,
                  *[f"run.note={v}" for v in HOSTILE])
    job = StageJob("sft", "sft-run1", home / "runs" / "sft-run1", stage_args)
    res = Resources(partition="gpu a'b \"c\"", time="1:00:00 #x", account="$(touch pwned11)", requeue=True,
                    sbatch_args=("--comment=`touch pwned12` \\ \"q\" 'q' #c",))
    script = render_script(job, res, registry_root=home, workdir=work, rlhf_exe=str(fake_rlhf),
                           command_line="rlhf submit sft '$(touch pwned13)'")
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0

    # sbatch reads every directive back as one argument, exactly as given.
    directives = [arg for line in script.splitlines() if line.startswith("#SBATCH") for arg in sbatch_reads(line)]
    assert directives == [
        "--job-name=rlhf-sft", "--nodes=1", "--ntasks-per-node=1", "--partition=gpu a'b \"c\"", "--time=1:00:00 #x",
        "--account=$(touch pwned11)", f"--output={home}/runs/sft-run1/slurm-%j.out", "--open-mode=append",
        "--requeue", "--signal=B:USR1@120", "--comment=`touch pwned12` \\ \"q\" 'q' #c",
    ]

    # bash hands every value to rlhf as one literal argument, in both branches (new run, resume).
    env = {"PATH": f"{tmp_path / 'fakebin'}:/usr/bin:/bin", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node01",
           "ARGS_OUT": str(tmp_path / "args")}

    def run_job() -> list[str]:
        done = subprocess.run(["bash", str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return (tmp_path / "args").read_text().split("\0")[:-1]

    launch = ["sft", "--launcher", "srun", "-n", "1"]
    assert run_job() == [*launch, "--run", "sft-run1", *stage_args]
    (home / "runs" / "sft-run1").mkdir(parents=True)
    (home / "runs" / "sft-run1" / "config.yaml").write_text("{}\n")
    assert run_job() == [*launch, "--resume", "--run", "sft-run1", "--registry", str(home)]
    assert not [p for p in tmp_path.rglob("pwned*") if p.name.startswith("pwned")]


@pytest.mark.parametrize("run_id, stage", [("../x", "sft"), ("a/b", "sft"), (".hidden", "sft"), ("a b", "sft"),
                                           ("sft-1", "SFT x"), ("sft-1", "../sft")])
def test_run_ids_and_stages_must_be_plain_names(run_id, stage):
    job = StageJob(stage, run_id, Path("/r/runs/x"), ())
    with pytest.raises(UserError, match="is not a (plain|stage) name"):
        render_script(job, Resources(), registry_root=Path("/r"), workdir=Path("/w"), rlhf_exe="rlhf")


@pytest.mark.parametrize("res, message", [
    (Resources(sbatch_args=("qos=high",)), "is not an sbatch option"),
    (Resources(partition="hetjob"), "another job component"),
    (Resources(sbatch_args=("--comment=PackJob",)), "another job component"),
])
def test_sbatch_options_sbatch_would_misread(res, message):
    job = StageJob("sft", "sft-1", Path("/r/runs/sft-1"), ())
    with pytest.raises(UserError, match=message):
        render_script(job, res, registry_root=Path("/r"), workdir=Path("/w"), rlhf_exe="rlhf")


runner = CliRunner()
CONTROL = ["\n", "\r", "\t", "\x00", "\x1b", "\x1f", "\x7f"]


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """An `sbatch` on PATH that records each call's argv (one JSON list a line) and prints a job id."""
    log = tmp_path / "sbatch.log"
    executable(tmp_path / "fakebin" / "sbatch", f"""#!{sys.executable}
import json, sys
with open({str(log)!r}, "a") as f:
    f.write(json.dumps(sys.argv) + "\\n")
print(sum(1 for _ in open({str(log)!r})) + 100, end=";cluster\\n")
""")
    monkeypatch.setenv("PATH", f"{tmp_path / 'fakebin'}:{os.environ['PATH']}")
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return log


def sbatch_calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def control_cases():
    """(option as the message names it, argv) for each place a value enters a script, each control character."""
    for i, ch in enumerate(CONTROL):
        yield "--partition", ["sft", "--partition", f"gpu{ch}touch pwned"]
        yield "--time", ["sft", "--time", f"1:00:00{ch}"]
        yield "--account", ["sft", "-A", f"{ch}proj"]
        yield "--sbatch-arg", ["sft", f"--sbatch-arg=--qos=high{ch}touch pwned"]
        yield "override", ["sft", f"tracking.wandb_project=x{ch}touch pwned"]
        yield "override", ["pipeline", f"rm:tracking.wandb_project=x{ch}y"]
        if ch != "\x00":  # no file name holds a NUL
            yield "--config", ["sft", "-c", f"cfg{i}{ch}.yaml"]
            yield "--rm-config", ["pipeline", "--rm-config", f"cfg{i}{ch}.yaml"]


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "submit"])
@pytest.mark.parametrize("option, argv", list(control_cases()))
def test_control_characters_are_refused_before_anything_is_written(fake_sbatch, tmp_path, option, argv, dry_run):
    from rlhf.cli import app

    for arg in argv:
        if arg.startswith("cfg"):  # the file exists: only the name is wrong
            Path(arg).write_text("train:\n  max_steps: 3\n")
    result = runner.invoke(app, ["submit", *argv, *(["--dry-run"] if dry_run else [])])
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and result.stderr.startswith(f"error: {option} ")
    assert result.stderr.count("\n") == 1 and "control character" in result.stderr
    assert not (tmp_path / "home").exists() and sbatch_calls(fake_sbatch) == []


# --- the sbatch chain ---------------------------------------------------------------------------


def test_submit_script_runs_the_command_sbatch_command_builds(fake_sbatch, tmp_path):
    script = tmp_path / "a dir" / "job.sbatch"
    sbatch = str(tmp_path / "fakebin" / "sbatch")
    assert submit_script(script, sbatch=sbatch) == "101"
    assert submit_script(script, sbatch=sbatch, after="101") == "102"
    assert sbatch_calls(fake_sbatch) == [
        sbatch_command(script, sbatch=sbatch),
        sbatch_command(script, sbatch=sbatch, after="101"),
    ]
    assert sbatch_command(script, sbatch=sbatch, after="101") == [
        sbatch, "--parsable", "--dependency=afterok:101", str(script)]


def test_pipeline_dry_run_prints_the_sbatch_chain_that_submission_runs(fake_sbatch, tmp_path):
    from rlhf.cli import app

    sbatch = str(tmp_path / "fakebin" / "sbatch")
    dry = runner.invoke(app, ["submit", "pipeline", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    scripts = [Path(line.split(" ")[2]) for line in dry.stdout.splitlines() if line.startswith("# ---- /")]
    assert [p.parent.name.split("-")[0] for p in scripts] == ["sft", "rm", "ppo"]
    assert dry.stdout.rstrip("\n").splitlines()[-3:] == [
        f"{sbatch} --parsable {scripts[0]}",
        f"{sbatch} --parsable '--dependency=afterok:<job id of sft>' {scripts[1]}",
        f"{sbatch} --parsable '--dependency=afterok:<job id of rm>' {scripts[2]}",
    ]
    assert sbatch_calls(fake_sbatch) == [] and not (tmp_path / "home").exists()

    # A real submission runs the same commands, each job id filled in.
    submitted = runner.invoke(app, ["submit", "pipeline"], env={"COLUMNS": "300"})
    assert submitted.exit_code == 0, submitted.output
    calls = sbatch_calls(fake_sbatch)
    scripts = [Path(call[-1]) for call in calls]
    assert all(script.is_file() for script in scripts)
    assert calls == [sbatch_command(scripts[0], sbatch=sbatch),
                     sbatch_command(scripts[1], sbatch=sbatch, after="101"),
                     sbatch_command(scripts[2], sbatch=sbatch, after="102")]


def test_submit_pipeline_with_stages_chains_dpo_after_sft(fake_sbatch, tmp_path):
    from rlhf.cli import app

    dry = runner.invoke(app, ["submit", "pipeline", "--stages", "sft,dpo", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    scripts = [Path(line.split(" ")[2]) for line in dry.stdout.splitlines() if line.startswith("# ---- /")]
    assert [p.parent.name.split("-")[0] for p in scripts] == ["sft", "dpo"]
    sft_id = scripts[0].parent.name
    # The dpo job starts from the sft job's run, not from whatever sft:latest is when it starts.
    assert f"model.name_or_path=sft:{sft_id}" in dry.stdout
    assert "--dependency=afterok:<job id of sft>" in dry.stdout.splitlines()[-1]
    one = runner.invoke(app, ["submit", "dpo", "--dry-run", "dpo.loss=ipo"])
    assert one.exit_code == 0, one.output
    assert "--job-name=rlhf-dpo" in one.stdout and "dpo.loss=ipo" in one.stdout
    refused = runner.invoke(app, ["submit", "pipeline", "--stages", "sft,dpo", "--rm-config", "x.yaml", "--dry-run"])
    assert refused.exit_code == 2 and "--rm-config names a stage this pipeline does not run" in refused.output
    assert sbatch_calls(fake_sbatch) == []


def test_submit_pipeline_with_bon_points_it_at_the_sft_and_rm_jobs_runs(fake_sbatch, tmp_path):
    from rlhf.cli import app

    dry = runner.invoke(app, ["submit", "pipeline", "--stages", "sft,rm,bon", "--dry-run", "bon:sampling.n=4"])
    assert dry.exit_code == 0, dry.output
    scripts = [Path(line.split(" ")[2]) for line in dry.stdout.splitlines() if line.startswith("# ---- /")]
    assert [p.parent.name.split("-")[0] for p in scripts] == ["sft", "rm", "bon"]
    sft_id, rm_id = scripts[0].parent.name, scripts[1].parent.name
    bon_script = dry.stdout.split(f"# ---- {scripts[2]} ----")[1]
    assert f"model.name_or_path=sft:{sft_id}" in bon_script and f"reward.name_or_path=rm:{rm_id}" in bon_script
    assert "sampling.n=4" in bon_script
    one = runner.invoke(app, ["submit", "bon", "--dry-run", "reward.name_or_path=oracle"])
    assert one.exit_code == 0, one.output
    assert "--job-name=rlhf-bon" in one.stdout and "reward.name_or_path=oracle" in one.stdout
    assert sbatch_calls(fake_sbatch) == []


def test_round_jobs_chain_each_round_to_the_runs_chosen_before_it(tmp_path):
    counter = itertools.count(1)
    jobs = round_jobs(2, "python:pkg.mod:fn", registry_root=tmp_path, new_run_id=lambda stage: f"{stage}-{next(counter)}",
                      stage_args={"sample": ["data.max_prompts=8"], "rm": ["by=ignored"]}, resume_args={"label": ["by=python:pkg.mod:fn"]})
    assert [(j.stage, j.run_id) for j in jobs] == [("sft", "sft-1"), ("sample", "sample-2"), ("label", "label-3"), ("rm", "rm-4"),
                                                   ("ppo", "ppo-5"), ("sample", "sample-6"), ("label", "label-7"), ("rm", "rm-8"),
                                                   ("ppo", "ppo-9")]
    args = {j.run_id: j.stage_args for j in jobs}
    assert args["sample-2"] == ("data.max_prompts=8", "model.name_or_path=sft:sft-1")
    assert args["sample-6"] == ("data.max_prompts=8", "model.name_or_path=ppo:ppo-5")
    assert args["label-7"] == ("data.samples=samples:sample-6", "by=python:pkg.mod:fn", "data.include=prefs:label-3")
    assert args["rm-8"] == ("by=ignored", "model.name_or_path=sft:sft-1", "data.train=prefs:label-7")
    assert args["ppo-9"] == ("model.name_or_path=ppo:ppo-5", "reference.name_or_path=sft:sft-1", "critic.name_or_path=rm:rm-8",
                             "reward.name_or_path=rm:rm-8")
    assert jobs[2].resume_args == ("by=python:pkg.mod:fn",) and jobs[2].run_dir == tmp_path / "runs" / "label-3"
