"""The checkpoint registry: publishing, references, lineage, tags, removal, concurrency, and `rlhf registry`."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhf.cli.registry import app
from rlhf.errors import UserError
from rlhf.store.entry import Entry, check_tags, is_reference, now_iso
from rlhf.store.lineage import LineageNode
from rlhf.store.registry import Registry, TagChange, default_root
from rlhf.store.start_record import write_start_record


def hf_folder(path: Path, marker: str = "config.json") -> Path:
    """A stand-in for a finished save_pretrained folder."""
    path.mkdir(parents=True, exist_ok=True)
    (path / marker).write_text("{}")
    return path


def make_entry(reg: Registry, entry_id: str, *, created: str | None = None, **kw) -> Entry:
    stage = kw.pop("stage", entry_id.split("-")[0])
    if "run_dir" not in kw:  # the entry's own run, with the start record its start wrote (rlhf.store.start_record)
        reg.run_dir(entry_id).mkdir(parents=True, exist_ok=True)
        write_start_record(reg.run_dir(entry_id), run_id=entry_id, stage=stage, registry=reg.root.resolve(), config={}, sources={})
    run = Path(kw.pop("run_dir", reg.run_dir(entry_id)))
    if "path" not in kw:
        kw["path"] = str(hf_folder(run / "hf"))
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


def shape(node: LineageNode) -> tuple:
    """A lineage tree as nested (id, state, [branches]) for comparing with a hand-drawn tree."""
    return (node.id, node.state, [shape(b) for b in node.branches])


def test_family_tree_follows_every_parent_and_child(reg: Registry) -> None:
    # sft1 <- sft2 <- rm1 <- ppo1, and ppo1 also names sft2: a DAG, not a chain.
    publish(reg, SFT1, t(1))
    publish(reg, SFT2, t(2), parents=(SFT1,))
    publish(reg, RM1, t(3), parents=(SFT2,))
    publish(reg, PPO1, t(4), parents=(RM1, SFT2))
    family = reg.family_tree("ppo:latest")
    assert family.entry.id == PPO1
    assert shape(family.ancestry) == (PPO1, "ok", [
        (RM1, "ok", [(SFT2, "ok", [(SFT1, "ok", [])])]),
        (SFT2, "repeat", []),  # its parents were drawn under rm1
    ])
    assert shape(family.descendants) == (PPO1, "ok", [])
    assert shape(reg.family_tree(SFT1).descendants) == (SFT1, "ok", [
        (SFT2, "ok", [(RM1, "ok", [(PPO1, "ok", [])]), (PPO1, "ok", [])]),  # a leaf is drawn again
    ])
    assert shape(reg.family_tree(SFT1).ancestry) == (SFT1, "ok", [])


def test_family_tree_marks_missing_and_removed_parents(reg: Registry) -> None:
    publish(reg, SFT1, t(1))
    publish(reg, RM1, t(3), parents=("sft-gone", SFT1))
    reg.remove(SFT1, force=True)
    assert shape(reg.family_tree(RM1).ancestry) == (RM1, "ok", [("sft-gone", "missing", []), (SFT1, "removed", [])])
    assert reg.family_tree(RM1).ancestry.branches[0].entry is None


def test_family_tree_stops_at_cycles(reg: Registry) -> None:
    # Only hand-edited files make cycles; they must print, not recurse forever.
    publish(reg, SFT1, t(1), parents=(SFT2,))
    publish(reg, SFT2, t(2), parents=(SFT1,))
    publish(reg, RM1, t(3), parents=(RM1,))
    family = reg.family_tree(SFT1)
    assert shape(family.ancestry) == (SFT1, "ok", [(SFT2, "ok", [(SFT1, "cycle", [])])])
    assert shape(family.descendants) == (SFT1, "ok", [(SFT2, "ok", [(SFT1, "cycle", [])])])
    assert shape(reg.family_tree(RM1).ancestry) == (RM1, "ok", [(RM1, "cycle", [])])


# --- tags ---------------------------------------------------------------------------------------


def tag_files(reg: Registry) -> list[str]:
    root = reg.root / "tags"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_tag_names_the_entry_through_every_reference_form(pipeline: Registry) -> None:
    [change] = pipeline.tag(f"rm:{RM1}", ["chosen"])
    assert change == TagChange("chosen", RM1, None)
    assert pipeline.resolve("rm:chosen").id == RM1
    assert pipeline.resolve("chosen").id == RM1
    assert pipeline.get(RM1).tags == ("chosen",)
    assert [e.tags for e in pipeline.entries("rm")] == [("chosen",)]
    assert tag_files(pipeline) == ["rm/chosen.json"]
    record = json.loads((pipeline.root / "tags" / "rm" / "chosen.json").read_text())
    assert record["entry"] == RM1 and record["tag"] == "chosen"
    # The entry file is never rewritten: it keeps the tags it was published with.
    assert json.loads((pipeline.root / "entries" / f"{RM1}.json").read_text())["tags"] == []


def test_retag_moves_the_tag_within_its_stage(pipeline: Registry) -> None:
    # sft2 holds "best" from publish time (sft1 was published with it earlier).
    assert pipeline.resolve("sft:best").id == SFT2
    [change] = pipeline.tag(SFT1, ["best"])
    assert change == TagChange("best", SFT1, SFT2)
    assert pipeline.resolve("sft:best").id == SFT1
    assert pipeline.get(SFT2).tags == ()
    assert pipeline.get(SFT1).tags == ("best", "baseline")
    assert pipeline.tag(SFT1, ["best"]) == [TagChange("best", SFT1, SFT1)]  # already there: a no-op
    [change] = pipeline.tag(SFT2, ["best"])
    assert change.previous == SFT1 and pipeline.resolve("best").id == SFT2
    assert tag_files(pipeline) == ["sft/best.json"]  # one file per tag, replaced


def test_publish_time_tags_keep_moving_tags(pipeline: Registry) -> None:
    pipeline.tag(SFT1, ["best"])
    newer = "sft-20260101-000009-eeee0009"
    pipeline.publish(make_entry(pipeline, newer, tags=("best",)))  # created now: after the tag
    assert pipeline.resolve("sft:best").id == newer
    assert pipeline.get(SFT1).tags == ("baseline",)


def test_tag_made_on_a_clock_behind_the_publisher_still_moves(reg: Registry) -> None:
    ahead = "2999-01-01T00:00:00.000000+00:00"  # published on a host whose clock is far ahead
    publish(reg, SFT1, ahead, tags=("best",))
    publish(reg, SFT2, t(2))
    reg.tag(SFT2, ["best"])
    assert reg.resolve("sft:best").id == SFT2


def test_tags_are_per_stage_and_a_bare_tag_must_be_unambiguous(pipeline: Registry) -> None:
    pipeline.tag(RM1, ["best"])
    assert pipeline.resolve("sft:best").id == SFT2
    assert pipeline.resolve("rm:best").id == RM1
    with pytest.raises(UserError) as err:
        pipeline.resolve("best")
    msg = str(err.value)
    assert msg.startswith("ambiguous registry reference 'best'")
    assert f"sft:best = {SFT2}" in msg and f"rm:best = {RM1}" in msg and "\n" not in msg


def test_untag_takes_tags_off_all_or_none(pipeline: Registry) -> None:
    with pytest.raises(UserError, match=f"{SFT2} has no tag 'nope' \\(its tags: best\\)"):
        pipeline.untag(SFT2, ["best", "nope"])
    assert pipeline.resolve("sft:best").id == SFT2 and tag_files(pipeline) == []
    with pytest.raises(UserError, match="has no tag 'best'"):
        pipeline.untag(SFT1, ["best"])  # published with it, but sft2 holds it now

    assert pipeline.untag("sft:best", ["best"]).id == SFT2
    # Gone, and not handed back to sft1, which was published with it earlier.
    with pytest.raises(UserError, match="unknown registry reference 'sft:best'"):
        pipeline.resolve("sft:best")
    assert pipeline.get(SFT1).tags == ("baseline",) and pipeline.get(SFT2).tags == ()
    pipeline.tag(SFT1, ["best"])
    assert pipeline.resolve("best").id == SFT1


@pytest.mark.parametrize(
    ("tag", "says"),
    [
        ("latest", "always means the newest entry"),
        ("a/b", "use up to 100 letters"),
        ("x:y", "use up to 100 letters"),
        (".hidden", "use up to 100 letters"),
        ("", "use up to 100 letters"),
        ("a" * 101, "use up to 100 letters"),
        (RM1, "looks like an entry id"),  # another entry's id
        ("20260101-000001-aaaa0001", "looks like an entry id"),  # `sft:` + this is sft1's id
        ("sft-20991231-235959-0123abcd", "looks like an entry id"),  # a future run's id
        ("ppo-20991231-235959-0123abcd-critic", "looks like an entry id"),
    ],
)
def test_invalid_tag_names_are_refused_before_any_write(pipeline: Registry, tag: str, says: str) -> None:
    with pytest.raises(UserError) as err:
        pipeline.tag(SFT1, ["fine", tag])
    msg = str(err.value)
    assert says in msg and "\n" not in msg
    assert tag_files(pipeline) == []


@pytest.mark.parametrize("tags", [("../../evil",), ("fine", "latest"), ("a/b",), (RM1,), ("20260101-000001-aaaa0001",),
                                  ("sft-20991231-235959-0123abcd",)])
def test_publish_applies_the_tag_rules_before_writing(pipeline: Registry, tags: tuple[str, ...]) -> None:
    before = sorted(p.name for p in (pipeline.root / "entries").iterdir())
    with pytest.raises(UserError) as err:
        publish(pipeline, "sft-20260101-000009-eeee0009", t(9), tags=tags)
    msg = str(err.value)
    assert msg.startswith("cannot publish sft-20260101-000009-eeee0009 with its tags (run.tags): invalid tag")
    assert "\n" not in msg
    assert sorted(p.name for p in (pipeline.root / "entries").iterdir()) == before
    assert tag_files(pipeline) == [] and not (pipeline.root.parent / "evil").exists()
    with pytest.raises(UserError, match="unknown registry reference 'latest'"):
        pipeline.resolve("latest")  # a bare `latest` names a tag: nobody took it


def test_check_tags_is_the_rule_a_run_can_check_before_it_starts(pipeline: Registry) -> None:
    check_tags(["best", "v1.2_rc-3", "2026"], "sft")
    check_tags([], "sft")
    for tags, says in ((["latest"], "always means the newest entry"), ("latest", "always means the newest entry"),
                       (["ok", "../x"], "use up to 100 letters"), (["sft-20991231-235959-0123abcd"], "looks like")):
        with pytest.raises(UserError, match=says):
            check_tags(tags, "sft")
    # Given the registry's ids, also a tag that one of them would shadow.
    assert pipeline.entry_ids() == {SFT1, SFT2, RM1, PPO1}
    check_tags(["mine"], "sft", pipeline.entry_ids())
    for tag in ("mine", "sft-mine"):
        with pytest.raises(UserError, match="looks like an entry id"):
            check_tags([tag], "sft", pipeline.entry_ids() | {"sft-mine"})


def test_tag_names_with_dots_and_dashes_work(pipeline: Registry) -> None:
    pipeline.tag(SFT1, ["v1.2_rc-3", "2026"])
    assert pipeline.resolve("sft:v1.2_rc-3").id == SFT1 and pipeline.resolve("v1.2_rc-3").id == SFT1


def test_tag_readers_skip_temp_files_and_name_a_corrupt_one(pipeline: Registry) -> None:
    pipeline.tag(RM1, ["best"])
    folder = pipeline.root / "tags" / "rm"
    (folder / ".best.123.ab.tmp").write_text("{half")
    assert pipeline.resolve("rm:best").id == RM1
    bad = folder / "other.json"
    bad.write_text("{")
    with pytest.raises(UserError) as err:
        pipeline.entries()
    assert str(bad) in str(err.value) and "remove the file" in str(err.value)


@pytest.mark.parametrize(
    ("record", "says"),
    [
        ({"stage": "../../escape"}, "invalid stage '../../escape'"),
        ({"tag": "../../evil"}, "invalid tag '../../evil'"),
        ({"tag": "latest"}, "invalid tag 'latest'"),
        ({"entry": "../x"}, "invalid id '../x'"),
        ({"tagged": 5}, "field 'tagged' must be a string"),
        ({"tagged": None}, "field 'tagged' must be a string"),
    ],
)
def test_names_read_from_a_tag_file_are_checked_not_trusted(pipeline: Registry, record: dict, says: str) -> None:
    folder = pipeline.root / "tags" / "sft"
    folder.mkdir(parents=True)
    bad = folder / "best.json"
    bad.write_text(json.dumps({"stage": "sft", "tag": "best", "entry": SFT1, "tagged": t(9), **record}))
    for read in (pipeline.entries, lambda: pipeline.resolve("sft:best"), lambda: pipeline.tag(SFT1, ["other"])):
        with pytest.raises(UserError) as err:
            read()
        msg = str(err.value)
        assert msg.startswith(f"corrupt registry tag file {bad}: {says}") and "remove the file" in msg
        assert "\n" not in msg
    assert tag_files(pipeline) == ["sft/best.json"]


@pytest.mark.parametrize(("stage", "tag", "entry_id"), [("../x", "best", SFT1), ("sft", "../evil", SFT1),
                                                        ("sft", ".hidden", SFT1), ("sft", "best", "../x")])
def test_write_tag_refuses_a_name_it_would_make_a_path_of(reg: Registry, stage: str, tag: str, entry_id: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        reg._write_tag(stage, tag, entry_id, not_before="")
    assert not reg.root.exists()


def test_run_dir_refuses_an_id_that_is_not_a_plain_name(reg: Registry) -> None:
    for run_id in ("../x", "a/b", ".x", "", "a b"):
        with pytest.raises(UserError, match="is not a plain name"):
            reg.run_dir(run_id)


# --- removal ------------------------------------------------------------------------------------


def test_remove_takes_the_entry_out_and_latest_falls_back(pipeline: Registry) -> None:
    removal = pipeline.remove("ppo:latest")
    assert removal.entry.id == PPO1 and removal.children == () and removal.purge_dir is None
    assert [e.id for e in pipeline.entries()] == [SFT1, SFT2, RM1]
    assert os.listdir(pipeline.root / "removed") == [f"{PPO1}.json"]
    assert pipeline.removed_ids() == {PPO1}
    with pytest.raises(UserError, match="no completed ppo entry"):
        pipeline.resolve("ppo:latest")
    # Its run folder stays without --purge, and is a finished run, not a resumable one.
    assert pipeline.run_dir(PPO1).is_dir() and pipeline.incomplete_runs() == []
    # Now rm1 has no children and can go: rm:latest falls back to nothing, sft:latest stays.
    pipeline.remove(RM1)
    assert pipeline.resolve("sft:latest").id == SFT2
    with pytest.raises(UserError, match="unknown registry reference"):
        pipeline.resolve(RM1)


def test_remove_refuses_a_parent_of_other_entries(pipeline: Registry) -> None:
    with pytest.raises(UserError) as err:
        pipeline.remove("sft:best")
    msg = str(err.value)
    assert msg == (
        f"cannot remove {SFT2}: 2 entries name it as parent ({RM1}, {PPO1}); remove them first, "
        f"or pass --force to leave them with a removed parent"
    )
    with pytest.raises(UserError, match=f"1 entry names it as parent \\({PPO1}\\); remove it first"):
        pipeline.plan_removal(RM1, purge=True)
    assert [e.id for e in pipeline.entries()] == [SFT1, SFT2, RM1, PPO1]
    assert not (pipeline.root / "removed").exists()


def test_forced_removal_leaves_children_naming_a_removed_parent(pipeline: Registry) -> None:
    removal = pipeline.remove(SFT2, force=True)
    assert removal.children == (RM1, PPO1)
    assert pipeline.get(RM1).parents == (SFT2,)
    assert shape(pipeline.family_tree(RM1).ancestry) == (RM1, "ok", [(SFT2, "removed", [])])
    assert [e.id for e in pipeline.lineage(PPO1)] == [PPO1, RM1]


def test_remove_drops_the_entry_tags(reg: Registry) -> None:
    publish(reg, SFT1, t(1), tags=("best",))
    publish(reg, SFT2, t(2), tags=("best",))
    reg.tag(SFT2, ["good"])
    removal = reg.remove(SFT2)
    assert removal.entry.tags == ("best", "good")
    # Dropped, not handed back to sft1 (published with "best" before sft2 took it).
    for ref in ("sft:best", "best", "sft:good"):
        with pytest.raises(UserError, match="unknown registry reference"):
            reg.resolve(ref)
    assert reg.get(SFT1).tags == ()


def test_tag_file_naming_a_removed_entry_names_nothing(reg: Registry) -> None:
    publish(reg, SFT1, t(1), tags=("best",))
    publish(reg, SFT2, t(2))
    reg.tag(SFT2, ["best"])
    # As a reader between another host's rename and its tag write would see it.
    os.rename(reg.root / "entries" / f"{SFT2}.json", reg.root / f"{SFT2}.json")
    with pytest.raises(UserError, match="unknown registry reference 'sft:best'"):
        reg.resolve("sft:best")
    assert reg.get(SFT1).tags == ()


def test_purge_deletes_the_run_folder_after_the_entry(pipeline: Registry) -> None:
    removal = pipeline.remove(PPO1, purge=True)
    assert removal.purge_dir == pipeline.run_dir(PPO1).resolve()
    assert not pipeline.run_dir(PPO1).exists()
    assert all(pipeline.run_dir(i).is_dir() for i in (SFT1, SFT2, RM1))
    assert [e.id for e in pipeline.entries()] == [SFT1, SFT2, RM1]


def test_purge_refuses_a_run_folder_another_entry_lives_in(reg: Registry) -> None:
    # PPO publishes its critic as a second entry inside the same run folder.
    publish(reg, PPO1, t(4))
    critic = f"{PPO1}-critic"
    publish(reg, critic, t(5), stage="critic", run_dir=str(reg.run_dir(PPO1)),
            path=str(hf_folder(reg.run_dir(PPO1) / "critic")))
    with pytest.raises(UserError) as err:
        reg.remove(PPO1, purge=True)
    assert str(err.value) == (
        f"cannot purge {PPO1}: its run folder {reg.run_dir(PPO1).resolve()} also holds {critic}; remove "
        f"that first (`rlhf registry rm ID`), or drop --purge"
    )
    assert len(reg.entries()) == 2 and (reg.run_dir(PPO1) / "critic" / "config.json").is_file()
    reg.remove(critic)
    reg.remove(PPO1, purge=True)
    assert reg.entries() == [] and not reg.run_dir(PPO1).exists()


def test_purge_deletes_only_the_run_that_made_the_entry(reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry crafted to name another run's folder, or a folder whose start record is not this user's,
    is removed without deleting anything."""
    publish(reg, SFT1, t(1))
    crafted = publish(reg, SFT2, t(2), run_dir=str(reg.run_dir(SFT1)), path=str(hf_folder(reg.run_dir(SFT1) / "x")))
    with pytest.raises(UserError, match=f"cannot purge {SFT2}: run {SFT1} was not started for {SFT2}; remove the entry without"):
        reg.remove(crafted.id, purge=True)
    publish(reg, RM1, t(3))
    monkeypatch.setenv("RLHF_SEAL_KEY", str(tmp_path / "someone-else.key"))
    with pytest.raises(UserError, match=f"cannot purge {RM1}: run {RM1} has a start record .* that your seal key"):
        reg.remove(RM1, purge=True)
    (reg.run_dir(RM1) / "start_record.json").unlink()
    with pytest.raises(UserError, match=f"cannot purge {RM1}: run {RM1} has no start record"):
        reg.remove(RM1, purge=True)
    assert all(reg.run_dir(i).is_dir() for i in (SFT1, RM1)) and len(reg.entries()) == 3


