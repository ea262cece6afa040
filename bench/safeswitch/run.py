"""Benchmark of keel switch: how fast it gets the old system back, and what a switch costs.

    .venv/bin/python bench/safeswitch/run.py [--runs 10] [--where host,container]

Three figures, each against a baseline measured in the same run, on the
generation fixtures of the integration tests (systems whose
``switch-to-configuration`` records a timestamp when it re-points the running
system), every time taken inside the machine that switches:

1. failed gate -> old system active: a check fails (it writes the moment it
   fails, then exits 1) and the old system's activation re-points the
   running system. Baseline: the old system's bare activation (what the
   figure contains of activation; goal: <= 2 s beyond it).
2. SIGKILL of the switcher -> rollback done: the switcher is killed mid-gate
   and the rollback timer does the rest; "done" is the final state written.
   Baseline: the deadline itself (goal: kill -> done <= deadline + 1 s).
3. a healthy switch, gate 0, no checks: ``keel switch`` from start to exit
   against a bare ``switch-to-configuration test`` of the same system, for an
   instant activation and for one that works for a second.

``host`` uses ``--timer process`` on this machine; ``container`` boots the
test harness's nspawn image (real systemd as PID 1) and uses transient
systemd units, the production path (needs root and the harness's rootfs).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "python"))

from tests.harness import nspawn  # noqa: E402
from tests.harness.nspawn import Container  # noqa: E402
from tests.integration.safeswitch.lab import SCRIPT  # noqa: E402

DEADLINE = 3.0  # seconds, figure 2


@dataclass(frozen=True)
class Target:
    """Where the switches happen: this host, or a container; shell in, text out."""

    name: str
    lab: str
    run_dir: str
    keel: str
    timer: str
    sh: Callable[[str], str]

    def write(self, path: str, text: str, mode: str = "644") -> None:
        self.sh(
            f"mkdir -p {shlex.quote(os.path.dirname(path))} && cat > {shlex.quote(path)} <<'KEEL_EOF'\n"
            f"{text}\nKEEL_EOF\nchmod {mode} {shlex.quote(path)}"
        )

    def system(self, name: str, behaviour: str = "ok") -> str:
        path = f"{self.lab}/systems/{name}"
        self.write(
            f"{path}/bin/switch-to-configuration", SCRIPT.format(name=name, lab=self.lab), "755"
        )
        self.write(f"{self.lab}/behaviour/{name}", behaviour)
        return path

    def reset(self, checks: list[dict[str, object]], **settings: object) -> str:
        """A fresh lab: gen-a running and in the profile; returns the config's path."""
        lab = self.lab
        self.sh(f"rm -rf {lab} {self.run_dir} && mkdir -p {lab}/profiles {lab}/gcroots")
        old = self.system("gen-a")
        self.sh(
            f"ln -s {old} {lab}/profiles/system-1-link && ln -s system-1-link {lab}/profiles/system"
            f" && ln -s {old} {lab}/current && echo ok > {lab}/health"
        )
        config = {
            "profile": f"{lab}/profiles/system",
            "current": f"{lab}/current",
            "gcroots": f"{lab}/gcroots",
            "run_dir": self.run_dir,
            "state_dir": f"{lab}/state",
            "ledger": f"{lab}/ledger.db",
            "timer": self.timer,
            "keel": shlex.split(self.keel),
            "interval": 0.1,
            "checks": checks,
        } | settings
        self.write(f"{lab}/safeswitch.json", json.dumps(config))
        return f"{lab}/safeswitch.json"

    def stamp(self, path: str) -> float:
        return float(self.sh(f"cat {path}").strip())

    def timed(self, command: str) -> float:
        """Seconds ``command`` took, timed inside the target; it must exit 0."""
        out = self.sh(f"s=$(date +%s.%N); {command} >/dev/null; e=$(date +%s.%N); echo $s $e")
        start, end = out.split()
        return float(end) - float(start)


