# Your keel host: what differs from keel's appliance host
# (keel.nixosModules.appliance, hosts/appliance.nix in keel).
{ config, ... }:
{
  # Your SSH public key (the line of ~/.ssh/id_ed25519.pub). Without one you
  # cannot log in once nixos-anywhere has rebooted the server.
  users.users.root.openssh.authorizedKeys.keys = [
    # "ssh-ed25519 AAAA... you@laptop"
  ];

  networking.hostName = "keel-1";

  # GRUB, for BIOS and UEFI servers alike (disk.nix has partitions for
  # both); disko gives it the disk.
  boot.loader.systemd-boot.enable = false;
  boot.loader.grub = {
    enable = true;
    efiSupport = true;
    efiInstallAsRemovable = true;
  };

  assertions = [
    {
      assertion = config.users.users.root.openssh.authorizedKeys.keys != [ ];
      message = "configuration.nix: put your SSH public key in users.users.root.openssh.authorizedKeys.keys, or you cannot log in after the install";
    }
  ];
}
