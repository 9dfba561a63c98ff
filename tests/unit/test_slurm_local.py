"""scripts/slurm-local.sh's --no-install, and the SLURM tests' choice of whether they may set a
cluster up (tests/slurm_setup.py); the cluster itself runs in tests/integration/test_slurm.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.slurm_setup import HOW_TO_OPT_IN, OPT_IN, changes_line, may_set_up, skip_reason, start_command

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "slurm-local.sh"


@pytest.mark.parametrize("env, root, allowed", [
    ({"CI": "true"}, True, True),
    ({OPT_IN: "1"}, True, True),
    ({"CI": "true", OPT_IN: "1"}, False, False),  # installing needs root
    ({}, True, False),  # root alone is not permission
    ({"CI": "1"}, True, False),  # CI sets CI=true exactly
    ({OPT_IN: "0"}, True, False),
    ({OPT_IN: "yes"}, True, False),
])
def test_setting_up_needs_root_and_ci_or_the_opt_in(env, root, allowed):
    assert may_set_up(env, root=root) is allowed
    assert start_command(SCRIPT, set_up=allowed) == [str(SCRIPT), "start", *([] if allowed else ["--no-install"])]


def test_a_skip_names_how_to_opt_in_unless_setting_up_was_allowed():
    assert skip_reason("slurmd did not start", set_up=True) == "no SLURM here: slurmd did not start"
    refused = skip_reason("slurm-wlm and munge are not installed (--no-install installs nothing)", set_up=False)
    assert refused.endswith(HOW_TO_OPT_IN) and f"{OPT_IN}=1" in refused and "\n" not in refused


def test_the_changes_are_said_in_one_line_and_nothing_when_there_were_none():
    stdout = ("slurm-local: changed: installed slurm-wlm and munge (apt-get)\nslurm-local: changed: wrote /etc/munge/munge.key\n"
              "slurm-local: changed: wrote /etc/slurm/slurm.conf\nslurm-local: running (/etc/slurm/slurm.conf)\n")
    assert changes_line(stdout, {"CI": "true"}) == ("SLURM tests (CI=true) set up this machine: installed slurm-wlm and munge "
                                                    "(apt-get); wrote /etc/munge/munge.key; wrote /etc/slurm/slurm.conf")
    assert changes_line(stdout, {OPT_IN: "1"}).startswith(f"SLURM tests ({OPT_IN}=1) set up this machine: installed")
    assert changes_line("slurm-local: running (/etc/slurm/slurm.conf)\n", {"CI": "true"}) is None


def sandbox(tmp_path: Path) -> dict[str, str]:
    """A PATH with no SLURM, munge or package manager of the machine's own: the script's tools, `id`
    saying root, and an `apt-get` that records its calls and fails (nothing is installed for real)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("hostname", "cat"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    for name, body in (("id", "echo 0"), ("apt-get", f'echo "$*" >> {tmp_path / "apt-get.log"}; exit 1')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {"PATH": str(bin_dir)}


def test_no_install_installs_nothing_where_slurm_is_missing(tmp_path):
    done = subprocess.run(["/bin/bash", str(SCRIPT), "start", "--no-install"], env=sandbox(tmp_path), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 3, done
    assert done.stderr == "slurm-local: slurm-wlm and munge are not installed (--no-install installs nothing)\n"
    assert done.stdout == "" and not (tmp_path / "apt-get.log").exists()
    # Without the flag, root on this machine would install them (the sandbox's apt-get refuses).
    done = subprocess.run(["/bin/bash", str(SCRIPT), "start"], env=sandbox(tmp_path / "again"), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 3 and "apt-get could not install" in done.stderr, done
    assert (tmp_path / "again" / "apt-get.log").read_text().startswith("install -y -q slurm-wlm munge")


@pytest.mark.parametrize("args", [["start", "--bogus"], ["status", "--no-install"], ["restart"]])
def test_unknown_arguments_are_a_usage_error(args):
    done = subprocess.run(["/bin/bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("usage:"), done


def test_the_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
