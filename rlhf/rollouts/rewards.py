"""Where a reward comes from: a learned reward model, a Python function, the embedded default's
oracle, or a weighted sum of them. Usable outside PPO (best-of-N scores candidates with it).

A source is a string: `python:package.module:function` (a function of the installed environment,
called with the prompts and responses as text, returning one float per response), `oracle` (the
embedded default's ground truth, `rlhf.toy.oracle_score`: 0 to 1, 1 = the exact sum), or anything
else: a learned reward model (registry reference, folder or hub name), of which there is at most one.

`Reward.scores` combines them: the learned model's scores (computed by the caller, who holds the
model) are normalized with its stored statistics when asked; a function's floats are used as they
are; then the weighted sum. Clipping and the no-EOS score are the caller's (PPO's shaping).

Security: a function is imported by dotted name from `sys.path` as the environment has it (an
installed package, or PYTHONPATH the user set); never from a file path, and nothing here puts a run
folder or the registry on the path. Torch is imported on first use: the config checks parse sources.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Sequence

from rlhf.errors import UserError, first_line
from rlhf.protocols import Tokenizer

if TYPE_CHECKING:
    import torch

    from rlhf.rollouts.generation import Sequences

PYTHON_PREFIX = "python:"
ORACLE = "oracle"
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_PYTHON_SOURCE = re.compile(rf"{_IDENTIFIER}(\.{_IDENTIFIER})*:{_IDENTIFIER}")
_FORM = f"{PYTHON_PREFIX}package.module:function (a module importable from the environment, never a file path)"


@dataclass(frozen=True)
class RewardSource:
    """One component of a reward, parsed from its string; `weight` multiplies its score."""

    text: str
    kind: Literal["learned", "python", "oracle"]
    weight: float = 1.0

    @property
    def module(self) -> str:
        return self.text[len(PYTHON_PREFIX):].partition(":")[0]

    @property
    def function(self) -> str:
        return self.text.rpartition(":")[2]


def parse_source(text: str, *, key: str = "reward.name_or_path") -> RewardSource:
    """A source string's kind, refusing a `python:` source that is not a dotted module name and a function name."""
    if text.startswith(PYTHON_PREFIX):
        if not _PYTHON_SOURCE.fullmatch(text[len(PYTHON_PREFIX):]):
            raise UserError(f"{key}: {text!r} is not {_FORM}")
        return RewardSource(text, "python")
    if text == ORACLE:
        return RewardSource(text, "oracle")
    return RewardSource(text, "learned")


def parse_sources(names: Sequence[str], weights: Sequence[float] | None, *, key: str = "reward") -> tuple[RewardSource, ...]:
    """The components of `key`.name_or_path weighted by `key`.weights (None = 1 each), checked:
    at least one, none twice, at most one learned reward model, one weight per source."""
    if not names:
        raise UserError(f"{key}.name_or_path is empty; give a reward model (rm:latest), {PYTHON_PREFIX}pkg.mod:fn or {ORACLE}")
    if weights is not None and len(weights) != len(names):
        raise UserError(f"{key}.weights has {len(weights)} weight(s) for {len(names)} source(s) in {key}.name_or_path; "
                        "give one weight per source, in the same order")
    if len(set(names)) != len(names):
        raise UserError(f"{key}.name_or_path names a source twice ({', '.join(names)}); give each once and weight it")
    sources = tuple(
        RewardSource(s.text, s.kind, 1.0 if weights is None else float(weights[i]))
        for i, s in enumerate(parse_source(n, key=f"{key}.name_or_path") for n in names)
    )
    learned = [s.text for s in sources if s.kind == "learned"]
    if len(learned) > 1:
        raise UserError(f"{key}.name_or_path names {len(learned)} reward models ({', '.join(learned)}); one at most is loaded")
    return sources


def learned_source(sources: Sequence[RewardSource]) -> RewardSource | None:
    """The learned reward model among `sources`, or None: then no reward model is loaded."""
    return next((s for s in sources if s.kind == "learned"), None)


def describe(sources: Sequence[RewardSource]) -> str:
    """The reward in words, for the run's log: `1 x rm:latest + 0.5 x python:pkg.mod:fn`."""
    return " + ".join(f"{s.weight:g} x {s.text}" for s in sources)


def load_function(source: RewardSource, *, key: str = "reward.name_or_path") -> Callable[..., object]:
    """Import a `python:` source's module by its dotted name and return its function, or stop in one
    line: not importable, no such attribute, not callable."""
    try:
        module = importlib.import_module(source.module)
    except Exception as exc:  # the module's own import may fail in any way: name it, not a traceback
        raise UserError(f"{key}: {source.text}: cannot import module {source.module!r} ({first_line(exc)}); "
                        "install its package or put its folder on PYTHONPATH") from None
    function = getattr(module, source.function, None)
    if function is None:
        raise UserError(f"{key}: {source.text}: module {source.module!r} has no attribute {source.function!r}")
    if not callable(function):
        raise UserError(f"{key}: {source.text}: {source.module}.{source.function} is a {type(function).__name__}, not a function")
    return function


