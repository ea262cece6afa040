"""One benchmark client: tools/call round trips, directly to a stdio server or through the gateway.

``python client.py direct|gateway TARGET --calls N [--seconds S]`` prints one
JSON line: the latencies' p50/p99 in microseconds and the calls per second.
``direct`` starts the server (TARGET, a script) itself over stdio, as an agent
without keel would; ``gateway`` connects to the gateway's socket (TARGET).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from mcp import ClientSession, StdioServerParameters, stdio_client

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python" / "src"))

from keel.mcp.client import open_session


async def measure(
    session: ClientSession, tool: str, calls: int, seconds: float | None
) -> dict[str, Any]:
    for _ in range(20):  # warm up
        await session.call_tool(tool, {"text": "warm"})
    latencies: list[float] = []
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        await session.call_tool(tool, {"text": "hello"})
        latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - started
        if (seconds is None and len(latencies) >= calls) or (
            seconds is not None and elapsed >= seconds
        ):
            break
    raw = list(latencies)
    latencies.sort()
    return {
        "latencies": raw,
        "calls": len(latencies),
        "p50_us": statistics.median(latencies) * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99) - 1] * 1e6,
        "per_second": len(latencies) / elapsed,
    }


async def run(
    mode: str, target: str, calls: int, seconds: float | None, tool: str
) -> dict[str, Any]:
    if mode == "direct":
        params = StdioServerParameters(command=sys.executable, args=[target])
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            return await measure(session, "echo", calls, seconds)
    async with open_session(Path(target)) as session:
        return await measure(session, tool, calls, seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["direct", "gateway"])
    parser.add_argument("target")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--tool", default="toolbox.echo", help="gateway mode: the tool to call")
    args = parser.parse_args()
    result = anyio.run(run, args.mode, args.target, args.calls, args.seconds, args.tool)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
