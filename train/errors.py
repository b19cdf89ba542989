"""Errors a user can act on.

Every error raised for bad input (a config file, a CLI flag, a dataset file, an HTTP
body) is one of these, and its message names the offending thing and what was
expected, so callers can print ``str(err)`` instead of a stack trace.
"""

from __future__ import annotations

import sys


class SegloopError(Exception):
    """Base class of all user-facing segloop errors."""


class ConfigError(SegloopError, ValueError):
    """A config file, override or CLI flag is malformed or invalid."""


class DatasetError(SegloopError, ValueError):
    """A dataset file is missing, malformed or inconsistent."""


class ModelError(SegloopError, ValueError):
    """A model name, weight name or checkpoint cannot be used."""


class StoreError(SegloopError, RuntimeError):
    """The object store refused an operation or holds inconsistent data."""


def cli_error(err: BaseException, code: int = 2) -> int:
    """What every ``python -m ...`` entry point does with an error: ``error: <message>`` on stderr, exit ``code``."""
    print(f"error: {err}", file=sys.stderr)
    return code
