"""The judgments of `rlhf label --by human`: an append-only JSONL log (`JudgmentLog`), one line per rank, skip or undo,
so a labeler can stop and resume at any time and several can label at once (each append under an exclusive file
lock, checked against the log's state); replayed into each labeler's state, the ranked lists `rlhf rm` trains on
(`ranked_lists`) and how often the labelers agree (`stats`). The page that writes it: rlhf.feedback.label_web.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import combinations
from pathlib import Path
from typing import Any

from rlhf.errors import UserError
from rlhf.feedback.labelers import rank
from rlhf.store.entry import now_iso
from rlhf.store.fileio import fsync_dir

LABELER_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
KINDS = ("rank", "skip", "undo")


class Conflict(UserError):
    """A judgment that the log's state refuses (a prompt already labeled, nothing to undo): HTTP 409."""


def check_labeler(name: object) -> str:
    """`name` if it is a usable labeler name (it is shown on pages and written to logs), else one line naming it."""
    if isinstance(name, str) and LABELER_RE.fullmatch(name):
        return name
    shown = repr(name[:80] + "..." if len(name) > 80 else name) if isinstance(name, str) else f"a {type(name).__name__}"
    raise UserError(f"labeler name {shown} is not usable: give 1-64 letters, digits, '.', '_' or '-' (e.g. --labeler alice)")


def judgment_ranks(order: object, ties: object, k: int, unacceptable: bool) -> tuple[list[int], list[int]]:
    """(order, ranks) of a submitted judgment: `order` a permutation of range(k) best first (or empty when
    all are unacceptable), `ties[i]` true where place i ties with the place before it."""
    if not isinstance(order, list) or not all(type(i) is int for i in order):
        raise UserError("order must be a list of response indices, best first")
    if unacceptable and not order:
        return [], []
    if sorted(order) != list(range(k)):
        raise UserError(f"order {order} is not a ranking of all {k} responses (each of 0..{k - 1} once)")
    ties = [False] * k if ties is None or unacceptable else ties
    if not isinstance(ties, list) or len(ties) != k or not all(isinstance(t, bool) for t in ties):
        raise UserError(f"ties must be {k} true/false values, one per place of the order")
    if unacceptable:
        return order, [0] * k  # all unacceptable: every response tied, whatever order was given
    ranks: list[int] = []
    for place, tied in enumerate(ties):
        ranks.append(ranks[-1] if tied and place else place)
    return order, ranks


@dataclass
class LabelerState:
    """One labeler's effective judgments, replayed from the log."""

    labeler: str
    stack: list[dict] = field(default_factory=list)
    """Rank and skip records not undone, oldest first: `undo` takes the last."""
    total: int | None = None

    @property
    def effective(self) -> dict[int, dict]:
        """Each judged prompt's effective record (a later one of the same prompt wins)."""
        return {r["prompt_index"]: r for r in self.stack if self.total is None or r["prompt_index"] < self.total}

    @property
    def done(self) -> set[int]:
        return set(self.effective)

    @property
    def skipped(self) -> int:
        return sum(r["kind"] == "skip" for r in self.effective.values())

    @property
    def next_index(self) -> int | None:
        """The lowest prompt this labeler has neither ranked nor skipped; None when all are done."""
        done = self.done
        candidates = range(self.total) if self.total is not None else range(len(done) + 1)
        return next((i for i in candidates if i not in done), None)

    def progress(self) -> dict[str, int | None]:
        return {"done": len(self.done), "skipped": self.skipped, "total": self.total}


