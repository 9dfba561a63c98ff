"""`rlhf registry`: list and inspect checkpoint-registry entries (read-only; imports no torch)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from rlhf.errors import EXIT_USER_ERROR, UserError
from rlhf.registry import Entry, Registry, default_root

app = typer.Typer(help="Inspect the checkpoint registry.", no_args_is_help=True)

RootOpt = Annotated[
    Optional[Path],
    typer.Option("--root", help="Registry root [default: $RLHF_HOME, else ./rlhf_runs]."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of tables.")]

# Metrics shown per row in `ls`; the rest stay in `show`.
_LS_METRICS = 3
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
        text += f" <- {parent} " + ("(cycle)" if any(e.id == parent for e in chain) else "(missing)")
    return text


@app.command("ls")
def ls(
    stage: Annotated[Optional[str], typer.Option("--stage", help="Only this stage (sft, rm, ppo).")] = None,
    root: RootOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List published entries (oldest first), then runs that stopped before publishing."""
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
        table = Table(title=f"Registry {reg.root}")
        # On a narrow terminal ids stay whole (they are what users copy) and the rest wraps.
        table.add_column("id", no_wrap=True)
        table.add_column("stage", no_wrap=True)
        for name in ("created", "parents", "tags", "metrics"):
            table.add_column(name)
        table.add_column("path", overflow="fold")
        for e in entries:
            metrics = "\n".join(f"{k}={_fmt(v)}" for k, v in list(e.metrics.items())[:_LS_METRICS])
            created = e.created[:19].replace("T", " ")  # seconds are enough to tell runs apart here
            table.add_row(e.id, e.stage, created, "\n".join(e.parents), ", ".join(e.tags), metrics, e.path)
        console.print(table)
    if incomplete:
        table = Table(title="Incomplete runs (no entry yet; resumable)")
        table.add_column("run dir", overflow="fold")
        for run in incomplete:
            table.add_row(str(run))
        console.print(table)


@app.command("show")
def show(
    ref: Annotated[str, typer.Argument(help="Entry id or reference: sft:latest, rm:<id>, a tag.")],
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

    table = Table(title=entry.id, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name in ("id", "stage", "status", "created", "path", "run_dir", "base_model", "adapter"):
        table.add_row(name, str(getattr(entry, name)))
    table.add_row("parents", ", ".join(entry.parents) or "-")
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