def rollback_latency(target: Target, runs: int) -> tuple[list[float], list[float]]:
    """Figure 1: (check failed -> old active) per run, and the bare old activation."""
    lab = target.lab
    check = f"grep -qx ok {lab}/health || {{ date +%s.%N > {lab}/failed-at; exit 1; }}"
    latencies, bare = [], []
    for _ in range(runs):
        config = target.reset([{"type": "command", "command": check, "name": "health"}], gate=5)
        bad = target.system("gen-b", "break")
        out = target.sh(f"{target.keel} switch --config {config} {bad} >/dev/null; echo $?").strip()
        if out != "1":
            raise SystemExit(f"bench/safeswitch: the bad switch exited {out}, expected 1")
        latencies.append(target.stamp(f"{lab}/activated-gen-a") - target.stamp(f"{lab}/failed-at"))
        bare.append(target.timed(f"{lab}/systems/gen-a/bin/switch-to-configuration test"))
    return latencies, bare


def kill_latency(target: Target, runs: int) -> tuple[list[float], list[float]]:
    """Figure 2: (SIGKILL -> rollback done) and (armed -> rollback done) per run."""
    lab = target.lab
    slow = {"type": "command", "command": "sleep 600", "timeout": 900, "name": "slow"}
    after_kill, after_arming = [], []
    for _ in range(runs):
        config = target.reset([slow], gate=1, deadline=DEADLINE)
        new = target.system("gen-b")
        start = f"{target.keel} switch --config {config} {new}"
        if target.timer == "systemd":
            target.sh(f"systemd-run --unit=bench-switcher --quiet --service-type=exec -- {start}")
            pid_of = "systemctl show -P MainPID bench-switcher.service"
        else:
            target.sh(f"setsid {start} >/dev/null 2>&1 & echo $! > {lab}/switcher.pid")
            pid_of = f"cat {lab}/switcher.pid"
        target.sh(
            f'until grep -q \'"phase": "gating"\' {target.run_dir}/state.json 2>/dev/null; '
            "do sleep 0.01; done"
        )
        target.sh(f"date +%s.%N > {lab}/killed-at; kill -9 $({pid_of})")
        target.sh(
            f'until grep -q \'"phase": "rolled-back"\' {target.run_dir}/state.json 2>/dev/null; '
            "do sleep 0.01; done"
        )
        state = json.loads(target.sh(f"cat {target.run_dir}/state.json"))
        done = float(state["updated_at"])
        # The rollback writes its ledger entry after the state: let it finish.
        if target.timer == "systemd":
            unit = state["timer"]["unit"].removesuffix(".timer") + ".service"
            target.sh(f"while systemctl -q is-active {unit}; do sleep 0.01; done")
        else:
            pid = state["timer"]["pid"]
            target.sh(
                f"while [ -e /proc/{pid} ] && ! grep -q ') Z' /proc/{pid}/stat; do sleep 0.01; done"
            )
        after_kill.append(done - target.stamp(f"{lab}/killed-at"))
        after_arming.append(done - float(state["started_at"]))
        if target.timer == "systemd":
            target.sh("systemctl reset-failed bench-switcher.service 2>/dev/null; true")
    return after_kill, after_arming


def switch_overhead(target: Target, runs: int, behaviour: str) -> tuple[list[float], list[float]]:
    """Figure 3: a healthy switch (gate 0, no checks) against a bare activation."""
    keel_times, bare = [], []
    for i in range(runs):
        config = target.reset([], gate=0)
        new = target.system(f"gen-{i}", behaviour)
        keel_times.append(target.timed(f"{target.keel} switch --config {config} {new}"))
        bare.append(target.timed(f"{new}/bin/switch-to-configuration test"))
    return keel_times, bare


def ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:7.1f} ms  max {max(values) * 1000:7.1f} ms"


