"""keel mcp: MCP tool servers run once per host, shared by agents under a per-agent policy.

Layers, as in every keel service (docs/mcp.md):

- pure cores: :mod:`~keel.mcp.spec` (server specs and their ``share``
  grants), :mod:`~keel.mcp.policy` (who sees and may call which tool),
  :mod:`~keel.mcp.units` (their units, through :mod:`keel.agents.units`);
- the shell: :mod:`~keel.mcp.gateway` (``keel mcp serve``, on
  :mod:`keel.service`), :mod:`~keel.mcp.upstream` (one session per server),
  :mod:`~keel.mcp.wire` (MCP's stdio framing on Unix sockets),
  :mod:`~keel.mcp.http` (Streamable HTTP for agents), :mod:`~keel.mcp.attach`
  (``keel mcp exec``, a server's stdio as the gateway's connection);
- :mod:`~keel.mcp.cli` (``keel mcp ...``) and :mod:`~keel.mcp.install`.
"""
