"""Test-only: which dotted config keys the code reads, found in its syntax tree.

A key counts as read only along its whole path, never by its last name alone (`lr` and `seed` are
read all over). `optim.lr` of a stage is read where the code holds

- `.lr` on a value of the section's class whose section is itself read: `cfg.optim.lr` with
  `cfg: SFTConfig`, or `optim.lr` inside `def build_engine(..., optim: OptimConfig)` where some
  code reads the stage's `optim` (`build_engine(optim=cfg.critic_optim)` reads `critic_optim.lr`).
  Types come from annotations (parameters, variables, class fields, `self.x = param`, return types);
- or, where the chain's root has no config type (`cfg: Any`), an attribute chain holding
  `optim.lr`: `cfg.optim.lr`, `o.lr` after `o = cfg.optim` (names bound to chains are expanded,
  tuple assignments too), or `optim.lr` on an untyped parameter named `optim`.

A chain typed from its root is credited to its classes alone: `cfg.eval.temperature` on an
SFTConfig says nothing of PPO's eval section. `getattr(x, "name")` reads `x.name`. Code that only
checks values does not count: a key `validate` checks but nothing uses is still a key nobody reads.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from collections.abc import Iterable, Iterator
from pathlib import Path

Chain = tuple[str, ...]
Scopes = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


def config_classes(roots: Iterable[type]) -> dict[str, type]:
    """Every dataclass in the config trees of `roots`, by class name."""
    found: dict[str, type] = {}

    def walk(cls: type) -> None:
        found[cls.__name__] = cls
        for tp in typing.get_type_hints(cls).values():
            if dataclasses.is_dataclass(tp) and tp.__name__ not in found:
                walk(tp)

    for root in roots:
        walk(root)
    return found


def only_checks(function: ast.FunctionDef | ast.AsyncFunctionDef, path: Path) -> bool:
    """A function that only checks config values: a schema's `validate`, the check helpers of rlhf/config/."""
    return function.name == "validate" or (path.parent.name == "config" and function.name.lstrip("_").startswith("check"))


