"""A run's life on a shared cluster: resume from what others could have written (no pickled code, a
damaged checkpoint, a truncated config, a folder that is not where it claims), a start that fails,
a second process on the same run, a signal to `rlhf` alone, a rank that dies.

Through the real CLI and launcher; the damaged runs are copies of one short unfinished run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from rlhf.config import STAGE_CONFIGS, load_config, to_dict
from rlhf.store.start_record import START_FILE, write_start_record
from tests.integration.conftest import ONE_PROCESS, QUICK, RLHF, Result, assert_ok, cli_env, entries, rlhf

pytestmark = pytest.mark.slow

SHORT = ["-c", QUICK, "train.max_steps=12", "train.save_every=4", "train.eval_every=0", "eval.max_rows=16"]


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory) -> Path:
    """A registry holding one sft run with checkpoints at steps 4 and 8 and no entry: a run killed
    after its last checkpoint. (It ran to the end; its entry and final folder are then taken away,
    which leaves exactly what a kill after step 8 leaves, without racing a kill.)"""
    home = tmp_path_factory.mktemp("unfinished")
    assert_ok(rlhf("sft", *ONE_PROCESS, *SHORT, home=home))
    [run_dir] = (home / "runs").iterdir()
    shutil.rmtree(run_dir / "final")
    for entry in (home / "entries").iterdir():
        entry.unlink()
    return home


def copy_of(source: Path, home: Path, **section_changes: dict) -> Path:
    """`source`'s registry copied to `home`, as if its run had started there: its config names its new
    registry (and `section_changes`), its start record is sealed again by the owner's key; the run folder."""
    shutil.copytree(source, home, dirs_exist_ok=True)
    [run_dir] = (home / "runs").iterdir()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["run"]["registry"] = str(home.resolve())
    for section, changes in section_changes.items():
        config[section].update(changes)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    started = json.loads((run_dir / START_FILE).read_text())
    write_start_record(run_dir, run_id=run_dir.name, stage="sft", registry=home.resolve(),
                       config=to_dict(load_config(STAGE_CONFIGS["sft"], run_dir / "config.yaml")), sources=started["sources"])
    return run_dir


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


def reseal(folder: Path, name: str) -> None:
    """Rewrite the manifest for a changed file, as someone with write access to the run could."""
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def one_error_line(result: Result) -> str:
    assert "Traceback" not in result.output, result.output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def resumed_at(result: Result, run_dir: Path) -> int:
    assert_ok(result)
    return int(result.stdout.split(f"resumed {run_dir.name} at step ")[1].split()[0])


PAYLOAD = """
import os, sys, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
torch.save({"python": Payload(), "torch": torch.get_rng_state()}, sys.argv[1])
"""


@pytest.mark.parametrize("target", ["rng_rank0.pt", "model/mp_rank_00_model_states.pt"])
def test_a_planted_pickle_payload_is_refused_in_one_line(unfinished, tmp_path, target):
    run_dir = copy_of(unfinished, tmp_path / "home")
    folder = checkpoint(run_dir, 8)
    marker = tmp_path / "payload-ran"
    subprocess.run([str(Path(RLHF).with_name("python")), "-c", PAYLOAD, str(folder / target), str(marker)], check=True)
    reseal(folder, target)  # the manifest is no defence against someone who can write the folder
    result = rlhf("sft", "--resume", home=tmp_path / "home")
    assert result.code == 2
    assert "refused to load checkpoint" in one_error_line(result) and "could run code" in result.stderr
    assert not marker.exists()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(unfinished, tmp_path):
    """(Each kind of damage the manifest catches is a unit test of rlhf.training.checkpoint; this is the path
    through the CLI.) A stale lock of a dead process on this host is taken over on the way."""
    run_dir = copy_of(unfinished, tmp_path / "home")
    truncate(checkpoint(run_dir, 8) / "model" / "mp_rank_00_model_states.pt")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run_dir / "lock.json").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "then"}))
    result = rlhf("sft", "--resume", home=tmp_path / "home")
    assert resumed_at(result, run_dir) == 4
    assert "checkpoint step-0000008 is damaged" in result.stderr and "trying an older one" in result.stderr
    assert [e["metrics"]["steps"] for e in entries(tmp_path / "home")] == [12]
    assert not (run_dir / "lock.json").exists()


