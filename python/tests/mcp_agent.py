"""An agent process for keel mcp's tests: MCP calls through the gateway, results as JSON lines.

``python mcp_agent.py SOCKET [--http] [--mode MODE] OP...`` where each OP is
``list`` or ``call:NAME:JSON-ARGUMENTS``. One JSON line per OP on stdout:
``{"tools": [...]}``, ``{"result": {...}}`` or ``{"error": {"code": N,
"message": "..."}}``. ``cancel:NAME:JSON-ARGUMENTS`` starts the call, prints
``{"calling": NAME}``, waits for a line on stdin, then cancels the call (the
client sends ``notifications/cancelled``) and prints ``{"cancelled": NAME}``;
``drop:NAME:JSON-ARGUMENTS`` does the same but exits at once instead of
cancelling (the connection just ends). Run under another uid (``setpriv --reuid``) it is the
agent the gateway must tell apart by its credentials.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx2
from keel.mcp.client import unix_transport
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client


def transport(path: Path, http: bool) -> Any:
    if http:
        client = httpx2.AsyncClient(transport=httpx2.AsyncHTTPTransport(uds=str(path)))
        return streamable_http_client("http://keel-mcp/mcp", http_client=client)
    return unix_transport(path)


async def run(path: Path, http: bool, mode: str, ops: list[str]) -> None:
    async with Client(transport(path, http), mode=mode) as client:
        for op in ops:
            out: dict[str, Any]
            try:
                if op.startswith(("cancel:", "drop:")):
                    out = await abandon(client, op)
                elif op == "list":
                    listing = await client.list_tools()
                    out = {"tools": [tool.name for tool in listing.tools]}
                else:
                    _, name, arguments = op.split(":", 2)
                    result = await client.call_tool(name, json.loads(arguments))
                    out = {
                        "result": result.model_dump(mode="json", by_alias=True, exclude_none=True)
                    }
            except MCPError as exc:
                out = {"error": {"code": exc.code, "message": exc.message}}
            print(json.dumps(out), flush=True)


async def abandon(client: Client, op: str) -> dict[str, Any]:
    verb, name, arguments = op.split(":", 2)
    async with anyio.create_task_group() as group:
        group.start_soon(client.call_tool, name, json.loads(arguments))
        print(json.dumps({"calling": name}), flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        if verb == "drop":
            os._exit(0)
        group.cancel_scope.cancel()
    return {"cancelled": name}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("socket", type=Path)
    parser.add_argument("--http", action="store_true")
    parser.add_argument("--mode", default="legacy")
    parser.add_argument("ops", nargs="+")
    args = parser.parse_args()
    anyio.run(run, args.socket, args.http, args.mode, args.ops)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
