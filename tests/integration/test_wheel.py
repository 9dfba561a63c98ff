"""rlhf as cluster users install it: a wheel, non-editable, in a fresh venv, run from a folder
outside the repo. The stage programs are modules of the package (no top-level `stages`), the
presets are package data and answer to their names."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.integration.conftest import cli_env

REPO = Path(__file__).resolve().parents[2]
# What a build from a clean clone sees: no virtual environment, git data or earlier builds.
NOT_SOURCE = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The `bin/` of a new venv holding only the wheel built from this tree (the dependencies come
    from the test's own environment through a path entry, as a shared cluster environment has them)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE, symlinks=True)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"), str(source)])
    [wheel] = (root / "dist").glob("rlhf-*.whl")
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    purelib = Path(run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).strip())
    # A path line only: the test environment's own .pth files (its editable rlhf) are not processed.
    (purelib / "test-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index", "-q", str(wheel)])
    return venv / "bin"


def run(cmd: list[str], **kwargs) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_wheel_holds_the_package_its_stages_and_presets_and_no_top_level_stages(installed, tmp_path):
    probe = ("import importlib.util, json, rlhf, rlhf.stages.ppo; from rlhf.config.presets import preset_names; "
             "print(json.dumps([rlhf.__file__, importlib.util.find_spec('stages') is None, preset_names()]))")
    where, no_stages, presets = json.loads(run([str(installed / "python"), "-c", probe], cwd=tmp_path))
    assert "site-packages" in where and not where.startswith(str(REPO))
    assert no_stages
    assert presets == sorted(p.stem for p in (REPO / "rlhf" / "presets").glob("*.yaml")) and "ppo-opt-1.3b" in presets


@pytest.mark.slow
def test_the_installed_command_trains_on_two_ranks_and_takes_presets_by_name(installed, tmp_path):
    env = {**cli_env(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    rlhf = str(installed / "rlhf")
    trained = run([rlhf, "sft", "-c", "sft-toy-quick", "-n", "2", "train.max_steps=4", "train.eval_every=2",
                   "train.save_every=2", "optim.warmup_steps=1", "eval.max_rows=8"], cwd=tmp_path, env=env)
    assert "--module rlhf.stages.sft" in trained and "sft finished" in trained
    [entry] = [json.loads(p.read_text()) for p in (tmp_path / "home" / "entries").glob("*.json")]
    assert entry["config"]["train"]["max_steps"] == 4 and entry["config"]["train"]["eval_every"] == 2
    # A preset by name from a folder without it (`.yaml` optional), a file by its path.
    planned = run([rlhf, "sft", "-c", "sft-opt-1.3b.yaml", "--dry-run"], cwd=tmp_path, env=env)
    assert "name_or_path: facebook/opt-1.3b" in planned and "--module rlhf.stages.sft" in planned
    (tmp_path / "mine.yaml").write_text("train:\n  max_steps: 7\noptim:\n  warmup_steps: 1\n")
    script = run([rlhf, "submit", "sft", "-c", "mine.yaml", "--dry-run"], cwd=tmp_path, env=env)
    assert f"{rlhf} sft --launcher srun -n 1 --run \"$RUN_ID\" -c {tmp_path / 'mine.yaml'}" in script
