"""Line and branch coverage totals of a `coverage json` report, and what an earlier report covered
that this one does not (`make coverage COVERAGE_BEFORE=old.json`).

    python scripts/coverage_diff.py AFTER.json [BEFORE.json]

Files are matched by their path inside the repository (rlhf/...), so reports made in
different checkouts compare. Exit status 0 always: the lines lost are for a person to judge.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOTS = ("rlhf/",)


def repo_path(name: str) -> str:
    """`/any/checkout/rlhf/x.py` or `rlhf/x.py` -> `rlhf/x.py`."""
    for root in ROOTS:
        at = name.rfind(f"/{root}")
        if at >= 0:
            return name[at + 1:]
    return name


def load(path: str) -> dict[str, dict]:
    files = json.loads(Path(path).read_text())["files"]
    return {repo_path(name): data for name, data in files.items()}


def totals(files: dict[str, dict]) -> dict[str, int]:
    keys = ("covered_lines", "num_statements", "covered_branches", "num_branches")
    return {k: sum(f["summary"].get(k, 0) for f in files.values()) for k in keys}


def describe(label: str, t: dict[str, int]) -> str:
    lines = 100 * t["covered_lines"] / max(t["num_statements"], 1)
    branches = 100 * t["covered_branches"] / max(t["num_branches"], 1)
    return (f"{label}: lines {t['covered_lines']}/{t['num_statements']} ({lines:.2f}%), "
            f"branches {t['covered_branches']}/{t['num_branches']} ({branches:.2f}%)")


def lost(before: dict[str, dict], after: dict[str, dict]) -> list[str]:
    """`file: lines` for each file with lines or branches the earlier report covered and this one does not."""
    rows = []
    for name, old in sorted(before.items()):
        new = after.get(name, {"executed_lines": [], "executed_branches": []})
        lines = sorted(set(old["executed_lines"]) - set(new["executed_lines"]))
        branches = sorted({tuple(b) for b in old.get("executed_branches", [])} - {tuple(b) for b in new.get("executed_branches", [])})
        if lines or branches:
            rows.append(f"  {name}: lines {_ranges(lines) or '-'}; branches {', '.join(f'{a}->{b}' for a, b in branches) or '-'}")
    return rows


def _ranges(numbers: list[int]) -> str:
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    after = load(argv[0])
    print(describe("coverage", totals(after)))
    if len(argv) == 2:
        before = load(argv[1])
        print(describe("before", totals(before)))
        rows = lost(before, after)
        print(f"covered before, not now ({len(rows)} files):" if rows else "nothing covered before is uncovered now")
        print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
