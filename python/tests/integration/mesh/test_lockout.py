"""Idle connections cannot lock a node out of its mesh (issue 8, item 2).

An attacker holds hundreds of TCP connections open without a word, from one
address or from several (loopback addresses 127.0.0.x), and opens a new one
for every one the daemon closes. Meanwhile a legitimate node joins and
messages flow, with the clients' usual timeouts; under a low descriptor limit
the control socket still answers, and the node takes peers again once the
attacker lets go. The daemons' logs hold no traceback.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence

import pytest
from keel.service import RESERVE

from .nodes import FAST, Node, wait_until

ATTACKERS = [f"127.0.0.{n}" for n in range(2, 12)]  # ten source addresses, none the nodes' own


class IdleFlood:
    """``count`` idle connections to ``address``, from ``sources`` in turn, each one reopened
    once the daemon closes it (at most ``rounds_per_second`` reopening rounds a second)."""

    def __init__(
        self,
        address: str,
        sources: Sequence[str],
        count: int,
        *,
        rounds_per_second: float = 5.0,
    ) -> None:
        host, _, port = address.rpartition(":")
        self.target = (host, int(port))
        self.sources = list(sources)
        self.count = count
        self.pause = 1.0 / rounds_per_second
        self.opened = 0
        self.closed_by_daemon = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="idle-flood", daemon=True)
        self._selector = selectors.DefaultSelector()

    def __enter__(self) -> IdleFlood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the flood thread did not stop"

    def held(self) -> int:
        return len(self._selector.get_map())

    def _open(self) -> None:
        source = self.sources[self.opened % len(self.sources)]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.bind((source, 0))
            code = sock.connect_ex(self.target)
        except OSError as exc:  # the attacker's own limits: note it, keep going
            sock.close()
            self.failures.append(str(exc))
            return
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self.failures.append(os.strerror(code))
            return
        self.opened += 1
        self._selector.register(sock, selectors.EVENT_READ)

    def _run(self) -> None:
        try:
            for _ in range(self.count):
                self._open()
            while not self._stop.is_set():
                for key, _ in self._selector.select(timeout=self.pause):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        data = sock.recv(4096)
                    except OSError:
                        data = b""
                    if not data:  # the daemon closed it: take another in its place
                        self._selector.unregister(sock)
                        sock.close()
                        self.closed_by_daemon += 1
                self._stop.wait(self.pause)
                while self.held() < self.count and not self._stop.is_set():
                    self._open()
        finally:
            for key in list(self._selector.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            self._selector.close()


@pytest.fixture
def target(mesh_nodes: Callable[..., Node]) -> Iterator[Node]:
    a = mesh_nodes("a").start()
    yield a
    no_traceback(a)


def no_traceback(*nodes: Node) -> None:
    for node in nodes:
        log = node.log()
        assert "Traceback" not in log, f"{node.name}'s log has a traceback:\n{log[-4000:]}"


def join_and_talk(a: Node, b: Node) -> None:
    """B joins A's mesh and they message each other, with the clients' usual timeouts."""
    b.join(a)  # MeshClient.join: its default 30 s
    a.wait_connected(b)
    b.client.send(a.node_id, "lockout", b"through the flood")
    got = a.client.recv("lockout", wait=20)
    assert [m.data for m in got] == [b"through the flood"]
    a.client.ack()
    a.client.send(b.node_id, "lockout", b"and back")
    got = b.client.recv("lockout", wait=20)
    assert [m.data for m in got] == [b"and back"]
    b.client.ack()


def test_300_idle_connections_from_one_address_lock_nobody_out(
    target: Node, mesh_nodes: Callable[..., Node]
) -> None:
    a = target
    with IdleFlood(a.address, ATTACKERS[:1], 300) as flood:
        wait_until(lambda: flood.opened >= 300, timeout=30, what="300 idle connections")
        a.wait_log("refusing a connection")  # the flood is over the limits
        b = mesh_nodes("b").start()
        join_and_talk(a, b)
        # the refused ones were closed at once, not kept
        wait_until(lambda: flood.closed_by_daemon >= 300 - 8, timeout=30, what="refusals")
    a.wait_log("refusing a connection from 127.0.0.2: 8 handshakes from 127.0.0.2 are in progress")
    no_traceback(b)


def test_300_idle_connections_from_ten_addresses_lock_nobody_out(
    target: Node, mesh_nodes: Callable[..., Node]
) -> None:
    a = target
    with IdleFlood(a.address, ATTACKERS, 300) as flood:
        wait_until(lambda: flood.opened >= 300, timeout=30, what="300 idle connections")
        a.wait_log("refusing a connection")  # the flood is over the limits
        b = mesh_nodes("b").start()
        join_and_talk(a, b)
    no_traceback(b)


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_out_of_descriptors_the_control_socket_answers_and_the_node_recovers(
    target: Node, mesh_nodes: Callable[..., Node]
) -> None:
    a = target
    assert a.process is not None
    pid = a.process.pid
    # Room for 24 more descriptors: far fewer than 64 handshakes need.
    limit = open_descriptors(pid) + 24
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={limit}:{limit}"], check=True)
    with IdleFlood(a.address, ATTACKERS, 300):
        wait_until(
            lambda: open_descriptors(pid) >= limit - RESERVE - 1,
            timeout=30,
            what="the daemon to run out of descriptors",
        )
        # The control socket still answers, the CLI too, admin verbs included.
        assert a.status()["member"]
        peers = a.cli("peers", "--json", timeout=30)
        assert peers.returncode == 0, peers.stderr
        invite = a.cli("invite", timeout=30)
        assert invite.returncode == 0, invite.stderr
        assert invite.stdout.startswith("keelinv1.")
    a.wait_log("not accepting peer connections until some close")
    # The attacker lets go: the node takes peers again.
    b = mesh_nodes("b").start()
    join_and_talk(a, b)
    assert open_descriptors(pid) < limit
    no_traceback(b)


def test_a_slow_handshake_is_closed_at_its_deadline_even_when_the_session_is_quiet(
    mesh_nodes: Callable[..., Node],
) -> None:
    """The intake's deadline holds on its own: a connection that sends nothing is closed."""
    a = mesh_nodes("a", config={**FAST, "handshake_timeout": 1}).start()
    host, _, port = a.address.rpartition(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.settimeout(30)
        assert sock.recv(1) == b""  # closed by the daemon, not by us
    a.wait_log("handshake not finished after 1 s")
    no_traceback(a)
