# The keel Python application, built from ./python with the host's own
# python3Packages. Its check phase runs the unit tier (python/tests/unit);
# the other tiers need root, namespaces or a booted systemd and run outside
# the Nix sandbox (`make test`) or as NixOS VM tests (vm-tests/).
{
  lib,
  buildPythonApplication,
  setuptools,
  cryptography,
  systemd-python,
  liboqs-python,
  pytestCheckHook,
  hypothesis,
}:

let
  pyproject = lib.importTOML ../python/pyproject.toml;

  # Only what the build and the tests read: no .venv, caches or build output
  # from a working tree, so the derivation does not change with them.
  buildJunk = [
    "__pycache__"
    ".pytest_cache"
    ".mypy_cache"
    ".ruff_cache"
    ".hypothesis"
    "build"
    "dist"
  ];
  src = lib.cleanSourceWith {
    name = "keel-python-source";
    src = lib.cleanSource ../python;
    filter =
      path: type:
      let
        name = baseNameOf path;
      in
      !(lib.elem name buildJunk || lib.hasSuffix ".egg-info" name || lib.hasSuffix ".pyc" name);
  };
in
buildPythonApplication {
  pname = "keel";
  inherit (pyproject.project) version;
  pyproject = true;
  inherit src;

  build-system = [ setuptools ];

  dependencies = [
    cryptography
    # sd_notify, watchdog pings and journal logging (keel.sd).
    systemd-python
    # The mesh's fallback ML-KEM backend where cryptography lacks ML-KEM.
    liboqs-python
  ];

  nativeCheckInputs = [
    pytestCheckHook
    hypothesis
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
