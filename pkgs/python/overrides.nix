# keel's Python package overrides (a `packageOverrides` function): the MCP
# SDK 2.x that keel mcp needs and what it needs that nixpkgs lacks or has too
# old. Applied by ./default.nix to the host's python3, so that every package
# in keel's closure takes these (one idna, one httpx2...), while the rest of
# nixpkgs keeps its own. docs/nix.md, "The MCP SDK packages".
final: prev: {
  mcp = final.callPackage ./mcp.nix { };
  mcp-types = final.callPackage ./mcp-types.nix { };
  httpx2 = final.callPackage ./httpx2.nix { };
  httpcore2 = final.callPackage ./httpcore2.nix { };
  idna = final.callPackage ./idna.nix { };
}
