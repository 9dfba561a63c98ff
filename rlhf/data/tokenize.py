"""Tokenization and loss masking for SFT, preference groups for the RM, and prompts for PPO.

Prompt and response are tokenized separately and concatenated (prompt ids, then response ids +
EOS), rather than tokenizing prompt+response as one string: PPO generates from exactly the prompt
ids produced here, so the ids SFT learned to continue are the ids PPO continues from, and the
prompt/response boundary is exact even where a merge would straddle it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rlhf.algos.reward import ranked_pairs
from rlhf.data.formats import Comparison, Feedback, Prompt, PromptResponse, Ranked
from rlhf.errors import UserError
from rlhf.protocols import Tokenizer

BATCH = 1024  # rows per fast-tokenizer call: amortizes the Rust call without holding 100k encodings


@dataclass
class SFTExample:
    """One SFT sequence. `response_mask[t]` True = token t is a response token (EOS included)
    and counts in the loss; False on prompt tokens. Same length as `input_ids`."""

    input_ids: list[int]
    response_mask: list[bool]

    @property
    def num_targets(self) -> int:
        """Tokens this example adds to the loss: position 0 is never a target (nothing predicts it)."""
        return sum(self.response_mask[1:])


@dataclass
class TruncationStats:
    """What tokenization did to fit the length limit. `rows` counts the examples given."""

    rows: int = 0
    truncated_responses: int = 0
    skipped_long_prompts: int = 0
    kept: int = 0
    identical_pairs: int = 0
    """RM pairs dropped because both sides were the same tokens (after truncation, or as given)."""
    tied_pairs: int = 0
    """Pairs of a ranked list with equal ranks (a tie): no preference, no pair."""


@dataclass
class RMExample:
    """One prompt's compared responses. `sequences[i]` = prompt ids + response i ids + EOS (cut to
    the length limit); `pairs` holds (better, worse) indices into `sequences`, with `margins[p]`
    the pair's required reward gap (0 when the data gives none)."""

    sequences: list[list[int]]
    pairs: list[tuple[int, int]]
    margins: list[float]
    prompt_length: int | None = None
    """Tokens of the prompt every sequence starts with (None when built by hand without one)."""