def test_a_save_killed_midway_and_a_garbage_pointer_resume_quietly_from_the_last_sealed_checkpoint(unfinished, tmp_path):
    run_dir = copy_of(unfinished, tmp_path / "home")
    (checkpoint(run_dir, 8) / "manifest.json").unlink()  # killed before the seal
    (run_dir / "checkpoints" / "resume.json").write_text("garbage")  # never trusted
    result = rlhf("sft", "--resume", home=tmp_path / "home")
    assert resumed_at(result, run_dir) == 4
    assert "damaged" not in result.stderr


def test_no_usable_checkpoint_stops_in_one_line(unfinished, tmp_path):
    run_dir = copy_of(unfinished, tmp_path / "home")
    for step in (4, 8):
        truncate(checkpoint(run_dir, step) / "rng_rank0.pt")
    result = rlhf("sft", "--resume", home=tmp_path / "home")
    assert result.code == 2 and "no usable checkpoint in" in one_error_line(result)
    assert (checkpoint(run_dir, 8)).is_dir()  # nothing deleted: the user decides


@pytest.mark.parametrize("content", ["", "model:\n  name_or_path: toy\n", "model: [unclosed\n", b"\xff\xfe",
                                     "train: &t\n  seed: *t\n", "model: &m\n  lora: [*m, *m]\n"])
def test_a_truncated_or_damaged_run_config_is_not_resumed_with_defaults(unfinished, tmp_path, content):
    run_dir = copy_of(unfinished, tmp_path / "home")
    if isinstance(content, bytes):
        (run_dir / "config.yaml").write_bytes(content)
    else:
        (run_dir / "config.yaml").write_text(content)
    result = rlhf("sft", "--resume", home=tmp_path / "home")
    assert result.code == 2
    assert "config.yaml is" in one_error_line(result) and "cannot be resumed" in result.stderr
    assert not (run_dir / "lock.json").exists() and not (run_dir / "final").exists()


@pytest.mark.parametrize("run_id", ["../../outside", "../x", "/tmp/x", ".hidden", "a/b"])
def test_resume_takes_run_ids_not_paths(unfinished, tmp_path, run_id):
    home = tmp_path / "site" / "home"
    # A run folder two levels above home/runs/, which `--run ../../outside` used to resume.
    shutil.copytree(copy_of(unfinished, tmp_path / "elsewhere"), tmp_path / "site" / "outside")
    home.mkdir(parents=True)
    result = rlhf("sft", "--resume", "--run", run_id, home=home)
    assert result.code == 2 and "is not a run id" in one_error_line(result)
    assert not (tmp_path / "site" / "outside" / "lock.json").exists()


def test_a_run_folder_copied_from_elsewhere_is_not_resumed(unfinished, tmp_path):
    """Its config names another registry, where a resume would publish."""
    home = tmp_path / "home"
    shutil.copytree(unfinished, home)
    [run_dir] = (home / "runs").iterdir()
    result = rlhf("sft", "--resume", home=home)
    assert result.code == 2 and "no unfinished sft run to resume" in one_error_line(result)
    assert f"skipped 1 unfinished sft run(s) without a start record sealed by you ({run_dir.name})" in result.stdout
    named = rlhf("sft", "--resume", "--run", run_dir.name, home=home)
    assert named.code == 2 and "is not inside the registry" in one_error_line(named)


def test_resume_launches_the_run_as_it_was_launched(unfinished, tmp_path):
    run_dir = copy_of(unfinished, tmp_path / "home")
    (run_dir / "launch.json").write_text(json.dumps({"num_gpus": 2, "launcher": "torchrun", "hostfile": None}))
    same = rlhf("sft", "--resume", "--dry-run", home=tmp_path / "home")
    assert_ok(same)
    assert "--nproc-per-node=2" in same.stdout and "torch.distributed.run" in same.stdout
    told = rlhf("sft", "--resume", "--dry-run", "-n", "1", "--launcher", "deepspeed", home=tmp_path / "home")
    assert_ok(told)
    assert "deepspeed.launcher.runner" in told.stdout and "--num_gpus 1" in told.stdout


