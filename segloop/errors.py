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


class ServiceError(SegloopError, RuntimeError):
    """A shared service (the MLflow server, Ray) failed or could not be reached."""


# The exit codes of every segloop command (scripts and the monitor's jobs rely on them).
EXIT_FAILURE = 1  # a service (object store, MLflow, Ray) failed or holds inconsistent data
EXIT_USAGE = 2  # bad input: a flag, a config, a dataset or annotation file, a model name
EXIT_INTERRUPTED = 130  # Ctrl-C


def exit_code(err: BaseException) -> int:
    """The exit code for ``err``: input errors 2, store/service failures 1, Ctrl-C 130."""
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(err, (StoreError, ServiceError)):
        return EXIT_FAILURE
    return EXIT_USAGE


def cli_error(err: BaseException, code: int | None = None) -> int:
    """What every entry point does with an error: ``error: <message>`` on stderr, exit :func:`exit_code`."""
    print(f"error: {err}", file=sys.stderr)
    return exit_code(err) if code is None else code
