# The NixOS VM tests (tier 4), one file per behaviour set; the flake exposes
# each as `checks.x86_64-linux.vm-<name>` so `nix flake check` runs them.
{
  pkgs,
  lib,
  self,
}:
let
  tests = [
    ./agents.nix
    ./watch.nix
    ./egress.nix
    ./mesh.nix
    ./mesh-agents.nix
    ./safeswitch.nix
    ./fleet.nix
    ./mcp.nix
    ./appliance.nix
  ];

  runTest =
    file:
    pkgs.testers.runNixOSTest {
      imports = [ file ];
      defaults.imports = [ self.nixosModules.default ];
    };
in
lib.listToAttrs (
  map (file: {
    name = "vm-" + lib.removeSuffix ".nix" (baseNameOf file);
    value = runTest file;
  }) tests
)
