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
- so does a first one that lands where Python cannot raise it (a ``__del__``
  method, a weakref callback such as the import system's module locks):
  Python hands it to :data:`sys.unraisablehook` instead of the command, and
  keel's hook exits rather than letting the command run on.

Long-running commands (``keel ledger tail --follow``, the mesh's ``recv``)
need nothing more: they are stopped wherever they block. Daemons get their
handling from ``keel.service``; asyncio's ``loop.add_signal_handler`` takes
these handlers over while the event loop runs.

This module imports only ``os`` and ``signal``: the entry point loads it before
anything else, so the time in which a signal could still print Python's
``KeyboardInterrupt`` traceback is Python's own start-up alone.
"""

import os
import signal
import sys
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
    interrupted = False  # the first signal was raised as Interrupted
    finished = False  # the command is done: exit at once


_state = _State()


def _handle(signum: int, frame: FrameType | None) -> None:
    if _state.interrupted or _state.finished:
        os._exit(128 + signum)
    _state.interrupted = True
    raise Interrupted(signum)


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
    _state.interrupted = False
    _state.finished = False
    return True


def finished() -> None:
    """The command's work and output are done: a signal from now on exits at once."""
    _state.finished = True


class handled:  # lowercase: used like a function, ``with signals.handled():``
    """:func:`install` for the duration of a ``with`` block, then the previous handlers.

    For callers that run a command inside a longer-lived process (tests that
    call :func:`keel.cli.main`): their own handlers come back afterwards.
    """

    def __init__(self) -> None:
        self._previous: list[tuple[signal.Signals, Any]] = []
        self._unraisable = sys.unraisablehook

    def __enter__(self) -> "handled":
        previous = [(signum, signal.getsignal(signum)) for signum in STOP_SIGNALS]
        self._unraisable = sys.unraisablehook
        if install():
            self._previous = previous
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous:
            signal.signal(signum, handler)
        if self._previous:
            sys.unraisablehook = self._unraisable
