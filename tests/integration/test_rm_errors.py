"""`rlhf rm` on bad input: one line naming what and where, exit code 2, no traceback, no run."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.models.tokenizer import tokenizer_fingerprint
from rlhf.store.entry import Entry, now_iso
from rlhf.store.registry import Registry
from rlhf.toy import ToyModelConfig, build_model, build_tokenizer, model_identity
from tests.integration.conftest import rlhf_here
from tests.integration.test_sft_errors import assert_user_error, write_jsonl

PAIR = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}


def publish(home: Path, stage: str, head: str, *, tokenizer=None, recorded_tokenizer=None) -> Entry:
    """A registry entry over a real toy model folder (built, not trained: these tests need none).
    `tokenizer` goes into the folder; the entry records `recorded_tokenizer` (default: the toy's)."""
    tokenizer = tokenizer or build_tokenizer()
    registry = Registry(home)
    run_id = registry.new_run_id(stage)
    folder = registry.run_dir(run_id) / "final"
    build_model(ToyModelConfig(), build_tokenizer(), seed=1, head=head).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return registry.publish(Entry(
        id=run_id, stage=stage, status="completed", created=now_iso(), path=str(folder),
        run_dir=str(folder.parent), config={}, parents=(), base_model=model_identity(ToyModelConfig()),
        tokenizer=tokenizer_fingerprint(recorded_tokenizer or build_tokenizer()), metrics={}, adapter="none", tags=(),
    ))


def other_tokenizer(folder: Path | None = None):
    """The toy tokenizer with one token more: same eos and pad, different vocabulary. Saved to
    `folder` (returned) when given, else returned itself."""
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    if folder is None:
        return tokenizer
    tokenizer.save_pretrained(folder)
    return folder


def runs_started(home: Path) -> list[Path]:
    return [p for p in (home / "runs").glob("rm-*")] if (home / "runs").exists() else []


def test_row_missing_rejected(home):
    data = write_jsonl(home / "pairs.jsonl", [PAIR, {"prompt": "2+2=", "chosen": "4"}, PAIR])
    assert_user_error(rlhf_here("rm", "model.name_or_path=toy", f"data.train={data}", home=home), "pairs.jsonl:2", "'rejected' is missing")
    assert not runs_started(home)


def test_file_without_chosen_column(home):
    data = write_jsonl(home / "pairs.jsonl", [{"prompt": "1+1=", "response": "2"}])
    assert_user_error(rlhf_here("rm", "model.name_or_path=toy", f"data.train={data}", home=home), "pairs.jsonl", "prompt+chosen+rejected")


def test_ranked_list_with_one_response(home):
    data = write_jsonl(home / "ranked.jsonl", [{"prompt": "1+1=", "responses": ["2", "3"]}, {"prompt": "2+2=", "responses": ["4"]}])
    assert_user_error(rlhf_here("rm", "model.name_or_path=toy", f"data.train={data}", home=home), "ranked.jsonl:2", "at least 2")


def test_pairs_that_are_all_identical(home):
    data = write_jsonl(home / "same.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "2"}])
    assert_user_error(rlhf_here("rm", "model.name_or_path=toy", f"data.train={data}", "data.eval=null", home=home), "no usable comparison")


@pytest.mark.parametrize("stage", ["rm", "sft"])
def test_backbone_that_is_not_a_causal_lm(home, stage):
    reward_model = publish(home, "rm", head="scalar")
    assert_user_error(
        rlhf_here(stage, "model.name_or_path=rm:latest", home=home),
        f"rm entry {reward_model.id}", "LlamaForSequenceClassification", "not a causal LM",
    )
    assert not [p for p in (home / "runs").iterdir() if p.name.startswith(stage) and p.name != reward_model.id]


def test_tokenizer_given_that_differs_from_the_parents(home):
    sft = publish(home, "sft", head="lm")
    other = other_tokenizer(home / "other-tokenizer")
    assert_user_error(
        rlhf_here("rm", f"model.tokenizer={other}", home=home),
        "other-tokenizer", f"sft entry {sft.id}", "vocab_size 101 vs 100",
    )
    assert not runs_started(home)


def test_tokenizer_swapped_inside_the_parent_folder(home):
    sft = publish(home, "sft", head="lm")
    other_tokenizer(Path(sft.path))  # someone replaced the tokenizer files after training
    assert_user_error(rlhf_here("rm", home=home), f"sft entry {sft.id}", "differs")


def test_no_sft_entry_yet(home):
    assert_user_error(rlhf_here("rm", home=home), "sft:latest", "rlhf registry ls")


def test_dry_run(home):
    result = rlhf_here("rm", "-n", "2", "--dry-run", "model.name_or_path=toy", "engine.zero_stage=3", home=home)
    assert result.code == 0, result.output
    assert "zero_stage: 3" in result.stdout and "--module rlhf.stages.rm --run-dir" in result.stdout
    assert not (home / "runs").exists()
