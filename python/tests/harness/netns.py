"""Hosts as network namespaces, joined by veth into a topology, with faults.

One :class:`Network` per test (the ``network`` fixture gives one and always
closes it)::

    a, b, c = network.host("a"), network.host("b"), network.host("c")
    link = network.connect(a, b)              # veth pair, 10.200.N.1/24 <-> .2/24
    lan = network.bridge([a, b, c])           # or N hosts on a bridge, one /24
    b.run("ping", "-c1", a.address)           # a command inside b
    server = a.spawn("python3", "-m", "http.server", "8000")   # stopped at close
    link.netem(delay_ms=50, loss_pct=1)       # tc netem on both ends of the link
    network.partition(a, b)                   # silent drop between a and b, both ways
    network.heal(a, b)                        # and back
    link.cut(); link.heal()                   # the same for one link

Every namespace is ``kh<pid>-<n>-<label>`` (``n`` counts networks) (:mod:`tests.harness.common`), so runs
by different engineers never collide. Interfaces live inside the namespaces
only (``eth0``, ``eth1``... per host in the order of its links), never in the
host's own network namespace. ``close`` kills every process of every namespace
(also those a test started itself with ``ip netns exec``) and deletes the
namespaces, which takes their veths and bridges with them.

Faults: netem sits on the egress of a link end, so ``delay_ms`` applies once
per direction when set on both ends (a ping's round trip grows by twice the
delay). Kernels without ``sch_netem`` get the same from a userspace shaper on
an NFQUEUE (:mod:`tests.harness.shaper`, IPv4 only); ``rate`` is a ``tbf``
qdisc either way. Partitions and cuts are nftables rules in a table
``inet keel_harness`` of the hosts' own namespaces that drop on *ingress*:
the sender sees no error, its packets just vanish, as in a real partition.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.common import (
    RUN_ID,
    HarnessError,
    describe,
    dies_with_us,
    report_output,
    run,
    stale,
    terminate,
)

SUBNETS = ipaddress.ip_network("10.200.0.0/16").subnets(new_prefix=24)
NETNS_DIR = Path("/run/netns")
_network_numbers = itertools.count(1)


def missing_prerequisite() -> str | None:
    """Why network namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (install {package})"
    return None


def namespaces() -> list[str]:
    """Names of all network namespaces on the machine (``ip netns list``)."""
    out = run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def pids_in(netns: str) -> list[int]:
    out = run(["ip", "netns", "pids", netns], check=False).stdout
    return [int(p) for p in out.split()]


def remove_namespace(netns: str) -> None:
    """Kill every process inside ``netns``, then delete it."""
    for _ in range(50):
        pids = pids_in(netns)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    run(["ip", "netns", "delete", netns], check=False)


def leftovers(run_id: str = RUN_ID) -> list[str]:
    """Namespaces of run ``run_id`` that still exist."""
    return [ns for ns in namespaces() if ns.startswith(f"{run_id}-")]


def sweep_stale() -> list[str]:
    """Remove the namespaces of earlier runs that died before cleaning up."""
    removed = [ns for ns in namespaces() if stale(ns)]
    for ns in removed:
        remove_namespace(ns)
    return removed


@dataclass
class Process:
    """A long-lived process inside a host; :meth:`stop` ends it and its group."""

    argv: list[str]
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        """Everything it wrote to stdout and stderr so far."""
        return self.log.read_text(errors="replace")

    def stop(self, grace: float = 5.0) -> int:
        return terminate(self.popen, grace=grace)


@dataclass
class Host:
    """One network namespace standing in for a machine."""

    label: str
    netns: str
    network: Network
    interfaces: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    processes: list[Process] = field(default_factory=list)
    queues: int = 0

    @property
    def address(self) -> str:
        """This host's first IPv4 address (of its first link)."""
        if not self.addresses:
            raise HarnessError(f"host {self.label!r} has no address yet: connect it first")
        return self.addresses[0]

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside this host."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 60,
        input: str | bytes | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside this host and wait for it."""
        return run(self.argv(argv), check=check, timeout=timeout, input=input, env=env)

    def spawn(
        self,
        *argv: str,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> Process:
        """Start a long-lived command inside this host; it is stopped at close."""
        log = self.network.workdir / f"{self.label}-{len(self.processes)}-{Path(argv[0]).name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                dies_with_us(self.argv(argv)), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None, cwd=cwd,
                start_new_session=True,
            )  # fmt: skip
        process = Process(list(argv), popen, log)
        self.processes.append(process)
        return process

    def next_queue(self) -> int:
        """A fresh NFQUEUE number in this host's namespace."""
        self.queues += 1
        return self.queues

    def nft(self, ruleset: str) -> None:
        """Load an nftables ruleset (``nft -f -``) into this host's namespace."""
        self.run("nft", "-f", "-", input=ruleset)


