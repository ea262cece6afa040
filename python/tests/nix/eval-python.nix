# Evaluates keel's Python package set (pkgs/python) with nixpkgs' real `lib`
# against the stand-in pkgs of stub-pkgs.nix, and returns a JSON-able
# summary for python/tests/nix/test_python_packages.py: each package
# pkgs/python defines (name, version, source, build system, dependencies),
# keel's dependency closure in the flake's package, overlay and module
# default, and whether nixpkgs' own python3Packages and a host's own
# packageOverrides are left as they were.
{
  repo,
  nixpkgsLib,
}:
let
  lib = import nixpkgsLib;
  pkgs = import ./stub-pkgs.nix { inherit lib; };
  flake = (import ./eval-flake.nix { inherit repo nixpkgsLib; }).outputs;

  python = pkgs.callPackage (repo + "/pkgs/python") { };
  defined = builtins.attrNames ((import (repo + "/pkgs/python/overrides.nix")) { } { });

  names = map (p: p.pname);
  describe = p: {
    inherit (p) pname version pythonImportsCheck;
    src = p.src.name;
    hash = p.src.hash;
    build-system = names p.build-system;
    dependencies = names (p.dependencies or [ ]);
    doCheck = p.doCheck or true;
    nativeCheckInputs = names (p.nativeCheckInputs or [ ]);
    postPatch = p.postPatch or "";
  };

  # Every package keel takes at run time, through `dependencies`.
  closure =
    keel:
    map (item: { inherit (item.package) pname version; }) (
      builtins.genericClosure {
        startSet = map (p: {
          key = p.outPath;
          package = p;
        }) keel.dependencies;
        operator =
          item:
          map (p: {
            key = p.outPath;
            package = p;
          }) (item.package.dependencies or [ ]);
      }
    );

  # A host whose python3 already has overrides of its own keeps them.
  hostPython = pkgs.python3.override {
    packageOverrides = final: prev: {
      jeepney = prev.jeepney // {
        version = "from-host";
      };
    };
  };
  withHost = pkgs.callPackage (repo + "/pkgs/python") { python3 = hostPython; };
in
{
  inherit defined;
  packages = lib.genAttrs defined (name: describe python.pkgs.${name});
  flakeClosure = closure flake.packages.x86_64-linux.keel;
  overlayClosure = closure (flake.overlays.default pkgs pkgs).keel;
  nixpkgsMcp = pkgs.python3Packages.mcp.version;
  nixpkgsIdna = pkgs.python3Packages.idna.version;
  hostKeeps = {
    jeepney = withHost.pkgs.jeepney.version;
    mcp = withHost.pkgs.mcp.version;
  };
}
