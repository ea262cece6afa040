"""Generation fixtures for safeswitch tests: systems that record what they are asked to do.

A :class:`Lab` is a directory standing in for a host's Nix bits: ``current``
(the running-system link), ``profiles/system`` with ``system-N-link``
generations, a run directory, GC roots and a ledger. Each system made by
:meth:`Lab.system` is a directory whose ``bin/switch-to-configuration``

- appends ``VERB NAME`` to ``calls`` (``test``, ``boot``, ``dry-activate``);
- on ``test``, re-points ``current`` at itself atomically and writes ``health``
  (``ok``; ``broken`` when told to ``break``), which the gate's check reads;
- on ``boot``, writes the boot default to ``boot-default``;
- does what ``behaviour/NAME`` says at the moment it runs: ``ok``, ``fail``
  (exit 1 after re-pointing, as a half-done activation would), ``hang``
  (re-point, then never return), ``break`` (activate fine, report broken),
  ``slow`` (a second's work, as a small real activation), ``fail-boot``
  (``boot`` exits 1).

The behaviour is read at each call, so a test can change it mid-switch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

KEEL = [sys.executable, "-m", "keel"]

SCRIPT = """#!/bin/sh
# A keel safeswitch test generation: {name}
lab={lab}
name={name}
verb="$1"
here=$(cd "$(dirname "$0")/.." && pwd -P)
behaviour=$(cat "$lab/behaviour/$name" 2>/dev/null || echo ok)
echo "$verb $name" >> "$lab/calls"
case "$verb" in
  test|switch)
    ln -s "$here" "$lab/current.tmp.$$" && mv -T "$lab/current.tmp.$$" "$lab/current"
    date +%s.%N > "$lab/activated-$name"
    case "$behaviour" in
      fail) echo "activation of $name failed: a unit did not start" >&2; exit 1 ;;
      hang) echo "activation of $name hangs"; exec sleep 3600 ;;
      break) echo broken > "$lab/health" ;;
      slow) sleep 1; echo ok > "$lab/health" ;;
      *) echo ok > "$lab/health" ;;
    esac
    echo "activated $name" ;;
  boot)
    if [ "$behaviour" = fail-boot ]; then echo "cannot install the boot loader" >&2; exit 1; fi
    echo "$here" > "$lab/boot-default.tmp.$$" && mv "$lab/boot-default.tmp.$$" "$lab/boot-default" ;;
  dry-activate)
    echo "would restart the following units: keel-agent-$name.service" ;;
  *) echo "unknown verb $verb" >&2; exit 1 ;;
esac
"""


# An agent that serves /health and dies when the running system says it is broken
# (as an agent does whose new configuration it cannot live with): the integration
# and system tests of the gate run it under watch. Arguments: HEALTH_FILE PORT.
HEALTH_AGENT = """
import http.server, os, sys, threading, time
health, port = sys.argv[1], int(sys.argv[2])
def broken():
    try:
        return open(health).read().strip() != "ok"
    except OSError:
        return True
if broken():
    sys.exit(1)
def watch():
    while not broken():
        time.sleep(0.05)
    os._exit(1)
threading.Thread(target=watch, daemon=True).start()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "3"); self.end_headers()
        self.wfile.write(b"ok\\n")
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    def handle_error(self, request, address):  # a probe that gave up is no failure
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, address)
S(("127.0.0.1", port), H).serve_forever()
"""


class Lab:
    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("systems", "behaviour", "profiles", "run", "gcroots"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.current = root / "current"
        self.profile = root / "profiles" / "system"
        self.run_dir = root / "run"
        self.state_dir = root / "state"  # what survives a reboot (safeswitch's evidence)
        self.gcroots = root / "gcroots"
        self.ledger = root / "ledger.db"
        self.health_check = f"grep -qx ok {root}/health"

    def system(self, name: str, behaviour: str = "ok", *, where: Path | None = None) -> Path:
        path = (where or self.root / "systems") / name
        (path / "bin").mkdir(parents=True, exist_ok=True)
        script = path / "bin" / "switch-to-configuration"
        script.write_text(SCRIPT.format(name=name, lab=self.root))
        script.chmod(0o755)
        self.behave(name, behaviour)
        return path

    def behave(self, name: str, behaviour: str) -> None:
        (self.root / "behaviour" / name).write_text(behaviour + "\n")

    def boot(self, system: Path) -> None:
        """Make ``system`` the running system and generation 1 of the profile."""
        link = self.profile.parent / "system-1-link"
        link.symlink_to(system)
        self.profile.symlink_to("system-1-link")
        self.current.symlink_to(system)
        (self.root / "health").write_text("ok\n")
        (self.root / "boot-default").write_text(f"{system}\n")

    def calls(self) -> list[str]:
        path = self.root / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def running(self) -> str:
        return os.path.realpath(self.current)

    def boot_default(self) -> str:
        return (self.root / "boot-default").read_text().strip()

    def profile_system(self) -> str:
        return os.path.realpath(self.profile)

    def generations(self) -> list[str]:
        return sorted(p.name for p in self.profile.parent.glob("system-*-link"))

    def config(self, **settings: Any) -> Path:
        config: dict[str, Any] = {
            "profile": str(self.profile),
            "current": str(self.current),
            "run_dir": str(self.run_dir),
            "state_dir": str(self.state_dir),
            "gcroots": str(self.gcroots),
            "ledger": str(self.ledger),
            "timer": "process",
            "keel": KEEL,
            "interval": 0.1,
            "gate": 1,
            "deadline": 20,
            "checks": [{"type": "command", "command": self.health_check, "name": "health"}],
        }
        config.update(settings)
        path = self.root / "safeswitch.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def keel(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*KEEL, *args], capture_output=True, text=True, timeout=timeout, check=False
        )

    def switch(
        self, system: Path, *args: str, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return self.keel(
            "switch", "--config", str(self.config_path), *args, str(system), timeout=timeout
        )

    @property
    def config_path(self) -> Path:
        path = self.root / "safeswitch.json"
        if not path.exists():
            self.config()
        return path

    def spawn_switch(self, system: Path, *args: str) -> subprocess.Popen[str]:
        log = open(self.root / "switcher.log", "a")  # noqa: SIM115 - closed by the process's end
        return subprocess.Popen(
            [*KEEL, "switch", "--config", str(self.config_path), *args, str(system)],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def state(self) -> dict[str, Any] | None:
        path = self.run_dir / "state.json"
        if not path.exists():
            return None
        value: dict[str, Any] = json.loads(path.read_text())
        return value

    def ledger_entries(self) -> list[dict[str, Any]]:
        if not self.ledger.exists():
            return []
        out = self.keel("ledger", "tail", "--db", str(self.ledger), "-n", "1000", "--json")
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout} s")
