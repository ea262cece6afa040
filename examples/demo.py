"""keel demo: what `make demo` runs (dev mode, every file under ./.keel).

The demo is a sequence of steps, each printing what it does and the commands
it runs, so that it reads as a walk through the appliance: watch supervising
two example agents (one of them flaky), the mesh (two nodes on loopback paired
by invite, example agents talking through them), safe switches between
generation fixtures (one committed, one rolled back by itself), egress (as
root: an agent in a network namespace reaching only its allowlist), and the
ledger that recorded all of it, signed, proved and verified, with a tampered
copy caught.

Run it from the repository root with ``KEEL_DEV=1 .venv/bin/python examples/demo.py``
(``make demo`` does exactly that).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STATE = Path(".keel")


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def keel(*args: str, expect: int = 0) -> str:
    """Run the real CLI in its own process, echoing the command and what it says.

    The demo stops unless the command exits with ``expect`` (1 for a check
    that must fail).
    """
    print(f"$ keel {shlex.join(args)}", flush=True)
    result = subprocess.run(
        [sys.executable, "-m", "keel", *args],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ, KEEL_DEV="1"),
    )
    said = result.stdout if expect == 0 else result.stdout + result.stderr
    if said:
        print("  " + said.rstrip("\n").replace("\n", "\n  "), flush=True)
    if expect:
        print(f"  (exit {result.returncode})", flush=True)
    if result.returncode != expect:
        sys.stderr.write(result.stderr)
        raise SystemExit(
            f"demo: `keel {shlex.join(args)}` exited {result.returncode}, expected {expect}"
        )
    return result.stdout


def ledger_start() -> int:
    """The operator notes the start of the demo; returns the entry's index."""
    step("ledger: the operator records a note (every service appends the same way)")
    note = {"text": "keel demo started", "by": os.environ.get("USER", "operator")}
    return int(
        keel(
            "ledger", "append", "--source", "operator", "--kind", "note",
            "--subject", "demo", "--data", json.dumps(note),
        )
    )  # fmt: skip


def ledger_audit(first: int) -> None:
    """Everything watch and mesh recorded, signed, proved and verified."""
    step("ledger: the last entries that watch, the mesh and safeswitch recorded")
    keel("ledger", "tail", "-n", "12")

    step("ledger: sign a checkpoint (C2SP tlog-checkpoint in an Ed25519 signed note)")
    note = keel("ledger", "checkpoint")
    saved = STATE / "demo-checkpoint.txt"
    saved.write_text(note)
    print(f"  (kept a copy in {saved}, as an auditor would)")

    step("ledger: the verifier key, for checking checkpoints offline")
    keel("ledger", "key")

    step(f"ledger: prove that entry {first} is in the signed tree, and check it offline")
    proof = STATE / "demo-inclusion.json"
    proof.write_text(keel("ledger", "prove", "inclusion", str(first)))
    keel("ledger", "verify-proof", str(proof))

    step("ledger: verify every entry, stored hash and checkpoint")
    keel("ledger", "verify", "--checkpoint", str(saved))

    step(f"ledger: someone edits entry {first} in a copy of the database; verify catches it")
    tampered = STATE / "demo-tampered"
    shutil.rmtree(tampered, ignore_errors=True)
    tampered.mkdir()
    for name in ("ledger.db", "ledger.key"):
        shutil.copy2(STATE / name, tampered / name)
    with sqlite3.connect(tampered / "ledger.db") as db:
        (entry,) = db.execute("SELECT entry FROM leaves WHERE idx = ?", (first,)).fetchone()
        forged = bytes(entry).replace(b"demo started", b"demo stopped")
        db.execute("UPDATE leaves SET entry = ? WHERE idx = ?", (forged, first))
    db.close()
    keel("ledger", "verify", "--db", str(tampered / "ledger.db"), expect=1)


MESH = STATE / "mesh-demo"
AGENT = Path(__file__).with_name("agents") / "mesh_agent.py"


