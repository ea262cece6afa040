"""Helpers for watch's integration tests: configs, a running daemon, HTTP stand-ins.

The Telegram stand-in speaks the Bot API's shape on loopback
(``POST /bot<token>/sendMessage`` with a JSON body, answered with
``{"ok": true, "result": {...}}`` or ``{"ok": false, "error_code": 429,
"parameters": {"retry_after": N}}``), as the real API does.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from keel import service
from keel.watch import config as watch_config
from keel.watch.daemon import Watch
from keel.watch.process_backend import ProcessBackend

AGENT = Path(__file__).resolve().parents[1] / "watch_agent.py"


def zombie_children(parent: int | None = None) -> list[int]:
    """The children of ``parent`` (default: this process) that exited and were never reaped."""
    parent = os.getpid() if parent is None else parent
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_bytes()
                fields = stat[stat.rindex(b")") + 2 :].split()
                if fields[0] == b"Z" and int(fields[1]) == parent:
                    found.append(int(entry.name))
    return sorted(found)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def agent_entry(port: int, *extra: str, **fields: Any) -> dict[str, Any]:
    """A process-backend agent running watch_agent.py with an http probe on ``port``."""
    entry: dict[str, Any] = {
        "command": [sys.executable, str(AGENT), "--port", str(port), *extra],
        "probes": [
            {
                "type": "http",
                "url": f"http://127.0.0.1:{port}/health",
                "interval": 0.5,
                "timeout": 0.4,
                "failures": 2,
                "grace": 3,
            }
        ],
        "stop_timeout": 2,
    }
    entry.update(fields)
    return entry


def write_config(tmp: Path, agents: dict[str, Any], **top: Any) -> Path:
    data: dict[str, Any] = {
        "backend": "process",
        "socket": str(tmp / "watch.sock"),
        "ledger": str(tmp / "ledger.db"),
        "state_file": str(tmp / "processes.json"),
        "host": "testhost",
        "agents": agents,
    }
    data.update(top)
    path = tmp / "watch.json"
    path.write_text(json.dumps(data))
    return path


@contextlib.asynccontextmanager
async def running_watch(config_path: Path, **backend_options: Any) -> AsyncIterator[Watch]:
    config = watch_config.load(config_path)
    backend = ProcessBackend(config.agents, state_file=config.state_file, **backend_options)
    watch = Watch(config, backend)
    async with service.running("watch", watch, config.common):
        yield watch


async def until(
    condition: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float = 30.0,
    what: str = "condition",
) -> None:
    """Poll ``condition`` every 20 ms; fail naming ``what`` after ``timeout`` seconds.

    For states another process reaches (a daemon's status, a server's count,
    a file written): nothing notifies the test of them, so the state polled
    is the event. ``condition`` may be a coroutine function (a status asked
    over a socket).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reached = condition()
        if not isinstance(reached, bool):
            reached = await reached
        if reached:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what} did not happen within {timeout:g} s")


def ledger_entries(path: Path) -> list[Any]:
    from keel.ledger import Ledger

    ledger = Ledger.open(path, create=False)
    try:
        return [entry for _, entry in ledger.entries()]
    finally:
        ledger.close()


# --- HTTP stand-ins ----------------------------------------------------------------------


class Recorder(http.server.ThreadingHTTPServer):
    """An HTTP server on loopback that records POSTs and answers from a script."""

    def __init__(self, answer: Callable[[Recorder, str, dict[str, Any]], tuple[int, Any]]) -> None:
        self.requests: list[tuple[float, str, dict[str, Any]]] = []
        self.answer = answer
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up and closed (keel's timeout) is not a stand-in failure.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Recorder

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        with self.server.lock:
            self.server.requests.append((time.monotonic(), self.path, body))
            status, payload = self.server.answer(self.server, self.path, body)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def http_stub(
    answer: Callable[[Recorder, str, dict[str, Any]], tuple[int, Any]],
) -> Iterator[Recorder]:
    server = Recorder(answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def telegram_answer(
    *, throttle_first: int = 0, retry_after: int = 1
) -> Callable[[Recorder, str, dict[str, Any]], tuple[int, Any]]:
    """Bot API answers: the first ``throttle_first`` calls get 429 with retry_after."""

    def answer(server: Recorder, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        if not path.endswith("/sendMessage") or not path.startswith("/bot"):
            return 404, {"ok": False, "error_code": 404, "description": "Not Found"}
        if len(server.requests) <= throttle_first:
            return 429, {
                "ok": False,
                "error_code": 429,
                "description": f"Too Many Requests: retry after {retry_after}",
                "parameters": {"retry_after": retry_after},
            }
        return 200, {
            "ok": True,
            "result": {
                "message_id": len(server.requests),
                "chat": {"id": body.get("chat_id"), "type": "private"},
                "date": int(time.time()),
                "text": body.get("text"),
            },
        }

    return answer


# --- agents that leave their process group ------------------------------------------------


def escaping_agent(marker: int) -> dict[str, Any]:
    """An agent whose descendants leave its process group, as daemons do.

    Four processes carry ``600.<marker>`` in their command line: the agent
    itself; two in a session of their own (``setsid``); one double-forked into
    another session with an empty environment (``env -i``), orphaned at once.
    """
    tag = f"600.{marker}"
    script = (
        f"setsid sh -c 'sleep {tag} & exec sleep {tag}' & "
        f"(setsid env -i sleep {tag} &); "
        f"exec sleep {tag}"
    )
    return {"command": ["sh", "-c", script], "stop_timeout": 2}


def tagged(marker: int) -> list[int]:
    """Pids of the processes with ``600.<marker>`` in their command line."""
    needle = f"600.{marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if needle in cmdline.split(b"\0"):
                found.append(int(entry.name))
    return found


@contextlib.contextmanager
def cleaned_up(marker: int) -> Iterator[int]:
    """The marker; whatever carries it is killed at the end, whatever the test did."""
    try:
        yield marker
    finally:
        for pid in tagged(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def cgroups_available() -> str | None:
    """None if this process can give agents cgroups, else why not."""
    from keel.watch.scopes import CgroupTree

    tree, reason = CgroupTree.create()
    if tree is None:
        return reason
    tree.path.rmdir()
    return None
