"""The objectives in rlhf.algos are pure torch: importable where transformers, deepspeed, datasets
and peft are not installed, so they can be read, tested and reused without the training stack."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import rlhf.algos

REPO = Path(__file__).resolve().parents[2]
TRAINING_STACK = ("transformers", "deepspeed", "datasets", "peft", "wandb", "typer", "rich")

# Run in a fresh interpreter: a finder placed first refuses every module of the training stack,
# as if it were not installed, then every module of rlhf.algos is imported.
PROBE = """
import importlib, sys
blocked = set(sys.argv[1].split(","))

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, Refuse())
for module in sys.argv[2:]:
    importlib.import_module(module)
print("imported", len(sys.argv) - 2)
"""


def algos_modules() -> list[str]:
    return ["rlhf.algos", *(f"rlhf.algos.{m.name}" for m in pkgutil.iter_modules(rlhf.algos.__path__))]


def probe(*modules: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, ",".join(TRAINING_STACK), *modules],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_rlhf_algos_imports_without_the_training_stack():
    modules = algos_modules()
    assert {"rlhf.algos.ppo", "rlhf.algos.reward", "rlhf.algos.lm"} <= set(modules)
    result = probe(*modules)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"imported {len(modules)}"


def test_the_probe_does_refuse_the_training_stack():
    # A module that imports datasets must fail under the probe, or the test above proves nothing.
    result = probe("rlhf.data.sources")
    assert result.returncode != 0 and "blocked by the test" in result.stderr


def test_model_loading_and_saving_know_neither_the_registry_nor_deepspeed():
    # Loaders take a resolved source and a Partitioning (rlhf.engine holds DeepSpeed's side), so
    # importing them must pull in neither the registry, the sources, the engine nor deepspeed.
    code = ("import sys, rlhf.model_loading, rlhf.model_saving; "
            "print([m for m in ('rlhf.registry', 'rlhf.model_sources', 'rlhf.engine', 'deepspeed') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
