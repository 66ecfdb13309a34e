"""Errors a user can act on.

A `UserError` is something the user can fix (a bad file, a bad option): the CLI prints its message without a
traceback and exits with code 2. Anything else is a bug in preftune and keeps its traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input or configuration; printed without a traceback, exit code 2."""


class DataError(UserError):
    """A bad record in a data source, located precisely enough to fix it.

    `location` is e.g. "line 17" (JSONL, CSV), "record 3" (JSON) or "row 5" (Parquet, datasets).
    """

    def __init__(self, source: str, location: str | None, field: str | None, problem: str) -> None:
        self.source = source
        self.location = location
        self.field = field
        self.problem = problem
        where = source if location is None else f"{source}: {location}"
        what = problem if field is None else f"field '{field}': {problem}"
        super().__init__(f"{where}: {what}")


class ConfigError(UserError):
    """An invalid option or combination of options, found before any model is loaded."""


class RunInterrupted(Exception):
    """Training stopped on SIGTERM or SIGINT after writing a checkpoint; exits with 128 + the signal number."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number
