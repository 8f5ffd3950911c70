"""Errors that reach the user as one line and an exit code (see compress/cli.py)."""


class UserError(Exception):
    """Bad input or a tool failure the user can act on: one line, exit code 2."""

    exit_code = 2


class GateFailed(Exception):
    """A budget, accuracy or parity gate was violated: exit code 1."""

    exit_code = 1


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first non-blank line of an exception's message (its type name when the message is empty), for one-line errors."""
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return line[:limit]
