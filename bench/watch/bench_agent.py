"""The benchmark's agent: listen, say "ready" with the time, answer HTTP probes.

    python3 -S bench_agent.py PORT [REPORT_SOCKET]

Once its socket listens it sends ``"PORT MONOTONIC_TIME"`` as one datagram to
REPORT_SOCKET, so the driver learns the moment it is serving again without
polling. Every connection gets a minimal ``200 ok``.
"""

import contextlib
import socket
import sys
import time

port = int(sys.argv[1])
listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(128)
if len(sys.argv) > 2:
    report = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with contextlib.suppress(OSError):  # nobody is measuring
        report.sendto(f"{port} {time.monotonic()}".encode(), sys.argv[2])
    report.close()
reply = b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
while True:
    connection, _ = listener.accept()
    try:
        connection.settimeout(2)
        connection.recv(4096)
        connection.sendall(reply)
    except OSError:
        pass
    finally:
        connection.close()
