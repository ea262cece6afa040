"""Benchmark of keel egress, each figure against a baseline measured in the same run.

    sudo .venv/bin/python bench/egress/run.py [--queries 2000] [--connects 10000] [--seconds 3]

Builds the egress test world (network namespaces: an "internet" with an
authoritative DNS server and TCP/UDP sinks, a keel host running ``keel egress
serve``; tests/integration/egress/world.py) and measures, as an agent (its
DNS redirected to keel's proxy, its packets through keel's rules) and as a
user keel does not manage (the baseline):

1. DNS latency through the proxy vs straight to the same upstream: fresh
   names on both paths (no cache helps either), every answer's address
   inserted into the agent's set before the answer is sent; p50, p99 and the
   ratio. The proxy's own cache, for the record.
2. Query to first packet accepted, and first-packet drops over N fresh
   connects: resolve a never-seen name, connect to its address at once.
3. A restart: SIGKILL, start, time until the restarted proxy answers.
4. TCP throughput over the veth with the ruleset installed vs the host's own
   stateful firewall alone (and vs no netfilter at all: connection tracking,
   which any stateful firewall turns on, is most of the difference).
5. 100 agents x 1,000-name allowlists: time to install the ruleset, its size,
   100,000 addresses in the sets, a restart that keeps them, throughput and
   per-packet cost (UDP packets per second) against no ruleset.

Goals (issue 10): proxy p99 overhead <= 1 ms; throughput >= 0.95x without
rules; first-packet drops 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "python"))

from tests.harness.netns import Network, missing_prerequisite  # noqa: E402
from tests.integration.egress.world import AGENT_UID, OTHER_UID, World, wait_until  # noqa: E402

CLIENT = HERE / "client.py"
AGENTS = 100
NAMES = 1000
FIRST_UID = 70000
SINK = "10.77.255.1"  # answered for 10-77-255-1.addr.test; the internet's loopback takes 10.64/10
ANSWER_ONCE = 19  # examples/egress/internet.py: UDP, the first datagram of each flow answered
ANSWERING = "192.0.2.10"  # an address of the internet's own (its UDP 19 answers from it)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def ms(ns: float) -> str:
    return f"{ns / 1e6:.3f} ms"


class Bench:
    def __init__(self, world: World, plans: Path) -> None:
        self.world = world
        self.plans = plans
        self.counter = 0

    def client(
        self, uid: int, command: str, plan: dict[str, Any], timeout: float = 600
    ) -> dict[str, Any]:
        self.counter += 1
        path = self.plans / f"plan-{self.counter}.json"
        path.write_text(json.dumps(plan))
        path.chmod(0o644)
        argv = [
            "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            sys.executable, str(CLIENT), command, str(path),
        ]  # fmt: skip
        out = self.world.host.run(*argv, timeout=timeout).stdout
        result: dict[str, Any] = json.loads(out)
        return result

    # --- 1. latency -----------------------------------------------------------------

    def latency(self, queries: int) -> dict[str, Any]:
        server = self.world.dns_v4
        proxy: list[int] = []
        direct: list[int] = []
        failures = 0
        batch = 250
        before = self.world.status()
        for start in range(0, queries, batch):
            # Interleaved batches, so that both paths share the machine's moods.
            size = min(batch, queries - start)
            through = [
                f"10-77-{(start + i) // 250}-{(start + i) % 250 + 1}.addr.test" for i in range(size)
            ]
            straight = [
                f"10-78-{(start + i) // 250}-{(start + i) % 250 + 1}.addr.test" for i in range(size)
            ]
            a = self.client(AGENT_UID, "latency", {"server": server, "names": through})
            b = self.client(OTHER_UID, "latency", {"server": server, "names": straight})
            proxy += a["ns"]
            direct += b["ns"]
            failures += a["failures"] + b["failures"]
        # keel's own share of each answer, as the daemon timed it (the wait
        # for the upstream excluded): what the proxy adds, whatever the
        # scheduler does to the processes around it.
        after = self.world.status()
        dns_figures = after["agents"]["bench"]["dns"]
        answered = dns_figures["queries"] - before["agents"]["bench"]["dns"]["queries"]
        cpu = None
        if "cpu_seconds" in after:
            cpu = (after["cpu_seconds"] - before["cpu_seconds"]) / max(1, answered)
        cached = self.client(
            AGENT_UID, "latency", {"server": server, "names": ["10-77-0-1.addr.test"] * 1000}
        )
        return {
            "proxy": proxy,
            "direct": direct,
            "cached": cached["ns"],
            "failures": failures,
            "work_ms": dns_figures["work_ms"],
            "upstream_ms": dns_figures["upstream_ms"],
            "cpu_per_answer": cpu,
            "answered": answered,
        }

    # --- 2. first packet --------------------------------------------------------------

    def first_packet(self, connects: int) -> dict[str, Any]:
        names = [f"10-79-{i // 250}-{i % 250 + 1}.addr.test" for i in range(connects)]
        return self.client(
            AGENT_UID,
            "first-packet",
            {"server": self.world.dns_v4, "names": names, "port": 80},
            timeout=1800,
        )

    # --- 3. restart ---------------------------------------------------------------------

    def restart(self, port: int) -> tuple[float, float]:
        """(seconds to the first answer, seconds to the control socket) after SIGKILL + start."""
        self.world.kill_daemon()
        started = time.monotonic()
        self.world.start_daemon(wait=False)
        answered = self.world.host.run(
            sys.executable, "-c", POLL, str(port), "10-77-0-1.addr.test", timeout=120
        ).stdout
        first_answer = float(answered) - started
        self.world.wait_ready()
        return first_answer, time.monotonic() - started

    # --- 4. throughput --------------------------------------------------------------------

    def throughput(self, uid: int, seconds: float) -> float:
        result = self.client(uid, "throughput", {"address": SINK, "port": 9, "seconds": seconds})
        return float(result["bytes"]) / float(result["seconds"])

    def packets(self, uid: int, seconds: float, *, answered: bool = False) -> tuple[float, float]:
        """(packets per second, the sender's CPU nanoseconds per packet); ``answered``: to
        a port that answers the flow's first datagram, so its conntrack is established."""
        plan = {
            "address": ANSWERING if answered else SINK,
            "port": ANSWER_ONCE if answered else 9,
            "seconds": seconds,
            "size": 64,
            "answered": answered,
        }
        result = self.client(uid, "packets", plan)
        packets = float(result["packets"])
        return packets / float(result["seconds"]), float(result["cpu_seconds"]) * 1e9 / packets


# Runs in the keel host as root: ask the agent's proxy port until it answers.
POLL = """
import socket, sys, time, dns.message
port, name = int(sys.argv[1]), sys.argv[2]
wire = dns.message.make_query(name, "A").to_wire()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.02)
while True:
    try:
        s.sendto(wire, ("127.0.0.1", port))
        s.recv(4096)
        break
    except OSError:
        time.sleep(0.005)
print(time.monotonic())
"""

# keel's table without its hooks: no packet passes through it (the sets stay).
UNHOOK = {
    "nftables": [
        {"flush": {"chain": {"family": "inet", "table": "keel", "name": chain}}}
        for chain in ("output", "redirect")
    ]
    + [
        {"delete": {"chain": {"family": "inet", "table": "keel", "name": chain}}}
        for chain in ("output", "redirect")
    ]
}

# Runs in the keel host as root: fills every agent's v4 set with NAMES addresses.
FILL = """
import ipaddress, json, sys
from keel.egress.netlink import SetWriter
from keel.egress.sets import Insert
agents, names = int(sys.argv[1]), int(sys.argv[2])
writer = SetWriter()
for a in range(agents):
    inserts = [
        Insert(ipaddress.ip_address(f"10.{100 + a // 250}.{a % 250}.0") + n, 3600, (f"n{n}.a{a}.bench.test",), False)
        for n in range(names)
    ]
    for start in range(0, names, 250):
        writer.write(f"a{a}", inserts[start:start + 250])
print(writer.batches)
"""


def ratio(keel: float, baseline: float) -> str:
    return f"{keel / baseline:.3f}x" if baseline else "-"


def report_latency(result: dict[str, Any]) -> dict[str, float]:
    proxy, direct = result["proxy"], result["direct"]
    p50p, p99p = percentile(proxy, 50), percentile(proxy, 99)
    p50d, p99d = percentile(direct, 50), percentile(direct, 99)
    print("== 1. DNS latency: fresh names, through keel's proxy vs straight to the same upstream")
    print(
        f"   queries: {len(proxy)} through the proxy, {len(direct)} direct; failures: {result['failures']}"
    )
    print(
        f"   p50: direct {ms(p50d)}, proxy {ms(p50p)}, ratio {ratio(p50p, p50d)}, overhead {ms(p50p - p50d)}"
    )
    print(f"   p99: direct {ms(p99d)}, proxy {ms(p99p)}, ratio {ratio(p99p, p99d)}, overhead {ms(p99p - p99d)}"
          f"  (goal: overhead <= 1 ms)")  # fmt: skip
    work, upstream = result["work_ms"], result["upstream_ms"]
    print(f"   keel's own time per answer (parse, decide, insert into the set, reply: all but the "
          f"wait for the upstream's reply, timed by the daemon): p50 {work['p50']:.3f} ms, "
          f"p99 {work['p99']:.3f} ms over the last {work['samples']}; the upstream's wait as the "
          f"proxy saw it: p50 {upstream['p50']:.3f} ms")  # fmt: skip
    cpu = result["cpu_per_answer"]
    if cpu is not None:
        print(f"   keel's CPU time per answer (the daemon's, over {result['answered']} answers; "
              f"unlike the times above, the machine's load barely moves it): {cpu * 1e6:.0f} us")  # fmt: skip
    cached = result["cached"]
    print(f"   answered from keel's cache (and the set refreshed): p50 {ms(percentile(cached, 50))}, "
          f"p99 {ms(percentile(cached, 99))}")  # fmt: skip
    return {
        "p50_direct": p50d,
        "p50_proxy": p50p,
        "p99_direct": p99d,
        "p99_proxy": p99p,
        "work_p50_ms": work["p50"],
        "work_p99_ms": work["p99"],
        "cpu_per_answer_us": None if cpu is None else cpu * 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--queries", type=int, default=2000, help="DNS questions per path (default 2000)"
    )
    parser.add_argument(
        "--connects", type=int, default=10_000, help="fresh connects (default 10000)"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput run (default 3)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating throughput rounds (default 3)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    reason = missing_prerequisite()
    if reason:
        print(f"bench/egress: skipped: {reason}")
        return 0
    figures: dict[str, Any] = {}
    workdir = Path(tempfile.mkdtemp(prefix="kegb-"))
    plans = workdir / "plans"
    plans.mkdir(mode=0o755)
    workdir.chmod(0o755)
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} at the start "
          "(the DNS figures include the scheduling of every process on the path)")  # fmt: skip
    with Network(workdir) as network:
        world = World(network)
        try:
            figures = run(world, Bench(world, plans), args)
        finally:
            world.close()
    figures["load_average"] = [load[0], os.getloadavg()[0]]
    print(f"machine: load average {figures['load_average'][1]:.2f} at the end")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, sort_keys=True))
    return 0


