"""The checkpoint registry: publishing, references, lineage, concurrency, and `rlhf registry`."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhf.cli_registry import app
from rlhf.errors import UserError
from rlhf.registry import Entry, Registry, default_root, is_reference, now_iso


def hf_folder(path: Path, marker: str = "config.json") -> Path:
    """A stand-in for a finished save_pretrained folder."""
    path.mkdir(parents=True, exist_ok=True)
    (path / marker).write_text("{}")
    return path


def make_entry(reg: Registry, entry_id: str, *, created: str | None = None, **kw) -> Entry:
    stage = kw.pop("stage", entry_id.split("-")[0])
    run = reg.run_dir(entry_id)
    kw.setdefault("path", str(hf_folder(run / "hf")))
    return Entry(
        id=entry_id,
        stage=stage,
        status=kw.pop("status", "completed"),
        created=created or now_iso(),
        run_dir=str(run),
        config=kw.pop("config", {"lr": 1e-4}),
        **kw,
    )


def publish(reg: Registry, entry_id: str, created: str, **kw) -> Entry:
    return reg.publish(make_entry(reg, entry_id, created=created, **kw))


def t(n: int) -> str:
    """Distinct, ordered ISO timestamps."""
    return f"2026-01-01T00:00:{n:02d}.000000+00:00"


SFT1 = "sft-20260101-000001-aaaa0001"
SFT2 = "sft-20260101-000002-bbbb0002"
RM1 = "rm-20260101-000003-cccc0003"
PPO1 = "ppo-20260101-000004-dddd0004"


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "home")


@pytest.fixture
def pipeline(reg: Registry) -> Registry:
    """sft1 <- sft2 (tag best) ; rm1 <- sft2 ; ppo1 <- rm1, published out of time order."""
    publish(reg, RM1, t(3), parents=(SFT2,), metrics={"accuracy": 0.8125, "margin": 1.5})
    publish(reg, SFT2, t(2), tags=("best",))
    publish(reg, SFT1, t(1), tags=("best", "baseline"))
    publish(reg, PPO1, t(4), parents=(RM1, SFT2))
    return reg


# --- basics -------------------------------------------------------------------------------------


def test_default_root_reads_env_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RLHF_HOME", raising=False)
    assert default_root() == Path("rlhf_runs")
    monkeypatch.setenv("RLHF_HOME", "/scratch/me/rlhf")
    assert default_root() == Path("/scratch/me/rlhf")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sft:latest", True),
        ("rm:20260101-000003", True),
        ("ppo_v2:best", True),
        ("sft:", False),
        ("Sft:latest", False),
        ("org/model", False),
        ("hf:org/model", False),
        ("./runs/sft", False),
        ("/abs/path:x", False),
        ("C:\\models\\x", False),
        ("sft-20260101-000001-aaaa0001", False),
    ],
)
def test_is_reference(text: str, expected: bool) -> None:
    assert is_reference(text) is expected


def test_new_run_id_shape_and_run_dir(reg: Registry) -> None:
    ids = {reg.new_run_id("rm") for _ in range(200)}
    assert len(ids) == 200
    stage, day, clock, rand = next(iter(ids)).split("-")
    assert (stage, len(day), len(clock), len(rand)) == ("rm", 8, 6, 8)
    assert reg.run_dir("rm-x") == reg.root / "runs" / "rm-x"
    assert not reg.root.exists()  # nothing is created until a run needs it
    with pytest.raises(ValueError):
        reg.new_run_id("Bad Stage")


def test_publish_then_get_round_trips(reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    hf_folder(tmp_path / "rel" / "hf")
    entry = make_entry(
        reg,
        SFT1,
        path="rel/hf",
        parents=("x",),
        base_model="toy-llama-400k",
        tokenizer={"name": "toy", "fingerprint": "abc"},
        metrics={"loss": 0.5},
        adapter="merged",
        tags=("a", "b"),
        config={"model": {"n_layer": 2}, "lr": 3e-4},
    )
    stored = reg.publish(entry)
    assert stored.path == str(tmp_path / "rel" / "hf")  # made absolute so it works from any cwd
    on_disk = json.loads((reg.root / "entries" / f"{SFT1}.json").read_text())
    assert on_disk["parents"] == ["x"] and on_disk["config"]["model"] == {"n_layer": 2}
    assert reg.get(SFT1) == stored
    assert Entry.from_json(stored.to_json()) == stored
    assert os.listdir(reg.root / "entries") == [f"{SFT1}.json"]  # the temp file is gone
    with pytest.raises(UserError, match="no registry entry 'sft-nope'"):
        reg.get("sft-nope")


def test_entries_oldest_first_and_by_stage(pipeline: Registry) -> None:
    assert [e.id for e in pipeline.entries()] == [SFT1, SFT2, RM1, PPO1]
    assert [e.id for e in pipeline.entries("sft")] == [SFT1, SFT2]
    assert pipeline.entries("dpo") == []
    assert Registry(pipeline.root / "nothing-here").entries() == []


# --- references ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("sft:latest", SFT2),
        ("rm:latest", RM1),
        (f"sft:{SFT1}", SFT1),  # full id
        ("sft:20260101-000001-aaaa0001", SFT1),  # the part after "sft-"
        ("sft:sft-20260101-000001", SFT1),  # unique prefix of the id
        ("sft:20260101-000002", SFT2),  # unique prefix of the part after "sft-"
        ("ppo:2026", PPO1),  # the only ppo entry
        ("sft:best", SFT2),  # newest entry carrying the tag
        ("sft:baseline", SFT1),
        (RM1, RM1),  # bare id
        ("best", SFT2),  # bare tag
        ("baseline", SFT1),
    ],
)
def test_resolve_reference_forms(pipeline: Registry, ref: str, expected: str) -> None:
    assert pipeline.resolve(ref).id == expected


def test_latest_skips_entries_that_are_not_completed(reg: Registry) -> None:
    publish(reg, SFT1, t(1))
    publish(reg, SFT2, t(2), status="aborted")
    assert reg.resolve("sft:latest").id == SFT1
    assert reg.resolve("sft:20260101-000002").id == SFT2  # explicit ids still reach it


@pytest.mark.parametrize(
    ("ref", "says"),
    [
        ("sft:nope", "no sft entry with that id or tag"),
        (f"rm:{SFT1}", "no rm entry with that id or tag"),  # another stage's entry never matches
        ("rm:best", "no rm entry with that id or tag"),  # tags are per stage too
        ("nope", "no entry with that id or tag"),
        ("sft-20260101", "no entry with that id or tag"),  # bare prefixes are not ids
        ("dpo:latest", "no completed dpo entry yet"),
    ],
)
def test_unknown_reference_names_ref_root_and_fix(pipeline: Registry, ref: str, says: str) -> None:
    with pytest.raises(UserError) as err:
        pipeline.resolve(ref)
    msg = str(err.value)
    assert msg.startswith(f"unknown registry reference {ref!r} in {pipeline.root}: ")
    assert says in msg and "rlhf registry ls" in msg and "\n" not in msg


def test_ambiguous_prefix_lists_candidates(pipeline: Registry) -> None:
    with pytest.raises(UserError) as err:
        pipeline.resolve("sft:20260101-00000")
    msg = str(err.value)
    assert "ambiguous registry reference 'sft:20260101-00000'" in msg
    assert SFT1 in msg and SFT2 in msg and "\n" not in msg


def test_exact_tag_beats_fuzzy_prefix(reg: Registry) -> None:
    publish(reg, SFT1, t(1), tags=("2026",))
    publish(reg, SFT2, t(2))
    assert reg.resolve("sft:2026").id == SFT1


# --- lineage ------------------------------------------------------------------------------------


def test_lineage_follows_first_parent(pipeline: Registry) -> None:
    assert [e.id for e in pipeline.lineage("ppo:latest")] == [PPO1, RM1, SFT2]
    assert [e.id for e in pipeline.lineage(SFT1)] == [SFT1]


def test_lineage_stops_at_missing_parent_and_cycle(reg: Registry) -> None:
    publish(reg, RM1, t(3), parents=("sft-gone",))
    assert [e.id for e in reg.lineage(RM1)] == [RM1]
    publish(reg, SFT1, t(1), parents=(SFT2,))
    publish(reg, SFT2, t(2), parents=(SFT1,))
    assert [e.id for e in reg.lineage(SFT2)] == [SFT2, SFT1]


# --- refusals and robustness --------------------------------------------------------------------


def test_refuses_duplicate_id_and_keeps_the_original(reg: Registry) -> None:
    publish(reg, SFT1, t(1), metrics={"loss": 1.0})
    with pytest.raises(UserError, match="already exists"):
        publish(reg, SFT1, t(2), metrics={"loss": 2.0})
    assert reg.get(SFT1).metrics == {"loss": 1.0}
    assert os.listdir(reg.root / "entries") == [f"{SFT1}.json"]


def test_refuses_checkpoint_without_config_json(reg: Registry, tmp_path: Path) -> None:
    half = tmp_path / "half-written"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"")
    for path in (half, tmp_path / "does-not-exist"):
        with pytest.raises(UserError, match=f"{path} has no config.json") as err:
            reg.publish(make_entry(reg, SFT1, path=str(path)))
        assert "\n" not in str(err.value)
    assert reg.entries() == []
    assert not (reg.root / "entries").exists() or os.listdir(reg.root / "entries") == []


def test_peft_adapter_folder_needs_adapter_config(reg: Registry, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no adapter_config.json"):
        reg.publish(make_entry(reg, SFT1, adapter="adapter"))  # has config.json only
    path = hf_folder(tmp_path / "lora", "adapter_config.json")
    assert reg.publish(make_entry(reg, SFT1, adapter="adapter", path=str(path))).adapter == "adapter"
    with pytest.raises(ValueError):
        reg.publish(make_entry(reg, SFT2, adapter="lora"))


def test_readers_ignore_temp_and_dot_files(pipeline: Registry) -> None:
    entries_dir = pipeline.root / "entries"
    (entries_dir / ".x.tmp").write_text("{half")
    (entries_dir / f".{SFT1}.123.ab.tmp").write_text("{half")
    (entries_dir / "notes.txt").write_text("not an entry")
    assert [e.id for e in pipeline.entries()] == [SFT1, SFT2, RM1, PPO1]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", json.dumps({"id": "sft-x"})])
def test_corrupt_entry_names_file_and_fix(pipeline: Registry, content: str) -> None:
    bad = pipeline.root / "entries" / "sft-bad.json"
    bad.write_text(content)
    with pytest.raises(UserError) as err:
        pipeline.entries()
    msg = str(err.value)
    assert str(bad) in msg and "remove the file" in msg and "\n" not in msg


def test_incomplete_runs_newest_first(pipeline: Registry) -> None:
    runs = pipeline.root / "runs"
    for name in ("sft-20260102-000000-eeee0005", "rm-20260103-000000-ffff0006", "sft-20260101-120000-aaaa0007"):
        (runs / name / "checkpoints").mkdir(parents=True)
    (runs / ".hidden").mkdir()
    (runs / "stray-file").write_text("")
    # Published runs (which all have run dirs here) are complete and never listed.
    assert [p.name for p in pipeline.incomplete_runs()] == [
        "rm-20260103-000000-ffff0006",
        "sft-20260102-000000-eeee0005",
        "sft-20260101-120000-aaaa0007",
    ]
    assert [p.name for p in pipeline.incomplete_runs("rm")] == ["rm-20260103-000000-ffff0006"]
    assert pipeline.incomplete_runs("ppo") == []
    assert Registry(pipeline.root / "empty").incomplete_runs() == []


# --- two writers at once ------------------------------------------------------------------------


def _publish_many(root: str, ckpt: str, n: int, barrier) -> None:
    """Child process: publish `n` entries as fast as possible once everyone is ready."""
    reg = Registry(root)
    barrier.wait()
    for _ in range(n):
        entry_id = reg.new_run_id("sft")
        reg.publish(
            Entry(
                id=entry_id,
                stage="sft",
                status="completed",
                created=now_iso(),
                path=ckpt,
                run_dir=str(reg.run_dir(entry_id)),
                config={"pid": os.getpid(), "padding": "x" * 4000},  # bigger than one write
            )
        )


def test_two_processes_publishing_at_once(tmp_path: Path) -> None:
    root, ckpt = tmp_path / "home", hf_folder(tmp_path / "hf")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_publish_many, args=(str(root), str(ckpt), 25, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    barrier.wait(timeout=60)

    reg, reads, errors = Registry(root), 0, []
    while any(p.is_alive() for p in procs):
        try:
            seen = reg.entries()
            assert all(e.config["padding"] == "x" * 4000 for e in seen)
        except Exception as e:  # any failed read during the race is the bug under test
            errors.append(repr(e))
        reads += 1
    for p in procs:
        p.join()

    assert [p.exitcode for p in procs] == [0, 0]
    assert errors == []
    assert reads > 1
    final = reg.entries()
    assert len(final) == 50 and len({e.id for e in final}) == 50
    assert len({e.config["pid"] for e in final}) == 2
    assert sorted(os.listdir(root / "entries")) == sorted(f"{e.id}.json" for e in final)  # no temp left


# --- CLI ----------------------------------------------------------------------------------------

runner = CliRunner()
WIDE = {"COLUMNS": "250"}  # rich reads it; keeps ids and paths on one line for the asserts


def test_cli_ls_table_lists_entries_and_incomplete_runs(pipeline: Registry) -> None:
    (pipeline.root / "runs" / "ppo-20260105-000000-abcd0009").mkdir()
    result = runner.invoke(app, ["ls", "--root", str(pipeline.root)], env=WIDE)
    assert result.exit_code == 0, result.output
    for entry_id in (SFT1, SFT2, RM1, PPO1, "ppo-20260105-000000-abcd0009"):
        assert entry_id in result.stdout
    assert "accuracy=0.8125" in result.stdout and "Incomplete runs" in result.stdout
    assert result.stdout.index(SFT1) < result.stdout.index(PPO1)

    only_rm = runner.invoke(app, ["ls", "--stage", "rm", "--root", str(pipeline.root)], env=WIDE)
    assert RM1 in only_rm.stdout and SFT1 not in only_rm.stdout and "Incomplete" not in only_rm.stdout


def test_cli_ls_json_and_default_root(pipeline: Registry) -> None:
    result = runner.invoke(app, ["ls", "--json"], env={"RLHF_HOME": str(pipeline.root)})
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [d["id"] for d in data] == [SFT1, SFT2, RM1, PPO1]
    assert [Entry.from_json(d) for d in data] == pipeline.entries()


def test_cli_ls_empty_root(tmp_path: Path) -> None:
    result = runner.invoke(app, ["ls", "--root", str(tmp_path / "none")], env=WIDE)
    assert result.exit_code == 0 and "No entries" in result.stdout


def test_cli_show_table_and_lineage(pipeline: Registry) -> None:
    result = runner.invoke(app, ["show", "ppo:latest", "--root", str(pipeline.root)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert f"lineage: {PPO1} <- {RM1} <- {SFT2}" in result.stdout
    assert "lr=0.0001" in result.stdout and pipeline.get(PPO1).path in result.stdout


def test_cli_show_marks_missing_parent(reg: Registry) -> None:
    publish(reg, RM1, t(3), parents=("sft-gone",))
    result = runner.invoke(app, ["show", RM1, "--root", str(reg.root)], env=WIDE)
    assert f"lineage: {RM1} <- sft-gone (missing)" in result.stdout


def test_cli_show_json(pipeline: Registry) -> None:
    result = runner.invoke(app, ["show", "rm:latest", "--json", "--root", str(pipeline.root)])
    assert result.exit_code == 0, result.output
    assert Entry.from_json(json.loads(result.stdout)) == pipeline.get(RM1)


@pytest.mark.parametrize("args", [["show", "sft:nope"], ["show", "sft:nope", "--json"]])
def test_cli_user_error_is_one_line_exit_2(pipeline: Registry, args: list[str]) -> None:
    result = runner.invoke(app, [*args, "--root", str(pipeline.root)])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: unknown registry reference 'sft:nope'")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


def test_cli_corrupt_entry_is_a_user_error(pipeline: Registry) -> None:
    (pipeline.root / "entries" / "bad.json").write_text("{")
    result = runner.invoke(app, ["ls", "--root", str(pipeline.root)])
    assert result.exit_code == 2 and result.stderr.startswith("error: corrupt registry entry")