def test_purge_refuses_a_run_folder_outside_the_registry(reg: Registry, tmp_path: Path) -> None:
    outside = hf_folder(tmp_path / "my-models" / "hf")
    publish(reg, SFT1, t(1), run_dir=str(outside.parent), path=str(outside))
    with pytest.raises(UserError, match=f"its run folder {outside.parent} is not inside {reg.root / 'runs'}"):
        reg.remove(SFT1, purge=True)
    assert reg.get(SFT1) and outside.is_dir()
    reg.remove(SFT1)  # without --purge it is only the entry
    assert outside.is_dir()


def test_removing_twice_is_a_user_error(pipeline: Registry) -> None:
    pipeline.remove(PPO1)
    with pytest.raises(UserError, match=f"unknown registry reference '{PPO1}'"):
        pipeline.remove(PPO1)


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
def test_corrupt_entry_names_file_and_fix(pipeline: Registry, content: str, capsys) -> None:
    bad = pipeline.root / "entries" / "sft-bad.json"
    bad.write_text(content)
    assert "sft-bad" not in [e.id for e in pipeline.entries()]
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: ") and str(bad) in line and "remove the file" in line


PLANTED = "sft-20260101-000009-eeee0009"


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"stage": "../../../escape"}, "invalid stage '../../../escape'"),
        ({"stage": "Sft"}, "invalid stage 'Sft'"),
        ({"id": "sft/../../x"}, "invalid id 'sft/../../x'"),
        ({"id": ".hidden"}, "invalid id '.hidden'"),
        ({"id": SFT1}, f"its id '{SFT1}' is not its file name"),
        ({"tags": ["a/b"]}, "invalid tag 'a/b'"),
        ({"tags": ["ok", "../../evil"]}, "invalid tag '../../evil'"),
        ({"tags": ["latest"]}, "invalid tag 'latest'"),
        ({"tags": "best"}, "field 'tags' must be a JSON list"),
        ({"parents": ["../p"]}, "invalid id '../p'"),
        ({"parents": [SFT1, 3]}, "invalid id 3"),
        ({"created": 5}, "field 'created' must be a string"),
        ({"created": "yesterday"}, "field 'created' is not an ISO time: 'yesterday'"),
        ({"config": []}, "field 'config' must be a JSON object"),
    ],
)
def test_names_read_from_an_entry_file_are_checked_not_trusted(pipeline: Registry, change: dict, says: str, capsys) -> None:
    bad = pipeline.root / "entries" / f"{PLANTED}.json"
    bad.write_text(json.dumps({**make_entry(pipeline, PLANTED).to_json(), **change}))
    assert_skipped_with_one_warning(pipeline, bad, says, capsys)


