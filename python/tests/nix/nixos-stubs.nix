# What the real NixOS files of nixos-modules.nix cannot give: options they
# read or set that are declared in files that are not evaluated here (those
# would pull in most of NixOS and real packages). Nothing keel's modules set
# is declared here, except what the NixOS test framework gives every VM-test
# node: `networking.primaryIPAddress` (nixos/lib/testing/network.nix) and the
# `virtualisation.*` options safeswitch's VM test sets (qemu-vm.nix).
# docs/nix.md lists what is real and what is a stand-in.
#
# Each entry names the NixOS file that really declares it; when that file is
# evaluated too (`real`, paths under nixos/modules), the entry is left out.
#
# - standIns: options the real files READ (systemd.nix reads
#   services.openssh.enable...), declared with the type and default NixOS
#   gives them in that file;
# - sinks: options the real files only SET (systemd.nix adds to
#   security.pam, boot.kernelModules...). A sink accepts any definition and
#   cannot be read (lib.mkSinkUndeclaredOptions), so nothing can depend on
#   its value by mistake.
real:
{ lib, pkgs, ... }:
let
  inherit (lib) mkOption types;
  standIn =
    type: default:
    mkOption {
      inherit type default;
      description = "A stand-in (python/tests/nix/nixos-stubs.nix).";
    };
  sink = lib.mkSinkUndeclaredOptions { };

  # declaring file -> options
  standIns = {
    "<nixos/lib/testing/network.nix>" = {
      networking.primaryIPAddress = standIn types.str "192.168.1.1";
    };
    # Imported into every VM-test node by the NixOS test framework
    # (nixos/lib/testing/nodes.nix); safeswitch's VM test boots through a
    # boot loader.
    "virtualisation/qemu-vm.nix" = {
      virtualisation.useBootLoader = standIn types.bool false;
      virtualisation.useEFIBoot = standIn types.bool false;
    };
    # Cannot be evaluated with Nix 2.8: it imports nixpkgs' default.nix,
    # which requires Nix 2.18 (test_flake.py reads the declaration instead).
    "misc/nixpkgs.nix" = {
      nixpkgs.pkgs = standIn types.pkgs pkgs;
      nixpkgs.hostPlatform = standIn (types.either types.str types.attrs) pkgs.stdenv.hostPlatform.system;
    };
    "tasks/network-interfaces.nix" = {
      networking.enableIPv6 = standIn types.bool true;
      networking.hostName = standIn types.str "nixos";
    };
    "config/networking.nix" = {
      networking.proxy.envVars = standIn (types.attrsOf types.str) { };
    };
    "services/networking/firewalld/firewalld.nix" = {
      services.firewalld.enable = standIn types.bool false;
    };
    "services/x11/xserver.nix" = {
      services.xserver.enable = standIn types.bool false;
      services.xserver.defaultDepth = sink;
      services.xserver.monitorSection = sink;
      services.xserver.resolutions = sink;
      services.xserver.videoDrivers = sink;
    };
    "services/system/userborn.nix" = {
      services.userborn.enable = standIn types.bool false;
    };
    "system/boot/systemd/sysusers.nix" = {
      systemd.sysusers.enable = standIn types.bool false;
    };
    "system/boot/systemd/initrd.nix" = {
      boot.initrd.systemd.enable = standIn types.bool false;
      # A path or { source; target; }, as initrd.nix takes them.
      boot.initrd.systemd.storePaths = standIn (types.listOf (
        types.coercedTo (types.either types.str types.package) (path: {
          source = path;
          target = toString path;
        }) types.attrs
      )) [ ];
      boot.initrd.systemd.additionalUpstreamUnits = sink;
      boot.initrd.systemd.contents = sink;
      boot.initrd.systemd.services = sink;
      boot.initrd.systemd.managerEnvironment = sink;
    };
    "system/boot/stage-2.nix" = {
      boot.extraSystemdUnitPaths = standIn (types.listOf types.str) [ ];
    };
    "tasks/filesystems.nix" = {
      system.fsPackages = standIn (types.listOf types.package) [ ];
    };
    "virtualisation/nixos-containers.nix" = {
      boot.isContainer = standIn types.bool false;
    };
    "hardware/device-tree.nix" = {
      hardware.deviceTree.enable = standIn types.bool false;
      hardware.deviceTree.name = standIn (types.nullOr types.str) null;
      hardware.deviceTree.package = standIn types.raw null;
    };
    "security/polkit.nix" = {
      security.polkit.enable = standIn types.bool false;
    };
    "security/google_oslogin.nix" = {
      security.googleOsLogin.enable = standIn types.bool false;
    };
    "services/system/nix-daemon.nix" = {
      nix.enable = standIn types.bool true;
      nix.package = standIn types.package pkgs.nix;
    };
    # users-groups.nix checks a user's shell against these
    "programs/bash/bash.nix" = {
      programs.bash.enable = standIn types.bool true;
      programs.bash.interactiveShellInit = sink;
    };
    "programs/zsh/zsh.nix" = {
      programs.zsh.enable = standIn types.bool false;
      programs.zsh.interactiveShellInit = sink;
    };
    "programs/fish.nix" = {
      programs.fish.enable = standIn types.bool false;
      programs.fish.interactiveShellInit = sink;
    };
    "programs/xonsh.nix" = {
      programs.xonsh.enable = standIn types.bool false;
    };
    "programs/shadow.nix" = {
      users.defaultUserShell = standIn types.raw pkgs.bashInteractive;
    };
    "system/boot/modprobe.nix" = {
      boot.blacklistedKernelModules = sink;
      boot.extraModprobeConfig = sink;
    };
    "system/boot/kernel.nix" = {
      boot.kernelModules = sink;
      system.requiredKernelConfig = sink;
    };
    "system/activation/bootspec.nix" = {
      boot.bootspec = sink;
    };
    "system/boot/stage-1.nix" = {
      boot.loader.supportsInitrdSecrets = sink;
      # It adds neededForBoot to tasks/filesystems.nix's fileSystems.
      fileSystems = mkOption {
        type = types.attrsOf (
          types.submodule {
            options.neededForBoot = standIn types.bool false;
          }
        );
      };
    };
    "config/system-environment.nix" = {
      environment.profileRelativeSessionVariables = sink;
      environment.sessionVariables = sink;
    };
    "config/shells-environment.nix" = {
      environment.extraInit = sink;
      environment.profiles = sink;
      environment.variables = sink;
    };
    "security/apparmor.nix" = {
      security.apparmor = sink;
    };
    "security/pam.nix" = {
      # security/polkit.nix reads these two (its agent helper's sandbox)
      security.pam.u2f.enable = standIn types.bool false;
      security.pam.zfs.enable = standIn types.bool false;
      security.pam.services = sink;
    };
    # what security/polkit.nix sets besides its own options
    "security/wrappers/default.nix" = {
      security.wrappers = sink;
    };
    "services/system/dbus.nix" = {
      services.dbus = sink;
    };
    "services/desktops/geoclue2.nix" = {
      services.geoclue2 = sink;
    };
    "services/logging/logrotate.nix" = {
      services.logrotate = sink;
    };
    "system/activation/activation-script.nix" = {
      system.activationScripts = sink;
    };
    "config/nsswitch.nix" = {
      system.nssDatabases = sink;
      system.nssModules = sink;
    };
    "system/boot/systemd/repart.nix" = {
      systemd.repart.enable = standIn types.bool false;
      boot.initrd.systemd.repart.enable = standIn types.bool false;
    };
    "config/resolvconf.nix" = {
      networking.resolvconf.enable = standIn types.bool false;
    };
    # What virtualisation/qemu-vm.nix (the VM variant) sets besides its own
    # options, by declaring file.
    "system/boot/luksroot.nix" = {
      boot.initrd.luks = sink;
    };
    "system/boot/loader/limine/limine.nix" = {
      boot.loader.limine = sink;
    };
    "services/networking/dhcpcd.nix" = {
      networking.dhcpcd = sink;
    };
    "services/networking/wpa_supplicant.nix" = {
      networking.wireless = sink;
    };
    "security/ca.nix" = {
      security.pki = sink;
    };
    "services/networking/connman.nix" = {
      services.connman = sink;
    };
    "virtualisation/qemu-guest-agent.nix" = {
      services.qemuGuest = sink;
    };
    "system/boot/timesyncd.nix" = {
      services.timesyncd = sink;
    };
    "config/swap.nix" = {
      swapDevices = sink;
    };
    "system/boot/networkd.nix" = {
      systemd.network.enable = standIn types.bool false;
      systemd.network.links = sink;
    };
    "virtualisation/openvswitch.nix" = {
      virtualisation.vswitch = sink;
    };
    "services/hardware/udev.nix" = {
      services.udev = sink;
      networking.usePredictableInterfaceNames = sink;
    };
    "services/networking/mstpd.nix" = {
      services.mstpd = sink;
    };
    "system/boot/systemd/user.nix" = {
      systemd.additionalUpstreamUserUnits = sink;
      systemd.user = sink;
    };
  };
  # Real files that evaluate a declaring file themselves (build-vm.nix
  # evaluates qemu-vm.nix in its VM variant, which extends this very module list).
  evaluatedBy = {
    "virtualisation/qemu-vm.nix" = [ "virtualisation/build-vm.nix" ];
  };
  isReal = file: lib.any (f: lib.elem f real) ([ file ] ++ evaluatedBy.${file} or [ ]);
in
{
  options = lib.foldl' lib.recursiveUpdate { } (
    lib.attrValues (lib.filterAttrs (file: _: !isReal file) standIns)
  );
}
