"""`rlhf registry lineage / tag / untag / rm` through the CLI, on entries published for real (no stage runs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhf.cli.registry import app
from rlhf.store.registry import Registry
from tests.unit.test_registry import PPO1, RM1, SFT1, SFT2, publish, t

runner = CliRunner()
WIDE = {"COLUMNS": "250"}  # rich reads it; keeps ids and paths on one line for the asserts


@pytest.fixture
def chain(tmp_path: Path) -> Registry:
    """sft1 <- sft2 (tag best) <- rm1 <- ppo1, and ppo1 also names sft2 (actor and reference)."""
    reg = Registry(tmp_path / "home")
    publish(reg, SFT1, t(1))
    publish(reg, SFT2, t(2), parents=(SFT1,), tags=("best",))
    publish(reg, RM1, t(3), parents=(SFT2,))
    publish(reg, PPO1, t(4), parents=(RM1, SFT2))
    return reg


def cli(reg: Registry, *args: str, **kw):
    return runner.invoke(app, [*args, "--root", str(reg.root)], env=WIDE, **kw)


def drawn(text: str, ids: list[str]) -> list[tuple[int, str]]:
    """(column, id) of each tree line that shows one of `ids`: the column is the nesting depth."""
    rows = []
    for line in text.splitlines():
        for entry_id in ids:
            col = line.find(entry_id)
            if col >= 0 and not line[col + len(entry_id):].startswith("-"):  # not a longer id
                rows.append((col, entry_id))
    return rows


def row(table: str, field: str) -> str:
    """The value cell of a `show` table row."""
    [value] = [cells[2].strip() for cells in (line.split("│") for line in table.splitlines())
               if len(cells) > 2 and cells[1].strip() == field]
    return value


# --- ls -----------------------------------------------------------------------------------------


@pytest.fixture
def scored(tmp_path: Path) -> Registry:
    """Entries with the metrics and tags stages publish: sft1 <- rm1 <- ppo1 (ppo1 also names sft1)."""
    reg = Registry(tmp_path / "home")
    publish(reg, SFT1, t(1), tags=("best",),
            metrics={"train_loss": 1.2, "loss": 1.581, "oracle_score": 41.5, "initial_loss": 3.25})
    publish(reg, RM1, t(3), parents=(SFT1,), metrics={"train_loss": 0.41, "accuracy": 0.8125, "oracle_agreement": 0.9})
    publish(reg, PPO1, t(4), parents=(RM1, SFT1), tags=("v2",), metrics={"score": 0.3125, "kl": 0.02})
    return reg


def ls_rows(reg: Registry, columns: int) -> tuple[list[str], dict[str, dict[str, list[str]]]]:
    """`ls` at `columns` terminal columns: its headers, and each entry's cells by header, a list of
    the cell's lines (a row's first line starts with its id)."""
    result = runner.invoke(app, ["ls", "--root", str(reg.root)], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= columns, result.stdout
    rule = next(i for i, line in enumerate(lines) if set(line.strip()) == {"─"})
    headers = lines[rule - 1].split()
    starts = [lines[rule - 1].index(name) for name in headers] + [columns]
    rows: dict[str, dict[str, list[str]]] = {}
    for line in lines[rule + 1:]:
        if not line.strip():
            break
        cells = [line[a:b].strip() for a, b in zip(starts, starts[1:])]
        if cells[0]:
            rows[cells[0]] = {name: [] for name in headers}
        for name, cell in zip(headers, cells):
            if cell:
                rows[list(rows)[-1]][name].append(cell)
    return headers, rows


def test_ls_fits_80_columns_with_one_whole_line_per_entry(scored: Registry, tmp_path: Path) -> None:
    headers, rows = ls_rows(scored, 80)
    assert headers == ["id", "stage", "created", "metric", "tags"]  # no header cut ("crea…"), no path or parents
    # One line per entry, every kept cell whole: each stage's headline metric, not its first one.
    assert rows == {
        SFT1: {"id": [SFT1], "stage": ["sft"], "created": ["2026-01-01 00:00:01"], "metric": ["loss=1.581"], "tags": ["best"]},
        RM1: {"id": [RM1], "stage": ["rm"], "created": ["2026-01-01 00:00:03"], "metric": ["accuracy=0.8125"], "tags": []},
        PPO1: {"id": [PPO1], "stage": ["ppo"], "created": ["2026-01-01 00:00:04"], "metric": ["score=0.3125"], "tags": ["v2"]},
    }
    # Tags too long for what is left wrap in their column; the other kept cells stay whole, on one line.
    scored.tag(PPO1, ["candidate"])
    headers, rows = ls_rows(scored, 80)
    assert headers == ["id", "stage", "created", "metric", "tags"]
    ppo = rows[PPO1]
    assert [ppo[name] for name in headers[:4]] == [[PPO1], ["ppo"], ["2026-01-01 00:00:04"], ["score=0.3125"]]
    assert len(ppo["tags"]) > 1 and "".join(ppo["tags"]).replace(" ", "") == "v2,candidate"

    # One entry, no parents or tags: three short metrics would fit 80 columns, but the row stays one line.
    solo = Registry(tmp_path / "solo")
    publish(solo, SFT1, t(1), metrics={"train_loss": 1.2, "loss": 1.581, "steps": 6})
    headers, rows = ls_rows(solo, 80)
    assert headers == ["id", "stage", "created", "metric", "tags"]
    assert rows[SFT1]["metric"] == ["loss=1.581"]


def test_ls_in_a_wide_terminal_shows_the_dropped_columns(scored: Registry) -> None:
    headers, rows = ls_rows(scored, 200)
    assert headers == ["id", "stage", "created", "metrics", "tags", "parents", "path"]
    assert list(rows) == [SFT1, RM1, PPO1]
    for entry_id, cells in rows.items():
        entry = scored.get(entry_id)
        assert cells["parents"] == list(entry.parents)
        assert "".join(cells["path"]) == entry.path  # whole, or folded onto lines of its column
        assert len(cells["path"]) <= 2
    # Up to three metrics, the headline one first.
    assert rows[SFT1]["metrics"] == ["loss=1.581", "train_loss=1.2", "oracle_score=41.5"]
    assert rows[PPO1]["metrics"] == ["score=0.3125", "kl=0.02"]


# --- lineage ------------------------------------------------------------------------------------


def test_lineage_draws_all_parents_and_all_descendants(chain: Registry) -> None:
    result = cli(chain, "lineage", "ppo:latest")
    assert result.exit_code == 0, result.output
    ancestry, descendants = result.stdout.split("Descendants")
    # Rich indents each level by 4 columns; sft2 is drawn twice, its parents only once.
    assert drawn(ancestry, [PPO1, RM1, SFT2, SFT1]) == [(0, PPO1), (4, RM1), (8, SFT2), (12, SFT1), (4, SFT2)]
    assert ancestry.splitlines()[-1].endswith(f"{SFT2}  sft  2026-01-01 00:00:02  [best]  (its parents are drawn above)")
    assert "sft  2026-01-01 00:00:02  [best]" in ancestry
    assert drawn(descendants, [PPO1]) == [(0, PPO1)] and "(none)" in descendants

    down = cli(chain, "lineage", "sft:best").stdout.split("Descendants")[1]
    assert drawn(down, [SFT2, RM1, PPO1]) == [(0, SFT2), (4, RM1), (8, PPO1), (4, PPO1)]


def test_lineage_marks_missing_removed_and_cyclic_ids(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "home")
    publish(reg, SFT1, t(1))
    publish(reg, RM1, t(3), parents=("sft-gone", SFT1))
    assert cli(reg, "rm", SFT1, "--force").exit_code == 0
    result = cli(reg, "lineage", RM1)
    assert result.exit_code == 0, result.output
    assert "sft-gone  (missing: no entry has this id)" in result.stdout
    assert f"{SFT1}  (removed with `rlhf registry rm`)" in result.stdout

    publish(reg, SFT2, t(2), parents=(PPO1,))
    publish(reg, PPO1, t(4), parents=(SFT2,))
    result = cli(reg, "lineage", SFT2)
    assert result.exit_code == 0, result.output
    assert f"{SFT2}  sft  2026-01-01 00:00:02  (cycle: already on the path above)" in result.stdout


def test_lineage_json_lists_every_ancestor_once_at_its_nearest_depth(chain: Registry) -> None:
    result = cli(chain, "lineage", PPO1, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["id"] == PPO1 and data["descendants"] == []
    # sft1 is two steps away through ppo1 <- sft2, three through rm1: the nearest counts.
    assert [(a["id"], a["depth"], a["state"]) for a in data["ancestors"]] == [
        (RM1, 1, "ok"), (SFT2, 1, "ok"), (SFT1, 2, "ok"),
    ]
    assert data["ancestors"][1] == {
        "id": SFT2, "depth": 1, "state": "ok", "stage": "sft", "created": t(2), "parents": [SFT1], "tags": ["best"],
    }
    down = json.loads(cli(chain, "lineage", SFT1, "--json").stdout)["descendants"]
    assert [(d["id"], d["depth"]) for d in down] == [(SFT2, 1), (RM1, 2), (PPO1, 2)]

    chain.remove(SFT1, force=True)
    [gone] = json.loads(cli(chain, "lineage", SFT2, "--json").stdout)["ancestors"]
    assert gone == {"id": SFT1, "depth": 1, "state": "removed", "stage": None, "created": None, "parents": [], "tags": []}


# --- tags ---------------------------------------------------------------------------------------


def test_tag_moves_and_untag_removes_as_ls_and_show_report(chain: Registry) -> None:
    result = cli(chain, "tag", "sft:latest", "best", "candidate")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{SFT2} already has tag best\ntagged {SFT2} candidate\n"
    result = cli(chain, "tag", SFT1, "best")
    assert result.stdout == f"tagged {SFT1} best (moved from {SFT2})\n"

    tags = {e["id"]: e["tags"] for e in json.loads(cli(chain, "ls", "--json").stdout)}
    assert tags == {SFT1: ["best"], SFT2: ["candidate"], RM1: [], PPO1: []}
    shown = cli(chain, "show", "best").stdout  # a bare tag is a reference
    assert row(shown, "id") == SFT1 and row(shown, "tags") == "best"

    result = cli(chain, "untag", "sft:candidate", "candidate")
    assert result.exit_code == 0 and result.stdout == f"untagged {SFT2}: candidate\n"
    assert cli(chain, "show", "sft:candidate").exit_code == 2


def test_show_lists_children_and_a_removed_parent(chain: Registry) -> None:
    shown = cli(chain, "show", SFT2).stdout
    assert row(shown, "children") == f"{RM1}, {PPO1}"
    chain.remove(SFT2, force=True)
    assert f"lineage: {RM1} <- {SFT2} (removed)" in cli(chain, "show", RM1).stdout


# --- rm -----------------------------------------------------------------------------------------


def test_rm_refuses_a_parent_then_force_removes_it(chain: Registry) -> None:
    result = cli(chain, "rm", "sft:best")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (
        f"error: cannot remove {SFT2}: 2 entries name it as parent ({RM1}, {PPO1}); remove them first, "
        f"or pass --force to leave them with a removed parent\n"
    )
    result = cli(chain, "rm", "sft:best", "--force")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[:2] == [
        f"removed {SFT2} and its tags best", f"  {RM1}, {PPO1} now name a removed parent",
    ]
    assert "restore: mv" in result.stdout and chain.run_dir(SFT2).is_dir()
    assert [e.id for e in chain.entries()] == [SFT1, RM1, PPO1]


def test_rm_purge_of_a_crafted_entry_deletes_nothing(chain: Registry) -> None:
    """An entry written by hand (as anyone who can write the registry could) naming another run's folder."""
    crafted = {**json.loads((chain.root / "entries" / f"{SFT1}.json").read_text()), "id": "sft-20260101-000009-eeee0009",
               "created": t(9), "run_dir": str(chain.run_dir(PPO1)), "path": str(chain.run_dir(PPO1) / "hf")}
    (chain.root / "entries" / "sft-20260101-000009-eeee0009.json").write_text(json.dumps(crafted))
    result = cli(chain, "rm", "sft-20260101-000009-eeee0009", "--purge", "--yes")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert f"cannot purge sft-20260101-000009-eeee0009: run {PPO1} was not started for sft-20260101-000009-eeee0009" in result.stderr
    assert (chain.run_dir(PPO1) / "hf").is_dir() and chain.get(PPO1)