def report(target: Target, runs: int) -> None:
    print(f"\n== {target.name} (timer: {target.timer}), {runs} runs each")
    latencies, bare = rollback_latency(target, runs)
    print("1. failed gate -> old system active")
    print(f"   baseline (old system's bare activation): {ms(bare)}")
    print(f"   keel:                                     {ms(latencies)}")
    extra = statistics.median(latencies) - statistics.median(bare)
    print(
        f"   ratio keel/baseline {statistics.median(latencies) / statistics.median(bare):.1f}x; "
        f"beyond activation: {extra * 1000:.0f} ms (goal <= 2000 ms)"
    )
    after_kill, after_arming = kill_latency(target, max(3, runs // 2))
    print(f"2. SIGKILL of the switcher mid-gate -> rollback done (deadline {DEADLINE:g} s)")
    print(f"   baseline (the deadline):                  {DEADLINE * 1000:7.1f} ms")
    print(f"   keel, armed -> done:                      {ms(after_arming)}")
    print(f"   keel, kill -> done:                       {ms(after_kill)}")
    late = max(after_arming) - DEADLINE
    print(
        f"   ratio (armed -> done)/deadline {statistics.median(after_arming) / DEADLINE:.2f}x; "
        f"kill -> done max {max(after_kill):.2f} s (goal <= deadline + 1 s = {DEADLINE + 1:g} s); "
        f"done at most {late * 1000:.0f} ms after the deadline"
    )
    cli = [target.timed(f"{target.keel} --version") for _ in range(runs)]
    for behaviour, label in (("ok", "an instant activation"), ("slow", "a 1 s activation")):
        keel_times, bare = switch_overhead(target, runs, behaviour)
        overhead = statistics.median(keel_times) - statistics.median(bare)
        print(f"3. healthy switch, gate 0, {label}")
        print(f"   baseline (bare switch-to-configuration test): {ms(bare)}")
        print(f"   keel switch (arm, test, commit with boot, disarm, ledger): {ms(keel_times)}")
        print(
            f"   ratio {statistics.median(keel_times) / statistics.median(bare):.2f}x; "
            f"overhead {overhead * 1000:.0f} ms (starting the keel CLI alone, "
            f"`keel --version`: {statistics.median(cli) * 1000:.0f} ms)"
        )


def host_target(workdir: Path) -> Target:
    def sh(script: str) -> str:
        result = subprocess.run(
            ["/bin/sh", "-c", script], capture_output=True, text=True, timeout=300, check=False
        )
        if result.returncode != 0:
            raise SystemExit(f"bench/safeswitch: `{script[:120]}` failed: {result.stderr.strip()}")
        return result.stdout

    keel = f"{shlex.quote(sys.executable)} -m keel"
    # The state file on a tmpfs, as /run/keel is on a host.
    shm = Path("/dev/shm")
    run_dir = shm / workdir.name if shm.is_dir() else workdir / "run"
    return Target("this host", str(workdir / "lab"), str(run_dir), keel, "process", sh)


def container_target(box: Container) -> Target:
    def sh(script: str) -> str:
        return box.run("/bin/sh", "-c", script, timeout=300).stdout

    return Target(
        "a container (systemd 252 as PID 1)",
        "/srv/lab",
        "/run/keel/safeswitch",
        "/opt/keel/bin/keel",
        "systemd",
        sh,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--where", default="host,container", help="host, container or both")
    args = parser.parse_args()
    where = set(args.where.split(","))
    print(f"bench/safeswitch: {os.cpu_count()} cores, shared with other work")
    if "host" in where:
        with tempfile.TemporaryDirectory(prefix="keel-switch-bench-") as tmp:
            target = host_target(Path(tmp))
            try:
                report(target, args.runs)
            finally:
                shutil.rmtree(target.run_dir, ignore_errors=True)
    if "container" in where:
        reason = nspawn.missing_prerequisite()
        if reason is not None:
            print(f"\n== container: skipped: {reason}")
            return 0
        with nspawn.standalone("switchbench") as box:
            report(container_target(box), args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
