# What the real NixOS files of nixos-modules.nix cannot give: options they
# read or set that are declared in files that are not evaluated here (those
# would pull in most of NixOS and real packages). Nothing keel's modules set
# is declared here, except `networking.primaryIPAddress`, which the NixOS test
# framework (nixos/lib/testing) gives every VM-test node. docs/nix.md lists
# what is real and what is a stand-in.
#
# - standIns: options the real files READ (systemd.nix reads
#   services.openssh.enable...), declared with the type and default NixOS
#   gives them in the file named beside each;
# - sinks: options the real files only SET (systemd.nix adds to
#   security.pam, boot.kernelModules...). A sink accepts any definition and
#   cannot be read (lib.mkSinkUndeclaredOptions), so nothing can depend on
#   its value by mistake.
{ lib, pkgs, ... }:
let
  inherit (lib) mkOption types;
  standIn =
    type: default:
    mkOption {
      inherit type default;
      description = "A stand-in (python/tests/nix/nixos-stubs.nix).";
    };

  standIns = {
    # nixos/lib/testing/network.nix, for VM-test nodes
    networking.primaryIPAddress = standIn types.str "192.168.1.1";
    # tasks/network-interfaces.nix
    networking.enableIPv6 = standIn types.bool true;
    networking.hostName = standIn types.str "nixos";
    # config/networking.nix
    networking.proxy.envVars = standIn (types.attrsOf types.str) { };
    # services/networking/firewalld
    services.firewalld.enable = standIn types.bool false;
    # services/x11/xserver.nix
    services.xserver.enable = standIn types.bool false;
    # services/system/userborn.nix, system/boot/systemd/sysusers.nix
    services.userborn.enable = standIn types.bool false;
    systemd.sysusers.enable = standIn types.bool false;
    # system/boot/systemd/initrd.nix
    boot.initrd.systemd.enable = standIn types.bool false;
    boot.initrd.systemd.storePaths = standIn (types.listOf types.raw) [ ];
    # system/boot/stage-2.nix
    boot.extraSystemdUnitPaths = standIn (types.listOf types.str) [ ];
    # tasks/filesystems.nix
    system.fsPackages = standIn (types.listOf types.package) [ ];
    # virtualisation/nixos-containers.nix
    boot.isContainer = standIn types.bool false;
    # hardware/device-tree.nix
    hardware.deviceTree.enable = standIn types.bool false;
    hardware.deviceTree.name = standIn (types.nullOr types.str) null;
    hardware.deviceTree.package = standIn types.raw null;
    # security/polkit.nix, security/google_oslogin.nix
    security.polkit.enable = standIn types.bool false;
    security.googleOsLogin.enable = standIn types.bool false;
    # services/system/nix-daemon.nix
    nix.enable = standIn types.bool true;
    nix.package = standIn types.package pkgs.nix;
    # programs/bash/bash.nix, programs/zsh/zsh.nix, programs/fish.nix,
    # programs/xonsh.nix (users-groups.nix checks a user's shell against them)
    programs.bash.enable = standIn types.bool true;
    programs.zsh.enable = standIn types.bool false;
    programs.fish.enable = standIn types.bool false;
    programs.xonsh.enable = standIn types.bool false;
    # programs/shadow.nix
    users.defaultUserShell = standIn types.raw pkgs.bashInteractive;
  };

  sinks = [
    [ "boot" "blacklistedKernelModules" ]
    [ "boot" "bootspec" ]
    [ "boot" "extraModprobeConfig" ]
    [ "boot" "initrd" "systemd" "additionalUpstreamUnits" ]
    [ "boot" "initrd" "systemd" "contents" ]
    [ "boot" "initrd" "systemd" "services" ]
    [ "boot" "kernelModules" ]
    [ "boot" "loader" "supportsInitrdSecrets" ]
    [ "environment" "extraInit" ]
    [ "environment" "profileRelativeSessionVariables" ]
    [ "environment" "profiles" ]
    [ "environment" "sessionVariables" ]
    [ "environment" "variables" ]
    [ "programs" "bash" "interactiveShellInit" ]
    [ "programs" "fish" "interactiveShellInit" ]
    [ "programs" "zsh" "interactiveShellInit" ]
    [ "security" "apparmor" ]
    [ "security" "pam" ]
    [ "services" "dbus" ]
    [ "services" "geoclue2" ]
    [ "services" "logrotate" ]
    [ "system" "activationScripts" ]
    [ "system" "nssDatabases" ]
    [ "system" "nssModules" ]
    [ "system" "requiredKernelConfig" ]
    [ "systemd" "additionalUpstreamUserUnits" ]
    [ "systemd" "user" ]
  ];
in
{
  options = lib.foldl' lib.recursiveUpdate standIns (
    map (path: lib.setAttrByPath path (lib.mkSinkUndeclaredOptions { })) sinks
  );
}