def test_a_run_is_locked_by_the_process_running_it(unfinished, tmp_path):
    run_dir = copy_of(unfinished, tmp_path / "home")
    lock = run_dir / "lock.json"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": "now"}))
    held = rlhf("sft", "--resume", home=tmp_path / "home")
    assert held.code == 2 and f"is being run by pid {os.getpid()}" in one_error_line(held)
    assert lock.exists() and not (checkpoint(run_dir, 12)).exists()  # someone else's lock stays


def test_a_start_that_fails_inside_the_stage_leaves_nothing_resumable(tmp_path):
    """A hub dataset is only fetched by the stage; offline, the fetch fails after the run was created."""
    home = tmp_path / "home"
    # Fresh interpreters: the hub libraries read their offline switches when first imported.
    result = rlhf("sft", *ONE_PROCESS, *SHORT, "data.train=nobody/no-such-dataset", "data.eval=null", home=home,
                  env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, fresh_interpreter=True)
    assert result.code != 0 and "Traceback" not in result.output, result.output[-3000:]
    assert not list((home / "runs").iterdir()) if (home / "runs").exists() else True
    again = rlhf("sft", "--resume", home=home)
    assert again.code == 2 and "no unfinished sft run" in again.stderr


def start(home: Path, *args: str) -> subprocess.Popen:
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([RLHF, "sft", *args], env=cli_env(home), cwd=home, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_step(home: Path, proc: subprocess.Popen, step: int) -> Path:
    deadline = time.time() + 300
    while time.time() < deadline:
        for path in home.glob("runs/*/metrics.jsonl"):
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
            if any(r.get("step", 0) >= step and "loss" in r for r in rows):
                return path.parent
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached in time")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def rank_pids(run_dir: Path) -> dict[int, int]:
    records = [json.loads(p.read_text()) for p in (run_dir / "ranks").glob("rank-*.json")]
    return {r["rank"]: r["pid"] for r in records}


def test_sigterm_to_rlhf_alone_stops_its_ranks_with_a_checkpoint_before_it_exits(tmp_path):
    home = tmp_path / "home"
    proc = start(home, "-c", QUICK, "train.max_steps=400", "train.save_every=0", "train.eval_every=0",
                 "train.log_every=1", "data.eval=null")
    try:
        run_dir = wait_for_step(home, proc, 5)
        pids = rank_pids(run_dir)
        proc.send_signal(signal.SIGTERM)  # `rlhf` alone, not its group
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-3000:]
    assert pids and not [pid for pid in pids.values() if alive(pid)]  # no rank outlives `rlhf`
    assert 5 <= json.loads((run_dir / "checkpoints" / "resume.json").read_text())["step"] < 400
    assert entries(home) == [] and not (run_dir / "lock.json").exists()


def test_a_rank_that_dies_is_named_and_the_others_stop(tmp_path):
    home = tmp_path / "home"
    proc = start(home, "-n", "2", "-c", QUICK, "train.max_steps=400", "train.save_every=3", "train.eval_every=0",
                 "train.log_every=1", "data.eval=null", "engine.micro_batch_size=16")
    try:
        run_dir = wait_for_step(home, proc, 4)
        pids = rank_pids(run_dir)
        os.kill(pids[1], signal.SIGKILL)  # one rank, not the group: a lost node, the OOM killer
        killed = time.time()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.time() - killed < 60
    assert proc.returncode not in (0, 143) and "Traceback" not in err, err[-3000:]
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"rank 1 (pid {pids[1]}" in line and "died without an error" in line and "--resume" in line
    assert not alive(pids[0])
    # The run keeps its checkpoints and resumes on its two ranks; on one, its partitions are refused in one line.
    wrong = rlhf("sft", "--resume", "-n", "1", "--launcher", "python", home=home)
    assert wrong.code == 2 and "checkpointed on 2 rank(s), not 1; resume it with -n 2" in one_error_line(wrong)
    again = rlhf("sft", "--resume", "--dry-run", home=home)
    assert_ok(again)
    assert run_dir.name in again.stdout and "--num_gpus 2" in again.stdout


