"""An entry's lineage: the chain of first parents (`first_parents`), and its whole family as trees (`family_tree`):
ancestry through all parents, descendants through the entries that name it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from rlhf.store.entry import Entry


@dataclass(frozen=True)
class LineageNode:
    """One id in a lineage tree; `branches` are its parents (ancestry) or its children (descendants)."""

    id: str
    entry: Entry | None
    """None when no entry has this id (`state` says why)."""
    state: str = "ok"
    """"ok"; "missing": no entry has the id; "removed": taken out by `Registry.remove`; "cycle": it is
    already on the path above (a hand-edited parent list); "repeat": its branches appear earlier in
    the tree and are not drawn again."""
    branches: tuple[LineageNode, ...] = ()


@dataclass(frozen=True)
class FamilyTree:
    """An entry's ancestry (all parents, transitively) and descendants (entries that name it)."""

    entry: Entry
    ancestry: LineageNode
    descendants: LineageNode


def first_parents(entry: Entry, entries: Sequence[Entry]) -> list[Entry]:
    """`entry`, then its first parent, grandparent, ... among `entries`; stops at a missing parent or a cycle."""
    by_id = {e.id: e for e in entries}
    chain = [entry]
    seen = {chain[0].id}
    while chain[-1].parents:
        parent = by_id.get(chain[-1].parents[0])
        if parent is None or parent.id in seen:
            break
        chain.append(parent)
        seen.add(parent.id)
    return chain


def family_tree(entry: Entry, entries: Sequence[Entry], removed: set[str]) -> FamilyTree:
    """`entry`'s ancestors through all parents and its descendants (entries naming it as a parent, transitively)
    among `entries` (oldest first), as trees; missing and `removed` ids and cycles become marked leaves."""
    by_id = {e.id: e for e in entries}
    children: dict[str, list[str]] = {}
    for e in entries:  # oldest first, so children are listed in the order they were made
        for parent in dict.fromkeys(e.parents):
            children.setdefault(parent, []).append(e.id)

    def tree(branch_ids: Callable[[Entry], Iterable[str]]) -> LineageNode:
        expanded: set[str] = set()

        def grow(node_id: str, path: frozenset[str]) -> LineageNode:
            node = by_id.get(node_id)
            if node is None:
                return LineageNode(node_id, None, "removed" if node_id in removed else "missing")
            if node_id in path:
                return LineageNode(node_id, node, "cycle")
            branches = list(dict.fromkeys(branch_ids(node)))
            # A DAG (ppo <- rm <- sft and ppo <- sft) reaches a node twice: draw its subtree once.
            if node_id in expanded and branches:
                return LineageNode(node_id, node, "repeat")
            expanded.add(node_id)
            return LineageNode(node_id, node, "ok", tuple(grow(b, path | {node_id}) for b in branches))

        return grow(entry.id, frozenset())

    return FamilyTree(entry, tree(lambda e: e.parents), tree(lambda e: children.get(e.id, ())))
