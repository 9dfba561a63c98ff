"""Helpers for tests that run `rlhf` the way a user does: the console script, the real launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RLHF = str(Path(sys.executable).with_name("rlhf"))
QUICK = str(REPO / "configs" / "sft-toy-quick.yaml")


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def cli_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["RLHF_HOME"] = str(home)
    env.pop("WANDB_MODE", None)  # our own default (offline) must be what keeps wandb off the network
    env["COLUMNS"] = "200"  # keep rich from wrapping the lines tests read
    return env


def rlhf(*args: str, home: Path, timeout: int = 600, cwd: Path | None = None) -> Result:
    proc = subprocess.run(
        [RLHF, *args], env=cli_env(home), cwd=cwd or home, capture_output=True, text=True, timeout=timeout
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def entries(home: Path) -> list[dict]:
    result = rlhf("registry", "ls", "--json", home=home)
    assert result.code == 0, result.output
    return json.loads(result.stdout)


def metric_rows(entry: dict) -> list[dict]:
    path = Path(entry["run_dir"]) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_ok(result: Result) -> None:
    assert result.code == 0, f"exit {result.code}\n{result.output[-4000:]}"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path
