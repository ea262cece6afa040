{
  description = "keel: a NixOS appliance for fleets of AI agents (supervision, egress control, safe switches, a post-quantum mesh, a tamper-evident ledger)";

  # nixos-26.05: its python3Packages.cryptography is >= 47 (ML-KEM-768 for the
  # mesh). Where the locked revision and its narHash come from: docs/nix.md.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      # keel drives systemd, nftables and NixOS generations: Linux only, and
      # only x86_64 is exercised by the VM tests today.
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      keel = pkgs.python3Packages.callPackage ./pkgs/keel.nix { };
    in
    {
      packages.${system} = {
        inherit keel;
        default = keel;
      };

      # For hosts that want `pkgs.keel` (the modules pick it up when present).
      overlays.default = final: prev: {
        keel = final.python3Packages.callPackage ./pkgs/keel.nix { };
      };

      nixosModules.default = ./modules;

      # `nix flake check`: the package (its check phase runs the unit tier)
      # and the NixOS VM tests.
      checks.${system} = {
        inherit keel;
      }
      // import ./vm-tests { inherit pkgs lib self; };

      formatter.${system} = pkgs.nixfmt-tree;
    };
}
