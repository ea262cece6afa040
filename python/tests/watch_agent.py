"""A test agent for watch's integration and system tests (stdlib only).

    python3 watch_agent.py --port 8080 [--start-delay S] [--exit-after S --code N]
                           [--starts FILE] [--notify]

Serves ``GET /health`` (200 "ok"). ``GET /crash?code=N`` exits with status N
at once; ``GET /hang`` stops answering anything (and stops watchdog pings)
while the process stays alive, as a hung agent does. With ``--notify`` it
speaks sd_notify: ``READY=1`` once listening and ``WATCHDOG=1`` every 0.2 s
while not hung. Each start appends a line to ``--starts``.
"""

from __future__ import annotations

import argparse
import http.server
import os
import socket
import sys
import threading
import time
from urllib.parse import parse_qs, urlsplit

hung = threading.Event()


def notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path == "/crash":
            code = int(parse_qs(parts.query).get("code", ["1"])[0])
            os._exit(code)
        if parts.path == "/hang":
            hung.set()
            self._reply(200, b"hanging\n")
            return
        if hung.is_set():
            time.sleep(3600)
        self._reply(200, b"ok\n")

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that went away mid-answer (a probe that timed out on a loaded
        # machine closes its socket) is not this agent's failure: no traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--start-delay", type=float, default=0.0)
    parser.add_argument("--exit-after", type=float, default=None)
    parser.add_argument("--code", type=int, default=1)
    parser.add_argument("--starts", default=None)
    parser.add_argument("--notify", action="store_true")
    args = parser.parse_args()
    if args.starts:
        with open(args.starts, "a") as f:
            f.write(f"{os.getpid()}\n")
    time.sleep(args.start_delay)
    if args.exit_after is not None:
        threading.Timer(args.exit_after, lambda: os._exit(args.code)).start()
    server = Server(("127.0.0.1", args.port), Handler)
    if args.notify:
        notify("READY=1")

        def ping() -> None:
            while True:
                if not hung.is_set():
                    notify("WATCHDOG=1")
                time.sleep(0.2)

        threading.Thread(target=ping, daemon=True).start()
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
