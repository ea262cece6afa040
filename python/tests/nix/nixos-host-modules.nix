# The real NixOS files a whole host file needs besides nixos-modules.nix:
# what hosts/appliance.nix sets (kernel parameters, file systems, DHCP, the
# EFI boot loader, the VM variant, the image framework). Used by
# eval-flake.nix for the flake's NixOS configurations. Not here:
# misc/nixpkgs.nix (nixpkgs.hostPlatform), which imports nixpkgs'
# default.nix and so needs Nix >= 2.18 (nixos-stubs.nix stands in;
# test_flake.py reads its declaration).
[
  "system/boot/kernel.nix"
  "tasks/network-interfaces.nix"
  "tasks/filesystems.nix"
  "system/boot/grow-partition.nix"
  "system/boot/loader/efi.nix"
  "misc/lib.nix"
  "virtualisation/build-vm.nix"
  "image/images.nix"
]
