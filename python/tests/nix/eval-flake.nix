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
  };

  keel = outputs.packages.x86_64-linux.keel;
  fromOverlay = (outputs.overlays.default pkgs pkgs).keel;

  # The package's source filter, asked about paths of a working tree.
  sourceKeeps =
    let
      root = toString (repo + "/python");
      keeps = path: type: keel.src.filter "${root}/${path}" type;
    in
    {
      pyproject = keeps "pyproject.toml" "regular";
      module = keeps "src/keel/cli.py" "regular";
      unitTest = keeps "tests/unit/test_config.py" "regular";
      pycache = keeps "src/keel/__pycache__" "directory";
      pyc = keeps "src/keel/cli.cpython-311.pyc" "regular";
      eggInfo = keeps "src/keel.egg-info" "directory";
      pytestCache = keeps ".pytest_cache" "directory";
      hypothesis = keeps ".hypothesis" "directory";
      build = keeps "build" "directory";
      result = keeps "result" "symlink";
    };
in
{
  outputNames = builtins.attrNames outputs;
  packageNames = builtins.attrNames outputs.packages.x86_64-linux;
  keel = summarise keel;
  defaultIsKeel = outputs.packages.x86_64-linux.default == keel;
  overlayKeel = summarise fromOverlay;
  inherit sourceKeeps;
  keelArgs = builtins.attrNames (builtins.functionArgs (import (repo + "/pkgs/keel.nix")));
  checkNames = builtins.attrNames outputs.checks.x86_64-linux;
  checkKeelIsPackage = outputs.checks.x86_64-linux.keel == keel;
  vmTests = lib.mapAttrs (
    name: check: builtins.baseNameOf (toString (builtins.head check.keelNixosTest.imports))
  ) (removeAttrs outputs.checks.x86_64-linux [ "keel" ]);
  nixosModule = toString outputs.nixosModules.default;
  formatter = outputs.formatter.x86_64-linux.pname;
}
