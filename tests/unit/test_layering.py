"""The objectives in rlhf.algos are pure torch: importable where transformers, deepspeed, datasets
and peft are not installed, so they can be read, tested and reused without the training stack."""

from __future__ import annotations

import ast
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
    # Loaders take a resolved source and a Partitioning (rlhf.training.engine holds DeepSpeed's side), so
    # importing them must pull in neither the registry, the sources, the engine nor deepspeed.
    code = ("import sys, rlhf.models.loading, rlhf.models.saving; "
            "print([m for m in ('rlhf.store.registry', 'rlhf.store.entry', 'rlhf.store.files', 'rlhf.store.lineage', "
            "'rlhf.store.removal', 'rlhf.models.sources', 'rlhf.training.engine', 'deepspeed') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def module_imports(package: Path) -> dict[str, set[str]]:
    """Module name -> the modules of `package` it imports at module level, read with ast (nothing is
    imported). Imports under `if TYPE_CHECKING:` count: a type-only import still ties the two modules
    together. Imports inside a function or class body do not: they run when called, after both
    modules are loaded, and are how a module defers a heavy or optional dependency."""
    names = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in names.items():
        is_package = path.name == "__init__.py"
        found: set[str] = set()

        def visit(body: list[ast.stmt], name: str = name, is_package: bool = is_package, found: set[str] = found) -> None:
            for node in body:
                if isinstance(node, ast.Import):
                    found.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom):
                    if node.level:  # relative: from the package of `name`, one level up per extra dot
                        base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                        module = ".".join([*base, node.module] if node.module else base)
                    else:
                        module = node.module or ""
                    found.add(module)
                    found.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
                elif isinstance(node, (ast.If, ast.Try, ast.With)):
                    for block in ("body", "orelse", "finalbody"):
                        visit(getattr(node, block, []))
                    for handler in getattr(node, "handlers", []):
                        visit(handler.body)

        visit(ast.parse(path.read_text(), filename=str(path)).body)
        graph[name] = {m for m in found if m in names and m != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per back edge a depth-first walk of the graph meets."""
    cycles, state, stack = [], {}, []

    def walk(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                cycles.append([*stack[stack.index(other):], other])
            elif other not in state:
                walk(other)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module)
    return cycles


def test_no_module_level_import_cycles_in_rlhf():
    graph = module_imports(REPO / "rlhf")
    assert {"rlhf.models.sources", "rlhf.models.tokenizer", "rlhf.algos.ppo", "rlhf.stages.ppo"} <= set(graph)
    assert "rlhf.models.tokenizer" in graph["rlhf.models.sources"]  # the graph does see rlhf's own imports
    assert import_cycles(graph) == []


def test_the_cycle_finder_sees_type_only_cycles_and_skips_deferred_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import c\n")
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n")
    (package / "b.py").write_text("import pkg.sub\nfrom pkg import a\n")
    (package / "sub" / "c.py").write_text("def late():\n    from pkg.b import B\n")
    graph = module_imports(package)
    assert graph == {"pkg": set(), "pkg.sub": {"pkg.sub.c"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg", "pkg.sub", "pkg.a"},
                     "pkg.sub.c": set()}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]
