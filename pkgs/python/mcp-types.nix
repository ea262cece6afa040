# mcp-types: the Model Context Protocol's wire types, split out of the SDK in
# 2.x; mcp 2.3.0 pins it to its own version (mcp-types==2.3.0). Not in
# nixpkgs. docs/nix.md, "The MCP SDK packages".
{
  lib,
  buildPythonPackage,
  fetchPypi,

  # build-system
  hatchling,
  uv-dynamic-versioning,

  # dependencies
  pydantic,
  typing-extensions,
}:

buildPythonPackage rec {
  pname = "mcp-types";
  version = "2.3.0";
  pyproject = true;

  src = fetchPypi {
    pname = "mcp_types";
    inherit version;
    # The sha256 PyPI publishes for mcp_types-2.3.0.tar.gz.
    hash = "sha256-0eRlSe2zXuGalJQPzubRrd1+WJq36pLdqD9dhHgfw2I=";
  };

  build-system = [
    hatchling
    uv-dynamic-versioning
  ];

  dependencies = [
    pydantic
    typing-extensions
  ];

  # The sdist ships no tests (they live in the SDK's repository).
  doCheck = false;

  pythonImportsCheck = [ "mcp_types" ];

  meta = {
    description = "Model Context Protocol wire types";
    homepage = "https://github.com/modelcontextprotocol/python-sdk";
    license = lib.licenses.mit;
  };
}