def test_rm_purge_asks_first_unless_yes(chain: Registry) -> None:
    declined = cli(chain, "rm", PPO1, "--purge", input="n\n")
    assert declined.exit_code == 1 and f"delete {chain.run_dir(PPO1).resolve()}?" in declined.stdout
    assert chain.get(PPO1) and chain.run_dir(PPO1).is_dir()

    accepted = cli(chain, "rm", PPO1, "--purge", input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert f"deleted {chain.run_dir(PPO1).resolve()}" in accepted.stdout
    assert not chain.run_dir(PPO1).exists()

    result = cli(chain, "rm", "rm:latest", "--purge", "--yes")
    assert result.exit_code == 0 and "?" not in result.stdout
    assert not chain.run_dir(RM1).exists() and [e.id for e in chain.entries()] == [SFT1, SFT2]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["lineage", "sft:nope"], "unknown registry reference 'sft:nope'"),
        (["lineage", "sft:nope", "--json"], "unknown registry reference 'sft:nope'"),
        (["tag", "rm:nope", "best"], "unknown registry reference 'rm:nope'"),
        (["tag", SFT1, "latest"], "invalid tag 'latest'"),
        (["tag", SFT1, RM1], f"invalid tag '{RM1}': it looks like an entry id"),
        (["untag", SFT1, "best"], f"{SFT1} has no tag 'best' (its tags: none)"),
        (["rm", "ppo:nope"], "unknown registry reference 'ppo:nope'"),
        (["rm", RM1, "--purge"], f"cannot remove {RM1}: 1 entry names it as parent ({PPO1})"),
    ],
)
def test_user_errors_are_one_line_exit_2_and_change_nothing(chain: Registry, args: list[str], says: str) -> None:
    before = sorted(str(p.relative_to(chain.root)) for p in chain.root.rglob("*"))
    result = cli(chain, *args)
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and result.stderr.startswith(f"error: {says}")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert sorted(str(p.relative_to(chain.root)) for p in chain.root.rglob("*")) == before


