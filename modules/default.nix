# Every keel NixOS module: the flake's `nixosModules.default`. Each service
# module is inert until its `services.keel.<service>.enable` is set.
{
  imports = [
    ./keel.nix
    ./agents.nix
    ./watch.nix
    ./egress.nix
    ./mesh.nix
    ./safeswitch.nix
    ./fleet.nix
    ./mcp.nix
    ./chat.nix
    ./appliance.nix
  ];
}
