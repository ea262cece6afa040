"""The network-namespace harness itself: topologies carry packets, netem
shapes them, partitions cut and heal, and nothing is left behind."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.harness import netns
from tests.harness.common import RUN_ID, HarnessError
from tests.harness.netns import Host, Network


def ping(source: Host, target: Host, *, count: int = 1, wait: float = 1) -> bool:
    result = source.run(
        "ping", "-n", "-q", "-c", str(count), "-W", str(wait), target.address, check=False
    )
    return result.returncode == 0


def rtt_ms(source: Host, target: Host, count: int = 3) -> float:
    """The minimum round trip of ``count`` pings (the least noisy figure)."""
    out = source.run("ping", "-n", "-q", "-c", str(count), "-i", "0.2", target.address).stdout
    match = re.search(r"= ([\d.]+)/", out)
    assert match, out
    return float(match.group(1))


def test_a_pair_pings_across(network: Network) -> None:
    a, b = network.host("a"), network.host("b")
    link = network.connect(a, b)
    assert (a.address, b.address) == (str(link.subnet[1]), str(link.subnet[2]))
    assert ping(a, b)
    assert ping(b, a)
    # The namespaces are this run's, the interfaces live only inside them.
    assert a.netns.startswith(f"{RUN_ID}-")
    assert a.netns in netns.namespaces()
    host_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    assert a.netns not in host_links.stdout


def test_hosts_on_a_bridge_reach_each_other(network: Network) -> None:
    hosts = [network.host(f"h{i}") for i in range(4)]
    network.bridge(hosts)
    for source in hosts:
        for target in hosts:
            if source is not target:
                assert ping(source, target), f"{source.label} -> {target.label}"


def test_netem_delay_applies_and_clears(network: Network) -> None:
    a, b = network.host("a"), network.host("b")
    link = network.connect(a, b)
    link.netem(delay_ms=100)
    # Each direction is delayed by 100 ms, so no round trip can be shorter
    # than 200 ms, however busy the machine is.
    assert rtt_ms(a, b) >= 200
    link.clear()
    assert "netem" not in a.run("tc", "qdisc", "show", "dev", link.a_iface).stdout
    assert "queue" not in a.run("nft", "list", "ruleset").stdout  # the shaper's NFQUEUE rule


def test_netem_one_way_delay_and_jitter(network: Network) -> None:
    a, b = network.host("a"), network.host("b")
    link = network.connect(a, b)
    link.netem(delay_ms=150, jitter_ms=20, both=False)
    assert rtt_ms(a, b) >= 130
    link.netem(delay_ms=60)  # replaces the earlier setting
    assert rtt_ms(a, b) >= 120


def test_netem_loss_drops_everything_at_100_percent(network: Network) -> None:
    a, b = network.host("a"), network.host("b")
    link = network.connect(a, b)
    link.netem(loss_pct=100, both=False)
    assert not ping(a, b)
    link.clear()
    assert ping(a, b)


def test_partition_cuts_and_heals_between_two_hosts_only(network: Network) -> None:
    a, b, c = network.host("a"), network.host("b"), network.host("c")
    network.bridge([a, b, c])
    network.partition(a, b)
    assert not ping(a, b)
    assert not ping(b, a)
    assert ping(a, c)
    assert ping(b, c)
    network.heal(a, b)
    assert ping(a, b)
    assert ping(b, a)


def test_partition_is_silent_for_the_sender(network: Network) -> None:
    a, b = network.host("a"), network.host("b")
    network.connect(a, b)
    listener = b.spawn(
        "python3",
        "-c",
        "import socket, time; s = socket.socket(2, 2); s.bind(('', 9000)); time.sleep(600)",
    )
    network.partition(a, b)
    # Sending into a partition succeeds locally; the datagram just vanishes.
    sent = a.run(
        "python3",
        "-c",
        f"import socket; s=socket.socket(2, 2); print(s.sendto(b'x', ('{b.address}', 9000)))",
    )
    assert sent.stdout.strip() == "1"
    network.heal()
    assert ping(a, b)
    assert listener.alive()


def test_link_cut_and_heal(network: Network) -> None:
    a, b = network.host("a"), network.host("b")
    link = network.connect(a, b)
    link.cut()
    assert not ping(a, b)
    link.heal()
    assert ping(a, b)


def test_processes_run_inside_and_are_stopped(network: Network) -> None:
    a, b = network.host("a"), network.host("b")
    network.connect(a, b)
    server = b.spawn("python3", "-m", "http.server", "--bind", b.address, "8080")
    fetch = (
        "import time, urllib.request\n"
        "for _ in range(100):\n"
        "    try:\n"
        f"        print(urllib.request.urlopen('http://{b.address}:8080/').status); break\n"
        "    except OSError: time.sleep(0.1)\n"
    )
    assert a.run("python3", "-c", fetch).stdout.strip() == "200"
    # A process the test started behind the harness's back is killed at close too.
    subprocess.Popen(["ip", "netns", "exec", b.netns, "sleep", "600"], start_new_session=True)
    network.close()
    assert not server.alive()
    assert b.netns not in netns.namespaces()


def test_closing_a_network_leaves_nothing(network: Network) -> None:
    hosts = [network.host(f"n{i}") for i in range(3)]
    network.bridge(hosts)
    names = [h.netns for h in network.hosts.values()]
    network.close()
    left = netns.namespaces()
    assert not [name for name in names if name in left]


def test_bad_host_labels_are_refused(network: Network) -> None:
    with pytest.raises(HarnessError, match="use a short name"):
        network.host("bad label")
    network.host("ok")
    with pytest.raises(HarnessError, match="already exists"):
        network.host("ok")


def test_stale_names_are_recognised() -> None:
    from tests.harness.common import stale

    assert not stale(f"{RUN_ID}-1-a")  # this run
    assert not stale("unrelated-namespace")
    assert stale("kh999999999-1-a")  # no such pid


def test_leftovers_of_dead_runs_are_swept(network: Network) -> None:
    # A pid above pid_max can never be alive: its run died without cleaning up.
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    dead = f"kh{pid_max + 1}-1-x"
    subprocess.run(["ip", "netns", "add", dead], check=True)
    try:
        assert dead in netns.sweep_stale()
        assert dead not in netns.namespaces()
    finally:
        subprocess.run(["ip", "netns", "delete", dead], check=False, capture_output=True)