def start_node(name: str) -> subprocess.Popen[bytes]:
    """``keel mesh serve`` in the background, logging to .keel/mesh-demo/NAME.log."""
    directory = MESH / name
    config = MESH / f"{name}.json"
    settings = {
        "directory": str(directory),
        "listen": "127.0.0.1:0",
        "socket": str(MESH / f"{name}.sock"),
        "ledger": str(STATE / "ledger.db"),
    }
    config.write_text(json.dumps(settings, indent=1) + "\n")
    print(f"$ cat {config}\n{config.read_text()}", end="", flush=True)
    argv = ["mesh", "serve", "--config", str(config)]
    print(f"$ keel {shlex.join(argv)} &", flush=True)
    with (MESH / f"{name}.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "keel", *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, KEEL_DEV="1"),
        )
    deadline = time.monotonic() + 30
    while not (MESH / f"{name}.sock").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"demo: node {name} did not start; see {MESH / f'{name}.log'}")
        time.sleep(0.1)
    return process


def agent(*args: str) -> subprocess.Popen[str]:
    print(
        f"$ python3 {AGENT.relative_to(Path.cwd()) if AGENT.is_relative_to(Path.cwd()) else AGENT} "
        f"{shlex.join(args)} &",
        flush=True,
    )
    return subprocess.Popen(
        [sys.executable, str(AGENT), *args], text=True, env=dict(os.environ, KEEL_DEV="1")
    )


def mesh_steps() -> None:
    shutil.rmtree(MESH, ignore_errors=True)  # a fresh pair of nodes on every run
    MESH.mkdir(parents=True)
    a_sock, b_sock = str(MESH / "a.sock"), str(MESH / "b.sock")
    step("mesh: two nodes on loopback (hybrid X25519 + ML-KEM-768 Noise sessions)")
    nodes = [start_node("a"), start_node("b")]
    try:
        a_id = keel("mesh", "id", "--config", str(MESH / "a.json")).strip()
        b_id = keel("mesh", "id", "--config", str(MESH / "b.json")).strip()

        step("mesh: node a invites node b (a single-use token); b joins with it")
        token = keel("mesh", "invite", "--socket", a_sock, "--ttl", "600").strip()
        keel("mesh", "join", "--socket", b_sock, token)
        keel("mesh", "peers", "--socket", a_sock)

        step("mesh: agent 'notes' on node a answers agent 'scout' on node b")
        notes = agent("--name", "notes", "--socket", a_sock, "--serve", "--count", "3")
        scout = agent("--name", "scout", "--socket", b_sock, "--ask", a_id, "--peer", "notes")
        if scout.wait(timeout=90) != 0 or notes.wait(timeout=90) != 0:
            raise SystemExit("demo: the mesh agents did not finish their exchange")

        step("mesh: a room owned by a; b posts to it, a reads it")
        keel("mesh", "room", "create", "--socket", a_sock, "ops", b_id)
        deadline = time.monotonic() + 20
        while (
            "ops"
            not in subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "keel",
                    "mesh",
                    "room",
                    "members",
                    "--socket",
                    b_sock,
                    "ops",
                ],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
        ):
            if time.monotonic() > deadline:
                raise SystemExit("demo: the room never reached node b")
            time.sleep(0.2)
        keel("mesh", "room", "send", "--socket", b_sock, "ops", "--topic", "chat", "deploy done")
        keel(
            "mesh",
            "recv",
            "--socket",
            a_sock,
            "--topic",
            "chat",
            "--count",
            "1",
            "--timeout",
            "20",
            "--json",
        )

        step("mesh: what the ledger recorded (metadata only: ids, peers, topics, sizes)")
        keel("ledger", "tail", "-n", "6")
    finally:
        for process in nodes:
            process.terminate()
        for process in nodes:
            process.wait(timeout=20)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def watch_status() -> dict[str, Any]:
    """``keel status --json``, quietly (for waiting); {} while watch is not up yet."""
    result = subprocess.run(
        [sys.executable, "-m", "keel", "status", "--json"],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ, KEEL_DEV="1"),
    )
    if result.returncode != 0:
        return {}
    status: dict[str, Any] = json.loads(result.stdout)
    return status


