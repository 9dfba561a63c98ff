"""The tools by name, and the text format of a tool call and of its observation.

A call is one tag in the assistant's text, the argument verbatim between the tags:

    <tool name="calculator">47+6</tool>
    <tool name="python">
    print(sum(i * i for i in range(10)))
    </tool>

Generation stops at `TOOL_CALL_STOP` ("</tool>"); the rollout then appends the observation,

    <result>
    53
    </result>

and lets the policy continue. A failed call's observation ends with the one-line reason
("error: time limit of 5 s exceeded"). The first `</tool>` closes a call, so an argument cannot
contain that text; a call whose closing tag is missing is no call.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Mapping
from types import MappingProxyType

from rlhf.tools.calculator import calculate
from rlhf.tools.sandbox import DEFAULT_LIMITS, SandboxLimits, ToolResult, run_python

TOOL_CALL_STOP = "</tool>"
_CALL = re.compile(r'<tool name="([A-Za-z_][A-Za-z0-9_-]*)">(.*?)</tool>', re.DOTALL)
_RESULT_OPEN, _RESULT_CLOSE = "<result>", "</result>"


def calculator_tool(argument: str) -> ToolResult:
    """The calculator as a tool: its answer, or its "error: ..." line as the reason."""
    answer = calculate(argument)
    if answer.startswith("error:"):
        return ToolResult(output="", ok=False, reason=answer)
    return ToolResult(output=answer, ok=True)


def python_tool(argument: str, *, limits: SandboxLimits = DEFAULT_LIMITS) -> ToolResult:
    """Python in the sandbox; the argument is dedented, since a policy often indents the code
    it writes inside the tag."""
    return run_python(textwrap.dedent(argument).strip("\n"), limits=limits)


TOOLS: Mapping[str, Callable[[str], ToolResult]] = MappingProxyType({"calculator": calculator_tool, "python": python_tool})


def parse_tool_call(text: str) -> tuple[str, str] | None:
    """(name, argument) of the first complete `<tool name="...">...</tool>` in `text`, or None.
    The argument is returned as written; each tool trims it as it needs."""
    match = _CALL.search(text)
    return (match.group(1), match.group(2)) if match else None


def call_tool(name: str, argument: str, *, tools: Mapping[str, Callable[[str], ToolResult]] = TOOLS) -> ToolResult:
    """Run the named tool; an unknown name is a failed call with its reason, not an exception,
    since the name comes from the policy."""
    tool = tools.get(name)
    if tool is None:
        return ToolResult(output="", ok=False, reason=f"error: unknown tool {name!r}; known: {', '.join(sorted(tools))}")
    return tool(argument)


def render_observation(result: ToolResult, *, max_chars: int = 2000) -> str:
    """The text appended to the rollout after a call: the output (its head, when longer than
    `max_chars`) and the reason of a failure, between <result> tags."""
    output = result.output.rstrip("\n")
    if len(output) > max_chars:
        output = output[:max_chars] + f"\n... ({len(output) - max_chars} more characters)"
    # The output is the code's to choose; it must not close the observation early.
    output = output.replace(_RESULT_CLOSE, "</ result>")
    lines = [line for line in (output, result.reason) if line]
    body = "\n".join(lines) if lines else "(no output)"
    return f"{_RESULT_OPEN}\n{body}\n{_RESULT_CLOSE}"