def assert_skipped_with_one_warning(pipeline: Registry, bad: Path, says: str, capsys) -> None:
    """Every registry read skips the damaged file, saying so in one line each time, and goes on."""
    for read in (lambda r: r.entries(), lambda r: r.resolve("sft:latest"), lambda r: r.tag(SFT1, ["other"])):
        registry = Registry(pipeline.root)  # what each command opens
        read(registry)
        read(registry)
        warned = capsys.readouterr().err.splitlines()
        assert len(warned) == 1 and warned[0].startswith(f"warning: corrupt registry entry {bad}: {says}"), warned
    assert PLANTED not in [e.id for e in pipeline.entries()] and pipeline.resolve("sft:latest").id != PLANTED
    with pytest.raises(UserError, match="corrupt registry entry"):  # asked for by name: the error itself
        pipeline.get(PLANTED)


@pytest.mark.parametrize(("content", "says"), [
    (b"\xff\xfe{}", "'utf-8' codec can't decode"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deep"),
    (None, "Is a directory"),
])
def test_an_entry_file_that_cannot_be_read_as_json_is_skipped(pipeline: Registry, content: bytes | None, says: str, capsys) -> None:
    bad = pipeline.root / "entries" / f"{PLANTED}.json"
    if content is None:
        bad.mkdir()
    else:
        bad.write_bytes(content)
    assert_skipped_with_one_warning(pipeline, bad, says, capsys)


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


def _move_tag_back_and_forth(root: str, ids: tuple[str, str], n: int, barrier) -> None:
    """Child process: move the tag "best" between two entries `n` times."""
    reg = Registry(root)
    barrier.wait()
    for i in range(n):
        reg.tag(ids[i % 2], ["best"])


def test_readers_always_see_one_owner_while_a_tag_moves(pipeline: Registry) -> None:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    mover = ctx.Process(target=_move_tag_back_and_forth, args=(str(pipeline.root), (SFT1, SFT2), 150, barrier))
    mover.start()
    barrier.wait(timeout=60)
    owners, errors = set(), []
    while mover.is_alive():
        try:
            owners.add(pipeline.resolve("sft:best").id)
        except Exception as e:  # a missing or half-written tag file is the bug under test
            errors.append(repr(e))
    mover.join()
    assert mover.exitcode == 0 and errors == []
    assert owners == {SFT1, SFT2}
    assert tag_files(pipeline) == ["sft/best.json"]  # no temp file left


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


def test_cli_lists_the_entries_it_can_read_and_warns_of_a_corrupt_one(pipeline: Registry) -> None:
    (pipeline.root / "entries" / "bad.json").write_text("{")
    result = runner.invoke(app, ["ls", "--root", str(pipeline.root)])
    assert result.exit_code == 0 and result.stderr.startswith("warning: corrupt registry entry") and SFT1 in result.stdout


def test_a_finished_or_removed_run_is_not_resumable(reg: Registry) -> None:
    from rlhf.store.runs import CONFIG_FILE, find_resumable
    from rlhf.store.start_record import write_start_record

    for run_id in ("sft-done", "sft-gone", "sft-open", "sft-20991231-000000-deadbeef"):
        reg.run_dir(run_id).mkdir(parents=True)
        (reg.run_dir(run_id) / CONFIG_FILE).write_text("{}\n")
        if run_id != "sft-20991231-000000-deadbeef":  # the newest, planted without a sealed start record
            write_start_record(reg.run_dir(run_id), run_id=run_id, stage="sft", registry=reg.root.resolve(), config={}, sources={})
    publish(reg, "sft-done", t(1))
    publish(reg, "sft-gone", t(2))
    reg.remove("sft-gone")
    with pytest.raises(UserError, match="already finished"):
        find_resumable("sft", reg.root, "sft-done")
    with pytest.raises(UserError, match="was removed with `rlhf registry rm`"):
        find_resumable("sft", reg.root, "sft-gone")
    assert find_resumable("sft", reg.root, "sft-open") == reg.run_dir("sft-open").resolve()
    assert find_resumable("sft", reg.root, None) == reg.run_dir("sft-open")
    with pytest.raises(UserError, match="--run '' is not a run id"):  # not "the newest"
        find_resumable("sft", reg.root, "")
