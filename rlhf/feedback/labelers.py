"""Who ranks a prompt's K sampled responses for `rlhf label`, and how scores become a ranking.

A labeler gives each response of a prompt a score; `rank` orders them best first, responses whose
scores are within `tolerance` of each other sharing a rank (a tie). The reward model takes a pair
from a ranked list only where one rank is strictly better, so ties add no pair (InstructGPT's
K-choose-2 pairs, minus the ties).

- `oracle`: the embedded default's ground truth (`rlhf.toy.oracle_score`).
- `python:package.module:function`: called with the prompts and responses as text, one float each
  (imported by dotted name, like a `python:` reward; never from a path).
- `judge:<model>`: a causal LM asked which of two responses is better (RLAIF: Bai et al. 2022,
  Lee et al. 2023). Its preference for the first is the softmax over the log-probs of the two
  answer tokens; each pair is asked in both orders and the two averaged, which cancels a constant
  preference for a position. A response's score is its mean preference over the others.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rlhf.errors import UserError
from rlhf.rollouts.rewards import ORACLE, PYTHON_PREFIX, checked_scores, load_function, oracle_rewards, parse_source

JUDGE_PREFIX = "judge:"
SAMPLES_MANIFEST = "manifest.json"
"""Beside `rlhf sample`'s samples.jsonl: its SHA-256 and row count."""
_FORMS = f"'{ORACLE}', '{PYTHON_PREFIX}package.module:function' or '{JUDGE_PREFIX}<model>'"


@dataclass(frozen=True)
class LabelerSpec:
    text: str
    kind: Literal["oracle", "python", "judge"]
    target: str = ""
    """The judge's model (registry reference, folder, .gguf or hub name); the python: source."""


def parse_labeler(text: str, *, key: str = "by") -> LabelerSpec:
    if text == ORACLE:
        return LabelerSpec(text, "oracle")
    if text.startswith(PYTHON_PREFIX):
        parse_source(text, key=key)
        return LabelerSpec(text, "python", text)
    if text.startswith(JUDGE_PREFIX) and text[len(JUDGE_PREFIX):].strip():
        return LabelerSpec(text, "judge", text[len(JUDGE_PREFIX):])
    if text == "human":
        raise UserError(f"{key}=human: people label on a web page, not in a stage run: use `rlhf label --by human` (then "
                        f"`rlhf label --by human --publish`); here use {_FORMS}")
    raise UserError(f"{key}={text!r} is not a labeler; use {_FORMS}")


def rank(scores: list[float], tolerance: float = 0.0) -> tuple[list[int], list[int]]:
    """(order, ranks): the responses' indices best first (stable: equal scores keep their order),
    and each place's rank, the number of responses scored more than `tolerance` above it (equal
    ranks are ties; with a tolerance, ties are taken against the best of a run of near-equal scores)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ranks, head = [], 0
    for place, i in enumerate(order):
        if scores[order[head]] - scores[i] > tolerance:
            head = place
        ranks.append(head)
    return order, ranks


def function_scores(spec: LabelerSpec) -> Callable[[list[str], list[str]], list[float]]:
    """A `(prompts, responses) -> scores` callable for an oracle or python: labeler, its output checked."""
    if spec.kind == "oracle":
        return oracle_rewards
    source = parse_source(spec.text, key="by")
    function = load_function(source, key="by")

    def call(prompts: list[str], responses: list[str]) -> list[float]:
        try:
            values = function(prompts, responses)
        except Exception as exc:  # the user's code: name it, in one line
            from rlhf.errors import first_line

            raise UserError(f"{spec.text} raised {type(exc).__name__}: {first_line(exc)}") from None
        return checked_scores(source, values, len(responses))

    return call


def read_samples(path: Path) -> list[dict]:
    """`rlhf sample`'s rows, each checked: one line naming the file, line and field of the first that is not one."""
    if not path.is_file():
        raise UserError(f"data.samples={path}: no such file; give a samples entry (samples:latest) or rlhf sample's samples.jsonl")
    data = path.read_bytes()
    manifest = path.parent / SAMPLES_MANIFEST
    if manifest.is_file():
        recorded = json.loads(manifest.read_text()).get("sha256")
        if recorded != hashlib.sha256(data).hexdigest():
            raise UserError(f"{path} was changed after `rlhf sample` wrote it (its SHA-256 is not the one in {manifest}); "
                            "labels must rank what the policy wrote: sample again")
    rows = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if line.strip():
            rows.append(_checked_row(line, f"{path}:{number}"))
    if not rows:
        raise UserError(f"{path} holds no samples; run `rlhf sample` on a prompt set that is not empty")
    return rows


def _checked_row(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except ValueError:
        raise UserError(f"{where}: not a JSON object; this is not a file `rlhf sample` wrote") from None
    responses = row.get("responses") if isinstance(row, dict) else None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(responses, list):
        raise UserError(f"{where}: a samples row has 'prompt' (text) and 'responses' (a list); this is not a file `rlhf sample` wrote")
    if len(responses) < 2:
        raise UserError(f"{where}: {len(responses)} response(s); a ranking needs K >= 2 (rlhf sample sampling.k)")
    for j, response in enumerate(responses):
        if not isinstance(response, dict) or not isinstance(response.get("text"), str):
            raise UserError(f"{where}: responses[{j}] has no 'text'; this is not a file `rlhf sample` wrote")
    return row
