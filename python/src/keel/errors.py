"""Every error keel reports to a person.

``str(error)`` is one line that says what happened and, where there is one, the
fix. The ``exit_code`` is what the CLI exits with: 2 for input the user must
correct (bad arguments, malformed files or configs), 1 for everything else.
"""

from __future__ import annotations


class KeelError(Exception):
    """Something went wrong that a user should read about."""

    exit_code = 1


class UsageError(KeelError):
    """The user's input (arguments, a file they named) is malformed."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file is missing, unreadable or invalid; the message names the key."""


class ApiError(KeelError):
    """The control socket of a daemon could not be reached or refused a request."""
