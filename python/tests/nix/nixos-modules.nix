# The real NixOS module files (from a nixpkgs tree: KEEL_NIXPKGS) that keel's
# modules are evaluated against: the files that declare the options keel's
# modules, its host files and its VM tests set, and those whose values keel's
# checks read (assertions, the generated unit text). Each is used as it is in
# nixpkgs; nothing here is a copy.
#
# To evaluate a module that sets an option none of these declares, add the
# file of nixpkgs that declares it (grep nixos/modules for `<name> = mkOption`
# or `lib.mkOption`). If that file reads options declared nowhere here, the
# evaluation fails naming them: declare each in nixos-stubs.nix (`standIns`,
# with NixOS' default) if it is read, or sink it (`sinks`) if it is only set.
#
# Paths are relative to nixos/modules (eval-modules.nix joins them to the
# tree, nixos-stubs.nix leaves out its stand-ins for the files named here).
[
  # assertions, warnings
  "misc/assertions.nix"
  # the `utils` module argument (nixos/lib/utils.nix: escapeSystemdExecArgs...)
  "misc/extra-arguments.nix"
  # users.users.<n>.uid/gid ranges the other files read
  "misc/ids.nix"
  # system.stateVersion, system.nixos.*
  "misc/version.nix"
  # systemd.services, systemd.units (their text, from nixos/lib/systemd-lib.nix,
  # systemd-unit-options.nix, systemd-types.nix), systemd.settings.Manager
  "system/boot/systemd.nix"
  "system/boot/systemd/tmpfiles.nix"
  "system/boot/emergency-mode.nix"
  # users.users, users.groups and their assertions
  "config/users-groups.nix"
  # environment.etc
  "system/etc/etc.nix"
  # environment.systemPackages
  "config/system-path.nix"
  # system.checks, system.build.toplevel's options
  "system/activation/top-level.nix"
  # networking.firewall.*, networking.nftables.*
  "services/networking/firewall.nix"
  "services/networking/nftables.nix"
  # what the appliance profile sets (modules/appliance.nix)
  "config/sysctl.nix"
  "system/boot/tmp.nix"
  "system/boot/loader/grub/grub.nix"
  "system/boot/loader/systemd-boot/systemd-boot.nix"
  # what safeswitch's VM test sets: the EFI loader's options, specialisations
  # (each one evaluated as NixOS builds it: its configuration is a whole system)
  "system/boot/loader/efi.nix"
  "system/activation/specialisation.nix"
  "services/networking/ssh/sshd.nix"
  "programs/ssh.nix"
  "config/nix.nix"
  "services/misc/nix-gc.nix"
  "config/locale.nix"
  "misc/documentation.nix"
  "config/fonts/fontconfig.nix"
  "programs/command-not-found/command-not-found.nix"
  # security.polkit.extraConfig: the rule that lets keel chat start keel-switch@
  "security/polkit.nix"
]