def run(world: World, bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    world.start_internet()
    world.inet.run("ip", "route", "add", "local", "10.64.0.0/10", "dev", "lo")
    world.host.nft(HOST_FIREWALL)
    allow = ["*.addr.test", "*.bench.test"]
    world.configure(
        {"bench": {"uid": AGENT_UID, "port": 5301, "allow": allow}},
        min_ttl=300, grace=30, ledger=None, on_stop="keep",
    )  # fmt: skip
    world.start_daemon()

    figures["latency"] = report_latency(bench.latency(args.queries))

    print(f"== 2. query to first packet accepted, {args.connects} fresh names and connects")
    first = bench.first_packet(args.connects)
    answered, connected = first["query_to_answer_ns"], first["query_to_connected_ns"]
    print(f"   query -> answer (address already in the set): p50 {ms(percentile(answered, 50))}, "
          f"p99 {ms(percentile(answered, 99))}")  # fmt: skip
    if connected:
        print(f"   query -> connection established: p50 {ms(percentile(connected, 50))}, "
              f"p99 {ms(percentile(connected, 99))}")  # fmt: skip
    print(
        f"   first-packet drops: {first['dropped']} of {args.connects} (goal: 0) {first['examples']}"
    )
    figures["first_packet"] = {
        "connects": args.connects,
        "dropped": first["dropped"],
        "p50_query_to_connected": percentile(connected, 50) if connected else None,
        "p99_query_to_connected": percentile(connected, 99) if connected else None,
    }

    print("== 3. restart: SIGKILL, start, until the proxy answers (its sets kept)")
    restarts = [bench.restart(5301) for _ in range(3)]
    answers = [r[0] for r in restarts]
    print(f"   first answer after start: {', '.join(f'{s:.2f} s' for s in answers)} "
          f"(control socket: {', '.join(f'{r[1]:.2f} s' for r in restarts)})")  # fmt: skip
    figures["restart_seconds"] = answers

    print(
        f"== 4. TCP throughput over the veth, {args.rounds} alternating rounds of {args.seconds:g} s"
    )
    with_rules, host_only, bare = throughput_rounds(world, bench, AGENT_UID, args)
    figures["throughput_1_agent"] = report_throughput(with_rules, host_only, bare, "1 agent")

    print(f"== 5. {AGENTS} agents x {NAMES}-name allowlists")
    figures["scale"] = scale(world, bench, args)
    return figures


# The host's own stateful firewall, as on any real server (NixOS' default
# firewall tracks connections the same way): the baseline that keel's
# rules are compared with. Without any table the kernel does not track
# connections at all, which a bare baseline shows too.
HOST_FIREWALL = """
table inet hostfw {
  chain input {
    type filter hook input priority 0; policy accept;
    ct state established,related accept
  }
}
"""


def start_settled(world: World) -> None:
    """Start the daemon and wait until it has read its sets: a restarted daemon lists
    them in the background (seconds of CPU with 100,000 addresses), which would
    otherwise run during the next measurement on the same cores."""
    world.start_daemon()
    wait_until(lambda: world.status()["sets_adopted"], timeout=300, what="the sets to be read")


def resolve_sink(world: World, bench: Bench) -> None:
    """Resolve the sink as the agent, until its address is in the agent's set: an answer
    that is not there came from elsewhere than keel's proxy (conntrack let the query
    ride on a flow someone else opened; keel's per-agent conntrack zones end that)."""
    for _ in range(20):
        answer = bench.client(
            AGENT_UID, "latency", {"server": world.dns_v4, "names": ["10-77-255-1.addr.test"]}
        )
        if not answer["failures"] and SINK in world.elements("bench_v4"):
            return
        if not answer["failures"]:
            print("   (the agent's DNS bypassed keel's proxy: answered, not in its set; again)")
    raise SystemExit(f"bench/egress: the sink does not resolve:\n{world.log()[-2000:]}")


def throughput_rounds(
    world: World, bench: Bench, uid: int, args: argparse.Namespace
) -> tuple[list[float], list[float], list[float]]:
    """Alternate: keel's rules, the host firewall alone, no netfilter at all."""
    with_rules: list[float] = []
    host_only: list[float] = []
    bare: list[float] = []
    for _ in range(args.rounds):
        world.host.nft(HOST_FIREWALL)
        if world.daemon is None or world.daemon.poll() is not None:
            start_settled(world)
        resolve_sink(world, bench)
        with_rules.append(bench.throughput(uid, args.seconds))
        world.kill_daemon()
        world.host.run("nft", "delete", "table", "inet", "keel")
        host_only.append(bench.throughput(uid, args.seconds))
        world.host.run("nft", "delete", "table", "inet", "hostfw")
        bare.append(bench.throughput(uid, args.seconds))
    world.host.nft(HOST_FIREWALL)
    start_settled(world)
    return with_rules, host_only, bare


def report_throughput(
    with_rules: list[float], host_only: list[float], bare: list[float], label: str
) -> dict[str, float]:
    keel, baseline, nothing = (statistics.median(v) for v in (with_rules, host_only, bare))
    print(f"   {label}: host firewall alone {baseline * 8 / 1e9:.2f} Gbit/s, with keel's rules "
          f"{keel * 8 / 1e9:.2f} Gbit/s, ratio {ratio(keel, baseline)} (goal >= 0.95x); "
          f"no netfilter at all {nothing * 8 / 1e9:.2f} Gbit/s (ratio {ratio(keel, nothing)})")  # fmt: skip
    return {
        "host_firewall_bps": baseline * 8,
        "with_bps": keel * 8,
        "bare_bps": nothing * 8,
        "ratio": keel / baseline,
        "ratio_bare": keel / nothing,
    }


def report_packets(
    label: str, with_rules: list[tuple[float, float]], without: list[tuple[float, float]]
) -> dict[str, float]:
    """64-byte datagrams of one flow: rate and the sender's CPU per packet, medians."""
    keel_pps, base_pps = (statistics.median(p for p, _ in v) for v in (with_rules, without))
    keel_cpu, base_cpu = (statistics.median(c for _, c in v) for v in (with_rules, without))
    cost = (1 / keel_pps - 1 / base_pps) * 1e9
    print(f"   UDP 64-byte packets, one flow {label}: {base_pps / 1e3:.0f} k/s with the host "
          f"firewall alone, {keel_pps / 1e3:.0f} k/s through keel's (ratio {ratio(keel_pps, base_pps)}, "
          f"goal >= 0.95x; {cost:+.0f} ns per packet); the sender's CPU per packet {base_cpu:.0f} ns "
          f"and {keel_cpu:.0f} ns ({keel_cpu - base_cpu:+.0f} ns, ratio {ratio(base_cpu, keel_cpu)})")  # fmt: skip
    return {
        "pps_with": keel_pps,
        "pps_without": base_pps,
        "ns_per_packet": cost,
        "cpu_ns_per_packet_with": keel_cpu,
        "cpu_ns_per_packet_without": base_cpu,
    }


def scale(world: World, bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    from keel.egress import ruleset

    agents = {
        f"a{i}": {
            "uid": FIRST_UID + i,
            "port": 6000 + i,
            "allow": [f"n{n}.a{i}.bench.test" for n in range(NAMES)],
        }
        for i in range(AGENTS)
    }
    world.kill_daemon()
    world.host.run("nft", "delete", "table", "inet", "keel", check=False)
    world.configure(agents, min_ttl=300, grace=30, ledger=None)
    started = time.monotonic()
    world.start_daemon()
    install = time.monotonic() - started
    document = ruleset.replace(
        [ruleset.AgentRules(name, a["uid"], a["port"], True) for name, a in agents.items()],  # type: ignore[arg-type]
        log_group=17,
    )
    out = world.host.run(sys.executable, "-c", FILL, str(AGENTS), str(NAMES), timeout=600).stdout
    listing = world.host.run("nft", "list", "table", "inet", "keel").stdout
    table = ruleset.read_table(
        json.loads(world.host.run("nft", "-j", "list", "table", "inet", "keel").stdout)
    )
    in_sets = sum(len(elements) for elements in table.sets.values())
    print(
        f"   start to ready (config, {AGENTS * NAMES} entries, ruleset installed): {install:.2f} s"
    )
    print(f"   ruleset: {ruleset.rule_count(document)} rules, {2 * AGENTS} sets, "
          f"{len(json.dumps(document)) / 1024:.0f} KiB of JSON; per packet: one uid map lookup "
          f"(vmap), then the agent's own chain")  # fmt: skip
    print(f"   filled {in_sets} addresses in {out.strip()} netlink batches; "
          f"`nft list table` is {len(listing) / 1e6:.1f} MB")  # fmt: skip
    kept_started = time.monotonic()
    world.kill_daemon()
    world.start_daemon(wait=False)
    answered = float(
        world.host.run(sys.executable, "-c", POLL, "6000", "n0.a0.bench.test", timeout=120).stdout
    )
    world.wait_ready()
    wait_until(lambda: world.status()["sets_adopted"], timeout=300, what="the sets to be read")
    adopted = time.monotonic() - kept_started
    kept = sum(a["sets"]["v4"] for a in world.status()["agents"].values())
    restart = answered - kept_started
    print(f"   restart with them in place: first answer after {restart:.2f} s; "
          f"all {kept} addresses known to the daemon after {adopted:.2f} s")  # fmt: skip
    # The sink is in agent a0's set, as if a0 had resolved n0.a0.bench.test (a name it may
    # resolve: one it may not would be taken out again by the next restart).
    world.host.run(
        sys.executable, "-c",
        "import ipaddress; from keel.egress.netlink import SetWriter; from keel.egress.sets import Insert; "
        "w = SetWriter(); "
        f"[w.write('a0', [Insert(ipaddress.ip_address(a), 3600, ('n0.a0.bench.test',), False)]) for a in ('{SINK}', '{ANSWERING}')]",
    )  # fmt: skip
    with_rules: list[float] = []
    without: list[float] = []
    bare: list[float] = []
    # (packets per second, CPU ns per packet) with keel's rules and without, per kind of flow.
    flows: dict[bool, tuple[list[tuple[float, float]], list[tuple[float, float]]]] = {
        False: ([], []),
        True: ([], []),
    }
    for _ in range(args.rounds):
        with_rules.append(bench.throughput(FIRST_UID, args.seconds))
        for answered, (keel_side, _) in flows.items():
            keel_side.append(bench.packets(FIRST_UID, args.seconds, answered=answered))
        # Without: keel's hooks taken out (the sets and their 100,000
        # addresses stay), then put back, so both sides interleave.
        world.kill_daemon()
        world.host.run("nft", "-j", "-f", "-", input=json.dumps(UNHOOK))
        without.append(bench.throughput(FIRST_UID, args.seconds))
        for answered, (_, baseline_side) in flows.items():
            baseline_side.append(bench.packets(FIRST_UID, args.seconds, answered=answered))
        world.host.run("nft", "delete", "table", "inet", "hostfw")
        bare.append(bench.throughput(FIRST_UID, args.seconds))
        world.host.nft(HOST_FIREWALL)
        start_settled(world)
    figures: dict[str, Any] = {
        **report_throughput(with_rules, without, bare, f"agent a0 of {AGENTS}")
    }
    for answered, label in (
        (False, "never answered: every packet walks the agent's chain"),
        (True, "answered once: established, the first rule passes it"),
    ):
        figures["udp_answered" if answered else "udp"] = report_packets(label, *flows[answered])
    return {
        "install_seconds": install,
        "rules": ruleset.rule_count(document),
        "addresses": in_sets,
        "restart_first_answer_seconds": restart,
        "restart_sets_read_seconds": adopted,
        "kept": kept,
        **figures,
    }


if __name__ == "__main__":
    if os.geteuid() != 0:
        print("bench/egress: skipped: needs root (network namespaces, nftables)")
        raise SystemExit(0)
    raise SystemExit(main())
