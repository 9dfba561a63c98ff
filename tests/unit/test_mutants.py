"""`scripts/mutants.py`'s table still fits the code: each fault's snippet is where it says, once, and
its tests exist. Nothing is mutated or run here (`make mutants` does that)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import mutants  # noqa: E402  (scripts/ is not a package)


def test_every_snippet_occurs_once_and_every_named_test_exists():
    assert mutants.table_problems(mutants.MUTANTS, REPO) == []
    for m in mutants.MUTANTS:
        assert (REPO / m.path).read_text(encoding="utf-8").count(m.original) == 1, m.name
        assert m.mutated != m.original and m.tests, m.name
        assert all((REPO / mutants.file_of(t)).is_file() for t in m.tests), m.name
        assert all(mutants.missing_test(t, REPO) is None for t in m.tests), m.name


def test_names_are_unique_and_every_area_has_faults():
    names = [m.name for m in mutants.MUTANTS]
    assert len(names) >= 25 and len(set(names)) == len(names)
    areas = Counter(m.area for m in mutants.MUTANTS)
    assert set(areas) == set(mutants.AREAS) == {"algos", "registry", "checkpoint", "resume", "launcher", "slurm", "data",
                                                  "rewards", "stages"}
    assert min(areas.values()) >= 2, areas


def test_fast_mutants_are_caught_by_unit_tests():
    """`--fast` stays a few minutes: only a slow mutant may need the integration tests."""
    for m in mutants.MUTANTS:
        if not m.slow:
            assert all(t.startswith("tests/unit/") for t in m.tests), m.name


def test_a_snippet_that_moved_is_reported(tmp_path):
    (tmp_path / "rlhf").mkdir()
    (tmp_path / "rlhf" / "x.py").write_text("a = 1\na = 1\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("def test_x(case):\n    pass\n")
    twice = mutants.Mutant("twice", "algos", "rlhf/x.py", "f", "a = 1", "a = 2", ("tests/test_x.py::test_x[1]",))
    gone = mutants.Mutant("gone", "algos", "rlhf/x.py", "f", "b = 1", "b = 2", ("tests/test_y.py", "tests/test_x.py::test_renamed"))
    problems = mutants.table_problems((twice, gone), tmp_path)
    assert problems == ["twice: its snippet occurs 2 times in rlhf/x.py, not once: update the table",
                        "gone: no test file tests/test_y.py", "gone: no test test_renamed in tests/test_x.py",
                        "gone: its snippet occurs 0 times in rlhf/x.py, not once: update the table"]
