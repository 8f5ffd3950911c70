"""Errors that reach the user as one line and an exit code (see compress/cli.py)."""


class UserError(Exception):
    """Bad input or a tool failure the user can act on: one line, exit code 2."""

    exit_code = 2


class GateFailed(Exception):
    """A budget, accuracy or parity gate was violated: exit code 1."""

    exit_code = 1


def is_whole(v: object) -> bool:
    """A whole number as a recipe (YAML/JSON) gives one: an int, not a bool (`iterations: yes` is not 1)."""
    return isinstance(v, int) and not isinstance(v, bool)


def first_line(e: BaseException, limit: int = 200) -> str:
    """The line of an exception a user can act on, for one-line errors: the first non-blank line (OpenVINO leads with
    C++ source locations: skipped), or the exception's type name when its message is empty."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from src/", "Check '"))]
    return ((useful or lines or [type(e).__name__])[0])[:limit]
