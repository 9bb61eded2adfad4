"""The one list of errors that mean "what you asked for cannot be done": bad data, settings,
weights, adapters, archives, prompts, files. Every command's `main` prints these as one line and
exits with status 2; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class ExportError(Exception):
    """The base, adapter or output cannot be exported as asked; the message says what to change."""


def user_errors() -> tuple[type[BaseException], ...]:
    # Imported when a command runs, not at import time: the list reaches into most of the package.
    from .config import ConfigError
    from .data.prompts import TemplateError
    from .data.records import DatasetError
    from .engine.requests import GenerationError
    from .formats.archives import ArchiveError, WeightsSourceError
    from .model.loading import ModelError
    from .model.weights import WeightsError

    return (
        ConfigError,
        DatasetError,
        TemplateError,
        WeightsError,
        WeightsSourceError,
        ArchiveError,
        ModelError,
        GenerationError,
        ExportError,
        OSError,  # a missing or unwritable file
    )
