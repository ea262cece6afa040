"""How keel's commands end on SIGINT and SIGTERM: at once, quietly, with 130 or 143.

A process may inherit SIGINT as *ignored* (a background job of a script,
``nohup``, many CI runners); Python then leaves it ignored, and Ctrl-C or
``kill -INT`` would do nothing. So every ``keel`` command installs its own
handler for both signals before anything else (:func:`install`, called by the
``keel`` entry point in :mod:`keel.__main__` and by :func:`keel.cli.main`):

- the first SIGINT or SIGTERM raises :class:`Interrupted` in the main thread.
  It is a :class:`KeyboardInterrupt`, so ``finally`` blocks and context
  managers run and an open ledger transaction rolls back; the CLI catches it
  and exits with ``128 + signal number`` (130, 143), printing nothing;
- a second signal while the first is being handled, or one that arrives once
  the command has finished (:func:`finished`), ends the process at once with
  the same status (``os._exit``), also without a word;
- Python cannot raise everywhere: in a ``__del__`` method or a weakref
  callback (the import system's module locks have one) it hands the exception
  to :data:`sys.unraisablehook`, and some C code (extension modules) drops
  exceptions it did not expect. So a signal is not done with until the
  command has returned: keel's unraisable hook exits at once; a command that
  starts while a signal is pending (swallowed during start-up) stops before
  it begins; and if the process still runs :data:`GRACE` seconds after the
  signal, an alarm ends it.

Long-running commands (``keel ledger tail --follow``, the mesh's ``recv``)
need nothing more: they are stopped wherever they block in Python. (A call
into C that cannot be interrupted, such as SQLite waiting for a lock, returns
first.) Daemons get their handling from ``keel.service``; asyncio's
``loop.add_signal_handler`` takes these handlers over while the loop runs.

This module imports only ``os``, ``signal`` and ``sys`` (no ``typing``): the
entry point loads it before anything else, so the time in which a signal can
still print Python's ``KeyboardInterrupt`` traceback is Python's own start-up.
"""

import os
import signal
import sys

TYPE_CHECKING = False  # typing costs milliseconds of start-up, and is for mypy only
if TYPE_CHECKING:
    from types import FrameType, TracebackType
    from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE = 2.0  # seconds from a stop signal to a forced exit, if the command has not ended


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``exit_code`` is ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}"


class _State:
    pending: "int | None" = None  # a stop signal the running command has not yet ended on
    finished = False  # the command is done: exit at once


_state = _State()


def _handle(signum: int, frame: "FrameType | None") -> None:
    if _state.pending is not None or _state.finished:
        os._exit(128 + signum)
    _state.pending = signum
    try:  # the last resort, should the exception below be lost
        signal.signal(signal.SIGALRM, _deadline)
        signal.setitimer(signal.ITIMER_REAL, GRACE)
    except (ValueError, OSError):
        pass
    raise Interrupted(signum)


def _deadline(signum: int, frame: "FrameType | None") -> None:
    os._exit(128 + (_state.pending or signal.SIGTERM))


def _unraisable(unraisable: "sys.UnraisableHookArgs") -> None:
    if isinstance(unraisable.exc_value, Interrupted):
        os._exit(unraisable.exc_value.exit_code)
    sys.__unraisablehook__(unraisable)


def install() -> bool:
    """Handle SIGINT and SIGTERM as this module says, whatever was inherited.

    Returns False (and changes nothing) outside the main thread, where Python
    cannot install signal handlers.
    """
    try:
        for signum in STOP_SIGNALS:
            signal.signal(signum, _handle)
    except ValueError:  # not the main thread
        return False
    sys.unraisablehook = _unraisable
    return True


def finished() -> None:
    """The command's work and output are done: a signal from now on exits at once."""
    _state.finished = True


def _settled() -> None:
    """The command returned: the signal it ended on is done with."""
    if _state.pending is not None:
        _state.pending = None
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


class handled:  # lowercase: used like a function, ``with signals.handled():``
    """:func:`install` for the duration of a ``with`` block, then the previous handlers.

    Entering raises :class:`Interrupted` at once if a stop signal arrived
    earlier and was lost on the way (the command must not start). For callers
    that run a command inside a longer-lived process (tests that call
    :func:`keel.cli.main`), their own handlers come back afterwards.
    """

    def __init__(self) -> None:
        self._previous: list[tuple[signal.Signals, Any]] = []
        self._unraisable = sys.unraisablehook

    def __enter__(self) -> "handled":
        previous = [(signum, signal.getsignal(signum)) for signum in STOP_SIGNALS]
        self._unraisable = sys.unraisablehook
        if install():
            self._previous = previous
        pending = _state.pending
        if pending is not None:
            self.__exit__(None, None, None)
            raise Interrupted(pending)
        return self

    def __exit__(
        self,
        exc_type: "type[BaseException] | None",
        exc: "BaseException | None",
        traceback: "TracebackType | None",
    ) -> None:
        if not self._previous:
            return
        _settled()
        for signum, handler in self._previous:
            signal.signal(signum, handler)
        sys.unraisablehook = self._unraisable
