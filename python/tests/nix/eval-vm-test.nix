# Evaluates one NixOS VM test of vm-tests/ without building it: its name,
# its test script (for the Python checks of test_vm_tests.py), and each node's
# configuration run through keel's modules and the real NixOS declarations as
# eval-modules.nix does.
{
  repo,
  nixpkgs,
  file,
}:
let
  lib = import (nixpkgs + "/lib");
  pkgs = import ./stub-pkgs.nix { inherit lib nixpkgs; };
  test = import file {
    inherit pkgs lib;
  };
  nodes = test.nodes or { };
  evaluateNode =
    name: node:
    let
      result = import ./eval-modules.nix {
        inherit repo nixpkgs;
        hostConfig = node;
        units = [ ];
      };
    in
    {
      inherit (result) failedAssertions listeners;
      services = builtins.attrNames result.services;
    };
in
{
  inherit (test) name;
  testScript = if builtins.isFunction test.testScript then test.testScript { inherit nodes; } else test.testScript;
  nodes = lib.mapAttrs evaluateNode nodes;
}