PLANTED = "sft-20260101-000009-eeee0009"


def plant_entry(reg: Registry, **change) -> Path:
    """An entry file written by hand (or by someone else), not by `publish`."""
    record = {**json.loads((reg.root / "entries" / f"{SFT1}.json").read_text()), "id": PLANTED, **change}
    file = reg.root / "entries" / f"{PLANTED}.json"
    file.write_text(json.dumps(record))
    return file


def plant_tag_file(reg: Registry, **change) -> Path:
    folder = reg.root / "tags" / "sft"
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "planted.json"
    file.write_text(json.dumps({"stage": "sft", "tag": "planted", "entry": SFT1, "tagged": t(9), **change}))
    return file


COMMANDS = [["ls"], ["ls", "--json"], ["tag", PLANTED, "best"], ["tag", SFT1, "best"], ["show", PLANTED], ["untag", SFT2, "best"],
            ["rm", PPO1]]


@pytest.mark.parametrize("args", COMMANDS)
@pytest.mark.parametrize(("plant", "says"), [
    (lambda reg: plant_entry(reg, stage="../../escape"), "invalid stage '../../escape'"),
    (lambda reg: plant_entry(reg, id="sft/../../escape"), "invalid id 'sft/../../escape'"),
    (lambda reg: plant_entry(reg, id=".escape"), "invalid id '.escape'"),
    (lambda reg: plant_entry(reg, tags=["../../escape"]), "invalid tag '../../escape'"),
])
def test_a_planted_entry_is_skipped_in_one_line_and_nothing_leaves_the_root(chain: Registry, plant, says: str,
                                                                            args: list[str]) -> None:
    """Every command goes on without it, saying so; one that names it is refused."""
    bad = plant(chain)
    outside = chain.root.parent
    before = sorted(str(p) for p in outside.rglob("*"))
    result = cli(chain, *args)
    named = PLANTED in args  # refused: as corrupt, or (skipped, said in a warning) as no such entry
    lines = result.stderr.splitlines()
    assert result.exit_code == (2 if named else 0), result.output
    assert lines[-1].startswith("error: ") if named else (len(lines) == 1 and lines[0].startswith("warning: corrupt registry "))
    assert len(lines) <= 2 and "Traceback" not in result.output
    assert any(f"corrupt registry entry {bad}: {says}" in line and "remove the file" in line for line in lines)
    assert PLANTED not in result.stdout
    assert sorted(str(p) for p in outside.rglob("*") if not p.is_relative_to(chain.root)) == \
        sorted(p for p in before if not Path(p).is_relative_to(chain.root))  # nothing written outside the root


