# Evaluates one NixOS VM test of vm-tests/ without building it: its name,
# its test script (for the Python checks of test_vm_tests.py, given the
# evaluated nodes as the NixOS test framework gives them), and each node's
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
  # As nixos/lib/testing/network.nix numbers them: the nodes in name order
  # on VLAN 1, 192.168.1.1 upwards.
  names = builtins.attrNames nodes;
  address = name: "192.168.1.${toString (1 + lib.lists.findFirstIndex (n: n == name) 0 names)}";
  hostOf = name: {
    imports = [ nodes.${name} ];
    networking.primaryIPAddress = address name;
  };
  evaluate =
    name: raw:
    import ./eval-modules.nix {
      inherit repo nixpkgs raw;
      hostConfig = hostOf name;
      units = [ ];
    };
  evaluateNode =
    name: _:
    let
      result = evaluate name false;
      # A specialisation's configuration is the whole system NixOS builds for it
      # (system/activation/specialisation.nix): its own assertions.
      failed = system: map (a: a.message) (lib.filter (a: !a.assertion) system.assertions);
    in
    {
      inherit (result) failedAssertions listeners;
      services = builtins.attrNames result.services;
      specialisations = lib.mapAttrs (_: special: failed special.configuration) (
        evaluate name true
      ).specialisation;
    };
in
{
  inherit (test) name;
  testScript =
    if builtins.isFunction test.testScript then
      test.testScript { nodes = lib.mapAttrs (name: _: evaluate name true) nodes; }
    else
      test.testScript;
  nodes = lib.mapAttrs evaluateNode nodes;
}