def test_a_run_started_with_code_running_settings_resumes_only_when_they_are_repeated(unfinished, tmp_path):
    """A run the user started with model.trust_remote_code: a plain --resume refuses it in one line that
    says how to confirm it; repeating it confirms it; an override on --resume that changes a value is refused."""
    run_dir = copy_of(unfinished, tmp_path / "home", model={"trust_remote_code": True})
    refused = rlhf("sft", "--resume", home=tmp_path / "home")
    assert refused.code == 2 and "sets model.trust_remote_code, which runs code from outside rlhf" in one_error_line(refused)
    assert f"repeat it: rlhf sft --resume --run {run_dir.name} model.trust_remote_code=true" in refused.stderr
    changed = rlhf("sft", "--resume", "model.trust_remote_code=true", "optim.lr=1", home=tmp_path / "home")
    assert changed.code == 2 and "an override on --resume may only repeat a value" in one_error_line(changed)
    assert not (run_dir / "lock.json").exists() and not (checkpoint(run_dir, 12)).exists()
    confirmed = rlhf("sft", "--resume", "model.trust_remote_code=true", home=tmp_path / "home")
    assert resumed_at(confirmed, run_dir) == 8


def plant(home: Path, run_id: str, config: dict) -> Path:
    """A run folder made by hand under `home`/runs, as anyone who can write the registry could."""
    run_dir = home / "runs" / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return run_dir


REMOTE_CODE = "import pathlib, sys\npathlib.Path(sys.argv[0]).with_name('ran').touch()\n"


def test_a_planted_or_edited_run_folder_never_resumes(unfinished, tmp_path):
    """A newer run planted with trust_remote_code on a folder with an auto_map module is skipped by a
    plain --resume (which names the run it picks) and refused by --resume --run; so is a start record
    sealed by another key, and an edit of the real run's config. Nothing is imported, nothing trained."""
    home = tmp_path / "home"
    run_dir = copy_of(unfinished, home)
    module = tmp_path / "evil"
    module.mkdir()
    (module / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}}))
    (module / "evil.py").write_text(REMOTE_CODE)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"].update(name_or_path=str(module), trust_remote_code=True)
    planted = plant(home, "sft-20991231-000000-deadbeef", config)
    picked = rlhf("sft", "--resume", "--dry-run", home=home)
    assert_ok(picked)
    assert "skipped 1 unfinished sft run(s) without a start record sealed by you (sft-20991231-000000-deadbeef)" in picked.stdout
    assert f"--run-dir {run_dir}" in picked.stdout and str(planted) not in picked.stdout
    named = rlhf("sft", "--resume", "--run", planted.name, "model.trust_remote_code=true", home=home)
    assert named.code == 2 and f"run {planted.name} has no start record" in one_error_line(named)
    # A start record for it, sealed by another user's key.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLHF_SEAL_KEY", str(tmp_path / "other-user.key"))
        write_start_record(planted, run_id=planted.name, stage="sft", registry=home.resolve(), config=config, sources={})
    sealed_elsewhere = rlhf("sft", "--resume", "--run", planted.name, "model.trust_remote_code=true", home=home)
    assert sealed_elsewhere.code == 2 and "that your seal key" in one_error_line(sealed_elsewhere)
    assert "skipped 1 unfinished" in rlhf("sft", "--resume", "--dry-run", home=home).stdout
    config["model"].update(name_or_path="toy", trust_remote_code=False)
    config["optim"]["lr"] = 0.5
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    edited = rlhf("sft", "--resume", "--run", run_dir.name, home=home)
    assert edited.code == 2
    assert f"sets optim.lr to 0.5, but run {run_dir.name} started with" in one_error_line(edited) and "the file was edited" in edited.stderr
    assert not (module / "ran").exists() and not (planted / "lock.json").exists() and not checkpoint(run_dir, 12).exists()


@pytest.mark.parametrize("name", ["metrics.jsonl", "final", "checkpoints/step-0000008", "config.yaml"])
def test_a_symbolic_link_in_a_run_folder_is_refused_in_one_line(unfinished, tmp_path, name):
    run_dir = copy_of(unfinished, tmp_path / "home")
    elsewhere = tmp_path / "elsewhere"
    link = run_dir / name
    if link.exists():
        link.rename(elsewhere)
    else:
        elsewhere.mkdir()
    link.symlink_to(elsewhere)
    result = rlhf("sft", "--resume", home=tmp_path / "home")
    assert result.code == 2 and f"{link} is a symbolic link" in one_error_line(result)
    assert not (run_dir / "lock.json").exists()