@dataclass
class PairExample:
    """One (prompt, chosen, rejected) row for the direct preference losses, as token ids: the
    responses hold their EOS unless cut at the length limit, and at least one token each."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


@dataclass
class UnpairedExample:
    """One KTO row: prompt and completion ids (EOS unless cut), and its label (True = desirable)."""

    prompt: list[int]
    completion: list[int]
    desirable: bool


def _long_prompts_key(key: str) -> str:
    return f"{key.rsplit('.', 1)[0]}.long_prompts" if "." in key else "long_prompts"


def _check_options(max_length: int, long_prompts: str, key: str, minimum: int) -> None:
    if long_prompts not in ("error", "skip"):
        raise UserError(
            f"long_prompts must be 'error' or 'skip', got {long_prompts!r} ({_long_prompts_key(key)}); set one of them"
        )
    if not isinstance(max_length, int) or max_length < minimum:
        raise UserError(f"{key}={max_length!r} is too small; set it to an integer >= {minimum}")


def _ids(tokenizer: Tokenizer, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(texts), BATCH):
        enc = tokenizer(
            texts[start : start + BATCH],
            add_special_tokens=add_special_tokens,
            return_attention_mask=False,  # only the ids are used; skipping the rest saves ~20%
            return_token_type_ids=False,
        )
        out.extend(enc["input_ids"])
    return out


def _too_long(where: str, n: int, max_length: int, key: str) -> UserError:
    return UserError(
        f"{where}: prompt is {n} tokens, longer than {key}={max_length} allows; "
        f"raise {key} or set {_long_prompts_key(key)}=skip"
    )


def _eos_id(tokenizer: Tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no eos token, which ends every response; set tokenizer.eos_token")
    return tokenizer.eos_token_id


def _leaves_room(prompt: list[int], where: str, *, max_length: int, long_prompts: str, key: str, stats: TruncationStats) -> bool:
    """Whether a prompt leaves room for one response token; a longer one is an error, or with
    long_prompts="skip" is counted and passed over."""
    if len(prompt) <= max_length - 1:
        return True
    if long_prompts == "error":
        raise _too_long(where, len(prompt), max_length, key)
    stats.skipped_long_prompts += 1
    return False


def _fitted_response(response: list[int], *, eos: int, room: int, stats: TruncationStats) -> list[int]:
    """response + EOS, cut to `room` tokens (counted); a cut drops the EOS, so no response is
    ever taught, or scored, as ending where it was cut."""
    response = response + [eos]
    if len(response) > room:
        stats.truncated_responses += 1
        return response[:room]
    return response


def tokenize_sft(
    examples: list[PromptResponse],
    tokenizer: Tokenizer,
    *,
    max_length: int,
    long_prompts: str = "error",
    key: str = "data.max_length",
) -> tuple[list[SFTExample], TruncationStats]:
    """Tokenize demonstrations into `SFTExample`s of at most `max_length` tokens.

    ids = tokenizer(prompt, add_special_tokens=True) + tokenizer(response, add_special_tokens=False)
    + [eos]. A prompt that leaves no room for one response token (> max_length - 1 tokens) is an
    error, or with long_prompts="skip" is dropped and counted. A response that does not fit is
    cut at max_length and counted; the cut drops the EOS, so the model is never taught to stop
    in the middle of a response.
    """
    _check_options(max_length, long_prompts, key, minimum=2)
    eos = _eos_id(tokenizer)
    stats = TruncationStats(rows=len(examples))
    prompt_ids = _ids(tokenizer, [e.prompt for e in examples], add_special_tokens=True)
    response_ids = _ids(tokenizer, [e.response for e in examples], add_special_tokens=False)
    out: list[SFTExample] = []
    for ex, p, r in zip(examples, prompt_ids, response_ids):
        if not _leaves_room(p, ex.where, max_length=max_length, long_prompts=long_prompts, key=key, stats=stats):
            continue
        r = _fitted_response(r, eos=eos, room=max_length - len(p), stats=stats)
        out.append(SFTExample(input_ids=p + r, response_mask=[False] * len(p) + [True] * len(r)))
    _check_any_left(out, stats, key)
    return out, stats


def tokenize_preferences(
    groups: Sequence[Comparison | Ranked],
    tokenizer: Tokenizer,
    *,
    max_length: int,
    long_prompts: str = "error",
    use_margin: bool = True,
    key: str = "data.max_length",
) -> tuple[list[RMExample], TruncationStats]:
    """Tokenize comparisons (one pair each) or ranked lists (all K(K-1)/2 pairs) into `RMExample`s.

    Each response is tokenized like an SFT response (prompt ids + response ids + EOS, cut to
    max_length, cuts counted), so the RM scores exactly the token sequences the policy writes.
    A pair whose two sequences are identical carries no preference: it is dropped and counted,
    and a group left with no pair is dropped. Long prompts are handled as in `tokenize_sft`.
    """
    _check_options(max_length, long_prompts, key, minimum=2)
    eos = _eos_id(tokenizer)
    stats = TruncationStats(rows=len(groups))
    responses = [(g.chosen, g.rejected) if isinstance(g, Comparison) else g.responses for g in groups]
    prompt_ids = _ids(tokenizer, [g.prompt for g in groups], add_special_tokens=True)
    flat_ids = iter(_ids(tokenizer, [r for rs in responses for r in rs], add_special_tokens=False))
    out: list[RMExample] = []
    for group, texts, p in zip(groups, responses, prompt_ids):
        ids = [next(flat_ids) for _ in texts]  # consumed even when the group is skipped
        if not _leaves_room(p, group.where, max_length=max_length, long_prompts=long_prompts, key=key, stats=stats):
            continue
        sequences = [p + _fitted_response(r, eos=eos, room=max_length - len(p), stats=stats) for r in ids]
        if isinstance(group, Comparison):
            candidates = [(0, 1, group.margin if use_margin and group.margin is not None else 0.0)]
        else:
            every = ranked_pairs(len(sequences))
            candidates = [(i, j, 0.0) for i, j in every if group.ranks is None or group.ranks[i] < group.ranks[j]]
            stats.tied_pairs += len(every) - len(candidates)
        kept = [(i, j, m) for i, j, m in candidates if sequences[i] != sequences[j]]
        stats.identical_pairs += len(candidates) - len(kept)
        if kept:
            out.append(RMExample(sequences, [(i, j) for i, j, _ in kept], [m for _, _, m in kept], prompt_length=len(p)))
    stats.kept = len(out)
    if stats.rows and not out:
        raise UserError(
            f"no usable comparison is left of {stats.rows} rows ({stats.skipped_long_prompts} long prompts skipped, "
            f"{stats.identical_pairs} pairs identical after truncation, {stats.tied_pairs} tied); raise {key} or check the data"
        )
    return out, stats


def preference_pairs(groups: list[RMExample]) -> list[PairExample]:
    """Every (better, worse) pair of tokenized preference groups as its own (prompt, chosen,
    rejected) row: a ranked list of K responses gives its K(K-1)/2 pairs."""
    out = []
    for group in groups:
        cut = group.prompt_length
        if cut is None:
            raise ValueError("preference_pairs needs groups made by tokenize_preferences (with prompt_length)")
        for i, j in group.pairs:
            out.append(PairExample(group.sequences[i][:cut], group.sequences[i][cut:], group.sequences[j][cut:]))
    return out


def tokenize_unpaired(
    examples: list[Feedback],
    tokenizer: Tokenizer,
    *,
    max_length: int,
    long_prompts: str = "error",
    key: str = "data.max_length",
) -> tuple[list[UnpairedExample], TruncationStats]:
    """Tokenize KTO's unpaired rows like SFT examples (prompt ids + completion ids + EOS, cut to
    max_length and counted; long prompts as in `tokenize_sft`)."""
    _check_options(max_length, long_prompts, key, minimum=2)
    eos = _eos_id(tokenizer)
    stats = TruncationStats(rows=len(examples))
    prompt_ids = _ids(tokenizer, [e.prompt for e in examples], add_special_tokens=True)
    completion_ids = _ids(tokenizer, [e.completion for e in examples], add_special_tokens=False)
    out: list[UnpairedExample] = []
    for ex, p, c in zip(examples, prompt_ids, completion_ids):
        if not _leaves_room(p, ex.where, max_length=max_length, long_prompts=long_prompts, key=key, stats=stats):
            continue
        out.append(UnpairedExample(p, _fitted_response(c, eos=eos, room=max_length - len(p), stats=stats), ex.desirable))
    _check_any_left(out, stats, key)
    return out, stats


def tokenize_prompts(
    examples: list[Prompt],
    tokenizer: Tokenizer,
    *,
    max_length: int,
    long_prompts: str = "error",
    key: str = "data.max_prompt_length",
) -> tuple[list[list[int]], TruncationStats]:
    """Tokenize PPO prompts (add_special_tokens=True, as in `tokenize_sft`), each <= max_length ids.

    Prompts are never cut (a cut prompt asks a different question): a longer one is an error, or
    with long_prompts="skip" is dropped and counted.
    """
    rows, stats = tokenize_prompt_rows(examples, tokenizer, max_length=max_length, long_prompts=long_prompts, key=key)
    return [ids for _, ids in rows], stats


def tokenize_prompt_rows(
    examples: list[Prompt],
    tokenizer: Tokenizer,
    *,
    max_length: int,
    long_prompts: str = "error",
    key: str = "data.max_prompt_length",
) -> tuple[list[tuple[Prompt, list[int]]], TruncationStats]:
    """`tokenize_prompts` keeping each kept prompt beside its ids (best-of-N writes the prompt's text back)."""
    _check_options(max_length, long_prompts, key, minimum=1)
    stats = TruncationStats(rows=len(examples))
    out: list[tuple[Prompt, list[int]]] = []
    for ex, p in zip(examples, _ids(tokenizer, [e.prompt for e in examples], add_special_tokens=True)):
        if len(p) > max_length:
            if long_prompts == "error":
                raise _too_long(ex.where, len(p), max_length, key)
            stats.skipped_long_prompts += 1
            continue
        out.append((ex, p))
    _check_any_left(out, stats, key)
    return out, stats


def _check_any_left(out: list, stats: TruncationStats, key: str) -> None:
    stats.kept = len(out)
    if stats.rows and not out:
        raise UserError(f"all {stats.rows} prompts are longer than {key} allows; raise {key}")