def oracle_rewards(prompts: list[str], responses: list[str]) -> list[float]:
    """The embedded default's ground truth as a reward: each response's oracle score, 0 to 1."""
    from rlhf.toy import oracle_score

    return [oracle_score(p, r) for p, r in zip(prompts, responses)]


def checked_scores(source: RewardSource, values: object, count: int) -> list[float]:
    """A function's return value as `count` finite floats, or a UserError naming the source and
    what it returned (a list or tuple of numbers; a 1-D tensor or array works as well)."""
    if hasattr(values, "tolist"):
        values = values.tolist()
    shown = repr(values)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    if not isinstance(values, (list, tuple)):
        raise UserError(f"{source.text} returned a {type(values).__name__} ({shown}), not a list of {count} floats")
    if len(values) != count:
        raise UserError(f"{source.text} returned {len(values)} score(s) for {count} responses ({shown}); return one float per response")
    floats = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars are Real too
            raise UserError(f"{source.text} returned a {type(value).__name__} ({value!r}) among its scores; return floats")
        if not math.isfinite(value):
            raise UserError(f"{source.text} returned {value} among its scores; every score must be finite")
        floats.append(float(value))
    return floats


@dataclass(frozen=True)
class RewardScores:
    """(B,) the weighted sum, and each component's (B,) score as it came (the learned one raw, before normalization)."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor]


class Reward:
    """A reward's components, functions imported once; `scores` combines them for a batch."""

    def __init__(self, sources: Sequence[RewardSource], *, mean: float = 0.0, std: float = 1.0, normalize: bool = False) -> None:
        self.sources = tuple(sources)
        self.learned = learned_source(self.sources)
        self.mean, self.std, self.normalize = mean, std, normalize
        self.functions = {s.text: oracle_rewards if s.kind == "oracle" else load_function(s)
                          for s in self.sources if s.kind != "learned"}

    @property
    def needs_text(self) -> bool:
        """Whether a component reads text (a function or the oracle): else `scores` ignores the texts."""
        return bool(self.functions)

    def scores(self, prompts: list[str], responses: list[str], *, learned: torch.Tensor | None = None,
               device: torch.device | str | None = None) -> RewardScores:
        """(B,) reward of each (prompt, response) text pair. `learned`: the reward model's raw (B,)
        scores, required when a component is learned, normalized here as (s - mean) / std when
        `normalize`. A function that raises or returns anything but B finite floats: a UserError
        naming it. Sums in float32 when a function takes part, else in the learned scores' dtype."""
        import torch

        if (learned is None) != (self.learned is None):
            raise ValueError("learned scores must be given exactly when a component is a reward model")
        parts: dict[str, torch.Tensor] = {}
        if learned is not None:
            assert self.learned is not None  # checked above
            parts[self.learned.text] = learned
            device = learned.device
        for text, function in self.functions.items():
            source = next(s for s in self.sources if s.text == text)
            try:
                values = function(prompts, responses)
            except Exception as exc:  # the user's code: name it, in one line
                raise UserError(f"{text} raised {type(exc).__name__}: {first_line(exc)}") from None
            parts[text] = torch.tensor(checked_scores(source, values, len(responses)), dtype=torch.float32, device=device)
        scaled = dict(parts)
        if learned is not None and self.learned is not None and self.normalize:
            scaled[self.learned.text] = (learned - self.mean) / self.std
        dtype = torch.float32 if self.functions or learned is None else learned.dtype  # no functions: a learned part
        total = None
        for source in self.sources:  # in the user's order
            weighted = source.weight * scaled[source.text].to(dtype)
            total = weighted if total is None else total + weighted
        assert total is not None  # a reward has at least one source
        return RewardScores(total=total, parts=parts)


def rollout_texts(seqs: Sequences, tokenizer: Tokenizer) -> tuple[list[str], list[str]]:
    """The prompts and responses of a rollout batch (`rlhf.rollouts.generation.Sequences`) as text, special
    tokens skipped: each prompt without its padding, each response up to its first EOS."""
    prompt_ids = seqs.input_ids[:, : seqs.prompt_width].tolist()
    prompt_mask = seqs.attention_mask[:, : seqs.prompt_width].bool().tolist()
    response_ids, response_mask = seqs.response_ids.tolist(), seqs.response_mask.tolist()
    prompts = [[t for t, keep in zip(ids, mask) if keep] for ids, mask in zip(prompt_ids, prompt_mask)]
    responses = [[t for t, keep in zip(ids, mask) if keep] for ids, mask in zip(response_ids, response_mask)]
    return (tokenizer.batch_decode(prompts, skip_special_tokens=True),
            tokenizer.batch_decode(responses, skip_special_tokens=True))