def wait_for(condition: Callable[[dict[str, Any]], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = watch_status()
        if status and condition(status["agents"]):
            return
        time.sleep(0.2)
    raise SystemExit(f"demo: {what} did not happen within {timeout:g} s (see .keel/watch.log)")


def watch_steps() -> None:
    step("watch: two example agents under the process backend, one steady, one flaky")
    steady, flaky = free_port(), free_port()
    agent = str(Path(__file__).parent / "agents" / "flaky.py")
    count = STATE / "flaky.count"
    count.unlink(missing_ok=True)

    def probe(port: int) -> dict[str, Any]:
        url = f"http://127.0.0.1:{port}/health"
        return {
            "type": "http",
            "url": url,
            "interval": 0.5,
            "timeout": 0.3,
            "failures": 2,
            "grace": 2,
        }

    config = {
        "backend": "process",
        "agents": {
            "steady": {
                "command": [sys.executable, agent, "--port", str(steady)],
                "probes": [probe(steady)],
            },
            "flaky": {
                # crashes 3 s after its first start, hangs 3 s after its second
                "command": [
                    sys.executable,
                    agent,
                    "--port",
                    str(flaky),
                    "--trouble-after",
                    "3",
                    "--state",
                    str(count),
                ],
                "probes": [probe(flaky)],
                "log": str(STATE / "flaky.log"),
            },
        },
    }
    path = STATE / "watch.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    keel("watch", "check-config", "--config", str(path))
    print(f"$ keel watch serve --config {path} &    (its log: {STATE / 'watch.log'})", flush=True)
    with (STATE / "watch.log").open("w") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "keel", "watch", "serve", "--config", str(path)],
            stdout=log,
            stderr=log,
            env=dict(os.environ, KEEL_DEV="1"),
            start_new_session=True,
        )
    try:
        wait_for(
            lambda agents: all(a["state"] == "healthy" for a in agents.values()),
            "both agents healthy",
            30,
        )
        step("watch: both agents are healthy")
        keel("status")

        step("watch: the flaky agent crashes, then hangs; watch restarts it both times")
        wait_for(
            lambda agents: (
                agents["flaky"]["restarts"] >= 2 and agents["flaky"]["state"] == "healthy"
            ),
            "two restarts of the flaky agent",
            60,
        )
        keel("status")

        step("ledger: what watch recorded (failures, restarts, probe changes)")
        keel("ledger", "tail", "-n", "10")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    step("watch: stopped (in dev mode it stops the agents it started)")


SWITCH = STATE / "switch-demo"

# A stand-in for a built NixOS system: `switch-to-configuration test` re-points
# the running-system link at it and says whether the system is healthy (what
# the gate's check reads); `boot` makes it the boot default.
FIXTURE = """#!/bin/sh
here=$(cd "$(dirname "$0")/.." && pwd -P)
case "$1" in
  test) ln -s "$here" "{lab}/current.tmp" && mv -T "{lab}/current.tmp" "{lab}/current"
        echo {health} > "{lab}/health"; echo "activated {name}" ;;
  boot) echo "$here" > "{lab}/boot-default" ;;
esac
"""


def switch_system(name: str, health: str) -> Path:
    lab = SWITCH.resolve()
    script = lab / "systems" / name / "bin" / "switch-to-configuration"
    script.parent.mkdir(parents=True)
    script.write_text(FIXTURE.format(lab=lab, name=name, health=health))
    script.chmod(0o755)
    return script.parents[1]


