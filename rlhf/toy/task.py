"""The synthetic task of the embedded default: addition, labelled by a deterministic oracle.

Prompts are "a+b=" and the right response is the sum's decimal digits. The oracle stands in for
the human labeler of InstructGPT: demonstrations are its answers with realistic mistakes mixed in
(so SFT alone stays imperfect), and comparisons / ranked lists order candidate responses by its
score, so the reward model can be checked against ground truth.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from rlhf.store.fileio import atomic_write_text

Split = Literal["train", "eval"]
SPLITS: tuple[str, ...] = ("train", "eval")

# The task prompt may sit inside a longer text (a chat template renders it between role tags,
# e.g. "<|user|>\n12+34=\n<|assistant|>\n"); the last "a+b=" in the text is the question.
_PROMPT_RE = re.compile(r"(\d+)\+(\d+)=")
# Characters for junk responses: what an untrained policy emits, letters and symbols included.
_JUNK_CHARS = "0123456789+= abcxyz?.-"


@dataclass
class ToyTaskConfig:
    """Size, noise and seed of the synthetic addition task."""

    digits: int = 2
    """Digits of each operand: 2 means operands 10..99 (1 means 0..9)."""
    demo_noise: float = 0.3
    """Probability that a demonstration's answer is corrupted (a wrong, dropped or extra digit,
    or an off-by-one / carry mistake), so SFT alone learns the task only partly."""
    seed: int = 1234
    """Seed of everything: the train/eval partition of prompts, the rows, the corruptions."""
    train_size: int = 4000
    """Rows per training split (demonstrations, comparisons, ranked lists, prompts)."""
    eval_size: int = 200
    """Rows per held-out split; their prompts never occur in any training split."""
    ranked_k: int = 4
    """Responses per prompt in a ranked list (InstructGPT's K)."""

    def validate(self) -> None:
        """Raise ValueError on values the task cannot be built from."""
        if not 1 <= self.digits <= 9:
            raise ValueError(f"toy task: digits must be in 1..9, got {self.digits}")
        if not 0.0 <= self.demo_noise <= 1.0:
            raise ValueError(f"toy task: demo_noise must be in [0, 1], got {self.demo_noise}")
        if self.train_size < 1 or self.eval_size < 1:
            raise ValueError("toy task: train_size and eval_size must be at least 1")
        if self.ranked_k < 2:
            raise ValueError(f"toy task: ranked_k must be at least 2, got {self.ranked_k}")


def _parse_prompt(prompt: str) -> tuple[int, int]:
    matches = _PROMPT_RE.findall(prompt)
    if not matches:
        raise ValueError(f"toy task: prompt holds no 'a+b=' question: {prompt!r}")
    a, b = matches[-1]
    return int(a), int(b)


def oracle_score(prompt: str, response: str) -> float:
    """Score a response to "a+b=" in [0, 1]: the task's ground truth, reused by every stage.

    1.0 for the exact sum. Otherwise the fraction of digit positions that match, aligned from the
    right (units with units), over max(len(response), len(sum)): one wrong digit of "46" scores
    0.5, "406" scores 1/3, so the score rises smoothly as answers improve, which RL needs.
    Empty or non-digit responses score 0. Surrounding whitespace is ignored; the caller strips
    EOS and padding. The prompt may be the bare "a+b=" or a chat-templated text holding it.
    """
    a, b = _parse_prompt(prompt)
    return _score(response, str(a + b))


def _score(response: str, true: str) -> float:
    """oracle_score against the sum's digits `true`, without parsing a prompt."""
    pred = response.strip()
    # isdigit() alone accepts characters like '²'; the task only knows ASCII digits.
    if not pred or not (pred.isascii() and pred.isdigit()):
        return 0.0
    if pred == true:
        return 1.0
    matches = sum(p == t for p, t in zip(reversed(pred), reversed(true)))
    return matches / max(len(pred), len(true))


def _random_digit(rng: random.Random, *, exclude: str = "", nonzero: bool = False) -> str:
    choices = [d for d in "0123456789" if d not in exclude and not (nonzero and d == "0")]
    return rng.choice(choices)


def _digit_wrong(answer: str, rng: random.Random) -> str:
    i = rng.randrange(len(answer))
    lead = i == 0 and len(answer) > 1
    return answer[:i] + _random_digit(rng, exclude=answer[i], nonzero=lead) + answer[i + 1 :]


def _digit_dropped(answer: str, rng: random.Random) -> str:
    if len(answer) == 1:
        return _digit_wrong(answer, rng)
    i = rng.randrange(len(answer))
    return answer[:i] + answer[i + 1 :]


def _digit_extra(answer: str, rng: random.Random) -> str:
    i = rng.randrange(len(answer) + 1)
    return answer[:i] + _random_digit(rng, nonzero=i == 0) + answer[i:]


def _off_by(answer: str, rng: random.Random) -> str:
    # +-1 is an arithmetic slip; +-10 is a carry forgotten or carried twice.
    value = int(answer) + rng.choice((-10, -1, 1, 10))
    return str(value) if value >= 0 else str(int(answer) + 1)


_CORRUPTIONS: tuple[Callable[[str, random.Random], str], ...] = (
    _digit_wrong,
    _digit_dropped,
    _digit_extra,
    _off_by,
)


def corrupt(answer: str, rng: random.Random) -> str:
    """Return a realistic wrong answer: one digit wrong, dropped or extra, or off by 1 or 10."""
    while True:
        wrong = rng.choice(_CORRUPTIONS)(answer, rng)
        # A dropped "0" of "100" still reads differently ("10"); the loop guards the rare no-op.
        if wrong != answer:
            return wrong


def _junk(rng: random.Random) -> str:
    return "".join(rng.choice(_JUNK_CHARS) for _ in range(rng.randint(1, 6))).strip() or "?"


def _candidate(answer: str, rng: random.Random) -> str:
    """One response of the kind a policy produces, from right to junk.

    The mix covers what an SFT policy gets wrong (mostly near misses, sometimes compound ones or
    a wrong length) so the reward model sees every mistake it will have to score.
    """
    u = rng.random()
    if u < 0.25:
        return answer
    if u < 0.60:
        return corrupt(answer, rng)
    if u < 0.80:
        return corrupt(corrupt(answer, rng), rng)
    if u < 0.90:
        return str(rng.randrange(10 ** rng.randint(1, len(answer) + 1)))
    return _junk(rng)


class ToyTask:
    """The addition task's splits, all derived from `cfg.seed`.

    Every (a, b) pair belongs to exactly one partition, train or eval, so no held-out prompt is
    ever trained on. Each split draws from its own seeded generator, so rows do not depend on
    which splits were built before.
    """

    def __init__(self, cfg: ToyTaskConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        low = 0 if cfg.digits == 1 else 10 ** (cfg.digits - 1)
        pairs = [(a, b) for a in range(low, 10**cfg.digits) for b in range(low, 10**cfg.digits)]
        random.Random(f"{cfg.seed}:partition").shuffle(pairs)
        # 10% of the pairs are held out (at least one): 810 of the 8100 two-digit pairs.
        n_eval = max(1, len(pairs) // 10)
        self._pool: dict[str, list[tuple[int, int]]] = {
            "eval": sorted(pairs[:n_eval]),
            "train": sorted(pairs[n_eval:]),
        }

    def _rng(self, kind: str, split: str) -> random.Random:
        if split not in SPLITS:
            raise ValueError(f"toy task: split must be one of {SPLITS}, got {split!r}")
        # Seeding with a str is deterministic in CPython (hashed with SHA-512, not hash()).
        return random.Random(f"{self.cfg.seed}:{kind}:{split}")

    def _problems(self, rng: random.Random, split: str) -> list[tuple[str, str]]:
        """(prompt, answer) for one split's rows: distinct prompts while the pool lasts."""
        pool = self._pool[split]
        size = self.cfg.train_size if split == "train" else self.cfg.eval_size
        picked: list[tuple[int, int]] = []
        while len(picked) < size:
            picked += rng.sample(pool, min(len(pool), size - len(picked)))
        return [(f"{a}+{b}=", str(a + b)) for a, b in picked]

    def demonstrations(self, split: str) -> list[dict]:
        """SFT rows {"prompt", "response"}; a fraction demo_noise of responses are corrupted."""
        rng = self._rng("sft", split)
        rows = []
        for prompt, answer in self._problems(rng, split):
            noisy = rng.random() < self.cfg.demo_noise
            rows.append({"prompt": prompt, "response": corrupt(answer, rng) if noisy else answer})
        return rows

    def comparisons(self, split: str) -> list[dict]:
        """Reward-model pairs {"prompt", "chosen", "rejected"}; chosen scores strictly higher."""
        return self._pairs(self._rng("pairs", split), split)

    def fresh_comparisons(self, split: str) -> list[dict]:
        """Pairs like `comparisons` drawn from a separate random stream: on "eval", pairs no
        training or held-out file contains, for measuring a reward model's agreement with the oracle."""
        return self._pairs(self._rng("fresh-pairs", split), split)

    def _pairs(self, rng: random.Random, split: str) -> list[dict]:
        rows = []
        for prompt, answer in self._problems(rng, split):
            while True:
                x, y = _candidate(answer, rng), _candidate(answer, rng)
                sx, sy = _score(x, answer), _score(y, answer)
                if sx != sy:  # ties carry no preference
                    break
            chosen, rejected = (x, y) if sx > sy else (y, x)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        return rows

    def feedback(self, split: str) -> list[dict]:
        """KTO's unpaired rows {"prompt", "completion", "label"}: the oracle's verdict on one response.
        About half are its exact answer (label true, desirable); the others a candidate it scores
        below 1 (label false), so desirable and undesirable rows come about 1:1, as KTO's default
        weights assume."""
        rng = self._rng("feedback", split)
        rows = []
        for prompt, answer in self._problems(rng, split):
            if rng.random() < 0.5:
                rows.append({"prompt": prompt, "completion": answer, "label": True})
                continue
            completion = _candidate(answer, rng)
            while _score(completion, answer) == 1.0:
                completion = _candidate(answer, rng)
            rows.append({"prompt": prompt, "completion": completion, "label": False})
        return rows

    def ranked(self, split: str) -> list[dict]:
        """Ranked lists {"prompt", "responses": [best, ..., worst]} of ranked_k responses with
        strictly decreasing oracle score."""
        rng = self._rng("ranked", split)
        k = self.cfg.ranked_k
        rows = []
        for prompt, answer in self._problems(rng, split):
            by_score: dict[float, str] = {}
            # Draw until there is some choice beyond K levels (or give up after 4K draws).
            for _ in range(4 * k):
                response = _candidate(answer, rng)
                by_score.setdefault(_score(response, answer), response)
                if len(by_score) > k:
                    break
            # Short answers have few score levels; digits prefixed to the sum give new ones
            # (len/(len+j) for j = 1, 2, ...), so K distinct scores always exist.
            for j in range(1, k + 1):
                if len(by_score) >= k:
                    break
                padded = "".join(_random_digit(rng, nonzero=True) for _ in range(j)) + answer
                by_score.setdefault(_score(padded, answer), padded)
            scores = sorted(rng.sample(sorted(by_score), k), reverse=True)
            rows.append({"prompt": prompt, "responses": [by_score[s] for s in scores]})
        return rows

    def prompts(self, split: str) -> list[dict]:
        """PPO prompts {"prompt"}."""
        rng = self._rng("prompts", split)
        return [{"prompt": prompt} for prompt, _ in self._problems(rng, split)]

    def write(self, out_dir: Path) -> dict[str, Path]:
        """Write every split as JSONL under out_dir; return {"sft_train": path, ...}."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        builders = {
            "sft": self.demonstrations,
            "pairs": self.comparisons,
            "ranked": self.ranked,
            "feedback": self.feedback,
            "prompts": self.prompts,
        }
        paths: dict[str, Path] = {}
        for kind, build in builders.items():
            for split in SPLITS:
                name = f"{kind}_{split}"
                path = out_dir / f"{name}.jsonl"
                atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in build(split)))
                paths[name] = path
        return paths
