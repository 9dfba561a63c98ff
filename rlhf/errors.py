"""Errors that are the user's to fix.

A `UserError` is reported as one line (what is wrong, where, and the fix) with a non-zero exit and
no traceback; anything else is a bug in rlhf and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input (config, data, reference): one line, no traceback."""


EXIT_USER_ERROR = 2
