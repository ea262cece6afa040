# The keel appliance: the host the flake's images, `nix run .#vm` and
# `nixosConfigurations.appliance` are built from (docs/install.md). It is the
# same for every operator: the operator's SSH key and a mesh invite arrive at
# first boot from the seed directory on the image's EFI system partition
# (services.keel.appliance.seed), so no secret and no key is built in.
#
# To make it yours instead (ways 2 and 3 of docs/install.md), import
# keel's nixosModules.default in your own host file and set what you need;
# this file is a working example of one.
{
  lib,
  pkgs,
  modulesPath,
  ...
}:
let
  serialConsole = if pkgs.stdenv.hostPlatform.isAarch64 then "ttyAMA0" else "ttyS0";
in
{
  imports = [
    # virtio disks and network: most rented servers are KVM guests.
    (modulesPath + "/profiles/qemu-guest.nix")
  ];

  services.keel = {
    # Server defaults (modules/appliance.nix): key-only SSH, firewall,
    # hardware watchdog, bounded boot entries, store GC, the first-boot seed.
    appliance.enable = true;

    # Supervision of every agent, with restarts and health probes.
    watch.enable = true;

    # This host's mesh node; peers reach it on TCP 7400.
    mesh = {
      enable = true;
      listen = "0.0.0.0:7400";
      openFirewall = true;
    };

    # The outbound firewall of tier-2 agents (docs/egress.md): the resolvers
    # keel's DNS proxy asks for allowed names. Use your provider's.
    egress = {
      enable = true;
      upstream = [
        "9.9.9.9"
        "[2620:fe::fe]:53"
      ];
    };

    # An example agent: untrusted (tier 2), sandboxed, no outbound network
    # but the allowlist, watched over HTTP. Replace it with your own.
    agents.hello = {
      tier = 2;
      command = [
        (lib.getExe pkgs.python3)
        "${../examples/agents/agent.py}"
        "--name"
        "hello"
        "--port"
        "8700"
      ];
      egress.allow = [ "example.org" ];
      health.probes = [
        {
          type = "http";
          url = "http://127.0.0.1:8700/health";
        }
      ];
      resources = {
        memoryMax = "256M";
        tasksMax = 64;
      };
    };
  };

  networking.hostName = lib.mkDefault "keel";
  # DHCP on every interface: what rented servers and QEMU's user network
  # give. A server with a static address sets networking.interfaces.
  networking.useDHCP = lib.mkDefault true;

  # The disk the images lay out (nixos/modules/virtualisation/disk-image.nix):
  # an EFI system partition labelled ESP and an ext4 root labelled nixos that
  # grows to the disk at first boot. lib.mkDefault: an image variant's own
  # definitions win.
  fileSystems."/" = {
    device = lib.mkDefault "/dev/disk/by-label/nixos";
    fsType = lib.mkDefault "ext4";
    autoResize = lib.mkDefault true;
  };
  fileSystems."/boot" = {
    device = lib.mkDefault "/dev/disk/by-label/ESP";
    fsType = lib.mkDefault "vfat";
    # root only: until the first boot applies it, the seed may hold a mesh
    # invite (a secret).
    options = [
      "fmask=0077"
      "dmask=0077"
    ];
  };
  boot.growPartition = lib.mkDefault true;

  boot.loader.systemd-boot.enable = lib.mkDefault true;
  # The images' EFI system partition is 256 MiB (make-disk-image.nix's
  # bootSize) and systemd-boot keeps each generation's kernel and initrd on
  # it: five fit with room to spare (the profile's default is ten).
  # (Above the profile's lib.mkDefault, below any plain definition.)
  boot.loader.systemd-boot.configurationLimit = lib.mkOverride 900 5;
  # The image boots through the removable-media path (EFI/BOOT/BOOT*.EFI),
  # which every firmware tries; it need not (and in a rescue system cannot)
  # write EFI variables.
  boot.loader.efi.canTouchEfiVariables = lib.mkDefault false;

  # A rented server's console is its serial port (the provider's web console).
  boot.kernelParams = [
    "console=tty0"
    "console=${serialConsole},115200"
  ];

  # The NixOS release whose defaults for stateful data this host keeps; do
  # not change it on a host that has run (see its option description).
  system.stateVersion = "26.05";

  # `nix run .#vm` (flake.nix): the same host in QEMU, headless on the
  # terminal, its SSH port forwarded by the runner, and the seed shared from
  # a host directory (KEEL_SEED_DIR) instead of the EFI system partition.
  virtualisation.vmVariant = {
    virtualisation = {
      memorySize = 2048;
      cores = 2;
      graphics = false;
      sharedDirectories.keel-seed = {
        source = ''"''${KEEL_SEED_DIR:-$TMPDIR/xchg}"'';
        target = "/mnt/keel-seed";
        securityModel = "none";
      };
    };
    services.keel.appliance.seed.directory = "/mnt/keel-seed";
  };
}
