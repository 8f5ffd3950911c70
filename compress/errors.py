"""Errors that reach the user as one line and an exit code (see compress/cli.py)."""


class UserError(Exception):
    """Bad input or a tool failure the user can act on: one line, exit code 2."""

    exit_code = 2


class GateFailed(Exception):
    """A budget, accuracy or parity gate was violated: exit code 1."""

    exit_code = 1
