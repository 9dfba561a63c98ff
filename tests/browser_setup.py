"""Test-only: a headless Chromium for the labeling page's tests, installed from Debian only where that is wanted.

The tests install `chromium` and `chromium-driver` with apt-get only as root on CI (CI=true) or when the
user opts in with RLHF_TEST_BROWSER_SETUP=1; elsewhere they use the ones already installed, or skip and
say how to opt in.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
OPT_IN = "RLHF_TEST_BROWSER_SETUP"
HOW_TO_OPT_IN = (f"install them (apt-get install chromium chromium-driver), or run the tests as root with {OPT_IN}=1 "
                 "(CI=true does the same) to let them install those packages")


def may_install(env: Mapping[str, str], *, root: bool) -> bool:
    return root and (env.get("CI") == "true" or env.get(OPT_IN) == "1")


def present() -> bool:
    return CHROMIUM.is_file() and CHROMEDRIVER.is_file()


def install() -> str | None:
    """apt-get install the two packages (updating the package lists once if that fails): None, or why it failed."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=600)
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0 or not present():
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"apt-get install chromium chromium-driver failed: {tail[0]}"
    return None


def browser_problem(env: Mapping[str, str], *, root: bool) -> str | None:
    """None when Chromium and its driver are here (installed now if allowed); else why the tests skip, and the fix."""
    if present():
        return None
    if not may_install(env, root=root):
        return f"no {CHROMIUM} and {CHROMEDRIVER} here; {HOW_TO_OPT_IN}"
    return install()
