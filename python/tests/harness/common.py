"""What the network-namespace and container harnesses share: the run id that
makes every name unique to this test run, command execution with readable
errors, and stale-leftover detection.

Everything the harness creates is named ``kh<pid>-...`` (``kh`` for keel
harness, ``<pid>`` the pytest process): several engineers run tests on the
same machine at once, and a name with a live pid belongs to a live run. Names
whose pid is dead belong to a run that was killed before it could clean up;
:func:`stale` says so, and the session fixtures remove them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence

RUN_ID = f"kh{os.getpid()}"
_RUN_NAME = re.compile(r"kh(\d+)-")


class HarnessError(Exception):
    """A harness operation failed; the message has the command and its output."""


# Who reads what the harness's long-lived processes and containers printed, when
# they stop: called with a name for the source and its text (the test session's
# check that no traceback reached a user registers here: tests/tracebacks.py).
output_readers: list[Callable[[str, str], None]] = []


def report_output(source: str, text: str) -> None:
    for reader in output_readers:
        reader(source, text)


def stale(name: str) -> bool:
    """True for a harness name (``kh<pid>-...``) whose run is no longer alive."""
    match = _RUN_NAME.match(name)
    if match is None:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    # A live pid may be a recycled one, but it may also be someone's run that
    # is not pytest (a script using the harness): never touch a live pid's names.
    return False


def describe(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60,
    input: str | bytes | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, text output captured; a failure raises with its stderr."""
    data = input.encode() if isinstance(input, str) else input
    try:
        proc = subprocess.run(
            list(argv), input=data, capture_output=True, timeout=timeout, check=False,
            env=dict(env) if env is not None else None,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"`{describe(argv)}` did not finish within {timeout:g} s") from exc
    except FileNotFoundError as exc:
        raise HarnessError(f"`{argv[0]}` not found (is its package installed?)") from exc
    result = subprocess.CompletedProcess(
        proc.args,
        proc.returncode,
        proc.stdout.decode(errors="replace"),
        proc.stderr.decode(errors="replace"),
    )
    if check and result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip())[-2000:]
        raise HarnessError(f"`{describe(argv)}` exited with {result.returncode}: {output}")
    return result


def dies_with_us(argv: Sequence[str], signal_name: str = "KILL") -> list[str]:
    """``argv`` prefixed so that it gets SIGKILL (or ``signal_name``) if pytest dies.

    The parent-death signal survives ``exec``, so this also holds through
    ``ip netns exec``, which execs its command in place.
    """
    return ["setpriv", "--pdeathsig", signal_name, "--", *argv]


def terminate(process: subprocess.Popen[bytes], *, grace: float = 5.0) -> int:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds; the exit status."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    return process.returncode
