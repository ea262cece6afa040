# Evaluates keel's flake outputs against a stand-in nixpkgs input made of
# nixpkgs' real `lib` and stub-pkgs.nix, and returns a JSON-able summary of
# their structure for python/tests/nix/test_flake.py.
{
  repo,
  nixpkgsLib,
}:
let
  lib = import nixpkgsLib;
  pkgs = import ./stub-pkgs.nix { inherit lib; };
  flake = import (repo + "/flake.nix");
  nixpkgs = {
    inherit lib;
    legacyPackages.x86_64-linux = pkgs;
  };
  outputs = flake.outputs {
    self = outputs;
    inherit nixpkgs;
  };

  names = map (p: p.pname);
  summarise = p: {
    inherit (p)
      pname
      version
      pyproject
      enabledTestPaths
      pythonImportsCheck
      ;
    build-system = names p.build-system;
    dependencies = names p.dependencies;
    nativeCheckInputs = names p.nativeCheckInputs;
    mainProgram = p.meta.mainProgram;
    sourceRoot = p.sourceRoot;
  };

  keel = outputs.packages.x86_64-linux.keel;
  kyberPy = lib.findFirst (p: p.pname == "kyber-py") null keel.nativeCheckInputs;
  fromOverlay = (outputs.overlays.default pkgs pkgs).keel;

  # The package's source filter, asked about paths of a working tree.
  sourceKeeps =
    let
      root = toString repo;
      keeps = path: type: keel.src.filter "${root}/${path}" type;
    in
    {
      pyproject = keeps "python/pyproject.toml" "regular";
      module = keeps "python/src/keel/cli.py" "regular";
      unitTest = keeps "python/tests/unit/test_config.py" "regular";
      tiersJson = keeps "modules/tiers.json" "regular";
      examples = keeps "examples/agents" "directory";
      docs = keeps "docs/nix.md" "regular";
      pycache = keeps "python/src/keel/__pycache__" "directory";
      pyc = keeps "python/src/keel/cli.cpython-311.pyc" "regular";
      eggInfo = keeps "python/src/keel.egg-info" "directory";
      pytestCache = keeps "python/.pytest_cache" "directory";
      hypothesis = keeps "python/.hypothesis" "directory";
      build = keeps "python/build" "directory";
      venv = keeps ".venv" "directory";
      devState = keeps ".keel" "directory";
      flake = keeps "flake.nix" "regular";
      vmTests = keeps "vm-tests" "directory";
      packages = keeps "pkgs" "directory";
    };
in
{
  outputNames = builtins.attrNames outputs;
  packageNames = builtins.attrNames outputs.packages.x86_64-linux;
  keel = summarise keel;
  defaultIsKeel = outputs.packages.x86_64-linux.default == keel;
  overlayKeel = summarise fromOverlay;
  inherit sourceKeeps;
  kyberPy = {
    inherit (kyberPy) pname version pyproject pythonImportsCheck;
    src = kyberPy.src.name;
    build-system = names kyberPy.build-system;
  };
  keelArgs = builtins.attrNames (builtins.functionArgs (import (repo + "/pkgs/keel.nix")));
  checkNames = builtins.attrNames outputs.checks.x86_64-linux;
  checkKeelIsPackage = outputs.checks.x86_64-linux.keel == keel;
  vmTests = lib.mapAttrs (
    name: check: builtins.baseNameOf (toString (builtins.head check.keelNixosTest.imports))
  ) (removeAttrs outputs.checks.x86_64-linux [ "keel" ]);
  nixosModule = toString outputs.nixosModules.default;
  formatter = outputs.formatter.x86_64-linux.pname;
}