def own_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node under `node` outside nested functions and classes (those are yielded, not entered)."""
    stack = list(ast.iter_child_nodes(node))
    while stack:
        child = stack.pop()
        yield child
        if not isinstance(child, Scopes):
            stack.extend(ast.iter_child_nodes(child))


def called_name(call: ast.Call) -> str:
    return call.func.id if isinstance(call.func, ast.Name) else call.func.attr if isinstance(call.func, ast.Attribute) else ""


def getattr_literal(call: ast.Call) -> ast.Attribute | None:
    """`getattr(x, "name")` as the attribute read `x.name` it is."""
    if (called_name(call) == "getattr" and len(call.args) >= 2
            and isinstance(call.args[1], ast.Constant) and isinstance(call.args[1].value, str)):
        return ast.Attribute(value=call.args[0], attr=call.args[1].value, ctx=ast.Load())
    return None


def chain_of(node: ast.AST) -> Chain | None:
    """`cfg.optim.lr` -> ('cfg', 'optim', 'lr'); a chain rooted in a call gets the root '<call>name'."""
    names: list[str] = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return (node.id, *reversed(names))
    if isinstance(node, ast.Call) and names:
        return (f"<call>{called_name(node)}", *reversed(names))
    return None


def expand(chain: Chain, aliases: dict[str, set[Chain]], depth: int = 0) -> set[Chain]:
    """The chain, and the chain with its root replaced by each chain that name was bound to (recursively)."""
    root, rest = chain[0], chain[1:]
    out = {chain}
    if depth < 8:
        for bound in aliases.get(root, ()):
            if bound[0] != root:
                out |= {(*c, *rest) for c in expand(bound, aliases, depth + 1)}
    return out


class ConfigReads:
    """The config reads of every file in `paths`; `is_read` answers for one dotted key."""

    def __init__(self, paths: Iterable[Path], classes: dict[str, type]) -> None:
        self.classes = classes
        self.holders: set[str] = set()
        self.typed: set[tuple[str, str]] = set()  # (class, attribute) read on a value of that class
        self.chains: set[Chain] = set()  # attribute names read in a row where the root has no config type
        self.returns: dict[str, set[str]] = {}  # function name -> the config classes it returns
        self.fields: dict[str, dict[str, set[str]]] = {}  # class name -> attribute -> its config classes
        trees = [(path, ast.parse(path.read_text(), str(path))) for path in paths]
        for _, tree in trees:
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
                    self.returns.setdefault(node.name, set()).update(self.annotated(node.returns))
                if isinstance(node, ast.ClassDef):
                    self.fields[node.name] = self.class_fields(node)
        # A class that holds a config in a field (a stage's context: `ctx.cfg.eval.batch_size` with
        # `ctx: PPOContext`) types its parameters too, so the read is credited to that config alone.
        self.holders = {name for name, fields in self.fields.items() if any(fields.values())}
        for path, tree in trees:
            self.scan(tree, path, cls=None, aliases={}, types={}, untyped=set())
        self.read_in_a_row = {chain[i:j] for chain in self.chains for i in range(len(chain)) for j in range(i + 1, len(chain) + 1)}

    def is_read(self, root: type, key: str) -> bool:
        """Whether the code reads `key` of the stage config class `root` along its whole path (see the module doc)."""
        names = tuple(key.split("."))
        owner: typing.Any = root
        for depth, name in enumerate(names, start=1):
            if (owner.__name__, name) not in self.typed and names[:depth] not in self.read_in_a_row:
                return False
            owner = typing.get_type_hints(owner).get(name)
            if depth < len(names) and not dataclasses.is_dataclass(owner):
                return False
        return True

    def annotated(self, annotation: ast.expr | None) -> set[str]:
        """The config classes an annotation names (`OptimConfig`, `ModelConfig | None`, 'LoraConfig')."""
        if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
            try:
                annotation = ast.parse(annotation.value, mode="eval")
            except SyntaxError:
                return set()
        nodes = list(ast.walk(annotation)) if annotation is not None else []
        names = {n.id for n in nodes if isinstance(n, ast.Name)} | {n.attr for n in nodes if isinstance(n, ast.Attribute)}
        names |= {n.value for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        return names & (self.classes.keys() | self.holders)

    def class_fields(self, node: ast.ClassDef) -> dict[str, set[str]]:
        """A class's annotated attributes, and those a method sets from a typed parameter (`self.cfg = cfg`)."""
        fields: dict[str, set[str]] = {}
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                fields.setdefault(item.target.id, set()).update(self.annotated(item.annotation))
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                params = {arg.arg: self.annotated(arg.annotation) for arg in [*item.args.args, *item.args.kwonlyargs]}
                for assign in ast.walk(item):
                    if isinstance(assign, ast.Assign) and isinstance(assign.value, ast.Name) and assign.value.id in params:
                        for target in assign.targets:
                            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                                fields.setdefault(target.attr, set()).update(params[assign.value.id])
        return fields

    def scan(self, node: ast.AST, path: Path, *, cls: str | None, aliases: dict[str, set[Chain]],
             types: dict[str, set[str]], untyped: set[str]) -> None:
        """Record the reads in `node`'s own scope, then scan each nested function and class in theirs."""
        body = list(own_nodes(node))
        for child in body:
            if isinstance(child, (ast.Assign, ast.AnnAssign)):
                self.bind(child, aliases, types)
        called = {id(child.func) for child in body if isinstance(child, ast.Call)}
        for child in body:
            # `model.eval()` calls a method: config fields are values, never called.
            if isinstance(child, ast.Attribute) and isinstance(child.ctx, ast.Load) and id(child) not in called:
                self.record(child, aliases, types, untyped)
            elif isinstance(child, ast.Call) and (read := getattr_literal(child)) is not None:
                self.record(read, aliases, types, untyped)
        for child in body:
            if isinstance(child, ast.ClassDef):
                self.scan(child, path, cls=child.name, aliases={}, types={}, untyped=set())
            elif isinstance(child, ast.Lambda) or (isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                                                   and not only_checks(child, path)):
                inner_types = {name: set(found) for name, found in types.items()}
                inner_untyped = set(untyped)
                for arg in [*child.args.posonlyargs, *child.args.args, *child.args.kwonlyargs]:
                    inner_types[arg.arg] = self.annotated(arg.annotation)
                    if arg.arg == "self" and cls is not None:
                        inner_types["self"] = {cls}
                    elif arg.annotation is None or (isinstance(arg.annotation, ast.Name) and arg.annotation.id == "Any"):
                        inner_untyped.add(arg.arg)
                self.scan(child, path, cls=cls, aliases={name: set(c) for name, c in aliases.items()}, types=inner_types,
                          untyped=inner_untyped)

    def bind(self, assign: ast.Assign | ast.AnnAssign, aliases: dict[str, set[Chain]], types: dict[str, set[str]]) -> None:
        """Names bound to attribute chains (`o = cfg.optim`, `a, b = x.a, x.b`), to calls that return a
        config class, or annotated with one."""
        if isinstance(assign, ast.AnnAssign):
            annotated = self.annotated(assign.annotation)
            if isinstance(assign.target, ast.Name):
                types.setdefault(assign.target.id, set()).update(annotated)
            # `cfg: SFTConfig = run.config`: the annotation says more than the chain it came from.
            pairs = [(assign.target, assign.value)] if assign.value is not None and not annotated else []
        else:
            pairs = []
            for target in assign.targets:
                if isinstance(target, ast.Tuple) and isinstance(assign.value, ast.Tuple) and len(target.elts) == len(assign.value.elts):
                    pairs += list(zip(target.elts, assign.value.elts))
                else:
                    pairs.append((target, assign.value))
        for target, value in pairs:
            if isinstance(target, ast.Name):
                if (chain := chain_of(value)) is not None:
                    aliases.setdefault(target.id, set()).add(chain)
                if isinstance(value, ast.Call):
                    types.setdefault(target.id, set()).update(self.returns.get(called_name(value), set()))

    def record(self, attribute: ast.Attribute, aliases: dict[str, set[Chain]], types: dict[str, set[str]],
               untyped: set[str]) -> None:
        """One attribute read: typed along its chain as far as the types go, as a chain of names where they stop."""
        chain = chain_of(attribute)
        if chain is None:
            return
        untyped_chains: set[Chain] = set()
        typed_somewhere = False
        for full in expand(chain, aliases):
            root, names = full[0], full[1:]
            owners = set(self.returns.get(root.removeprefix("<call>"), set())) if root.startswith("<call>") else set(types.get(root, ()))
            typed_throughout = True
            for name in names:
                typed_throughout &= bool(owners)
                self.typed |= {(owner, name) for owner in owners}
                owners = set().union(*(self.fields.get(owner, {}).get(name, set()) for owner in owners))
            typed_somewhere |= typed_throughout
            if not typed_throughout:
                untyped_chains.add(full if root in untyped else names)
        if not typed_somewhere:  # `cfg.eval.x` after `cfg = ctx.cfg`: the typed expansion says whose it is
            self.chains |= untyped_chains
