"""Chat templates: render a list of {role, content} messages to the text the model sees.

The tokenizer's own template is used when it has one; otherwise `DEFAULT_CHAT_TEMPLATE`.
"""

from __future__ import annotations

from typing import Any

from rlhf.errors import UserError, first_line
from rlhf.protocols import Tokenizer

ROLES = ("system", "user", "assistant", "tool")

# The fallback template, for tokenizers without one (base models, the embedded toy tokenizer).
# Each turn is a role tag on its own line followed by the content:
#
#     <|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!</s>
#
# Non-assistant turns end with "\n"; an assistant turn ends with the eos token and nothing after
# it. With add_generation_prompt=True the text ends with "<|assistant|>\n". So, by construction,
#     render(msgs + [assistant c], gen=False) == render(msgs, gen=True) + c + eos_token
# which is exactly what SFT trains on (prompt ids, then response ids + EOS) and what PPO
# generates from: the training and generation views of a conversation agree.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def validate_messages(messages: Any, *, where: str = "messages") -> list[dict]:
    """Check a conversation and return it as plain dicts (keys whose value is None dropped).

    Arrow gives every message struct the union of all messages' keys, filling the missing ones
    with None; dropping them hands templates the messages as the user wrote them.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UserError(
            f"{where}: messages must be a non-empty list of {{role, content}} objects, got "
            f"{type(messages).__name__}; fix the row or remove it"
        )
    clean: list[dict] = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"{where}: message {j} is {type(m).__name__}, not a {{role, content}} object; fix the row")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(
                f"{where}: message {j} has role {role!r}; use one of {', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            raise UserError(
                f"{where}: message {j} ({role}) content must be a string, got {type(content).__name__}; fix the row"
            )
        clean.append({k: v for k, v in m.items() if v is not None})
    return clean


def render_chat(tokenizer: Tokenizer, messages: list[dict], *, add_generation_prompt: bool, where: str = "messages") -> str:
    """Render `messages` to text with the tokenizer's chat template, or `DEFAULT_CHAT_TEMPLATE`.

    Raises `UserError` naming `where` for malformed messages or a template that rejects them
    (e.g. "roles must alternate").
    """
    from jinja2.exceptions import TemplateError

    clean = validate_messages(messages, where=where)
    # None lets the tokenizer pick its own template (a str, or the default of a named dict).
    template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
    try:
        text = tokenizer.apply_chat_template(
            clean, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
        )
    except TemplateError as e:
        raise UserError(
            f"{where}: the chat template rejected this conversation ({first_line(e)}); "
            "fix the messages or use a tokenizer whose template accepts them"
        ) from None
    if not isinstance(text, str):  # some versions return a list for batched input
        text = text[0]
    return text
