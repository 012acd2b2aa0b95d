"""Errors alignkit reports to the user as one readable message (exit code 2, no traceback)."""

from __future__ import annotations


class AlignkitError(Exception):
    """A problem with the user's input (recipe, override, data, run dir) rather than a bug.

    The CLI prints ``error: <message>`` and exits with ``exit_code``; anything else that escapes is a
    bug and keeps its traceback.
    """

    exit_code = 2


class RecipeError(AlignkitError):
    """The recipe or a command-line override is invalid."""


class DataError(AlignkitError):
    """A data source is missing, unreadable, or has no usable rows."""


class RunDirError(AlignkitError):
    """The output directory holds something alignkit must not overwrite silently."""
