"""Fleet hosts for the integration tests: a namespace, a mesh node, a fleet daemon (and a watch).

Each :class:`FleetHost` is one keel host of the test's topology: a network
namespace of the harness, a real ``keel mesh serve`` inside it, and a real
``keel fleet serve`` (optionally a ``keel watch serve`` with a process-backend
agent) beside it, all sharing the host's ledger. Daemons are killed at the
end of the test whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keel.api import call
from keel.errors import ApiError
from keel.ledger.store import Ledger

from tests.harness.netns import Host
from tests.integration.mesh.nodes import FAST, Node, wait_until
from tests.integration.watch_support import AGENT

PORT = 7400


class Daemon:
    """A keel daemon run as ``python -m keel ARGV`` inside a host, logging to a file."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, prefix: Sequence[str]) -> None:
        self.name = name
        self.argv = [*prefix, sys.executable, "-m", "keel", *argv]
        self.log_path = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        assert self.process is None or self.process.poll() is not None
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self, signum: int = signal.SIGKILL) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signum)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class FleetHost:
    def __init__(
        self,
        host: Host,
        directory: Path,
        *,
        operators: Sequence[str] = (),
        watch_agents: Sequence[str] = (),
        witness_every: float = 0.5,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.host = host
        self.label = host.label
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ledger = directory / "ledger.db"
        self.socket = directory / "fleet.sock"
        self.mesh = Node(
            directory / "mesh", listen=f"{host.address}:{PORT}", ledger=self.ledger,
            config=FAST, prefix=host.argv([]), name=host.label,
        )  # fmt: skip
        self.watch: Daemon | None = None
        services = ["mesh"]
        if watch_agents:
            services.insert(0, "watch")
            self.watch = Daemon(
                "watch",
                ["watch", "serve", "--config", str(self._watch_config(watch_agents))],
                directory / "watch.log",
                host.argv([]),
            )
        self.config_path = directory / "fleet.json"
        self.settings: dict[str, Any] = {
            "socket": str(self.socket),
            "ledger": str(self.ledger),
            "mesh": str(self.mesh.socket),
            "state": str(directory / "fleet"),
            "host": host.label,
            "witness_every": witness_every,
            "request_timeout": 3,
            "watch": str(directory / "watch.sock") if watch_agents else None,
            "services": services,
            "operators": list(operators),
            "current_system": str(directory / "current-system"),
            "profile": str(directory / "system"),
        }
        self.settings.update(config or {})
        self.write_config()
        self.fleet = Daemon(
            "fleet",
            ["fleet", "serve", "--config", str(self.config_path)],
            directory / "fleet.log",
            host.argv([]),
        )

    def _watch_config(self, agents: Sequence[str]) -> Path:
        port = 8000
        entries = {}
        for offset, name in enumerate(agents):
            entries[name] = {
                "command": [sys.executable, str(AGENT), "--port", str(port + offset)],
                "probes": [
                    {"type": "http", "url": f"http://127.0.0.1:{port + offset}/health",
                     "interval": 0.5, "timeout": 0.4, "failures": 2, "grace": 3}
                ],
                "stop_timeout": 2,
            }  # fmt: skip
        path = self.directory / "watch.json"
        path.write_text(
            json.dumps(
                {
                    "backend": "process",
                    "socket": str(self.directory / "watch.sock"),
                    "ledger": str(self.ledger),
                    "state_file": str(self.directory / "processes.json"),
                    "host": self.label,
                    "agents": entries,
                }
            )
        )
        return path

    def write_config(self) -> None:
        self.config_path.write_text(json.dumps(self.settings))

    # --- life cycle -------------------------------------------------------------------

    def start(self) -> FleetHost:
        if not self.mesh.alive():
            self.mesh.start()
        if self.watch is not None and not self.watch.alive():
            self.watch.start()
        self.fleet.start()
        wait_until(self._serving, timeout=30, what=f"{self.label}'s fleet daemon to serve")
        return self

    def _serving(self) -> bool:
        if not self.fleet.alive():
            raise AssertionError(f"{self.label}'s fleet daemon exited:\n{self.fleet.log()[-3000:]}")
        try:
            return bool(self.call("status", timeout=2).get("node"))
        except ApiError:
            return False

    def kill(self) -> None:
        self.fleet.kill()
        if self.watch is not None:
            self.watch.kill()
        self.mesh.kill()

    # --- asking ---------------------------------------------------------------------

    def call(self, verb: str, args: dict[str, Any] | None = None, timeout: float = 30) -> Any:
        return call(self.socket, verb, args, timeout=timeout, service="fleet")

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "keel", "fleet", *args, "--socket", str(self.socket)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)

    @property
    def node_id(self) -> str:
        return self.mesh.node_id

    def witnessed(self) -> dict[str, dict[str, Any]]:
        return {w["node"]: w for w in self.call("witness")["witnessed"]}

    def alarms(self) -> list[dict[str, Any]]:
        return list(self.call("witness")["alarms"])

    def ledger_entries(self, kind: str | None = None) -> list[dict[str, Any]]:
        with Ledger.open(self.ledger, create=False) as ledger:
            entries = [entry.as_dict() for _, entry in ledger.entries()]
        return [e for e in entries if kind is None or e["kind"] == kind]

    def ledger_size(self) -> int:
        with Ledger.open(self.ledger, create=False) as ledger:
            return ledger.size()


def mesh_of(hosts: Sequence[FleetHost], timeout: float = 60) -> None:
    """Join every host's mesh node to the first one's mesh and wait until all are connected."""
    first = hosts[0].mesh
    for other in hosts[1:]:
        other.mesh.join(first)
    for fleet_host in hosts:
        fleet_host.mesh.wait_connected(
            *[h.mesh for h in hosts if h is not fleet_host], timeout=timeout
        )


def wait_witnessed(
    witness: FleetHost, others: Sequence[FleetHost], *, above: dict[str, int] | None = None,
    timeout: float = 60,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Until ``witness`` has cosigned each of ``others`` (beyond the sizes in ``above``)."""
    above = above or {}

    def done() -> dict[str, dict[str, Any]] | None:
        seen = witness.witnessed()
        for other in others:
            record = seen.get(other.node_id)
            if record is None or record["size"] <= above.get(other.node_id, -1):
                return None
        return seen

    result: dict[str, dict[str, Any]] = wait_until(
        done, timeout=timeout, what=f"{witness.label} to witness {[o.label for o in others]}",
        step=0.2,
    )  # fmt: skip
    return result


def elapsed(function: Any) -> tuple[Any, float]:
    started = time.monotonic()
    result = function()
    return result, time.monotonic() - started
