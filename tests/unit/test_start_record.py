"""The start record (rlhf.store.start_record): sealed with the user's own key, verified on resume, naming
what changed: the seal, the config and the model sources."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rlhf.errors import UserError
from rlhf.store.entry import Entry
from rlhf.store.registry import Registry
from rlhf.store.runs import model_source_digests, resolve_config
from rlhf.store.start_record import (
    START_FILE,
    check_same_config,
    check_same_sources,
    content_digest,
    load_key,
    record_problem,
    verified_record,
    write_start_record,
)


@pytest.fixture
def key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "keys" / "seal.key"
    monkeypatch.setenv("RLHF_SEAL_KEY", str(path))
    return path


def started(run_dir: Path, registry: Path, **config) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_start_record(run_dir, run_id=run_dir.name, stage="sft", registry=registry, config=config or {"train": {"seed": 1}},
                       sources={"model.name_or_path": "toy"})
    return run_dir


def test_the_key_is_made_once_readable_by_its_owner_alone(key: Path) -> None:
    first = load_key(create=True)
    assert key.stat().st_mode & 0o777 == 0o600 and len(first) == 32
    assert load_key(create=False) == first and load_key(create=True) == first
    key.chmod(0o640)
    with pytest.raises(UserError, match=f"the seal key {key} must be a file of yours that only you can read"):
        load_key(create=False)
    key.chmod(0o600)
    key.write_text("not hex\n")
    with pytest.raises(UserError, match="is damaged"):
        load_key(create=False)


def test_a_record_verifies_only_under_its_key_registry_stage_and_folder(key: Path, tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "home"
    run = started(root / "runs" / "sft-a", root)
    assert record_problem(run, stage="sft", registry=root) is None
    assert verified_record(run, stage="sft", registry=root)["config"] == {"train": {"seed": 1}}
    assert "was started in the registry" in record_problem(run, stage="sft", registry=tmp_path / "other")
    assert "for another run (sft run sft-a)" in record_problem(run, stage="rm", registry=root)
    moved = run.rename(root / "runs" / "sft-b")  # a record copied into another folder is not that folder's
    assert "for another run" in record_problem(moved, stage="sft", registry=root)
    moved.rename(run)
    record = json.loads((run / START_FILE).read_text())
    record["config"]["model"] = {"trust_remote_code": True}  # edited with the seal kept
    (run / START_FILE).write_text(json.dumps(record))
    assert "that your seal key" in record_problem(run, stage="sft", registry=root)
    started(run, root)
    monkeypatch.setenv("RLHF_SEAL_KEY", str(tmp_path / "another-user.key"))
    with pytest.raises(UserError, match="run sft-a has a start record .* that your seal key .* did not seal: another user"):
        verified_record(run, stage="sft", registry=root)
    (run / START_FILE).unlink()
    assert "has no start record" in record_problem(run, stage="sft", registry=root)
    (run / START_FILE).write_bytes(b"\xff{")
    assert "damaged start record" in record_problem(run, stage="sft", registry=root)


def test_the_first_difference_from_the_started_config_is_named(key: Path, tmp_path: Path) -> None:
    run = started(tmp_path / "runs" / "sft-a", tmp_path, model={"name_or_path": "toy", "trust_remote_code": False}, train={"seed": 1})
    record = verified_record(run, stage="sft", registry=tmp_path)
    check_same_config(run, record, {"model": {"name_or_path": "toy", "trust_remote_code": False}, "train": {"seed": 1}})
    with pytest.raises(UserError, match="sets model.trust_remote_code to True, but run sft-a started with False: the file was edited"):
        check_same_config(run, record, {"model": {"name_or_path": "toy", "trust_remote_code": True}, "train": {"seed": 1}})
    with pytest.raises(UserError, match="sets train.steps to 3, but run sft-a started with None"):
        check_same_config(run, record, {"model": {"name_or_path": "toy", "trust_remote_code": False}, "train": {"seed": 1, "steps": 3}})


def test_a_folder_digest_follows_names_and_content(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "w.bin").write_bytes(b"\x00" * 10)
    first = content_digest(folder)
    assert first == content_digest(folder) and first.startswith("sha256:")
    (folder / "w.bin").write_bytes(b"\x00" * 9 + b"\x01")
    assert content_digest(folder) != first
    (folder / "w.bin").write_bytes(b"\x00" * 10)
    assert content_digest(folder) == first
    (folder / "w.bin").rename(folder / "v.bin")
    assert content_digest(folder) != first


def publish_sft(reg: Registry, entry_id: str, created: str, weights: bytes) -> None:
    folder = reg.run_dir(entry_id) / "final"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(weights)
    reg.publish(Entry(id=entry_id, stage="sft", status="completed", created=created, run_dir=str(reg.run_dir(entry_id)),
                      path=str(folder), config={}))


def test_model_sources_pin_the_entry_a_reference_resolved_to_and_folder_contents(key: Path, tmp_path: Path, monkeypatch) -> None:
    reg = Registry(tmp_path / "home")
    monkeypatch.setenv("RLHF_HOME", str(reg.root))
    publish_sft(reg, "sft-20260101-000001-aaaa0001", "2026-01-01T00:00:01.000000+00:00", b"a")
    folder = reg.run_dir("sft-20260101-000001-aaaa0001") / "final"
    cfg = resolve_config("rm", None, ["model.name_or_path=sft:latest", f"model.tokenizer={folder}"])
    then = model_source_digests(cfg, reg)
    assert then["model.name_or_path"] == f"sft-20260101-000001-aaaa0001 {content_digest(folder)}"
    assert then["model.tokenizer"] == content_digest(folder)
    run = reg.run_dir("rm-x")
    run.mkdir(parents=True)
    write_start_record(run, run_id="rm-x", stage="rm", registry=reg.root, config={}, sources=then)
    record = verified_record(run, stage="rm", registry=reg.root)
    check_same_sources(run, record, model_source_digests(cfg, reg))
    publish_sft(reg, "sft-20260101-000002-bbbb0002", "2026-01-01T00:00:02.000000+00:00", b"b")  # sft:latest moves on
    with pytest.raises(UserError, match=r"model.name_or_path is not what run rm-x started from \(then sft-20260101-000001-aaaa0001 "
                                        r"sha256:\w+, now sft-20260101-000002-bbbb0002 sha256:\w+\)"):
        check_same_sources(run, record, model_source_digests(cfg, reg))
    (folder / "model.safetensors").write_bytes(b"swapped")
    cfg = resolve_config("rm", None, [f"model.name_or_path={folder}"])
    assert model_source_digests(cfg, reg)["model.name_or_path"] == content_digest(folder) != then["model.tokenizer"]
    assert os.path.isabs(cfg.model.name_or_path)
