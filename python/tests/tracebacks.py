"""No traceback reaches a user: every test checks what the processes it ran printed.

Issue 8's rule ("bad input gets a one-line error; no traceback ever reaches a
user") is checked by this plugin on every test, not by a grep after the run.
After each test phase it looks for ``Traceback (most recent call last)`` in:

- what the test process itself printed or logged: pytest's captured stdout,
  stderr and log records. The daemons tests run in-process
  (``keel.service.running``) log there, and so does every subprocess that
  inherits pytest's stdout or stderr;
- the output of every subprocess whose output the test collected with
  ``communicate()``: ``subprocess.run``, ``check_output`` and the harness's
  ``run`` use it, and so does asyncio's ``Process.communicate``. Both are
  wrapped for the session by :func:`pytest_configure`;
- daemon logs, container journals and process logs that fixtures hand to
  :func:`scan` when they stop what they started (the harness's hosts and
  containers, the mesh nodes, the ledger's daemons...).

A traceback found fails the test (a passing phase becomes a failure; a
failing one gets the finding added), naming the process and quoting the
traceback. A test that deliberately provokes one says so, with the reason and
a pattern the traceback must match (nothing else is let through)::

    @pytest.mark.allow_traceback("the test agent crashes on purpose", match=r"ZeroDivisionError")

There should be almost none: a traceback in keel's output is a bug in keel.
"""

from __future__ import annotations

import asyncio.subprocess
import re
import shlex
import subprocess
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from tests.harness.common import output_readers

MARKER = "Traceback (most recent call last)"


@dataclass
class Finding:
    traceback: str
    sources: list[str]


# Tracebacks found in this test phase, by their text (one traceback read twice,
# e.g. a container's journal read by a `run`, is one finding with two sources).
_found: dict[str, Finding] = {}


def tracebacks_in(text: str) -> list[str]:
    """Each traceback in ``text``: its first line to its exception line (at most 60 lines)."""
    found = []
    start = text.find(MARKER)
    while start != -1:
        lines = text[start:].splitlines()
        end = 1
        while end < len(lines) and end < 60 and (lines[end][:1] in (" ", "\t") or not lines[end]):
            end += 1
        # The exception's own line ends it; chained tracebacks ("During handling...") each count.
        found.append("\n".join(lines[: end + 1]))
        start = text.find(MARKER, start + len(MARKER))
    return found


def scan(source: str, text: str | bytes | None) -> None:
    """Note every traceback in ``text``, output of ``source`` (a process, a log, a journal)."""
    if not text:
        return
    if isinstance(text, bytes):
        if MARKER.encode() not in text:
            return
        text = text.decode(errors="replace")
    if MARKER not in text:
        return
    for traceback in tracebacks_in(text):
        finding = _found.setdefault(traceback, Finding(traceback, []))
        if source not in finding.sources:
            finding.sources.append(source)


def process_name(argv: Any) -> str:
    if isinstance(argv, str | bytes):
        return f"`{argv if isinstance(argv, str) else argv.decode(errors='replace')}`"
    if isinstance(argv, Sequence):
        words = [str(word) for word in argv]
        shown = shlex.join(words)
        return f"`{shown[:300]}{'...' if len(shown) > 300 else ''}`"
    return repr(argv)


# --- subprocess output read with communicate() -------------------------------------------

_communicate = subprocess.Popen.communicate
_acommunicate = asyncio.subprocess.Process.communicate


def _popen_communicate(self: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> Any:
    stdout, stderr = _communicate(self, *args, **kwargs)
    name = process_name(self.args)
    scan(f"{name} (stdout)", stdout)
    scan(f"{name} (stderr)", stderr)
    return stdout, stderr


async def _process_communicate(self: asyncio.subprocess.Process, *args: Any, **kwargs: Any) -> Any:
    stdout, stderr = await _acommunicate(self, *args, **kwargs)
    transport = getattr(self, "_transport", None)  # asyncio keeps the Popen there
    popen = transport.get_extra_info("subprocess") if transport is not None else None
    name = process_name(getattr(popen, "args", f"pid {self.pid}"))
    scan(f"{name} (stdout)", stdout)
    scan(f"{name} (stderr)", stderr)
    return stdout, stderr


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "allow_traceback(reason, match): this test provokes a traceback on purpose; "
        "tracebacks matching the regex `match` do not fail it (tests/tracebacks.py)",
    )
    subprocess.Popen.communicate = _popen_communicate  # type: ignore[method-assign]
    asyncio.subprocess.Process.communicate = _process_communicate  # type: ignore[method-assign]
    output_readers.append(scan)


def pytest_unconfigure(config: pytest.Config) -> None:
    output_readers.remove(scan)
    subprocess.Popen.communicate = _communicate  # type: ignore[method-assign]
    asyncio.subprocess.Process.communicate = _acommunicate  # type: ignore[method-assign]


# --- the verdict, per phase --------------------------------------------------------------


def _allowed(item: pytest.Item, finding: Finding) -> bool:
    for mark in item.iter_markers("allow_traceback"):
        pattern = mark.kwargs.get("match")
        if not mark.args or not pattern:
            raise pytest.UsageError(
                f"{item.nodeid}: allow_traceback needs a reason and match=REGEX"
            )
        if re.search(pattern, finding.traceback):
            return True
    return False


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "setup" and report.passed:
        return report  # setup's output is checked with the call's
    phases = ("setup", "call") if report.when == "call" else (report.when,)
    for title, content in report.sections:
        if title.startswith("Captured ") and title.rsplit(" ", 1)[-1] in phases:
            scan(f"this test's {title[len('Captured ') :]}", content)
    findings = [finding for finding in _found.values() if not _allowed(item, finding)]
    _found.clear()
    if not findings:
        return report
    text = "\n\n".join(
        f"a traceback reached the user, in {' and '.join(finding.sources)}:\n{finding.traceback}"
        for finding in findings
    )
    if report.passed:
        report.outcome = "failed"
        report.longrepr = (
            f"{len(findings)} traceback(s) reached a user (bad input must get one line; "
            f"tests/tracebacks.py):\n\n{text}"
        )
    else:
        report.sections.append(("keel: tracebacks that reached a user", text))
    return report
