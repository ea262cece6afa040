# Evaluates the flake template templates/appliance (nixos-anywhere with
# disko) with keel's own outputs as its `keel` input and the stand-in nixpkgs
# of eval-flake.nix, against the real NixOS declarations. disko is a
# stand-in that declares `disko.devices` only (disko's own module, which
# turns the layout into fileSystems and boot.loader.grub.devices, is not
# part of a nixpkgs tree); `withKey` adds an SSH key, as the operator does.
{
  repo,
  nixpkgs,
  withKey ? false,
}:
let
  lib = import (nixpkgs + "/lib");
  keelFlake = import ./eval-flake.nix {
    inherit repo nixpkgs;
    nixpkgsLib = nixpkgs + "/lib";
  };
  disko.nixosModules.disko =
    { lib, ... }:
    {
      options.disko.devices = lib.mkOption {
        type = lib.types.attrsOf lib.types.anything;
        description = "A stand-in for disko's module (python/tests/nix/eval-template.nix).";
      };
    };
  template = import (repo + "/templates/appliance/flake.nix");
  outputs = template.outputs {
    self = outputs;
    nixpkgs = keelFlake.nixpkgsInput;
    keel = keelFlake.outputs;
    inherit disko;
  };
  key = {
    users.users.root.openssh.authorizedKeys.keys = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA operator" ];
  };
  configuration =
    if withKey then
      outputs.nixosConfigurations.appliance.extendModules { modules = [ key ]; }
    else
      outputs.nixosConfigurations.appliance;
  inherit (configuration) config;
in
{
  inputs = builtins.attrNames template.inputs;
  keelUrl = template.inputs.keel.url;
  followsNixpkgs = lib.mapAttrs (_: input: input.inputs.nixpkgs.follows or null) (
    removeAttrs template.inputs [ "nixpkgs" ]
  );
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  platform = config.nixpkgs.hostPlatform;
  disk = config.disko.devices.disk.main.device;
  partitions = lib.mapAttrs (_: p: p.type or null) config.disko.devices.disk.main.content.partitions;
  grub = {
    inherit (config.boot.loader.grub) enable efiSupport efiInstallAsRemovable;
  };
  systemdBoot = config.boot.loader.systemd-boot.enable;
  hostName = config.networking.hostName;
  keelServices = builtins.filter (lib.hasPrefix "keel") (builtins.attrNames config.systemd.services);
}
