# The server's disk, for disko (nixos-anywhere partitions and formats it):
# a BIOS boot partition and an EFI system partition, so GRUB boots the
# server whichever firmware it has, and an ext4 root on the rest.
{
  disko.devices.disk.main = {
    type = "disk";
    # The disk to install on: check it in the server's rescue system
    # (`lsblk`); NVMe disks are /dev/nvme0n1. Everything on it is erased.
    device = "/dev/sda";
    content = {
      type = "gpt";
      partitions = {
        boot = {
          size = "1M";
          type = "EF02";
        };
        ESP = {
          size = "1G";
          type = "EF00";
          content = {
            type = "filesystem";
            format = "vfat";
            mountpoint = "/boot";
            mountOptions = [ "umask=0077" ];
          };
        };
        root = {
          size = "100%";
          content = {
            type = "filesystem";
            format = "ext4";
            mountpoint = "/";
          };
        };
      };
    };
  };
}
