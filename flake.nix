{
  description = "keel: a NixOS appliance for fleets of AI agents (supervision, egress control, safe switches, a post-quantum mesh, a tamper-evident ledger)";

  # nixos-26.05: its python3Packages.cryptography (48) does ML-KEM-768 over
  # its OpenSSL (3.6) for the mesh. Where the locked revision and its narHash
  # come from, and what it ships: docs/nix.md.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      # keel drives systemd, nftables and NixOS generations: Linux only, on
      # the two architectures rented servers come in. The VM tests run on
      # x86_64. (Output names are made with builtins only, so that listing
      # them does not evaluate nixpkgs.)
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forSystems =
        f:
        builtins.listToAttrs (
          map (system: {
            name = system;
            value = f system;
          }) systems
        );
      pkgsFor = system: nixpkgs.legacyPackages.${system};
      # keel is built with nixpkgs' python3 whose package set takes the MCP
      # SDK 2.x and what it needs from pkgs/python (nixpkgs' mcp is 1.x);
      # the rest of nixpkgs keeps its own (docs/nix.md).
      keelWith = pkgs: (pkgs.callPackage ./pkgs/python { }).pkgs.callPackage ./pkgs/keel.nix { };
      keelFor = system: keelWith (pkgsFor system);

      # The appliance of hosts/appliance.nix, per architecture.
      applianceNames = {
        x86_64-linux = "appliance";
        aarch64-linux = "appliance-aarch64";
      };
      applianceFor = system: self.nixosConfigurations.${applianceNames.${system}}.config;
      mkAppliance =
        system:
        nixpkgs.lib.nixosSystem {
          modules = [
            self.nixosModules.default
            ./hosts/appliance.nix
            { nixpkgs.hostPlatform = system; }
          ];
        };

      # `nix run .#vm`: the appliance in QEMU (virtualisation.vmVariant of
      # hosts/appliance.nix), see pkgs/keel-vm.nix.
      vmRunner =
        system:
        (pkgsFor system).callPackage ./pkgs/keel-vm.nix {
          vm = (applianceFor system).system.build.vm;
        };
    in
    {
      packages = forSystems (
        system:
        let
          images = (applianceFor system).system.build.images;
        in
        {
          keel = keelFor system;
          default = keelFor system;
          # Through the image framework of the pinned nixpkgs
          # (nixos/modules/image/images.nix): a raw GPT disk with an EFI
          # system partition, to write onto a rented server's disk from its
          # rescue system, and the same as qcow2 for QEMU and clouds.
          image-raw-efi = images.raw-efi;
          image-qcow2 = images.qemu-efi;
        }
      );

      apps = forSystems (system: {
        vm = {
          type = "app";
          program = nixpkgs.lib.getExe (vmRunner system);
          meta.description = "Boot the keel appliance in QEMU with SSH on 127.0.0.1:2222";
        };
      });

      # For hosts that want `pkgs.keel` (the modules pick it up when present).
      overlays.default = final: prev: {
        keel = keelWith final;
      };

      nixosModules.default = ./modules;
      # keel's appliance host (hosts/appliance.nix), to build on in your own
      # flake (templates/appliance does).
      nixosModules.appliance = ./hosts/appliance.nix;

      nixosConfigurations = {
        appliance = mkAppliance "x86_64-linux";
        appliance-aarch64 = mkAppliance "aarch64-linux";
      };

      # nixos-anywhere onto any Linux server, with a disko disk layout:
      # `nix flake init -t github:OWNER/keel#appliance` (docs/install.md).
      templates.appliance = {
        path = ./templates/appliance;
        description = "A keel host for nixos-anywhere: keel's modules, a disko disk layout, your SSH key";
      };

      # `nix flake check`: the package (its check phase runs the unit tier),
      # the appliance's system, and on x86_64 the NixOS VM tests.
      checks = forSystems (
        system:
        {
          keel = keelFor system;
          appliance-toplevel = (applianceFor system).system.build.toplevel;
        }
        // (
          if system == "x86_64-linux" then
            import ./vm-tests {
              pkgs = pkgsFor system;
              inherit (nixpkgs) lib;
              inherit self;
            }
          else
            { }
        )
      );

      formatter = forSystems (system: (pkgsFor system).nixfmt-tree);
    };
}