class JudgmentLog:
    """The append-only JSONL log of the judgments of one samples file.

    An append is one `os.write` of one line to the file opened with O_APPEND, under an exclusive
    `flock`, then `fsync`: concurrent labelers (threads or processes on this machine) never interleave
    or lose lines, and a judgment acknowledged to the page survives a kill. The check that makes an
    append valid (the prompt not yet judged, an undo's target) is made under the same lock.
    A line cut by a crash is skipped when read and set apart by a newline before the next append.
    """

    def __init__(self, path: Path | str, samples_sha256: str | None = None) -> None:
        self.path = Path(path)
        self.samples_sha256 = samples_sha256
        self.damaged = 0
        """Lines of the last read that were not a judgment (a cut last line, a hand edit)."""

    # --- reading -------------------------------------------------------------------------------

    def read(self) -> list[dict]:
        """The log's judgments in order; lines that are not one are skipped (counted in `damaged`)."""
        return self.snapshot()[1]

    def snapshot(self) -> tuple[bytes, list[dict]]:
        """The log's bytes and the judgments they hold, from one read."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return b"", []
        return data, self._parse(data)

    def _parse(self, data: bytes) -> list[dict]:
        records, damaged = [], 0
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if _valid_record(record):
                self._check_samples(record)
                records.append(record)
            else:
                damaged += 1
        self.damaged = damaged
        return records

    def _check_samples(self, record: dict) -> None:
        theirs = record.get("samples")
        if self.samples_sha256 and theirs and theirs != self.samples_sha256:
            raise UserError(f"{self.path} holds judgments of another samples file (SHA-256 {theirs[:12]}..., this one is "
                            f"{self.samples_sha256[:12]}...); give each samples file its own log")

    def state(self, labeler: str, total: int | None = None) -> LabelerState:
        """`labeler`'s effective judgments over `total` prompts (the samples' row count)."""
        return _replay(self.read(), total).get(labeler) or LabelerState(labeler, total=total)

    def states(self, total: int | None = None) -> dict[str, LabelerState]:
        return _replay(self.read(), total)

    # --- appending -----------------------------------------------------------------------------

    def judge(self, labeler: str, prompt_index: int, order: list[int], ranks: list[int], *, unacceptable: bool = False,
              total: int | None = None) -> dict:
        """Append a ranking of one prompt (order best first; equal ranks are ties); Conflict if already judged."""
        record = {"kind": "rank", "prompt_index": prompt_index, "order": list(order), "ranks": list(ranks),
                  "unacceptable": bool(unacceptable)}
        return self._append_new(labeler, record, total)

    def skip(self, labeler: str, prompt_index: int, *, total: int | None = None) -> dict:
        return self._append_new(labeler, {"kind": "skip", "prompt_index": prompt_index}, total)

    def undo(self, labeler: str) -> tuple[dict, dict]:
        """Cancel `labeler`'s latest rank or skip not yet undone: (the undo record, the record it cancels)."""
        check_labeler(labeler)
        undone: list[dict] = []

        def make(records: list[dict]) -> dict:
            stack = _replay(records, None).get(labeler)
            if not stack or not stack.stack:
                raise Conflict(f"{labeler} has no judgment left to undo")
            undone.append(stack.stack[-1])
            return {"labeler": labeler, "kind": "undo", "undoes": stack.stack[-1]["id"]}

        return self._append(make), undone[0]

    def _append_new(self, labeler: str, record: dict, total: int | None) -> dict:
        check_labeler(labeler)
        index = record["prompt_index"]

        def make(records: list[dict]) -> dict:
            state = _replay(records, total).get(labeler)
            if state and index in state.done:
                raise Conflict(f"prompt {index} is already judged by {labeler}; undo that judgment first (u)")
            return {"labeler": labeler, **record}

        return self._append(make)

    def _append(self, make: Callable[[list[dict]], dict]) -> dict:
        """Append the record `make` builds from the log's records, all under the exclusive lock."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = _read_fd(fd)
            record = {"id": uuid.uuid4().hex, **make(self._parse(data)), "time": now_iso()}
            if self.samples_sha256:
                record["samples"] = self.samples_sha256
            line = json.dumps(record, ensure_ascii=True) + "\n"
            # A line a crash cut off keeps no newline: start on a fresh line so this one stays whole.
            prefix = "\n" if data and not data.endswith(b"\n") else ""
            payload = (prefix + line).encode()
            if os.write(fd, payload) != len(payload):
                raise OSError(f"short write to {self.path} (disk full?)")
            os.fsync(fd)
        finally:
            os.close(fd)  # also releases the lock
        if created:
            fsync_dir(self.path.parent)
        return record

    # --- summaries -----------------------------------------------------------------------------

    def stats(self, total: int | None = None, records: list[dict] | None = None) -> dict[str, Any]:
        """Counts per labeler, and the agreement of each pair of labelers: over prompts both ranked, of the
        response pairs both ordered strictly, the fraction they ordered the same way."""
        records = self.read() if records is None else records
        states = _replay(records, total)
        labelers = {name: _counts(state, records) for name, state in sorted(states.items())}
        places = {name: _strict_places(state) for name, state in states.items()}
        pairs = [_pair_agreement(a, b, places[a], places[b]) for a, b in combinations(sorted(places), 2)]
        compared = sum(p["pairs"] for p in pairs)
        agreed = sum(p["agreed"] for p in pairs)
        return {"records": len(records), "damaged": self.damaged, "labelers": labelers, "agreement": pairs,
                "pairs": compared, "agreed": agreed, "fraction": agreed / compared if compared else None}

    def ranked_lists(self, samples_rows: list[dict], records: list[dict] | None = None) -> list[dict]:
        """One ranked list per prompt that someone ranked: the labelers' mean place (Borda; a tie shares the
        mean of its places) ordered best first, equal means tied. A prompt judged only "all unacceptable"
        gives a row with every response tied (no pair for the reward model)."""
        states = _replay(self.read() if records is None else records, len(samples_rows))
        effective = {name: state.effective for name, state in states.items()}
        rows = []
        for index, sample in enumerate(samples_rows):
            judged = {name: e[index] for name, e in effective.items() if e.get(index, {}).get("kind") == "rank"}
            if judged:
                rows.append(_aggregate(sample, judged))
        return rows


def _valid_record(record: object) -> bool:
    """Whether a parsed line is a judgment this module wrote (a hand-edited or foreign line is skipped)."""
    if not isinstance(record, dict) or record.get("kind") not in KINDS or not isinstance(record.get("id"), str):
        return False
    if not (isinstance(record.get("labeler"), str) and LABELER_RE.fullmatch(record["labeler"])):
        return False
    if record["kind"] == "undo":
        return isinstance(record.get("undoes"), str)
    if type(record.get("prompt_index")) is not int or record["prompt_index"] < 0:
        return False
    if record["kind"] == "skip":
        return True
    order, ranks = record.get("order"), record.get("ranks")
    return (isinstance(order, list) and isinstance(ranks, list) and len(order) == len(ranks)
            and isinstance(record.get("unacceptable"), bool) and all(type(v) is int for v in order + ranks))


def _replay(records: list[dict], total: int | None) -> dict[str, LabelerState]:
    """Each labeler's state: ranks and skips stack up, an undo takes out the record it names."""
    states: dict[str, LabelerState] = {}
    for record in records:
        state = states.setdefault(record["labeler"], LabelerState(record["labeler"], total=total))
        if record["kind"] != "undo":
            state.stack.append(record)
            continue
        for place in range(len(state.stack) - 1, -1, -1):
            if state.stack[place]["id"] == record["undoes"]:
                del state.stack[place]
                break
    return states


