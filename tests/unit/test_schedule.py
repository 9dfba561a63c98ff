"""The test schedule (tests/conftest.py) names files that exist: a renamed slow file would
otherwise drop to the end of the run, where it can leave one worker running alone."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import SCHEDULE, schedule_rank

TESTS = Path(__file__).resolve().parents[1]


def test_every_scheduled_file_exists():
    missing = [name for name in SCHEDULE if not (TESTS / name).is_file()]
    assert not missing


def test_scheduled_files_come_first_then_integration_then_unit():
    assert schedule_rank("/r/tests/integration/test_pipeline_cli.py") == 0
    assert schedule_rank("/r/tests/integration/test_bad_input.py") == len(SCHEDULE)
    assert schedule_rank("/r/tests/unit/test_config.py") == len(SCHEDULE) + 1
