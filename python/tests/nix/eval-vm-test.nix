# Evaluates one NixOS VM test of vm-tests/ without building it: its name,
# its test script (for the Python checks of test_vm_tests.py), and each node's
# configuration run through keel's modules as eval-modules.nix does.
{
  repo,
  nixpkgsLib,
  file,
}:
let
  lib = import nixpkgsLib;
  pkgs = import ./stub-pkgs.nix { inherit lib; };
  test = import file {
    inherit pkgs lib;
  };
  nodes = test.nodes or { };
  evaluateNode =
    name: node:
    let
      result = import ./eval-modules.nix {
        inherit repo nixpkgsLib;
        hostConfig = node;
      };
    in
    {
      inherit (result) failedAssertions;
      services = builtins.attrNames result.services;
    };
in
{
  inherit (test) name;
  testScript = if builtins.isFunction test.testScript then test.testScript { inherit nodes; } else test.testScript;
  nodes = lib.mapAttrs evaluateNode nodes;
}
