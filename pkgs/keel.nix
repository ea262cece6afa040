# The keel Python application, built from ./python with the package set of
# pkgs/python (the host's python3Packages, with the MCP SDK 2.x and what it
# needs: `(callPackage ./pkgs/python { }).pkgs.callPackage ./pkgs/keel.nix { }`). Its check phase runs the unit tier (python/tests/unit);
# the other tiers need root, namespaces or a booted systemd and run outside
# the Nix sandbox (`make test`) or as NixOS VM tests (vm-tests/).
{
  lib,
  callPackage,
  buildPythonApplication,
  setuptools,
  cryptography,
  jeepney,
  mcp,
  dnspython,
  idna,
  systemd-python,
  # Optional: a nixpkgs without it still builds keel, whose mesh then takes
  # ML-KEM from cryptography alone (docs/nix.md).
  liboqs-python ? null,
  pytestCheckHook,
  hypothesis,
}:

let
  pyproject = lib.importTOML ../python/pyproject.toml;

  # The source is python/ plus the parts of the repository the package and
  # its tests read beside it: modules/tiers.json (src/keel/data/tiers.json
  # links to it) and the example agent specs and docs the tests check. No
  # .venv, caches or build output from a working tree, and no Nix files, so
  # the derivation changes only with what it is built from.
  sourceTrees = [
    "python"
    "modules"
    "examples"
    "docs"
  ];
  buildJunk = [
    "__pycache__"
    ".pytest_cache"
    ".mypy_cache"
    ".ruff_cache"
    ".hypothesis"
    "build"
    "dist"
  ];
  repo = toString ../.;
  src = lib.cleanSourceWith {
    name = "keel-source";
    src = lib.cleanSource ../.;
    filter =
      path: type:
      let
        relative = lib.removePrefix "${repo}/" (toString path);
        name = baseNameOf path;
      in
      lib.elem (lib.head (lib.splitString "/" relative)) sourceTrees
      && !(lib.elem name buildJunk || lib.hasSuffix ".egg-info" name || lib.hasSuffix ".pyc" name);
  };

  # Not in nixpkgs: the ML-KEM the mesh tests cross-check against.
  kyber-py = callPackage ./kyber-py.nix { };
in
buildPythonApplication {
  pname = "keel";
  inherit (pyproject.project) version;
  pyproject = true;
  inherit src;
  sourceRoot = "${src.name}/python";

  build-system = [ setuptools ];

  dependencies = [
    cryptography
    # D-Bus to systemd for keel watch's systemd backend.
    jeepney
    # keel mcp: the official MCP SDK (2.x) for the gateway's sessions
    # (pkgs/python/mcp.nix; nixpkgs' own is 1.x).
    mcp
    # keel egress: the DNS wire format, IDNA 2008 for allowlist entries.
    dnspython
    idna
    # sd_notify, watchdog pings and journal logging (keel.sd).
    systemd-python
  ]
  # The mesh's fallback ML-KEM backend where cryptography lacks ML-KEM.
  ++ lib.optional (liboqs-python != null) liboqs-python;

  nativeCheckInputs = [
    pytestCheckHook
    hypothesis
    kyber-py
  ];

  # The unit tier only; the published vectors (../shared/vectors) are not in
  # the source, so the tests that need them skip and say so.
  enabledTestPaths = [ "tests/unit" ];

  pythonImportsCheck = [ "keel" ];

  meta = {
    inherit (pyproject.project) description;
    mainProgram = "keel";
    platforms = lib.platforms.linux;
  };
}
