"""An example agent for watch demos: an HTTP health endpoint, and trouble on cue.

    python3 flaky.py --port 8080                      # steady: always healthy
    python3 flaky.py --port 8081 --trouble-after 3 --state /tmp/flaky.count

With ``--trouble-after S`` it serves ``GET /health`` for S seconds, then
misbehaves: on odd starts it crashes (exit status 3), on even starts it hangs
(the process lives on but answers nothing). ``--state`` keeps the count of
starts across restarts. Standard library only.
"""

from __future__ import annotations

import argparse
import http.server
import os
import sys
import threading
import time
from pathlib import Path

hung = threading.Event()


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if hung.is_set():
            time.sleep(3600)  # a hung agent: connection accepted, no answer
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def count_start(state: Path | None) -> int:
    if state is None:
        return 1
    try:
        starts = int(state.read_text()) + 1
    except (OSError, ValueError):
        starts = 1
    state.write_text(str(starts))
    return starts


def trouble(starts: int) -> None:
    if starts % 2:
        print(f"flaky[{os.getpid()}]: crashing (start {starts})", file=sys.stderr, flush=True)
        os._exit(3)
    print(f"flaky[{os.getpid()}]: hanging (start {starts})", file=sys.stderr, flush=True)
    hung.set()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--trouble-after", type=float, default=None)
    parser.add_argument("--state", type=Path, default=None)
    args = parser.parse_args()
    starts = count_start(args.state)
    if args.trouble_after is not None:
        threading.Timer(args.trouble_after, trouble, args=(starts,)).start()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Health)
    server.daemon_threads = True
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
