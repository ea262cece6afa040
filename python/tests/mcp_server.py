"""A real MCP server on the official SDK, for keel mcp's tests and benchmark.

``python mcp_server.py [--name NAME] [--http PORT]``: stdio by default (the
way keel runs servers), Streamable HTTP with ``--http``. Its tools:
``echo``, ``add``, ``pid`` (which process answered), ``sleep`` (a slow
call), ``sleeping`` (how many ``sleep`` calls are running), ``crash`` (the process dies in the middle of the call), ``blob`` (a
large result) and ``fail`` (a tool-level error).
"""

from __future__ import annotations

import argparse
import asyncio
import os

from mcp.server.mcpserver import MCPServer


def build(name: str) -> MCPServer:
    server = MCPServer(name)
    running = {"sleep": 0}

    @server.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool()
    def pid() -> int:
        """The pid of the server process that answered."""
        return os.getpid()

    @server.tool()
    async def sleep(seconds: float) -> str:
        """Answer after some seconds (the slow call the tests cancel or time out: the
        sleep is the tool's work, not a wait in a test)."""
        running["sleep"] += 1
        try:
            await asyncio.sleep(seconds)
        finally:
            running["sleep"] -= 1
        return "slept"

    @server.tool()
    def sleeping() -> int:
        """How many calls of sleep are running (a cancelled one is not)."""
        return running["sleep"]

    @server.tool()
    def crash() -> str:
        """Die in the middle of the call, without answering."""
        os._exit(3)

    @server.tool()
    def blob(size: int) -> str:
        """A string of `size` characters."""
        return "x" * size

    @server.tool()
    def fail(message: str) -> str:
        """Raise: the call ends with a tool error."""
        raise RuntimeError(message)

    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="toolbox")
    parser.add_argument("--http", type=int, default=None)
    args = parser.parse_args()
    server = build(args.name)
    if args.http is not None:
        server.run("streamable-http", host="127.0.0.1", port=args.http)
    else:
        server.run()


if __name__ == "__main__":
    main()
