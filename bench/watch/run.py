"""Benchmark of keel watch, against systemd's own restarts, in one container run.

    sudo .venv/bin/python bench/watch/run.py [--crashes 200] [--hangs 10] [--cpu-seconds 30]

Boots a Debian 12 container with systemd as PID 1 (the test harness's
nspawn image, keel installed from this checkout) and measures:

1. crash -> healthy again: an agent is SIGKILLed and the time until its
   replacement listens again is taken from the agent itself (it reports the
   moment it listens). Two identical agents take turns: one a plain unit with
   ``Restart=always``, ``RestartSec=0`` (systemd's own restart: the baseline),
   one with ``Restart=no`` supervised by keel watch (systemd backend). Crashes
   are spaced so that each is a first restart (never a back-off), and the
   ledger is checked for that.
2. hang detection: an agent stops answering (alive, silent); the time until
   watch declares it failed, against the budget interval x failures.
3. CPU: keel-watch's own cgroup CPU time while it probes 100 agents over HTTP
   once a second each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "python"))

from tests.harness import nspawn  # noqa: E402
from tests.harness.nspawn import Container  # noqa: E402

WATCH_UNIT = """\
[Unit]
Description=keel watch
[Service]
Type=notify
NotifyAccess=main
ExecStart=/opt/keel/bin/keel watch serve --config /etc/keel/watch.json
WatchdogSec=10s
Restart=always
RestartSec=200ms
"""

AGENT_CMD = "/usr/bin/python3 -S -E /srv/bench/bench_agent.py"


def agent_unit(port: int, restart: str, *, report: bool = True) -> str:
    report_arg = " /run/bench-ready.sock" if report else ""
    return (
        "[Unit]\nStartLimitIntervalSec=0\n[Service]\nType=exec\n"
        f"ExecStart={AGENT_CMD} {port}{report_arg}\n"
        f"Restart={restart}\nRestartSec=0\n"
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def set_watch_config(box: Container, config: dict[str, Any]) -> None:
    base = {
        "backend": "systemd",
        "socket": "/run/keel/watch.sock",
        "ledger": "/var/lib/keel/ledger.db",
    }
    box.write_file("/etc/keel/watch.json", json.dumps({**base, **config}))
    box.run("systemctl", "restart", "keel-watch.service", timeout=120)


def driver(box: Container, *args: str, timeout: float) -> dict[str, Any]:
    out = box.run("/usr/bin/python3", "/srv/bench/driver.py", *args, timeout=timeout)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def crash_phase(box: Container, crashes: int) -> None:
    box.write_file("/etc/systemd/system/bench-keel.service", agent_unit(9001, "no"))
    box.write_file("/etc/systemd/system/bench-systemd.service", agent_unit(9002, "always"))
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "start", "bench-systemd.service")
    set_watch_config(
        box,
        {"agents": {"fast": {"unit": "bench-keel.service", "restart": {"stable_after": 0.3}}}},
    )
    settle = 0.45  # > stable_after: every crash is a first restart
    result = driver(
        box,
        "crash", str(crashes), str(settle),
        "systemd=bench-systemd.service=9002", "keel=bench-keel.service=9001",
        timeout=crashes * 10 + 120,
    )  # fmt: skip
    tail = box.run("keel", "ledger", "tail", "-n", str(crashes * 4 + 50), "--json").stdout
    decisions = [
        json.loads(line)["data"]["decision"]
        for line in tail.splitlines()
        if json.loads(line)["kind"] == "failure" and json.loads(line)["subject"] == "fast"
    ]
    keel_ms = [v * 1000 for v in result["latencies"]["keel"]]
    systemd_ms = [v * 1000 for v in result["latencies"]["systemd"]]
    print(
        f"crash -> healthy again, {crashes} crashes each (SIGKILL; time until the new agent listens)"
    )
    for label, values in (
        ("systemd Restart=always RestartSec=0", systemd_ms),
        ("keel watch, systemd backend", keel_ms),
    ):
        print(
            f"  {label:<36} p50 {percentile(values, 50):6.1f} ms   p99 {percentile(values, 99):6.1f} ms"
            f"   mean {statistics.fmean(values):6.1f} ms   max {max(values):6.1f} ms"
        )
    p50 = percentile(keel_ms, 50) / percentile(systemd_ms, 50)
    p99 = percentile(keel_ms, 99) / percentile(systemd_ms, 99)
    print(f"  ratio keel/systemd: p50 {p50:.2f}x   p99 {p99:.2f}x   (goal: p99 <= 1.2x)")
    restarts = decisions.count("restart")
    print(
        f"  keel decisions recorded in the ledger: {restarts} immediate restarts, "
        f"{len(decisions) - restarts} back-offs (every crash a first restart: "
        f"{'yes' if restarts == len(decisions) == crashes else 'NO'})"
    )
    box.run("systemctl", "stop", "bench-systemd.service")


def hang_phase(box: Container, hangs: int) -> None:
    unit = (
        "[Service]\nType=exec\n"
        "ExecStart=/usr/bin/python3 /srv/bench/watch_agent.py --port 9003\nRestart=no\n"
    )
    box.write_file("/etc/systemd/system/bench-hang.service", unit)
    box.run("systemctl", "daemon-reload")
    interval, timeout, failures = 1.0, 0.25, 3
    probe = {
        "type": "http", "url": "http://127.0.0.1:9003/health",
        "interval": interval, "timeout": timeout, "failures": failures, "grace": 2,
    }  # fmt: skip
    set_watch_config(
        box,
        {
            "agents": {
                "hang": {
                    "unit": "bench-hang.service",
                    "probes": [probe],
                    "restart": {"stable_after": 1},
                }
            }
        },
    )
    result = driver(
        box, "hang", str(hangs), "bench-hang.service", "9003", "hang", timeout=hangs * 30 + 60
    )
    budget = interval * failures
    detections = result["detections"]
    print(
        f"hang detection ({hangs} hangs; http probe every {interval:g} s, timeout {timeout:g} s, "
        f"{failures} failures: budget {budget:g} s)"
    )
    print(
        f"  detected after p50 {percentile(detections, 50):.2f} s, max {max(detections):.2f} s "
        f"= {max(detections) / budget * 100:.0f}% of the budget (goal: <= 110%)"
    )
    box.run("systemctl", "stop", "bench-hang.service")


def cpu_phase(box: Container, seconds: float, kind: str, agents: int = 100) -> None:
    for i in range(agents):
        box.write_file(
            f"/etc/systemd/system/bench-cpu-{i:03d}.service",
            agent_unit(9100 + i, "no", report=False),
        )
    box.run("systemctl", "daemon-reload")
    config = {
        f"cpu{i:03d}": {
            "unit": f"bench-cpu-{i:03d}.service",
            "probes": [
                {
                    "type": kind,
                    **(
                        {"url": f"http://127.0.0.1:{9100 + i}/health"}
                        if kind == "http"
                        else {"port": 9100 + i}
                    ),
                    "interval": 1,
                    "timeout": 0.5,
                    "failures": 3,
                    "grace": 10,
                }
            ],
        }
        for i in range(agents)
    }
    set_watch_config(box, {"agents": config})
    box.wait_until(
        lambda: all(
            a["state"] == "healthy"
            for a in json.loads(box.run("keel", "status", "--json").stdout)["agents"].values()
        ),
        timeout=180,
        what=f"{agents} agents healthy",
    )
    time.sleep(5)  # past start-up, into the steady state
    result = driver(box, "cpu", str(seconds), timeout=seconds + 120)
    windows = sorted(result["windows"], key=lambda w: w["cpu_seconds"] / w["elapsed"])
    median = windows[len(windows) // 2]
    percents = [w["cpu_seconds"] / w["elapsed"] * 100 for w in windows]
    percent = percents[len(percents) // 2]
    user = median["user_seconds"] / median["elapsed"] * 100
    per_probe = median["cpu_seconds"] / (agents * median["elapsed"]) * 1e6
    print(
        f"CPU of keel-watch with {agents} agents, a {kind} probe each every 1 s "
        f"({len(windows)} windows of 10 s)"
    )
    print(
        f"  median {percent:.2f}% of one core (user {user:.2f}%, kernel {percent - user:.2f}%; "
        f"{per_probe:.0f} us per probe), windows {min(percents):.2f}-{max(percents):.2f}%; "
        f"healthy {result['healthy_after']}/{agents}, restarts {result['restarts']} (goal: <= 2%)"
    )
    shares = ", ".join(
        f"{name} {seconds / median['elapsed'] * 100:.2f}%"
        for name, seconds in sorted(median["threads"].items(), key=lambda kv: -kv[1])
        if seconds > 0
    )
    print(f"  by thread: {shares}")
    for i in range(agents):
        box.run("systemctl", "stop", f"bench-cpu-{i:03d}.service", check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crashes", type=int, default=200)
    parser.add_argument("--hangs", type=int, default=10)
    parser.add_argument("--cpu-seconds", type=float, default=60)
    parser.add_argument(
        "--phases", default="crash,hang,cpu", help="which measurements (default: all three)"
    )
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    reason = nspawn.missing_prerequisite()
    if reason is not None:
        print(f"bench/watch: skipped: {reason}")
        return 0
    with nspawn.standalone("watchbench") as box:
        box.copy_in(HERE, "/srv/bench")
        agent = REPO / "python" / "tests" / "watch_agent.py"
        box.write_file("/srv/bench/watch_agent.py", agent.read_text())
        box.write_file("/etc/systemd/system/keel-watch.service", WATCH_UNIT)
        box.write_file("/etc/keel/watch.json", json.dumps({"backend": "systemd", "agents": {}}))
        box.run("systemctl", "daemon-reload")
        print(
            f"container: Debian 12, {box.run('systemctl', '--version').stdout.splitlines()[0]}; "
            f"host: {os.cpu_count()} cores, shared"
        )
        if "crash" in phases:
            crash_phase(box, args.crashes)
        if "hang" in phases:
            hang_phase(box, args.hangs)
        if "cpu" in phases:
            cpu_phase(box, args.cpu_seconds, "http")
            cpu_phase(box, args.cpu_seconds, "tcp")
    return 0


if __name__ == "__main__":
    sys.exit(main())
