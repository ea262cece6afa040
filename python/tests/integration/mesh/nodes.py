"""Real ``keel mesh serve`` processes for the integration tests, and a raw peer.

:class:`Node` writes a node's config file (``NAME.json`` beside its
directory: the directory, the listen address, its control socket
``DIR/mesh.sock``, its ledger or none, and the settings), runs the daemon
on it as a subprocess (optionally inside a network namespace of the
harness), waits for its control socket, and is killed at the end of the
test whatever happens. :class:`RawPeer` speaks the wire
protocol with the pure :class:`~keel.mesh.session.Session` over a plain
socket, so a test can be a well-behaved member and then misbehave: replay,
reorder, truncate, tamper, forge.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from keel.api import call
from keel.errors import ApiError
from keel.mesh import packets
from keel.mesh.client import MeshClient
from keel.mesh.identity import NodeIdentity
from keel.mesh.invite import InviteToken
from keel.mesh.kem import Kem, get_kem
from keel.mesh.session import Closed, Event, HandshakeComplete, Message, NeedData, Session

FAST = {
    "handshake_timeout": 2,
    "keepalive_interval": 1,
    "idle_timeout": 4,
    "ack_timeout": 2,
    "retry_base": 0.2,
    "retry_cap": 2,
    "dial_base": 0.2,
    "dial_cap": 2,
    "connect_timeout": 2,
}


def wait_until(
    predicate: Callable[[], Any], *, timeout: float, what: str, step: float = 0.05
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


class Node:
    def __init__(
        self,
        directory: Path,
        *,
        listen: str = "127.0.0.1:0",
        ledger: Path | None = None,
        config: dict[str, Any] | None = None,
        prefix: Sequence[str] = (),
        name: str = "node",
    ) -> None:
        self.directory = directory
        self.listen = listen
        self.ledger = ledger
        self.prefix = list(prefix)
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = directory.parent / f"{directory.name}.log"
        self.config_path = directory.parent / f"{directory.name}.json"
        self.socket = directory / "mesh.sock"
        self.settings = dict(config if config is not None else FAST)
        directory.mkdir(parents=True, exist_ok=True)
        self.client = MeshClient(self.socket, timeout=20)
        self._id: str | None = None

    def write_config(self) -> None:
        """The config ``serve`` reads: written again at each start (the port it got)."""
        config = {
            **self.settings,
            "directory": str(self.directory),
            "listen": self.listen,
            "socket": str(self.socket),
            "ledger": None if self.ledger is None else str(self.ledger),
        }
        self.config_path.write_text(json.dumps(config))

    def argv(self) -> list[str]:
        return [*self.prefix, sys.executable, "-m", "keel", "mesh", "serve",
                "--config", str(self.config_path)]  # fmt: skip

    def start(self, timeout: float = 30.0) -> Node:
        assert self.process is None or self.process.poll() is not None
        self.write_config()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited at start:\n{self.log()[-3000:]}")
            try:
                call(self.socket, "status", timeout=2)
            except ApiError:
                return False
            return True

        wait_until(ready, timeout=timeout, what=f"{self.name} to serve its control socket")
        status = self.status()
        self._id = str(status["node"])
        if self.listen.endswith(":0"):  # keep the port the kernel chose across restarts
            self.listen = str(status["addresses"][0])
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int | None:
        return self._signal(signal.SIGTERM)

    def kill(self) -> int | None:
        return self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        os.killpg(self.process.pid, signum)
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait(timeout=15)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def status(self) -> dict[str, Any]:
        return self.client.status()

    @property
    def node_id(self) -> str:
        if self._id is None:
            self._id = str(self.status()["node"])
        return self._id

    @property
    def address(self) -> str:
        return str(self.status()["addresses"][0])

    def connected(self) -> list[str]:
        return list(self.status()["connected"])

    def cli(
        self, *args: str, input: bytes | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """``keel mesh ARGS`` against this node (its socket, or its config file)."""
        where = ["--config", str(self.config_path)] if args[0] in ("id", "check-config") else []
        where = where or ["--socket", str(self.socket)]
        argv = [*self.prefix, sys.executable, "-m", "keel", "mesh", *args, *where]
        done = subprocess.run(argv, input=input, capture_output=True, timeout=timeout, check=False)
        return subprocess.CompletedProcess(
            argv, done.returncode, done.stdout.decode(errors="replace"),
            done.stderr.decode(errors="replace"),
        )  # fmt: skip

    def invite(self, uses: int = 1, ttl: float = 600) -> str:
        return self.client.invite(uses=uses, ttl=ttl)

    def join(self, other: Node) -> None:
        self.client.join(other.invite())

    def wait_log(self, text: str, timeout: float = 15) -> None:
        wait_until(
            lambda: text in self.log(), timeout=timeout, what=f"{text!r} in {self.name}'s log"
        )

    def wait_connected(self, *others: Node, timeout: float = 30) -> None:
        ids = {o.node_id for o in others}
        wait_until(lambda: ids <= set(self.connected()), timeout=timeout,
                   what=f"{self.name} to connect to {', '.join(o.name for o in others)}")  # fmt: skip


_KEM: Kem | None = None


def kem() -> Kem:
    global _KEM  # noqa: PLW0603 (one KEM object per test process)
    if _KEM is None:
        _KEM = get_kem()
    return _KEM


class RawPeer:
    """One connection to a daemon, driven by hand with the pure Session."""

    def __init__(
        self,
        identity: NodeIdentity,
        address: str,
        remote_static: bytes,
        *,
        invite: InviteToken | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.identity = identity
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.session = Session.initiator(
            identity, remote_static=remote_static, kem=kem(), clock=time.monotonic,
            invite=invite, extra=extra or {},
        )  # fmt: skip
        self.events: list[Event] = []

    def handshake(self) -> HandshakeComplete:
        self.sock.sendall(self.session.start())
        done = self.read_until(lambda e: isinstance(e, HandshakeComplete | Closed))
        assert isinstance(done, HandshakeComplete), f"handshake ended with {done}"
        return done

    def read_until(self, wanted: Callable[[Event], bool], timeout: float = 10) -> Event:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if wanted(event):
                    return event
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching event in {timeout:g} s: {self.events}")
            self.pump(deadline - time.monotonic())

    def pump(self, timeout: float) -> None:
        self.sock.settimeout(max(0.01, timeout))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        except ConnectionError:
            data = b""
        self.session.receive_data(data)
        while True:
            event = self.session.next_event()
            out = self.session.data_to_send()
            if out:
                self.sock.sendall(out)
            if isinstance(event, NeedData):
                return
            self.events.append(event)
            if isinstance(event, Closed):
                return

    def received(self) -> list[packets.Packet]:
        return [packets.decode(e.data) for e in self.events if isinstance(e, Message)]

    def closed(self, timeout: float = 10) -> Closed:
        """Wait for the daemon to end the connection (CLOSE or plain EOF)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if isinstance(event, Closed):
                    return event
            try:
                self.pump(deadline - time.monotonic())
            except Exception as exc:  # the daemon may cut us off mid-frame: that counts
                return Closed(f"connection broken: {exc}", clean=False)
        raise AssertionError(f"the daemon did not close the connection within {timeout:g} s")

    def send_packet(self, packet: packets.Packet) -> bytes:
        frames = self.session.send_message(packets.encode(packet))
        self.sock.sendall(frames)
        return frames

    def close(self) -> None:
        self.sock.close()


def is_closed_by_peer(sock: socket.socket, timeout: float = 10) -> bool:
    """True once the other end closed (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True
