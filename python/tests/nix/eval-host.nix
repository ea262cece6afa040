# Evaluates a whole host file (hosts/appliance.nix) the way the flake's
# nixosConfigurations do, against the real NixOS declarations of
# nixos-modules.nix plus those a host file needs (kernel, file systems,
# networking, boot loader, image framework, VM variant), and returns what
# test_flake.py checks: failed assertions, warnings, the image variants the
# pinned image framework offers and what two of them make of the host (file
# systems, file name), and the VM variant's seed share.
{
  repo,
  nixpkgs,
  host,
  system ? "x86_64-linux",
}:
let
  lib = import (nixpkgs + "/lib");
  hostFiles = import ./nixos-host-modules.nix;
  evaluation = import ./eval-modules.nix {
    inherit repo nixpkgs;
    hostConfig = {
      imports = [ host ];
      nixpkgs.hostPlatform = system;
    };
    extraNixosModules = hostFiles;
    system = system;
    raw = "evaluation";
  };
  summary = import ./eval-modules.nix {
    inherit repo nixpkgs;
    hostConfig = {
      imports = [ host ];
      nixpkgs.hostPlatform = system;
    };
    extraNixosModules = hostFiles;
    system = system;
    units = [ ];
  };
  inherit (evaluation) config;
  variant =
    name:
    let
      image = (evaluation.extendModules { modules = [ config.image.modules.${name} ]; }).config;
    in
    {
      fileSystems = lib.mapAttrs (_: fs: {
        inherit (fs) device fsType options;
        autoResize = fs.autoResize or false;
      }) image.fileSystems;
      inherit (image.image) fileName;
      format = image.image.format or null;
      efiSupport = image.image.efiSupport or null;
      systemdBoot = image.boot.loader.systemd-boot.enable;
      grub = image.boot.loader.grub.enable;
    };
  vm = config.virtualisation.vmVariant;
in
{
  inherit (summary) failedAssertions warnings services;
  imageVariants = builtins.attrNames config.image.modules;
  images = lib.genAttrs [
    "raw-efi"
    "qemu-efi"
  ] variant;
  buildAttributes = builtins.attrNames config.system.build;
  hostName = config.networking.hostName;
  vm = {
    seedDirectory = vm.services.keel.appliance.seed.directory;
    share = vm.virtualisation.sharedDirectories.keel-seed;
    inherit (vm.virtualisation) graphics memorySize;
    systemName = vm.system.name;
  };
}
