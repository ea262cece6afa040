"""``keel mesh recv`` ends at once and quietly on SIGINT and SIGTERM (issue 8, item 6).

Also when it inherited the signals as ignored (a background job, ``nohup``,
CI runners). The handling is the shared one of ``keel.signals`` (installed by
the ``keel`` entry point for every command); this checks that the mesh's
long-running command, blocked in a ``recv`` with a wait, is covered by it.
"""

from __future__ import annotations

import importlib.util
import os
import select
import signal
import subprocess
import sys

import pytest

from .nodes import Node

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("keel.signals") is None,
    reason="keel.signals (the shared SIGINT/SIGTERM handling) is not merged into this branch yet",
)


def ignore_stop_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def first_line(process: subprocess.Popen[bytes], timeout: float = 60) -> bytes:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, "recv printed nothing"
    return process.stdout.readline()


@pytest.mark.parametrize("inherited", ["default", "ignored"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_recv_ends_on_signal(pair: tuple[Node, Node], inherited: str, signum: int) -> None:
    a, b = pair
    receiver = subprocess.Popen(
        [sys.executable, "-m", "keel", "mesh", "recv", "--topic", "sig", "--socket", str(b.socket)],
        preexec_fn=ignore_stop_signals if inherited == "ignored" else None,  # noqa: PLW1509
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        a.client.send(b.node_id, "sig", b"first")
        assert b"first" in first_line(receiver)  # running, and waiting in its next recv
        receiver.send_signal(signum)
        _, err = receiver.communicate(timeout=30)
    finally:
        if receiver.poll() is None:
            os.killpg(receiver.pid, signal.SIGKILL)
            receiver.wait()
    assert receiver.returncode == 128 + signum
    assert err == b""
