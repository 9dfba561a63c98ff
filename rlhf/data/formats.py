"""Dataset formats: turn `Records` into the typed examples each stage consumes.

Accepted layouts (columns):
- SFT (`to_prompt_responses`): prompt+response, prompt+completion, or messages.
- RM (`to_comparisons`): prompt+chosen+rejected (+margin); chosen+rejected as whole conversation
  texts (Anthropic hh-rlhf); chosen+rejected as message lists.
- RM (`to_ranked`): prompt+responses (best first, K >= 2).
- PPO (`to_prompts`): prompt, or messages.
- KTO (`to_unpaired`): prompt+completion+label (true = desirable), unpaired.
Wherever a `prompt` is read it may also be a message list; it is then rendered with the chat
template and add_generation_prompt=True. Responses are always the raw assistant text: the EOS is
appended at tokenization, never here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlhf.data.sources import Records
from rlhf.data.templates import render_chat, validate_messages
from rlhf.errors import UserError
from rlhf.protocols import Tokenizer

# hh-rlhf turn marker; the prompt of a hh-rlhf pair ends right after the last one shared.
ASSISTANT_MARKER = "Assistant:"


@dataclass(frozen=True)
class PromptResponse:
    prompt: str
    response: str
    where: str


@dataclass(frozen=True)
class Comparison:
    prompt: str
    chosen: str
    rejected: str
    margin: float | None
    where: str


@dataclass(frozen=True)
class Ranked:
    prompt: str
    responses: tuple[str, ...]  # best first, K >= 2
    where: str
    ranks: tuple[int, ...] | None = None
    """Each response's rank (0 = best, non-decreasing; equal ranks are ties, which give no pair); None = strictly ranked."""


@dataclass(frozen=True)
class Feedback:
    prompt: str
    completion: str
    desirable: bool
    where: str


@dataclass(frozen=True)
class Prompt:
    prompt: str
    where: str


def _columns(records: Records, names: list[str]) -> list[list[Any]]:
    """Whole columns as Python lists: one Arrow conversion per column, not per row
    (iterating a `datasets` Column goes row by row, ~100x slower on 100k rows)."""
    data = records.rows.select_columns(names).with_format(None)[:]
    return [data[n] for n in names]


def _missing(records: Records, accepted: str) -> UserError:
    found = ", ".join(records.rows.column_names) or "none"
    key = f" ({records.key})" if records.key else ""
    return UserError(f"{records.source}: no accepted columns (found: {found}); accepted formats: {accepted}{key}")


def _text(value: Any, column: str, where: str, *, may_be_empty: bool = False) -> str:
    if value is None:  # a key absent from this row (other rows have it) reads as None
        raise UserError(f"{where}: {column!r} is missing; add it to the row or remove the row")
    if not isinstance(value, str):
        raise UserError(f"{where}: {column!r} must be a string, got {type(value).__name__}; fix the row or remove it")
    if not value.strip() and not may_be_empty:
        raise UserError(f"{where}: {column!r} is empty; fix the row or remove it")
    return value


def _prompt(value: Any, tokenizer: Tokenizer, where: str) -> str:
    """A prompt given as text, or as messages rendered ready for the assistant's reply."""
    if isinstance(value, (list, tuple)):
        return render_chat(tokenizer, list(value), add_generation_prompt=True, where=where)
    return _text(value, "prompt", where)


