# A keel host of your own, installed onto any Linux server with
# nixos-anywhere (docs/install.md, "Way 2"):
#
#   nix flake init -t github:OWNER/keel#appliance
#   # edit configuration.nix (your SSH key) and disk.nix (the disk)
#   nix run github:nix-community/nixos-anywhere -- --flake .#appliance root@SERVER
{
  description = "A keel host (nixos-anywhere, disko)";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";
    # Where you get keel from (a fork, a tag: github:OWNER/keel/v0.1.0).
    keel.url = "github:OWNER/keel";
    keel.inputs.nixpkgs.follows = "nixpkgs";
    disko.url = "github:nix-community/disko";
    disko.inputs.nixpkgs.follows = "nixpkgs";
  };

  outputs =
    {
      nixpkgs,
      keel,
      disko,
      ...
    }:
    {
      nixosConfigurations.appliance = nixpkgs.lib.nixosSystem {
        modules = [
          disko.nixosModules.disko
          keel.nixosModules.default
          # keel's appliance host: the profile, watch, the mesh node, an
          # example agent (override or drop what you do not want).
          keel.nixosModules.appliance
          ./disk.nix
          ./configuration.nix
          { nixpkgs.hostPlatform = "x86_64-linux"; }
        ];
      };
    };
}
