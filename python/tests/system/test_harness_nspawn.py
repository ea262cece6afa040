"""The container harness itself: boots, isolation, multi-host networking,
the packaged keel inside, and a clean teardown."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from tests.harness import nspawn
from tests.harness.netns import Network
from tests.harness.nspawn import Container, Image
from tests.harness.plugin import Containers

REPO = Path(__file__).resolve().parents[3]


def test_the_wheel_carries_tiers_json(image: Image) -> None:
    assert image.wheelhouse is not None
    with zipfile.ZipFile(nspawn.keel_wheel(image.wheelhouse)) as wheel:
        info = wheel.getinfo("keel/data/tiers.json")
        assert (info.external_attr >> 16) & 0o170000 == 0o100000  # a file, not a symlink
        packaged = json.loads(wheel.read(info))
    assert packaged == json.loads((REPO / "modules" / "tiers.json").read_text())


def test_a_container_boots_systemd_on_a_private_network(containers: Containers) -> None:
    box = containers.boot("solo")
    assert box.run("systemctl", "is-system-running").stdout.strip() == "running"
    assert box.run("cat", "/proc/1/comm").stdout.strip() == "systemd"
    assert box.run("hostname").stdout.strip() == box.name
    # Only loopback: the host's network is out of reach.
    links = box.run("ip", "-o", "link").stdout.splitlines()
    assert [line.split(":")[1].strip() for line in links] == ["lo"]
    # keel is installed from the wheel, offline, into its own venv.
    assert box.run("keel", "--version").stdout.strip() == "keel 0.1.0"
    assert box.run("readlink", "/usr/local/bin/keel").stdout.strip() == "/opt/keel/bin/keel"
    tiers = box.run(
        "/opt/keel/bin/python",
        "-c",
        "from keel.agents.units import load_tiers; print(load_tiers().source)",
    ).stdout.strip()
    assert tiers.startswith("/opt/keel/lib/python3")
    assert tiers.endswith("keel/data/tiers.json")


def test_files_commands_and_users_inside(containers: Containers) -> None:
    box = containers.boot("files")
    box.write_file("/etc/keel-test/hello.txt", "hello\n", mode=0o600)
    assert box.read_file("/etc/keel-test/hello.txt") == "hello\n"
    assert box.run("stat", "-c", "%a %U", "/etc/keel-test/hello.txt").stdout.strip() == "600 root"
    assert box.run("id", "-un", user="nobody").stdout.strip() == "nobody"
    assert box.run("cat", "/etc/keel-test/hello.txt", user="nobody", check=False).returncode == 1
    result = box.run("sh", "-c", "echo out; echo err >&2; exit 3", check=False)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    # What a container writes stays in its own overlay.
    assert not (nspawn.ensure_rootfs() / "etc/keel-test").exists()


def test_containers_are_hosts_of_a_topology(network: Network, containers: Containers) -> None:
    a, b = network.host("a"), network.host("b")
    link = network.connect(a, b)
    box_a = containers.boot("a", host=a)
    box_b = containers.boot("b", host=b)
    # A service in one container, reached from the other over the link.
    box_b.run(
        "systemd-run", "--unit=web", "--property=Restart=always",
        "python3", "-m", "http.server", "--bind", b.address, "8080",
    )  # fmt: skip
    fetch = (
        "import time, urllib.request\n"
        "for _ in range(100):\n"
        "    try:\n"
        f"        print(urllib.request.urlopen('http://{b.address}:8080/').status); break\n"
        "    except OSError: time.sleep(0.1)\n"
    )
    assert box_a.run("python3", "-c", fetch).stdout.strip() == "200"
    # Faults of the topology apply to the containers in it.
    link.netem(delay_ms=100)
    out = box_a.run("ping", "-n", "-q", "-c", "2", "-i", "0.2", b.address).stdout
    assert float(out.rsplit("=", 1)[1].split("/")[0]) >= 200
    link.clear()
    network.partition(a, b)
    assert box_a.run("ping", "-c", "1", "-W", "1", b.address, check=False).returncode != 0
    network.heal()
    assert box_a.run("ping", "-c", "1", "-W", "2", b.address).returncode == 0
    # Containers may manage their own firewall (CAP_NET_ADMIN in their namespace).
    box_a.run("nft", "add", "table", "inet", "keel_test")
    assert "keel_test" in a.run("nft", "list", "tables").stdout


def test_each_container_has_cgroups_of_its_own(containers: Containers) -> None:
    # Containers that shared nspawn's "payload" cgroup (every container of every run on
    # the machine) had one systemd remove the cgroups of another's units.
    boxes = [containers.boot("cga"), containers.boot("cgb")]
    for box in boxes:
        assert box.leader is not None
        text = Path(f"/proc/{box.leader}/cgroup").read_text()
        assert f"/{nspawn.CGROUP_GROUP}/{box.name}/" in text, text
        box.run("systemd-run", "--unit=same", "sleep", "600")
    # The same unit in both: stopping it in one leaves the other's running.
    boxes[0].run("systemctl", "stop", "same")
    assert boxes[1].run("systemctl", "is-active", "same").stdout.strip() == "active"


def test_stop_removes_everything(image: Image) -> None:
    box = Container("gone", image)
    box.start()
    assert any(box.name in item for item in nspawn.leftovers())
    box.stop()
    assert not [item for item in nspawn.leftovers() if box.name in item]
    assert not box.workdir.exists()
