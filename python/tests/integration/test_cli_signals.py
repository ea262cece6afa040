"""keel's commands end at once and quietly on SIGINT and SIGTERM (keel.signals).

Also when the signals were inherited as ignored (a background job of a
script, ``nohup``, CI runners), and at any moment of start-up once keel's code
runs. ``keel ledger tail --follow`` is the long-running command under test;
every command gets the same handling from ``keel.cli.main``.
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from keel.ledger import Ledger

from tests.harness.processes import Lines, Processes

KEEL_SCRIPT = Path(sys.executable).with_name("keel")
ENTRIES = {
    "python -m keel": [sys.executable, "-m", "keel"],
    "keel script": [str(KEEL_SCRIPT)],
}


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    with Ledger.open(path) as ledger:
        ledger.append(source="test", kind="hello")
    return path


def ignore_stop_signals() -> None:
    """What a shell does to a background job (``cmd &``) and ``nohup`` to SIGHUP."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def keel_handles_signals(pid: int) -> bool:
    """Has the process installed keel's handlers? Python alone never catches SIGTERM."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # it is gone already: nothing more to wait for
    match = re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.MULTILINE)
    assert match is not None, status
    return bool(int(match.group(1), 16) >> (signal.SIGTERM - 1) & 1)


def wait_for_handlers(process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not keel_handles_signals(process.pid):
        assert time.monotonic() < deadline, "keel never installed its signal handlers"
        time.sleep(0.0005)


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("inherited", ["default", "ignored"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_follow_ends_on_signal(
    db: Path, processes: Processes, entry: str, inherited: str, signum: int
) -> None:
    if not Path(ENTRIES[entry][0]).exists():
        pytest.skip(f"no {ENTRIES[entry][0]} (keel is not installed as a script)")
    follower = processes.popen(
        [*ENTRIES[entry], "ledger", "tail", "--follow", "--db", str(db)],
        preexec_fn=ignore_stop_signals if inherited == "ignored" else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert "hello" in Lines(follower.stdout).next()  # started, and following
    follower.send_signal(signum)
    _, err = follower.communicate(timeout=60)
    assert follower.returncode == 128 + signum
    assert err == b""


def test_signal_at_random_moments_of_start_up_is_quiet(db: Path, processes: Processes) -> None:
    """From the moment keel's code runs: during imports, parsing, opening, following."""
    rng = random.Random()
    appended = 0
    for attempt in range(24):
        follow = attempt % 2 == 0
        command = ["tail", "--follow"] if follow else ["append", "--source", "t", "--kind", "k"]
        signum = signal.SIGINT if attempt % 4 < 2 else signal.SIGTERM
        process = processes.popen(
            [sys.executable, "-m", "keel", "ledger", *command, "--db", str(db)],
            preexec_fn=ignore_stop_signals if attempt % 3 == 0 else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        wait_for_handlers(process)
        time.sleep(rng.uniform(0, 0.2))  # a random moment, not a wait for anything
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
        assert err == b"", (attempt, command, err.decode())
        if follow:
            assert process.returncode == 128 + signum, (attempt, command)
        else:
            # An append that finished before the signal exits 0; one the signal
            # caught while Python was exiting ends with 128 + signum, or by the
            # signal itself once Python has given its handlers back.
            assert process.returncode in (0, 128 + signum, -signum), (attempt, command)
            appended += process.returncode == 0
    # Interrupted appends rolled back whole: the ledger verifies.
    with Ledger.open(db, read_only=True) as ledger:
        report = ledger.verify(None)
    assert 1 + appended <= report.size <= 1 + 12


FINALIZER = """
import os, signal, sys, time
from keel import signals

signals.install()

class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler runs here, where Python cannot raise out

Finalized()  # collected at once: the signal arrives inside __del__
time.sleep(30)
print("ran on", flush=True)
"""


def test_signal_inside_a_finalizer_still_ends_the_process(processes: Processes) -> None:
    process = processes.popen(
        [sys.executable, "-c", FINALIZER], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert (out, err) == (b"", b"")


SWALLOWED = """
import os, signal, sys, time
from keel import signals

def lose_a_signal(signum):
    try:
        os.kill(os.getpid(), signum)
        time.sleep(30)
    except BaseException:
        pass  # what some C code does with an exception it did not expect

signals.install()
try:
    if sys.argv[1] == "before the command":
        lose_a_signal(signal.SIGINT)
        with signals.handled():
            print("the command started", flush=True)
    else:
        with signals.handled():
            lose_a_signal(signal.SIGTERM)
            time.sleep(30)  # the alarm ends this
            print("the command ran on", flush=True)
except KeyboardInterrupt as exc:
    sys.exit(exc.exit_code)
"""


@pytest.mark.parametrize(
    ("where", "status"),
    [("before the command", 128 + signal.SIGINT), ("in the command", 128 + signal.SIGTERM)],
)
def test_a_lost_signal_still_ends_the_command(
    processes: Processes, where: str, status: int
) -> None:
    process = processes.popen(
        [sys.executable, "-c", SWALLOWED, where], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = process.communicate(timeout=60)
    assert process.returncode == status
    assert (out, err) == (b"", b"")
