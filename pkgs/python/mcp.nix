# mcp: the official Model Context Protocol SDK, 2.x (`mcp.server.mcpserver`,
# `mcp.Client`, `MCPError`), which keel mcp is written against
# (python/pyproject.toml: mcp>=2.3,<3). nixpkgs' python3Packages.mcp is the
# 1.x series, so keel's Python package set (./default.nix) replaces it with
# this one; the rest of nixpkgs keeps its own. Why, and how to update it:
# docs/nix.md, "The MCP SDK packages".
{
  lib,
  buildPythonPackage,
  fetchPypi,

  # build-system
  hatchling,
  uv-dynamic-versioning,

  # dependencies
  anyio,
  httpx2,
  jsonschema,
  mcp-types,
  opentelemetry-api,
  pydantic,
  pyjwt,
  python-multipart,
  sse-starlette,
  starlette,
  typing-extensions,
  typing-inspection,
  uvicorn,
}:

buildPythonPackage rec {
  pname = "mcp";
  version = "2.3.0";
  pyproject = true;

  src = fetchPypi {
    inherit pname version;
    # The sha256 PyPI publishes for mcp-2.3.0.tar.gz.
    hash = "sha256-ixR6UEQc8FnciMaE4K7tNofwqg85xs3nuQMw7/0rNNg=";
  };

  # The version comes from git tags through uv-dynamic-versioning; its
  # setup hook sets UV_DYNAMIC_VERSIONING_BYPASS to `version`, which also
  # fills the `mcp-types=={{ version }}` pin of its dependency list.
  build-system = [
    hatchling
    uv-dynamic-versioning
  ];

  dependencies = [
    anyio
    httpx2
    jsonschema
    mcp-types
    opentelemetry-api
    pydantic
    pyjwt
    python-multipart
    sse-starlette
    starlette
    typing-extensions
    typing-inspection
    uvicorn
  ]
  ++ pyjwt.optional-dependencies.crypto;

  # Its suite needs test-only packages nixpkgs lacks or has too old
  # (inline-snapshot, dirty-equals, pytest-examples, mcp-example-stories,
  # strict-no-cover, logfire, blockbuster) and starts servers on local
  # ports and subprocesses; keel's own unit tier (pkgs/keel.nix) exercises
  # the parts keel uses.
  doCheck = false;

  pythonImportsCheck = [
    "mcp"
    "mcp.client"
    "mcp.server.mcpserver"
  ];

  meta = {
    description = "Official Python SDK for Model Context Protocol servers and clients";
    homepage = "https://github.com/modelcontextprotocol/python-sdk";
    changelog = "https://github.com/modelcontextprotocol/python-sdk/releases/tag/v${version}";
    license = lib.licenses.mit;
  };
}