@pytest.mark.parametrize("args", COMMANDS)
@pytest.mark.parametrize(("plant", "says"), [
    (lambda reg: plant_tag_file(reg, stage="../../escape"), "invalid stage '../../escape'"),
    (lambda reg: plant_tag_file(reg, tag="../../escape"), "invalid tag '../../escape'"),
])
def test_planted_names_are_refused_in_one_line_and_nothing_leaves_the_root(chain: Registry, plant, says: str,
                                                                           args: list[str]) -> None:
    bad = plant(chain)
    outside = chain.root.parent
    before = sorted(str(p) for p in outside.rglob("*"))
    result = cli(chain, *args)
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and result.stderr.startswith("error: corrupt registry ")
    assert f"{bad}: {says}" in result.stderr and "remove the file" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert sorted(str(p) for p in outside.rglob("*")) == before  # nothing written, inside the root or out


def test_installed_console_script_reaches_the_new_commands(chain: Registry) -> None:
    rlhf = shutil.which("rlhf", path=str(Path(sys.executable).parent))
    assert rlhf, "the rlhf console script is not installed in this venv"
    env = {**os.environ, "RLHF_HOME": str(chain.root), "COLUMNS": "250"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([rlhf, "registry", *args], env=env, capture_output=True, text=True, timeout=60)

    assert run("tag", "rm:latest", "best").returncode == 0
    assert json.loads(run("lineage", "rm:best", "--json").stdout)["descendants"][0]["id"] == PPO1
    refused = run("rm", "rm:best")
    assert refused.returncode == 2 and refused.stderr.startswith(f"error: cannot remove {RM1}")
    assert run("rm", "ppo:latest", "--purge", "--yes").returncode == 0
    assert run("rm", "rm:best").returncode == 0
    assert {e["id"]: e["tags"] for e in json.loads(run("ls", "--json").stdout)} == {SFT1: [], SFT2: ["best"]}
    assert run("show", "rm:best").returncode == 2  # the tag went with its entry
