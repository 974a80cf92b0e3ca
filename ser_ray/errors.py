"""Errors that describe the user's situation, not a bug: the CLI prints them in one line (exit 2)."""


class UserError(Exception):
    """Something the user can fix (an output in use, an endpoint that refuses); no traceback needed."""
