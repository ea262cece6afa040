"""Prometheus metrics: the text exposition format (0.0.4), served over plain HTTP.

Series (all prefixed ``keel_watch_``):

- ``up{agent}``: 1 while the agent is healthy, else 0;
- ``agent_state{agent,state}``: 1 for the agent's current state, 0 for the others;
- ``restarts_total{agent}``: restarts watch made;
- ``probe_failures_total{agent,probe}``: failed probe runs (grace included);
- ``restart_latency_seconds{backoff}``: histogram of the time from a failure
  being seen to the agent running again; ``backoff="no"`` for immediate
  restarts (supervision latency), ``"yes"`` when a back-off wait came first.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger("keel.watch.metrics")

STATES = ("starting", "healthy", "unhealthy", "backoff", "quarantined", "stopped")
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: Mapping[str, str]) -> list[str]:
        out = []
        running = 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f"{name}_bucket{_labels({**labels, 'le': le})} {running}")
        out.append(f"{name}_sum{_labels(labels)} {_number(self.sum)}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")
        return out


@dataclass(frozen=True)
class AgentSample:
    name: str
    state: str
    restarts: int
    probe_failures: Mapping[str, int]


def render(agents: Iterable[AgentSample], latency: Mapping[str, Histogram]) -> str:
    """The whole exposition, one ``# HELP``/``# TYPE`` block per metric family."""
    samples = list(agents)
    out: list[str] = []

    def family(name: str, kind: str, text: str) -> None:
        out.append(f"# HELP {name} {text}")
        out.append(f"# TYPE {name} {kind}")

    family("keel_watch_up", "gauge", "1 while the agent is healthy, else 0.")
    for a in samples:
        out.append(f"keel_watch_up{_labels({'agent': a.name})} {int(a.state == 'healthy')}")
    family("keel_watch_agent_state", "gauge", "1 for the agent's current state.")
    for a in samples:
        for state in STATES:
            value = int(a.state == state)
            out.append(
                f"keel_watch_agent_state{_labels({'agent': a.name, 'state': state})} {value}"
            )
    family("keel_watch_restarts_total", "counter", "Restarts made by watch.")
    for a in samples:
        out.append(f"keel_watch_restarts_total{_labels({'agent': a.name})} {a.restarts}")
    family("keel_watch_probe_failures_total", "counter", "Failed probe runs.")
    for a in samples:
        for probe, count in sorted(a.probe_failures.items()):
            out.append(
                f"keel_watch_probe_failures_total{_labels({'agent': a.name, 'probe': probe})} "
                f"{count}"
            )
    family(
        "keel_watch_restart_latency_seconds",
        "histogram",
        "Seconds from a failure being seen to the agent running again.",
    )
    for backoff, histogram in sorted(latency.items()):
        out += histogram.lines("keel_watch_restart_latency_seconds", {"backoff": backoff})
    return "\n".join(out) + "\n"


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return repr(float(value))


# --- the endpoint ---------------------------------------------------------------------


class MetricsServer:
    """``GET /metrics`` on ``host:port`` (port 0 picks a free one; see :attr:`address`)."""

    def __init__(self, host: str, port: int, render_page: Callable[[], str]) -> None:
        self.host = host
        self.port = port
        self._render = render_page
        self._server: asyncio.AbstractServer | None = None
        self.address: tuple[str, int] | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        sockname = self._server.sockets[0].getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            method, _, rest = head.decode("latin-1").partition(" ")
            target = rest.partition(" ")[0]
            if method not in ("GET", "HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"only GET\n", "text/plain"
            elif target.split("?")[0] == "/metrics":
                status, body, ctype = "200 OK", self._render().encode(), CONTENT_TYPE
            else:
                status, body, ctype = "404 Not Found", b"metrics are at /metrics\n", "text/plain"
            head_out = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            writer.write(head_out + (body if method != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
