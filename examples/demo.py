"""keel demo: what `make demo` runs (dev mode, every file under ./.keel).

The demo is a sequence of steps, each printing what it does and the commands
it runs, so that it reads as a walk through the appliance. Today it shows the
ledger; later steps start the services around it on embedded defaults.

Run it from the repository root with ``KEEL_DEV=1 .venv/bin/python examples/demo.py``
(``make demo`` does exactly that).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

STATE = Path(".keel")


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def keel(*args: str) -> str:
    """Run the real CLI in its own process, echoing the command and its output."""
    print(f"$ keel {shlex.join(args)}", flush=True)
    result = subprocess.run(
        [sys.executable, "-m", "keel", *args],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ, KEEL_DEV="1"),
    )
    if result.stdout:
        print("  " + result.stdout.rstrip("\n").replace("\n", "\n  "), flush=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"demo: `keel {shlex.join(args)}` failed (exit {result.returncode})")
    return result.stdout


# The events a small appliance records in its first minutes (metadata only).
EVENTS = [
    ("watch", "started", "notes", {"unit": "keel-agent-notes.service", "tier": 1}),
    ("watch", "restart", "scout", {"reason": "http probe failed", "attempt": 1}),
    ("egress", "blocked", "scout", {"address": "203.0.113.7", "port": 443}),
    ("mesh", "message.sent", "ops", {"peer": "b3c1f0d2", "bytes": 412, "room": "ops"}),
    ("safeswitch", "switch", "system", {"generation": 42, "result": "passed"}),
]


def ledger_steps() -> None:
    step("ledger: append a handful of events (each one durable transaction)")
    first = None
    for source, kind, subject, data in EVENTS:
        index = int(
            keel(
                "ledger",
                "append",
                "--source",
                source,
                "--kind",
                kind,
                "--subject",
                subject,
                "--data",
                json.dumps(data),
            )
        )
        first = index if first is None else first
    assert first is not None

    step("ledger: the last entries")
    keel("ledger", "tail", "-n", str(len(EVENTS)))

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


def main() -> int:
    print("keel demo (dev mode: files under ./.keel)")
    STATE.mkdir(exist_ok=True)
    ledger_steps()
    print("\ndemo: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