def _split_messages(messages: Any, where: str) -> tuple[list[dict], str]:
    """messages -> (the turns before the final assistant turn, that turn's content)."""
    msgs = validate_messages(messages, where=where)
    if msgs[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's response, got {msgs[-1]['role']!r}; fix the row")
    if len(msgs) < 2:
        raise UserError(f"{where}: messages hold only the assistant's response, no prompt; add the user turn")
    return msgs[:-1], _text(msgs[-1]["content"], "assistant content", where)


def to_prompt_responses(records: Records, tokenizer: Tokenizer) -> list[PromptResponse]:
    """SFT demonstrations from prompt+response, prompt+completion or messages columns."""
    cols = records.rows.column_names
    out: list[PromptResponse] = []
    if "prompt" in cols and ("response" in cols or "completion" in cols):
        resp_col = "response" if "response" in cols else "completion"
        prompts, responses = _columns(records, ["prompt", resp_col])
        for i, (p, r) in enumerate(zip(prompts, responses)):
            w = records.where(i)
            out.append(PromptResponse(_prompt(p, tokenizer, w), _text(r, resp_col, w), w))
    elif "messages" in cols:
        (messages,) = _columns(records, ["messages"])
        for i, m in enumerate(messages):
            w = records.where(i)
            turns, response = _split_messages(m, w)
            out.append(PromptResponse(render_chat(tokenizer, turns, add_generation_prompt=True, where=w), response, w))
    else:
        raise _missing(records, "prompt+response, prompt+completion, messages (list of {role, content}, last = assistant)")
    return out


def split_shared_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two whole conversations (hh-rlhf style) into (prompt, chosen, rejected) texts.

    The prompt is their longest common prefix cut back to just after the last "Assistant:"
    marker in it, so a response that happens to start with the same words as the other keeps
    them. With no marker in the common prefix, the cut is at the longest common prefix itself
    (possibly mid-word). Identical texts give identical responses (a pair with no signal, kept).
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    marker = chosen.rfind(ASSISTANT_MARKER, 0, n)  # only a marker lying wholly inside the prefix
    cut = marker + len(ASSISTANT_MARKER) if marker >= 0 else n
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _message_pair(chosen: Any, rejected: Any, tokenizer: Tokenizer, where: str) -> tuple[str, str, str]:
    """Two conversations as message lists -> (rendered shared prefix, chosen reply, rejected reply)."""
    c = validate_messages(chosen, where=where)
    r = validate_messages(rejected, where=where)
    n = 0
    while n < min(len(c), len(r)) and (c[n]["role"], c[n]["content"]) == (r[n]["role"], r[n]["content"]):
        n += 1
    n = min(n, len(c) - 1, len(r) - 1)  # identical conversations: the last turn is the response
    if n == 0:
        raise UserError(f"{where}: chosen and rejected share no prompt turns; start both with the same messages")
    for name, conv in (("chosen", c), ("rejected", r)):
        if len(conv) != n + 1 or conv[n]["role"] != "assistant":
            raise UserError(
                f"{where}: after the shared prompt, {name} must be exactly one assistant message; fix the row"
            )
    prompt = render_chat(tokenizer, c[:n], add_generation_prompt=True, where=where)
    return prompt, _text(c[n]["content"], "chosen", where), _text(r[n]["content"], "rejected", where)


def _margin(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: 'margin' must be a number or null, got {type(value).__name__}; fix the row")
    return float(value)


def to_comparisons(records: Records, tokenizer: Tokenizer) -> list[Comparison]:
    """Preference pairs from prompt+chosen+rejected(+margin), hh-rlhf texts, or message lists."""
    cols = records.rows.column_names
    if "chosen" not in cols or "rejected" not in cols:
        raise _missing(
            records,
            "prompt+chosen+rejected (+margin), chosen+rejected as whole conversations (hh-rlhf), "
            "chosen+rejected as message lists",
        )
    chosen, rejected = _columns(records, ["chosen", "rejected"])
    prompts = _columns(records, ["prompt"])[0] if "prompt" in cols else [None] * len(chosen)
    margins = _columns(records, ["margin"])[0] if "margin" in cols else [None] * len(chosen)
    out: list[Comparison] = []
    for i, (p, c, r, m) in enumerate(zip(prompts, chosen, rejected, margins)):
        w = records.where(i)
        if isinstance(c, (list, tuple)) or isinstance(r, (list, tuple)):
            # Full conversations as messages (the prompt column, if any, repeats their first turns).
            prompt, c_text, r_text = _message_pair(c, r, tokenizer, w)
        elif p is not None:
            prompt, c_text, r_text = _prompt(p, tokenizer, w), _text(c, "chosen", w), _text(r, "rejected", w)
        else:
            prompt, c_text, r_text = split_shared_prefix(_text(c, "chosen", w), _text(r, "rejected", w))
            if not prompt.strip():
                raise UserError(f"{w}: chosen and rejected share no prompt prefix; add a 'prompt' column")
            c_text, r_text = _text(c_text, "chosen response", w), _text(r_text, "rejected response", w)
        out.append(Comparison(prompt, c_text, r_text, _margin(m, w), w))
    return out


def to_ranked(records: Records, tokenizer: Tokenizer) -> list[Ranked]:
    """Ranked responses from prompt+responses (a list, best first, at least 2), with optional ranks (ties: `rlhf label`)."""
    cols = records.rows.column_names
    if "prompt" not in cols or "responses" not in cols:
        raise _missing(records, "prompt+responses (a list of strings, best first, at least 2)")
    prompts, responses = _columns(records, ["prompt", "responses"])
    all_ranks = _columns(records, ["ranks"])[0] if "ranks" in cols else [None] * len(prompts)
    out: list[Ranked] = []
    for i, (p, rs, ranks) in enumerate(zip(prompts, responses, all_ranks)):
        w = records.where(i)
        if not isinstance(rs, (list, tuple)):
            raise UserError(f"{w}: 'responses' must be a list of strings, got {type(rs).__name__}; fix the row")
        if len(rs) < 2:
            raise UserError(f"{w}: 'responses' has {len(rs)} response(s), a ranking needs at least 2; add some or remove the row")
        # A labeled sample (it has ranks) may be empty: the policy ended at once, and a labeler ranked that too.
        texts = tuple(_text(r, f"responses[{j}]", w, may_be_empty=ranks is not None) for j, r in enumerate(rs))
        out.append(Ranked(_prompt(p, tokenizer, w), texts, w, None if ranks is None else _ranks(ranks, len(texts), w)))
    return out


def _ranks(value: Any, count: int, where: str) -> tuple[int, ...]:
    """A ranked list's 'ranks': one whole number per response, from 0, never falling (the responses are best first)."""
    ok = isinstance(value, (list, tuple)) and len(value) == count and all(isinstance(r, int) and not isinstance(r, bool) for r in value)
    if not ok or value[0] != 0 or any(b < a for a, b in zip(value, value[1:])):
        raise UserError(f"{where}: 'ranks' must be {count} whole numbers from 0, never falling (best first; equal = tie), "
                        f"got {value!r}; fix the row")
    return tuple(value)


def to_prompts(records: Records, tokenizer: Tokenizer) -> list[Prompt]:
    """PPO prompts from a prompt column, or messages (a final assistant turn is dropped)."""
    cols = records.rows.column_names
    out: list[Prompt] = []
    if "prompt" in cols:
        (prompts,) = _columns(records, ["prompt"])
        for i, p in enumerate(prompts):
            w = records.where(i)
            out.append(Prompt(_prompt(p, tokenizer, w), w))
    elif "messages" in cols:
        (messages,) = _columns(records, ["messages"])
        for i, m in enumerate(messages):
            w = records.where(i)
            msgs = validate_messages(m, where=w)
            if msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
            if not msgs:
                raise UserError(f"{w}: messages hold no prompt turns, only an assistant reply; add the user turn")
            out.append(Prompt(render_chat(tokenizer, msgs, add_generation_prompt=True, where=w), w))
    else:
        raise _missing(records, "prompt, messages (list of {role, content})")
    return out


def to_unpaired(records: Records, tokenizer: Tokenizer) -> list[Feedback]:
    """KTO's unpaired feedback from prompt+completion+label columns; label is true (desirable) or false."""
    cols = records.rows.column_names
    if not {"prompt", "completion", "label"} <= set(cols):
        raise _missing(records, "prompt+completion+label (label true = desirable, false = undesirable)")
    prompts, completions, labels = _columns(records, ["prompt", "completion", "label"])
    out: list[Feedback] = []
    for i, (p, c, label) in enumerate(zip(prompts, completions, labels)):
        w = records.where(i)
        if not isinstance(label, bool):
            raise UserError(f"{w}: 'label' must be true or false, got {label!r}; fix the row")
        out.append(Feedback(_prompt(p, tokenizer, w), _text(c, "completion", w), label, w))
    return out
