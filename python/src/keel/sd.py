"""systemd integration: readiness and watchdog notifications, journal logging.

Uses systemd-python (libsystemd) when it is installed. Without it, notifications
speak the notify-socket protocol directly (one datagram to ``$NOTIFY_SOCKET``,
which is the whole protocol; see sd_notify(3)), and logs go to stderr, which
systemd sends to the journal anyway. Outside systemd every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

try:  # pragma: no cover - depends on the host
    from systemd import daemon as _sd_daemon
    from systemd import journal as _sd_journal
except ImportError:  # pragma: no cover - depends on the host
    _sd_daemon = None
    _sd_journal = None


def notify(*fields: str) -> bool:
    """Send ``READY=1``, ``WATCHDOG=1``, ``STATUS=...`` etc.; False outside systemd."""
    message = "\n".join(fields)
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if _sd_daemon is not None:
        return bool(_sd_daemon.notify(message))
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError:
            return False
    return True


def ready(status: str | None = None) -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def stopping() -> bool:
    return notify("STOPPING=1")


def watchdog_ping() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """How often to ping (half of ``WatchdogSec``), or None when no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2_000_000 if value > 0 else None


def under_systemd() -> bool:
    """True when stderr is connected to the journal (set by systemd for services)."""
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


class _StderrFormatter(logging.Formatter):
    """``service: level: message key=value`` on a terminal; the journal adds time itself."""

    def __init__(self, service: str, *, timestamps: bool) -> None:
        fmt = f"%(asctime)s {service}[%(process)d] %(levelname)s %(message)s"
        if not timestamps:
            fmt = "<%(levelno_sd)s>%(levelname)s %(message)s"
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        record.levelno_sd = _syslog_priority(record.levelno)
        return super().format(record)


def _syslog_priority(level: int) -> int:
    if level >= logging.CRITICAL:
        return 2
    if level >= logging.ERROR:
        return 3
    if level >= logging.WARNING:
        return 4
    if level >= logging.INFO:
        return 6
    return 7


def setup_logging(service: str, *, verbose: bool = False, stream: Any = None) -> logging.Logger:
    """Configure the root logger for a daemon and return the service's logger.

    Under systemd, records go to the journal with their priority (through
    libsystemd when present, else as ``<N>`` prefixes on stderr, which journald
    parses); on a terminal they carry a timestamp.
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler
    if under_systemd() and _sd_journal is not None and stream is None:
        handler = _sd_journal.JournalHandler(SYSLOG_IDENTIFIER=f"keel-{service}")
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(_StderrFormatter(service, timestamps=not under_systemd()))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    return logging.getLogger(f"keel.{service}")
