"""The in-container half of the watch benchmark (run by run.py inside the container).

    python3 driver.py crash TRIALS SETTLE LABEL=UNIT=PORT ...
    python3 driver.py hang TRIALS UNIT PORT AGENT
    python3 driver.py cpu SECONDS

Prints one JSON object on stdout. Times are CLOCK_MONOTONIC, shared with the
agents (same kernel), so "ready" times from the agents compare with kill times.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPORT = "/run/bench-ready.sock"


def main_pid(unit: str) -> int:
    out = subprocess.run(
        ["systemctl", "show", "-p", "MainPID", "--value", unit],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip() or 0)


def watch_status() -> dict[str, Any]:
    out = subprocess.run(["keel", "status", "--json"], capture_output=True, text=True, check=True)
    status: dict[str, Any] = json.loads(out.stdout)
    return status


def wait_ready(sock: socket.socket, port: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        data = sock.recv(256).decode().split()
        if int(data[0]) == port:
            return float(data[1])


def crash(trials: int, settle: float, targets: list[tuple[str, str, int]]) -> dict[str, Any]:
    if os.path.exists(REPORT):
        os.unlink(REPORT)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(REPORT)
    os.chmod(REPORT, 0o666)  # noqa: S103 - agents may run as other users
    latencies: dict[str, list[float]] = {label: [] for label, _, _ in targets}
    for _, unit, _ in targets:  # each agent must be up before the first crash
        deadline = time.monotonic() + 30
        while main_pid(unit) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    for trial in range(trials):
        order = targets if trial % 2 == 0 else list(reversed(targets))
        for label, unit, port in order:
            pid = main_pid(unit)
            sock.setblocking(False)
            try:  # drop stale reports
                while True:
                    sock.recv(256)
            except BlockingIOError:
                pass
            sock.setblocking(True)
            started = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            ready = wait_ready(sock, port, 30)
            latencies[label].append(ready - started)
            time.sleep(settle)
    return {"latencies": latencies}


def hang(trials: int, unit: str, port: int, agent: str) -> dict[str, Any]:
    detections = []
    for _ in range(trials):
        deadline = time.monotonic() + 60
        while True:
            state = watch_status()["agents"][agent]
            # Past the start-up grace (2 s): the budget counts from there.
            if state["state"] == "healthy" and (state["uptime"] or 0) > 2.2:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{agent} never became healthy: {state}")
            time.sleep(0.05)
        restarts = state["restarts"]
        time.sleep(random.uniform(0, 1.0))  # a random phase against the probe timer
        hung_at = time.time()
        urllib.request.urlopen(f"http://127.0.0.1:{port}/hang", timeout=5).read()
        while True:
            state = watch_status()["agents"][agent]
            if state["restarts"] > restarts:
                break
            if time.time() - hung_at > 60:
                raise SystemExit(f"{agent}: the hang was never detected: {state}")
            time.sleep(0.05)
        detections.append(state["last_error_at"] - hung_at)
    return {"detections": detections, "unit": unit}


def cpu(seconds: float) -> dict[str, Any]:
    # keel-watch's own CPU time, from /proc (cgroup accounting may be off).
    pid = main_pid("keel-watch.service")
    ticks = os.sysconf("SC_CLK_TCK")

    def usage() -> tuple[float, float]:
        """(user + system, user) seconds of keel-watch and its reaped children."""
        raw = Path(f"/proc/{pid}/stat").read_text()
        fields = [int(f) for f in raw[raw.rindex(")") + 2 :].split()[11:15]]
        return sum(fields) / ticks, (fields[0] + fields[2]) / ticks

    def threads() -> dict[str, float]:
        found: dict[str, float] = {}
        for task in Path(f"/proc/{pid}/task").iterdir():
            # Python does not name its threads for the kernel: the event loop is
            # the main thread; the probe engine, the ledger writer are the others.
            name = "event loop" if task.name == str(pid) else "other threads"
            raw = (task / "stat").read_text()
            fields = raw[raw.rindex(")") + 2 :].split()
            found[name] = found.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
        return found

    status = watch_status()
    states = [a["state"] for a in status["agents"].values()]
    # Several short windows, so that a burst of load from elsewhere on a shared
    # machine shows as one outlier window instead of skewing one long one.
    windows = []
    for _ in range(max(1, int(seconds // 10))):
        before, before_threads, start = usage(), threads(), time.monotonic()
        time.sleep(10)
        after, after_threads, end = usage(), threads(), time.monotonic()
        windows.append(
            {
                "cpu_seconds": after[0] - before[0],
                "user_seconds": after[1] - before[1],
                "elapsed": end - start,
                "threads": {
                    name: after_threads[name] - before_threads.get(name, 0.0)
                    for name in after_threads
                },
            }
        )
    status = watch_status()
    return {
        "windows": windows,
        "agents": len(states),
        "healthy_before": states.count("healthy"),
        "healthy_after": [a["state"] for a in status["agents"].values()].count("healthy"),
        "restarts": sum(a["restarts"] for a in status["agents"].values()),
    }


def main() -> None:
    mode = sys.argv[1]
    if mode == "crash":
        trials, settle = int(sys.argv[2]), float(sys.argv[3])
        targets = []
        for spec in sys.argv[4:]:
            label, unit, port = spec.split("=")
            targets.append((label, unit, int(port)))
        result = crash(trials, settle, targets)
    elif mode == "hang":
        result = hang(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        result = cpu(float(sys.argv[2]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
