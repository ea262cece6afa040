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
    """Talking to a daemon's control socket failed; the subclasses say how.

    In the manner of trio's ``BrokenResourceError`` vs ``ClosedResourceError``:
    a caller tells the cases apart by type, never by reading the message.
    """


class Unavailable(ApiError):
    """The daemon could not be reached, or the connection broke mid-request.

    The cause (``ConnectionRefusedError``, ``FileNotFoundError``, a timeout...)
    is kept in ``__cause__``. Trying again later may succeed.
    """


class Refused(ApiError):
    """The daemon understood the request and refused it (its reason is the message)."""


class Forbidden(Refused):
    """The caller, as the kernel names it (``SO_PEERCRED``), may not do this."""


class BadRequest(ApiError):
    """The daemon found the request malformed: unknown verb, missing or bad arguments."""

    exit_code = 2
