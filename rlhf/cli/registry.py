"""`rlhf registry`: list, inspect, tag and remove checkpoint-registry entries (imports no torch)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from rlhf.errors import EXIT_USER_ERROR, UserError
from rlhf.store.entry import Entry
from rlhf.store.lineage import LineageNode
from rlhf.store.registry import Registry, default_root

app = typer.Typer(help="Inspect, tag and remove checkpoint-registry entries.", no_args_is_help=True)

RootOpt = Annotated[
    Optional[Path],
    typer.Option("--root", help="Registry root (default: $RLHF_HOME, else ./rlhf_runs)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of tables.")]
RefArg = Annotated[str, typer.Argument(help="Entry id or reference: sft:latest, rm:<id>, a tag.")]

# Metrics shown per row in `ls` when the terminal has room (the headline one first); the rest stay in `show`.
_LS_METRICS = 3
# The metric `ls` shows of each stage's entries: the first of these it has, else its first metric.
_HEADLINE = {
    "sft": ("loss", "oracle_score", "train_loss"),
    "rm": ("accuracy", "oracle_agreement", "train_accuracy"),
    "dpo": ("accuracy", "oracle_score", "train_accuracy"),
    "ppo": ("score", "oracle_score", "train_score"),
    "critic": ("explained_variance", "value_loss"),
    "bon": ("dataset_rows",),
    "samples": ("prompts",),
    "prefs": ("pairs",),
}
# The columns `ls` leaves out, fullest layout first, when the terminal is too narrow for all of them:
# first the path, then the parents and the metrics under the headline one (rows become one line).
_LS_DROPPED = ((), ("path",), ("path", "parents", "metrics"))
# Config keys shown in `show` before "... N more" (the full config is in --json).
_SHOW_CONFIG_KEYS = 12


@contextmanager
def _user_errors() -> Iterator[None]:
    """Report a UserError as one `error: ...` line on stderr with exit code 2, no traceback."""
    try:
        yield
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_USER_ERROR) from None


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested config as dotted keys, the same form as command-line overrides."""
    out: list[tuple[str, Any]] = []
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.extend(_flatten(value, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _lineage_text(reg: Registry, entry: Entry) -> str:
    chain = reg.lineage(entry.id)
    text = " <- ".join(e.id for e in chain)
    if chain[-1].parents:  # lineage stopped early: say why rather than hide the parent
        parent = chain[-1].parents[0]
        if any(e.id == parent for e in chain):
            why = "cycle"
        else:
            why = "removed" if parent in reg.removed_ids() else "missing"
        text += f" <- {parent} ({why})"
    return text


def _metric_lines(entry: Entry) -> list[str]:
    """`key=value` of the entry's headline metric, then of its next metrics (up to _LS_METRICS in all)."""
    names = list(entry.metrics)
    headline = next((k for k in _HEADLINE.get(entry.stage, ()) if k in entry.metrics), names[0] if names else None)
    ordered = ([headline] if headline else []) + [k for k in names if k != headline]
    return [f"{k}={_fmt(entry.metrics[k])}" for k in ordered[:_LS_METRICS]]


def _ls_table(entries: list[Entry], title: str, dropped: tuple[str, ...]) -> Table:
    """The `ls` table without the `dropped` columns (see `ls`). Borderless like `docker ps` and
    `gh`: two spaces between columns, a rule under the headers."""
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    # The kept columns never wrap, and their headers are never cut (min_width).
    for name in ("id", "stage", "created"):
        table.add_column(name, no_wrap=True, min_width=len(name))
    metrics = "metric" if "metrics" in dropped else "metrics"
    table.add_column(metrics, no_wrap=True, min_width=len(metrics))
    table.add_column("tags", overflow="fold", min_width=len("tags"))
    if "parents" not in dropped:
        table.add_column("parents", no_wrap=True)
    if "path" not in dropped:
        table.add_column("path", overflow="fold")
    for e in entries:
        lines = _metric_lines(e)
        row = [
            e.id, e.stage,
            e.created[:19].replace("T", " "),  # seconds are enough to tell runs apart here
            "\n".join(lines[:1] if "metrics" in dropped else lines),
            ", ".join(e.tags),
        ]
        if "parents" not in dropped:
            row.append("\n".join(e.parents))
        if "path" not in dropped:
            row.append(e.path)
        table.add_row(*row)
    return table


def _fitting_ls_table(console: Console, entries: list[Entry], title: str) -> Table:
    """The fullest `ls` table of _LS_DROPPED that fits the console's width; a path may fold onto two
    lines. When even the leanest is too wide, rich wraps its tags."""
    unbounded = console.options.update_width(1_000_000)
    for dropped in _LS_DROPPED:
        table = _ls_table(entries, title, dropped)
        width = console.measure(table, options=unbounded).maximum
        if "path" not in dropped:
            path = max(cell_len(e.path) for e in entries)
            width -= path - (path + 1) // 2
        if width <= console.width:
            return table
    return table


@app.command("ls")
def ls(
    stage: Annotated[Optional[str], typer.Option("--stage", help="Only this stage (sft, rm, ppo).")] = None,
    root: RootOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List published entries (oldest first), then runs that stopped before publishing.

    The columns fit the terminal's width, as `docker ps` and `gh` do. Always shown, whole, with
    their full headers: id (what users copy), stage, created, the headline metric (sft: loss, rm and
    dpo: accuracy, ppo: score, each on held-out data; see _HEADLINE) and tags. When the terminal is
    too narrow for every column, the others go in this order: first path (the longest;
    `rlhf registry show` has it), then together parents (`rlhf registry lineage` draws them) and the
    metrics after the headline one (`show` lists them all), which leaves one line per entry: what
    80 columns show (long tags wrap, last). A wide terminal shows every column, a path folded onto
    two lines when that is what fits.
    """
    reg = Registry(root or default_root())
    with _user_errors():
        entries = reg.entries(stage)
        if as_json:
            typer.echo(json.dumps([e.to_json() for e in entries], indent=2))
            return
        incomplete = reg.incomplete_runs(stage)

    console = Console(markup=False)  # ids, paths and config values are data, not markup
    if not entries:
        console.print(f"No {stage + ' ' if stage else ''}entries in {reg.root}.")
    else:
        console.print(_fitting_ls_table(console, entries, f"Registry {reg.root}"))
    if incomplete:
        table = Table(title="Incomplete runs (no entry yet; resumable)", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        table.add_column("run dir", overflow="fold")
        for run in incomplete:
            table.add_row(str(run))
        console.print(table)


@app.command("show")
def show(
    ref: RefArg,
    root: RootOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one entry (all fields) and its lineage."""
    reg = Registry(root or default_root())
    with _user_errors():
        entry = reg.resolve(ref)
        if as_json:
            typer.echo(json.dumps(entry.to_json(), indent=2))
            return
        lineage = _lineage_text(reg, entry)
        children = [e.id for e in reg.entries() if entry.id in e.parents]

    table = Table(title=entry.id, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name in ("id", "stage", "status", "created", "path", "run_dir", "base_model", "adapter"):
        table.add_row(name, str(getattr(entry, name)))
    table.add_row("parents", ", ".join(entry.parents) or "-")
    table.add_row("children", ", ".join(children) or "-")
    table.add_row("tags", ", ".join(entry.tags) or "-")
    table.add_row("tokenizer", ", ".join(f"{k}={v}" for k, v in entry.tokenizer.items()) or "-")
    table.add_row("metrics", "\n".join(f"{k}={_fmt(v)}" for k, v in entry.metrics.items()) or "-")
    items = _flatten(entry.config)
    config = "\n".join(f"{k}={v}" for k, v in items[:_SHOW_CONFIG_KEYS])
    if len(items) > _SHOW_CONFIG_KEYS:
        config += f"\n... {len(items) - _SHOW_CONFIG_KEYS} more (see --json)"
    table.add_row("config", config or "-")
    console = Console(markup=False)  # ids, paths and config values are data, not markup
    console.print(table)
    console.print(f"lineage: {lineage}")


_STATE_NOTE = {
    "missing": "missing: no entry has this id",
    "removed": "removed with `rlhf registry rm`",
    "cycle": "cycle: already on the path above",
}


def _node_label(node: LineageNode, *, repeat_note: str) -> Text:
    label = Text(node.id, style="bold")
    if node.entry is not None:
        label.append(f"  {node.entry.stage}  {node.entry.created[:19].replace('T', ' ')}", style="dim")
        if node.entry.tags:
            label.append(f"  [{', '.join(node.entry.tags)}]", style="cyan")
    note = repeat_note if node.state == "repeat" else _STATE_NOTE.get(node.state)
    if note:
        label.append(f"  ({note})", style="yellow")
    return label


def _draw(node: LineageNode, tree: Tree, *, repeat_note: str) -> None:
    for branch in node.branches:
        _draw(branch, tree.add(_node_label(branch, repeat_note=repeat_note)), repeat_note=repeat_note)


def _flat(root: LineageNode) -> list[dict]:
    """Every id reachable from `root` once, nearest first (depth: fewest steps), with its parents:
    the graph for scripts. The tree draws a shared subtree once, so walk ids, not drawn nodes."""
    nodes: dict[str, LineageNode] = {}

    def collect(node: LineageNode) -> None:
        if node.state not in ("repeat", "cycle"):  # each id has one such node: the one with branches
            nodes.setdefault(node.id, node)
        for branch in node.branches:
            collect(branch)

    collect(root)
    out: list[dict] = []
    seen: set[str] = set()
    level, depth = [b.id for b in root.branches], 1
    while level:
        following: list[str] = []
        for node_id in level:
            if node_id in seen:
                continue
            seen.add(node_id)
            node = nodes[node_id]
            e = node.entry
            out.append({
                "id": node_id, "depth": depth, "state": node.state, "stage": e.stage if e else None,
                "created": e.created if e else None, "parents": list(e.parents) if e else [],
                "tags": list(e.tags) if e else [],
            })
            following.extend(b.id for b in node.branches)
        level, depth = following, depth + 1
    return out


@app.command("lineage")
def lineage(ref: RefArg, root: RootOpt = None, as_json: JsonOpt = False) -> None:
    """Show an entry's ancestry (all its parents, transitively) and its descendants."""
    reg = Registry(root or default_root())
    with _user_errors():
        family = reg.family_tree(ref)
    if as_json:
        typer.echo(json.dumps({
            "id": family.entry.id,
            "ancestors": _flat(family.ancestry),
            "descendants": _flat(family.descendants),
        }, indent=2))
        return
    console = Console()  # labels are rich Text objects: ids are never parsed as markup
    for title, node, note in (
        ("Ancestry (parents, transitively)", family.ancestry, "its parents are drawn above"),
        ("Descendants (entries that name it as parent, transitively)", family.descendants, "its children are drawn above"),
    ):
        tree = Tree(_node_label(node, repeat_note=note))
        _draw(node, tree, repeat_note=note)
        console.print(Text(title, style="underline"))
        console.print(tree)
        if not node.branches:
            console.print("  (none)")


@app.command("tag")
def tag(
    ref: RefArg,
    tags: Annotated[list[str], typer.Argument(help="Tags to put on the entry; one held by another entry of its stage moves.")],
    root: RootOpt = None,
) -> None:
    """Tag an entry, e.g. `rlhf registry tag rm:latest best`; then `rm:best` names it."""
    reg = Registry(root or default_root())
    with _user_errors():
        changes = reg.tag(ref, tags)
    for change in changes:
        if change.previous == change.entry:
            typer.echo(f"{change.entry} already has tag {change.tag}")
        elif change.previous:
            typer.echo(f"tagged {change.entry} {change.tag} (moved from {change.previous})")
        else:
            typer.echo(f"tagged {change.entry} {change.tag}")


@app.command("untag")
def untag(
    ref: RefArg,
    tags: Annotated[list[str], typer.Argument(help="Tags to take off the entry.")],
    root: RootOpt = None,
) -> None:
    """Take tags off an entry (each must be on it)."""
    reg = Registry(root or default_root())
    with _user_errors():
        entry = reg.untag(ref, tags)
    typer.echo(f"untagged {entry.id}: {', '.join(dict.fromkeys(tags))}")


@app.command("rm")
def rm(
    ref: RefArg,
    force: Annotated[bool, typer.Option("--force", help="Remove it even if other entries name it as parent.")] = False,
    purge: Annotated[bool, typer.Option("--purge", help="Also delete its run folder (checkpoints and model).")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Purge without asking.")] = False,
    root: RootOpt = None,
) -> None:
    """Remove an entry (its file moves to removed/; --purge also deletes the run folder)."""
    reg = Registry(root or default_root())
    with _user_errors():
        plan = reg.plan_removal(ref, force=force, purge=purge)
    if plan.purge_dir is not None and not yes:
        typer.confirm(f"Remove {plan.entry.id} and delete {plan.purge_dir}?", abort=True)
    folder_existed = plan.purge_dir is not None and plan.purge_dir.exists()
    with _user_errors():
        # By id: `stage:latest` could name a newer entry by now.
        done = reg.remove(plan.entry.id, force=force, purge=purge)
    entry = done.entry
    typer.echo(f"removed {entry.id}" + (f" and its tags {', '.join(entry.tags)}" if entry.tags else ""))
    if done.children:
        typer.echo(f"  {', '.join(done.children)} now name{'s' if len(done.children) == 1 else ''} a removed parent")
    if done.purge_dir is not None:
        typer.echo(f"  deleted {done.purge_dir}" if folder_existed else f"  {done.purge_dir} was already gone")
        if not Path(entry.path).resolve().is_relative_to(done.purge_dir):
            typer.echo(f"  kept {entry.path} (outside the run folder)")
    else:
        typer.echo(f"  restore: mv {reg.root / 'removed' / (entry.id + '.json')} {reg.root / 'entries'}/")