_netem_in_kernel: dict[str, bool] = {}
SHAPER = Path(__file__).with_name("shaper.py")


def kernel_has_netem(host: Host, iface: str) -> bool:
    """Whether ``tc netem`` works here (asked once per run, on a real interface)."""
    if "netem" not in _netem_in_kernel:
        probe = host.run("tc", "qdisc", "replace", "dev", iface, "root", "netem", check=False)
        _netem_in_kernel["netem"] = probe.returncode == 0
        host.run("tc", "qdisc", "del", "dev", iface, "root", check=False)
    return _netem_in_kernel["netem"]


@dataclass
class _Shaper:
    host: Host
    rule: list[str]
    process: Process


def _start_shaper(
    host: Host, iface: str, *, delay_ms: float, jitter_ms: float, loss_pct: float
) -> _Shaper:
    if shutil.which("iptables") is None:
        raise HarnessError(
            "this kernel has no netem and the userspace shaper needs `iptables` "
            "for its NFQUEUE rule (install iptables)"
        )
    queue = host.next_queue()
    process = host.spawn(
        sys.executable, str(SHAPER), f"--queue={queue}", f"--delay-ms={delay_ms}",
        f"--jitter-ms={jitter_ms}", f"--loss-pct={loss_pct}",
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while "ready" not in process.output():
        if not process.alive() or time.monotonic() > deadline:
            process.stop()
            raise HarnessError(f"shaper in {host.label} did not start: {process.output()[-500:]}")
        time.sleep(0.02)
    rule = [
        "POSTROUTING", "-o", iface, "-j", "NFQUEUE", f"--queue-num={queue}", "--queue-bypass",
    ]  # fmt: skip
    host.run("iptables", "-w", "-t", "mangle", "-A", *rule)
    return _Shaper(host, rule, process)


def _stop_shaper(shaper: _Shaper) -> None:
    shaper.host.run("iptables", "-w", "-t", "mangle", "-D", *shaper.rule, check=False)
    shaper.process.stop()


@dataclass
class Link:
    """A veth pair: ``a_iface`` inside ``a``, ``b_iface`` inside ``b``."""

    a: Host
    a_iface: str
    b: Host
    b_iface: str
    subnet: ipaddress.IPv4Network
    _shapers: list[_Shaper] = field(default_factory=list)

    def ends(self) -> list[tuple[Host, str]]:
        return [(self.a, self.a_iface), (self.b, self.b_iface)]

    def netem(
        self,
        *,
        delay_ms: float = 0,
        jitter_ms: float = 0,
        loss_pct: float = 0,
        rate: str | None = None,
        both: bool = True,
    ) -> None:
        """Delay, jitter, loss (and a rate such as ``"1mbit"``) on the link's egress.

        Replaces what an earlier call set. ``both=False`` shapes only the ``a``
        side (traffic from ``a`` to ``b``). Uses ``tc netem`` where the kernel
        has it, otherwise :mod:`tests.harness.shaper` (same effect on IPv4).
        """
        self.clear()
        for host, iface in self.ends()[: 2 if both else 1]:
            if rate:
                host.run(
                    "tc", "qdisc", "replace", "dev", iface, "root",
                    "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms",
                )  # fmt: skip
            if not (delay_ms or jitter_ms or loss_pct):
                continue
            if kernel_has_netem(host, iface):
                spec = ["delay", f"{delay_ms}ms", f"{jitter_ms}ms", "loss", f"{loss_pct}%"]
                host.run("tc", "qdisc", "replace", "dev", iface, "root", "netem", *spec)
            else:
                self._shapers.append(
                    _start_shaper(
                        host, iface, delay_ms=delay_ms, jitter_ms=jitter_ms, loss_pct=loss_pct
                    )
                )

    def clear(self) -> None:
        """Remove every delay, loss and rate from both ends."""
        for host, iface in self.ends():
            host.run("tc", "qdisc", "del", "dev", iface, "root", check=False)
        for shaper in self._shapers:
            _stop_shaper(shaper)
        self._shapers.clear()

    def cut(self) -> None:
        """Drop everything arriving over this link, at both ends, silently."""
        for host, iface in self.ends():
            self.a.network.block(host, iface=iface)

    def heal(self) -> None:
        for host, iface in self.ends():
            self.a.network.unblock(host, iface=iface)


@dataclass
class Bridge:
    """N hosts on one Ethernet segment (a Linux bridge in its own namespace)."""

    switch: Host
    subnet: ipaddress.IPv4Network
    links: dict[str, Link] = field(default_factory=dict)

    def link(self, host: Host) -> Link:
        """The uplink of ``host`` (its end is ``a``): netem on it shapes all its traffic."""
        return self.links[host.label]


class Network:
    """The hosts, links and faults of one test; :meth:`close` removes them all."""

    def __init__(self, workdir: Path, *, name: str = "net") -> None:
        self.workdir = workdir
        self.name = name
        self.number = next(_network_numbers)
        self.hosts: dict[str, Host] = {}
        self._subnets = iter(SUBNETS)
        self._blocked_sources: dict[str, set[str]] = {}
        self._blocked_ifaces: dict[str, set[str]] = {}
        self._closed = False

    # --- topology ----------------------------------------------------------

    def host(self, label: str) -> Host:
        """A new host (network namespace ``kh<pid>-<n>-<label>``) with loopback up."""
        if label in self.hosts:
            raise HarnessError(f"host {label!r} already exists in this network")
        netns = f"{RUN_ID}-{self.number}-{label}"
        if len(netns) > 48 or not label.replace("-", "").isalnum():
            raise HarnessError(f"host label {label!r}: use a short name of letters, digits and '-'")
        run(["ip", "netns", "add", netns])
        host = Host(label, netns, self)
        self.hosts[label] = host
        host.run("ip", "link", "set", "lo", "up")
        return host

    def _next_iface(self, host: Host) -> str:
        name = f"eth{len(host.interfaces)}"
        host.interfaces.append(name)
        return name

    def _veth(self, a: Host, b: Host) -> tuple[str, str]:
        a_iface, b_iface = self._next_iface(a), self._next_iface(b)
        run(
            [
                "ip", "link", "add", a_iface, "netns", a.netns, "type", "veth",
                "peer", "name", b_iface, "netns", b.netns,
            ]
        )  # fmt: skip
        return a_iface, b_iface

    def connect(self, a: Host, b: Host, *, subnet: str | None = None) -> Link:
        """A point-to-point veth between ``a`` (``.1``) and ``b`` (``.2``) of a fresh /24."""
        net = ipaddress.ip_network(subnet) if subnet else next(self._subnets)
        if not isinstance(net, ipaddress.IPv4Network):
            raise HarnessError(f"{subnet}: only IPv4 subnets are supported")
        a_iface, b_iface = self._veth(a, b)
        hosts_iter = net.hosts()
        for host, iface in ((a, a_iface), (b, b_iface)):
            address = str(next(hosts_iter))
            host.run("ip", "addr", "add", f"{address}/{net.prefixlen}", "dev", iface)
            host.run("ip", "link", "set", iface, "up")
            host.addresses.append(address)
        return Link(a, a_iface, b, b_iface, net)

    def bridge(self, hosts: Iterable[Host], *, subnet: str | None = None) -> Bridge:
        """Put ``hosts`` on one bridge (in a namespace of its own), addresses ``.1`` upwards."""
        net = ipaddress.ip_network(subnet) if subnet else next(self._subnets)
        if not isinstance(net, ipaddress.IPv4Network):
            raise HarnessError(f"{subnet}: only IPv4 subnets are supported")
        switch = self.host(f"sw{len([h for h in self.hosts if h.startswith('sw')])}")
        switch.run("ip", "link", "add", "br0", "type", "bridge")
        switch.run("ip", "link", "set", "br0", "up")
        result = Bridge(switch, net)
        addresses = net.hosts()
        for host in hosts:
            host_iface, port = self._veth(host, switch)
            switch.run("ip", "link", "set", port, "master", "br0")
            switch.run("ip", "link", "set", port, "up")
            address = str(next(addresses))
            host.run("ip", "addr", "add", f"{address}/{net.prefixlen}", "dev", host_iface)
            host.run("ip", "link", "set", host_iface, "up")
            host.addresses.append(address)
            result.links[host.label] = Link(host, host_iface, switch, port, net)
        return result

    # --- partitions ----------------------------------------------------------

    def block(self, host: Host, *, sources: Iterable[str] = (), iface: str | None = None) -> None:
        """Drop, inside ``host``, what arrives from ``sources`` or over ``iface``."""
        self._blocked_sources.setdefault(host.label, set()).update(sources)
        if iface is not None:
            self._blocked_ifaces.setdefault(host.label, set()).add(iface)
        self._load_blocks(host)

    def unblock(self, host: Host, *, sources: Iterable[str] = (), iface: str | None = None) -> None:
        self._blocked_sources.setdefault(host.label, set()).difference_update(sources)
        if iface is not None:
            self._blocked_ifaces.setdefault(host.label, set()).discard(iface)
        self._load_blocks(host)

    def _load_blocks(self, host: Host) -> None:
        sources = sorted(self._blocked_sources.get(host.label, ()))
        ifaces = sorted(self._blocked_ifaces.get(host.label, ()))
        rules = [f'iifname "{iface}" drop' for iface in ifaces]
        if sources:
            rules.append(f"ip saddr {{ {', '.join(sources)} }} drop")
        body = "\n".join(f"    {rule}" for rule in rules)
        host.nft(
            "table inet keel_harness\n"
            "delete table inet keel_harness\n"
            "table inet keel_harness {\n"
            "  chain partition {\n"
            "    type filter hook prerouting priority raw; policy accept;\n"
            f"{body}\n"
            "  }\n"
            "}\n"
        )

    def partition(self, side_a: Host | Iterable[Host], side_b: Host | Iterable[Host]) -> None:
        """Nothing from one side reaches the other, both ways; other traffic flows."""
        group_a = [side_a] if isinstance(side_a, Host) else list(side_a)
        group_b = [side_b] if isinstance(side_b, Host) else list(side_b)
        for here, there in ((group_a, group_b), (group_b, group_a)):
            sources = [address for host in there for address in host.addresses]
            for host in here:
                self.block(host, sources=sources)

    def heal(
        self,
        side_a: Host | Iterable[Host] | None = None,
        side_b: Host | Iterable[Host] | None = None,
    ) -> None:
        """Undo :meth:`partition` between two sides, or every partition and cut."""
        if side_a is None or side_b is None:
            for label in list(self._blocked_sources) + list(self._blocked_ifaces):
                self._blocked_sources.pop(label, None)
                self._blocked_ifaces.pop(label, None)
                self._load_blocks(self.hosts[label])
            return
        group_a = [side_a] if isinstance(side_a, Host) else list(side_a)
        group_b = [side_b] if isinstance(side_b, Host) else list(side_b)
        for here, there in ((group_a, group_b), (group_b, group_a)):
            sources = [address for host in there for address in host.addresses]
            for host in here:
                self.unblock(host, sources=sources)

    # --- teardown ------------------------------------------------------------

    def close(self) -> None:
        """Stop every process, delete every namespace; raise if anything resisted."""
        if self._closed:
            return
        self._closed = True
        for host in self.hosts.values():
            for process in host.processes:
                process.stop(grace=3)
                with contextlib.suppress(OSError):
                    report_output(
                        f"`{describe(process.argv)}` on host {host.label}", process.output()
                    )
        for host in self.hosts.values():
            remove_namespace(host.netns)
        left = [h.netns for h in self.hosts.values() if (NETNS_DIR / h.netns).exists()]
        if left:
            raise HarnessError(f"network namespaces could not be removed: {', '.join(left)}")

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
