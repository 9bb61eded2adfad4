"""The one list of errors that mean "what you asked for cannot be done": bad data, settings,
weights, adapters, archives, prompts, files. Each layer's error of that kind derives from
`UserError`, so this module imports nothing and every layer may import it. Every command's `main`
prints these as one line and exits with status 2; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """A request that cannot be done as asked; the message says what to change."""


class ExportError(UserError):
    """The base, adapter or output cannot be exported as asked; the message says what to change."""


def user_errors() -> tuple[type[BaseException], ...]:
    return (UserError, OSError)  # OSError: a missing or unwritable file
