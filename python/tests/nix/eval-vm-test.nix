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
        paths = [ [ "specialisation" ] ];
      };
      # Each specialisation is the node plus its configuration, as NixOS builds it.
      specialise =
        _: specialisation:
        (import ./eval-modules.nix {
          inherit repo nixpkgsLib;
          hostConfig = {
            imports = [
              node
              specialisation.configuration
            ];
            specialisation = lib.mkForce { };
          };
        }).failedAssertions;
    in
    {
      inherit (result) failedAssertions;
      services = builtins.attrNames result.services;
      specialisations = lib.mapAttrs specialise (builtins.head result.values);
    };
  # What a test script may interpolate of its nodes (the driver passes the
  # evaluated configurations; a stand-in toplevel is enough to render it).
  scriptNodes = lib.mapAttrs (name: _: {
    system.build.toplevel = "/nix/store/${lib.fixedWidthString 32 "0" ""}-nixos-system-${name}";
  }) nodes;
in
{
  inherit (test) name;
  testScript =
    if builtins.isFunction test.testScript then
      test.testScript { nodes = scriptNodes; }
    else
      test.testScript;
  nodes = lib.mapAttrs evaluateNode nodes;
}