def switch_steps() -> None:
    step("safeswitch: a host's generations as fixtures under .keel/switch-demo, gen-1 running")
    shutil.rmtree(SWITCH, ignore_errors=True)
    lab = SWITCH.resolve()
    first = switch_system("gen-1", "ok")
    good = switch_system("gen-2", "ok")
    bad = switch_system("gen-3", "broken")
    (lab / "profiles").mkdir()
    (lab / "profiles" / "system-1-link").symlink_to(first)
    (lab / "profiles" / "system").symlink_to("system-1-link")
    (lab / "current").symlink_to(first)
    (lab / "health").write_text("ok\n")
    config = {
        "profile": str(lab / "profiles" / "system"),
        "current": str(lab / "current"),
        "run_dir": str(lab / "run"),
        "state_dir": str(lab / "state"),
        "gcroots": str(lab / "gcroots"),
        "ledger": str((STATE / "ledger.db").resolve()),
        "timer": "process",
        "keel": [sys.executable, "-m", "keel"],
        "gate": 2,
        "deadline": 30,
        "interval": 0.2,
        "checks": [{"type": "command", "name": "health", "command": f"grep -qx ok {lab}/health"}],
    }
    path = SWITCH / "safeswitch.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    print(f"  (config: {path}; a rollback timer runs as a detached process: --timer process)")

    step("safeswitch: switch to gen-2; its check holds for the 2 s gate, so it commits")
    keel("switch", "--config", str(path), str(good.relative_to(Path.cwd())))
    keel("switch", "status", "--config", str(path))

    step("safeswitch: switch to gen-3, which breaks its health check: it rolls back by itself")
    keel("switch", "--config", str(path), str(bad.relative_to(Path.cwd())), expect=1)
    running = os.path.realpath(lab / "current")
    print(f"  (running again: {Path(running).name}; boot default still gen-2)")

    step("safeswitch: the switches, from the ledger")
    keel("switch", "history", "--config", str(path))


EGRESS = Path(__file__).with_name("egress")
EGRESS_ZONES = """\
$ORIGIN allowed.test.
@    300 IN SOA ns.allowed.test. admin.allowed.test. 1 60 60 600 300
@    300 IN NS  ns.allowed.test.
www  300 IN A   192.0.2.10
$ORIGIN other.test.
@    300 IN SOA ns.other.test. admin.other.test. 1 60 60 600 300
@    300 IN NS  ns.other.test.
www  300 IN A   192.0.2.14
"""
EGRESS_AGENT_UID = 64123  # the demo agent's uid (no user needed: egress matches the number)

# What the demo agent does, as uid EGRESS_AGENT_UID inside the keel host: ask
# any resolver (egress catches port 53 whatever the address), then connect.
EGRESS_AGENT = """
import socket, sys
import dns.message, dns.query, dns.rcode

def resolve(name):
    reply = dns.query.udp(dns.message.make_query(name, "A"), "203.0.113.53", timeout=3)
    found = [r.address for rrset in reply.answer for r in rrset]
    print(f"  resolve {name}: {dns.rcode.to_text(reply.rcode())} {' '.join(found)}")
    return found

def connect(address):
    try:
        with socket.create_connection((address, 80), timeout=1) as s:
            s.sendall(b"hello\\n")
            print(f"  connect {address}:80: {s.recv(100).decode().strip()!r}")
    except OSError as exc:
        print(f"  connect {address}:80: blocked ({exc.strerror or 'no answer'})")

for address in resolve("www.allowed.test"):
    connect(address)
resolve("www.other.test")
connect("192.0.2.14")
"""


def netns(name: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", name, *argv], capture_output=True, text=True, check=check
    )


