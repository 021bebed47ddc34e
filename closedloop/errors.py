"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad config, missing stream, unreadable file). Exit status 2."""

    exit_code = 2


class ConfigError(UserError):
    """A config that failed validation. `errors` lists every problem as 'path: message'."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"{source}: {len(self.errors)} config error(s):\n{lines}")
