"""Errors that are the user's to fix.

A `UserError` is reported as one line (what is wrong, where, and the fix) with a non-zero exit and
no traceback; anything else is a bug in rlhf and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input (config, data, reference): one line, no traceback."""


EXIT_USER_ERROR = 2


class StoppedBySignal(Exception):
    """The run was asked to stop (SIGTERM: preemption, `scontrol requeue`, a time limit near) and
    saved a resumable checkpoint first."""


# 128 + SIGTERM, the status a shell gives a process that SIGTERM ended: not a success, not a bug.
EXIT_STOPPED = 143


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, for quoting a library's error in ours."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


def remote_code_hint(exc: Exception, key: str) -> str:
    """transformers refuses a repository's own code unless trusted: name the one flag that trusts
    this model (`reward.name_or_path` -> `reward.trust_remote_code`), each model having its own."""
    if "custom code" not in str(exc):
        return ""
    return f" (set {key.partition('.')[0]}.trust_remote_code=true only if you trust that code)"