def _read_fd(fd: int) -> bytes:
    size, chunks, offset = os.fstat(fd).st_size, [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)




def _counts(state: LabelerState, records: list[dict]) -> dict[str, int]:
    effective = state.effective.values()
    return {"ranked": sum(r["kind"] == "rank" and not r["unacceptable"] for r in effective),
            "unacceptable": sum(r["kind"] == "rank" and r["unacceptable"] for r in effective),
            "skipped": sum(r["kind"] == "skip" for r in effective),
            "undone": sum(r["kind"] == "undo" and r["labeler"] == state.labeler for r in records)}


def _strict_places(state: LabelerState) -> dict[int, dict[int, int]]:
    """prompt -> {response index: rank} for each prompt the labeler ranked (not "all unacceptable")."""
    return {p: dict(zip(r["order"], r["ranks"])) for p, r in state.effective.items()
            if r["kind"] == "rank" and not r["unacceptable"] and r["order"]}


def _pair_agreement(a: str, b: str, first: dict[int, dict[int, int]], second: dict[int, dict[int, int]]) -> dict[str, Any]:
    prompts = pairs = agreed = 0
    for prompt in first.keys() & second.keys():
        x, y = first[prompt], second[prompt]
        prompts += 1
        for i, j in combinations(sorted(x.keys() & y.keys()), 2):
            if x[i] != x[j] and y[i] != y[j]:
                pairs += 1
                agreed += (x[i] < x[j]) == (y[i] < y[j])
    return {"labelers": [a, b], "prompts": prompts, "pairs": pairs, "agreed": agreed, "fraction": agreed / pairs if pairs else None}


def _places(order: list[int], ranks: list[int]) -> dict[int, Fraction]:
    """Each response's place (0 = best); the responses of a tie share the mean of the places they span."""
    span = {r: ranks.count(r) for r in set(ranks)}
    return {i: r + Fraction(span[r] - 1, 2) for i, r in zip(order, ranks)}


def _aggregate(sample: dict, judged: dict[str, dict]) -> dict:
    texts = [r["text"] for r in sample["responses"]]
    k = len(texts)
    real = [r for r in judged.values() if not r["unacceptable"] and sorted(r["order"]) == list(range(k))]
    if real:
        places = [_places(r["order"], r["ranks"]) for r in real]
        scores = [float(k - 1 - sum(p[i] for p in places) / len(places)) for i in range(k)]  # Borda points, higher is better
    else:
        scores = [0.0] * k
    order, ranks = rank(scores, 1e-9)  # exact means (fractions): only equal ones tie
    return {"prompt": sample["prompt"], "responses": [texts[i] for i in order], "ranks": ranks, "scores": [scores[i] for i in order],
            "sample_index": order, "labeler": "human", "labelers": sorted(judged),
            "unacceptable": sum(r["unacceptable"] for r in judged.values())}



def samples_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def stats_lines(stats: dict) -> list[str]:
    """`rlhf label --by human --stats`: the summary, then each pair of labelers' agreement."""
    lines = [summary_line(stats)]
    for pair in stats["agreement"]:
        share = f"{pair['fraction']:.3f}" if pair["fraction"] is not None else "n/a"
        a, b = pair["labelers"]
        lines.append(f"  {a} ~ {b}: {share} agreement over {pair['pairs']} pairs on {pair['prompts']} prompts both ranked")
    return lines


def summary_line(stats: dict) -> str:
    people = ", ".join(f"{name} {c['ranked']} ranked, {c['skipped']} skipped" for name, c in stats["labelers"].items()) or "none yet"
    agreement = f"; agreement {stats['fraction']:.3f} over {stats['pairs']} pairs" if stats["fraction"] is not None else ""
    return f"{stats['records']} judgments ({people}){agreement}"