def egress_steps() -> None:
    """An agent that reaches exactly its allowlist, in network namespaces (needs root)."""
    step("egress: a per-agent, deny-by-default firewall opened only for allowlisted names")
    if os.geteuid() != 0:
        print("  (skipped: egress drives nftables in network namespaces, which needs root)")
        return
    missing = [tool for tool in ("ip", "nft", "setpriv") if shutil.which(tool) is None]
    if missing:
        print(
            f"  (skipped: {', '.join(missing)} not found; install iproute2, nftables, util-linux)"
        )
        return
    inet, host = f"keel-demo-{os.getpid()}-inet", f"keel-demo-{os.getpid()}-host"
    daemon: subprocess.Popen[bytes] | None = None
    try:
        for name in (inet, host):
            subprocess.run(["ip", "netns", "add", name], check=True)
            netns(name, "ip", "link", "set", "lo", "up")
        subprocess.run(
            ["ip", "link", "add", "eth0", "netns", host, "type", "veth", "peer", "name", "eth0", "netns", inet],
            check=True,
        )  # fmt: skip
        for name, address in ((host, "10.250.0.1/24"), (inet, "10.250.0.2/24")):
            netns(name, "ip", "addr", "add", address, "dev", "eth0")
            netns(name, "ip", "link", "set", "eth0", "up")
        netns(host, "ip", "route", "add", "default", "via", "10.250.0.2")
        for address in ("192.0.2.10/32", "192.0.2.14/32"):
            netns(inet, "ip", "addr", "add", address, "dev", "lo")
        print(f"  (namespaces {inet} and {host}: the host's own network is not touched)")
        zones = STATE / "egress-zones.txt"
        zones.write_text(EGRESS_ZONES)
        internet_log = (STATE / "egress-internet.log").open("wb")
        subprocess.Popen(
            ["ip", "netns", "exec", inet, sys.executable, str(EGRESS / "internet.py"),
             "--zone", str(zones), "--dns", "10.250.0.2"],
            stdout=internet_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        config = {
            "upstream": ["10.250.0.2"],
            "min_ttl": 30,
            "grace": 5,
            "agents": {
                "scout": {"uid": EGRESS_AGENT_UID, "port": 5301, "allow": ["www.allowed.test"]}
            },
        }
        config_file = STATE / "egress.json"
        config_file.write_text(json.dumps(config, indent=2))
        print(f"$ cat {config_file}\n  " + json.dumps(config).replace("\n", "\n  "))
        keel("egress", "check", "--config", str(config_file), "scout", "www.allowed.test")
        keel("egress", "check", "--config", str(config_file), "scout", "www.other.test", expect=1)
        print(f"$ ip netns exec {host} keel egress serve --config {config_file} &", flush=True)
        log = (STATE / "egress.log").open("wb")
        daemon = subprocess.Popen(
            ["ip", "netns", "exec", host, sys.executable, "-m", "keel", "egress", "serve", "--config", str(config_file)],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, KEEL_DEV="1"),
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while keel_quiet("egress", "status") != 0:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("demo: keel egress did not start (see .keel/egress.log)")
            time.sleep(0.1)
        step(f"egress: the agent (uid {EGRESS_AGENT_UID}) resolves and connects")
        agent = netns(
            host, "setpriv", f"--reuid={EGRESS_AGENT_UID}", f"--regid={EGRESS_AGENT_UID}",
            "--clear-groups", sys.executable, "-c", EGRESS_AGENT, check=False,
        )  # fmt: skip
        print(agent.stdout.rstrip() or agent.stderr.rstrip(), flush=True)
        step("egress: keel's own nftables table (inet keel), in the keel host's namespace")
        rules = netns(host, "nft", "list", "chain", "inet", "keel", "agent_scout").stdout
        print("  " + rules.strip().replace("\n", "\n  "))
        # The drop reaches the daemon over NFLOG a moment after it happened.
        deadline = time.monotonic() + 10
        while not egress_saw_a_drop() and time.monotonic() < deadline:
            time.sleep(0.1)
        step("egress: what the daemon saw")
        keel("egress", "status")
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
        for name in (host, inet):
            pids = subprocess.run(
                ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
            )
            for pid in pids.stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "delete", name], check=False)


def egress_saw_a_drop() -> bool:
    result = subprocess.run(
        [sys.executable, "-m", "keel", "egress", "status", "--json"],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ, KEEL_DEV="1"),
    )
    if result.returncode != 0:
        return False
    recent = json.loads(result.stdout)["agents"]["scout"]["recent"]
    return any(item["what"] == "blocked" for item in recent)


def keel_quiet(*args: str) -> int:
    return subprocess.run(
        [sys.executable, "-m", "keel", *args],
        capture_output=True,
        check=False,
        env=dict(os.environ, KEEL_DEV="1"),
    ).returncode


def main() -> int:
    print("keel demo (dev mode: files under ./.keel)")
    STATE.mkdir(exist_ok=True)
    first = ledger_start()
    watch_steps()
    mesh_steps()
    switch_steps()
    egress_steps()
    ledger_audit(first)
    print("\ndemo: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
