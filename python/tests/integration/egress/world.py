"""A small internet and one keel host, as network namespaces, for the egress tests.

- ``inet``: the authoritative DNS server for the test zones
  (``examples/egress/internet.py``, which the demo uses too)
  on 10.200.N.2 and fd42:N::2, and TCP/UDP services on several IPv4 and IPv6
  addresses (``SERVICES_V4``, ``SERVICES_V6``, on its loopback, routed to it).
- ``host``: the machine keel protects: ``keel egress serve`` runs there as root
  (it alone has CAP_NET_ADMIN), agents run there as plain uids.

:class:`World` starts and kills the daemon, runs agents (``probe.py`` under a
uid, driven over its stdin) and reads keel's table straight from the kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from keel.api import call
from keel.errors import ApiError

from tests.harness.common import dies_with_us
from tests.harness.netns import Host, Network

HERE = Path(__file__).parent
INTERNET = HERE.parents[3] / "examples" / "egress" / "internet.py"
AGENT_UID = 64001
OTHER_UID = 64002  # a user egress does not manage
SECOND_AGENT_UID = 64003
SERVICES_V4 = [f"192.0.2.{n}" for n in range(10, 20)]
SERVICES_V6 = [f"2001:db8::{n:x}" for n in range(0x10, 0x20)]
FAR_RESOLVER = "198.51.100.53"  # a resolver the agent might try instead of keel's

ZONES = """\
$ORIGIN allowed.test.
@        {ttl} IN SOA ns.allowed.test. admin.allowed.test. 1 60 60 600 {ttl}
@        {ttl} IN NS  ns.allowed.test.
ns       {ttl} IN A   10.0.0.1
www      {ttl} IN A   192.0.2.10
www      {ttl} IN AAAA 2001:db8::10
twin     {ttl} IN A   192.0.2.10
dual     {ttl} IN A   192.0.2.11
dual     {ttl} IN AAAA 2001:db8::11
short    {short} IN A 192.0.2.12
cached   {cached} IN A 192.0.2.19
alias    {ttl} IN CNAME edge.cdn.test.
$ORIGIN cdn.test.
@        {ttl} IN SOA ns.cdn.test. admin.cdn.test. 1 60 60 600 {ttl}
@        {ttl} IN NS  ns.cdn.test.
edge     {ttl} IN A   192.0.2.13
edge     {ttl} IN AAAA 2001:db8::13
$ORIGIN other.test.
@        {ttl} IN SOA ns.other.test. admin.other.test. 1 60 60 600 {ttl}
@        {ttl} IN NS  ns.other.test.
www      {ttl} IN A   192.0.2.14
into     {ttl} IN CNAME www.allowed.test.
$ORIGIN wild.test.
@        {ttl} IN SOA ns.wild.test. admin.wild.test. 1 60 60 600 {ttl}
@        {ttl} IN NS  ns.wild.test.
@        {ttl} IN A   192.0.2.15
a        {ttl} IN A   192.0.2.16
a.b      {ttl} IN A   192.0.2.17
$ORIGIN badwild.test.
@        {ttl} IN SOA ns.badwild.test. admin.badwild.test. 1 60 60 600 {ttl}
@        {ttl} IN NS  ns.badwild.test.
@        {ttl} IN A   192.0.2.18
"""


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


class Agent:
    """``probe.py`` running as ``uid`` inside a host: an agent's hands."""

    def __init__(self, host: Host, uid: int, workdir: Path) -> None:
        argv = host.argv(
            [
                "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                sys.executable, str(HERE / "probe.py"),
            ]
        )  # fmt: skip
        self.uid = uid
        self.stderr = (workdir / f"agent-{uid}.err").open("wb")
        self.process = subprocess.Popen(
            dies_with_us(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            cwd="/",
            env={**os.environ, "PYTHONPATH": str(HERE.parents[2] / "src")},
        )

    def do(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"the agent (uid {self.uid}) died; see {self.stderr.name}")
        result: dict[str, Any] = json.loads(line)
        return result

    def resolve(
        self,
        name: str,
        rdtype: str = "A",
        *,
        server: str,
        tcp: bool = False,
        source_port: int = 0,
    ) -> dict[str, Any]:
        return self.do(
            "resolve", name=name, type=rdtype, server=server, tcp=tcp, source_port=source_port
        )

    def connect(
        self, address: str, port: int = 80, proto: str = "tcp", timeout: float = 3.0
    ) -> dict[str, Any]:
        return self.do("connect", address=address, port=port, proto=proto, timeout=timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.stderr.close()


class World:
    def __init__(self, network: Network) -> None:
        self.network = network
        self.inet = network.host("inet")
        self.host = network.host("host")
        link = network.connect(self.host, self.inet)
        self.dns_v4 = self.inet.address
        n = network.number % 250
        self.dns_v6 = f"fd42:{n:x}::2"
        for end, address in ((self.host, f"fd42:{n:x}::1"), (self.inet, self.dns_v6)):
            iface = link.a_iface if end is self.host else link.b_iface
            end.run("ip", "-6", "addr", "add", f"{address}/64", "dev", iface, "nodad")
        self.host.run("ip", "route", "add", "default", "via", self.dns_v4)
        self.host.run("ip", "-6", "route", "add", "default", "via", self.dns_v6)
        for address in SERVICES_V4:
            self.inet.run("ip", "addr", "add", f"{address}/32", "dev", "lo")
        for address in SERVICES_V6:
            self.inet.run("ip", "-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad")
        self.inet.run("ip", "route", "add", "default", "via", self.host.address)
        self.workdir = Path(tempfile.mkdtemp(prefix="kegr-"))  # short: socket paths <= 108 bytes
        self.config_path = self.workdir / "egress.json"
        self.socket = self.workdir / "egress.sock"
        self.ledger = self.workdir / "ledger.db"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemon_logs: list[Path] = []
        self.agents: list[Agent] = []
        self.internet: Any = None

    # --- the internet -------------------------------------------------------

    def start_internet(self, *, ttl: int = 300, short: int = 1, cached: int = 6) -> None:
        zone = self.workdir / "zones.txt"
        zone.write_text(ZONES.format(ttl=ttl, short=short, cached=cached))
        self.internet = self.inet.spawn(
            sys.executable, str(INTERNET), "--zone", str(zone),
            "--dns", self.dns_v4, "--dns", self.dns_v6,
        )  # fmt: skip

        def ready() -> bool:
            if not self.internet.alive():
                raise AssertionError(f"internet.py died:\n{self.internet.output()}")
            return "ready" in self.internet.output().splitlines()

        wait_until(ready, timeout=30, what="the internet to start")

    def queries(self, name: str) -> int:
        """How often the authoritative server was asked for ``name``."""
        return sum(
            1 for line in self.internet.output().splitlines() if line.startswith(f"query {name} ")
        )

    # --- keel -----------------------------------------------------------------

    def configure(self, agents: dict[str, dict[str, Any]], **settings: Any) -> dict[str, Any]:
        config = {
            "socket": str(self.socket),
            "ledger": str(self.ledger),
            "checkpoint_every": None,
            "upstream": [self.dns_v4],
            "min_ttl": 30,
            "grace": 5,
            "agents": agents,
            **settings,
        }
        self.config_path.write_text(json.dumps(config))
        return config

    def start_daemon(self, *, wait: bool = True) -> subprocess.Popen[bytes]:
        log = self.workdir / f"egress-{len(self.daemon_logs)}.log"
        self.daemon_logs.append(log)
        with log.open("wb") as out:
            self.daemon = subprocess.Popen(
                dies_with_us(
                    self.host.argv(
                        [
                            sys.executable,
                            "-m",
                            "keel",
                            "egress",
                            "serve",
                            "--config",
                            str(self.config_path),
                            "-v",
                        ]
                    )
                ),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "KEEL_DEV": "0"},
            )
        if wait:
            self.wait_ready()
        return self.daemon

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            if self.daemon is not None and self.daemon.poll() is not None:
                raise AssertionError(
                    f"keel egress exited with {self.daemon.returncode}:\n{self.log()}"
                )
            try:
                self.status()
            except ApiError:
                return False
            return True

        wait_until(ready, timeout=timeout, what="keel egress to serve")

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.daemon_logs if p.exists())

    def kill_daemon(self) -> None:
        assert self.daemon is not None
        self.daemon.send_signal(signal.SIGKILL)
        self.daemon.wait()

    def stop_daemon(self) -> int:
        assert self.daemon is not None
        self.daemon.send_signal(signal.SIGTERM)
        return self.daemon.wait(timeout=30)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = call(self.socket, "status", service="egress", timeout=5)
        return result

    def keel(self, *argv: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return self.host.run(
            sys.executable, "-m", "keel", *argv, check=check, env={**os.environ, "KEEL_DEV": "0"}
        )

    def ledger_entries(self) -> list[dict[str, Any]]:
        out = self.keel(
            "ledger", "tail", "--db", str(self.ledger), "-n", "100000", "--json", check=True
        )
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    # --- the kernel -------------------------------------------------------------

    def nft_json(self, *what: str) -> list[dict[str, Any]]:
        out = self.host.run("nft", "-j", "list", *what, check=False)
        if out.returncode != 0:
            return []
        items: list[dict[str, Any]] = json.loads(out.stdout)["nftables"]
        return items

    def elements(self, set_name: str) -> dict[str, int]:
        """address -> seconds left, of one of keel's sets."""
        found: dict[str, int] = {}
        for item in self.nft_json("set", "inet", "keel", set_name):
            for element in item.get("set", {}).get("elem", []):
                if isinstance(element, dict):
                    found[element["elem"]["val"]] = element["elem"].get("expires", 0)
                else:
                    found[str(element)] = 0
        return found

    def ruleset_text(self) -> str:
        return self.host.run("nft", "list", "ruleset").stdout

    # --- agents -------------------------------------------------------------------

    def agent(self, uid: int = AGENT_UID) -> Agent:
        agent = Agent(self.host, uid, self.workdir)
        self.agents.append(agent)
        return agent

    def close(self) -> None:
        for agent in self.agents:
            agent.close()
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.kill()
            self.daemon.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)
