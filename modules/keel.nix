# What every keel service module shares: the package, the `keel` group (the
# daemons and the operators allowed to use the `keel` CLI against their
# sockets and the shared ledger), and keel's directories: /etc/keel (its
# presence is what tells keel it is on an installed host), /var/lib/keel
# (state and the ledger) and /run/keel (control sockets).
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.keel;

  # keel is not in nixpkgs: `pkgs.keel` when an overlay (the flake's
  # overlays.default) provides it, else built here from this repository with
  # the host's own python3Packages.
  pkgsWithKeel = pkgs // {
    keel = pkgs.keel or (pkgs.python3Packages.callPackage ../pkgs/keel.nix { });
  };
in
{
  options.services.keel = {
    package = lib.mkPackageOption pkgsWithKeel "keel" {
      extraDescription = "Every keel service runs from it and the `keel` CLI comes with it.";
    };

    group = lib.mkOption {
      type = lib.types.str;
      default = "keel";
      description = ''
        Group that owns /var/lib/keel and /run/keel. keel's daemons run in
        it; add operators to it to use the `keel` CLI without root. Agents
        are never in it, so they cannot reach keel's sockets or the ledger.
      '';
    };

    ledger = lib.mkOption {
      type = lib.types.str;
      default = "/var/lib/keel/ledger.db";
      description = "The ledger every keel daemon appends to.";
    };

    enabledServices = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      internal = true;
      description = "keel services enabled on this host; each service module adds its name.";
    };
  };

  config = lib.mkIf (cfg.enabledServices != [ ]) {
    environment.systemPackages = [ cfg.package ];

    users.groups = lib.mkIf (cfg.group == "keel") { keel = { }; };

    # /etc/keel is how keel knows it is on an installed host (keel.paths),
    # also where no service has a file in it (a mesh-only host). The state
    # and socket directories are setgid, so files the daemons create (the
    # ledger's -wal and -shm files among them) stay in the group whichever
    # daemon made them.
    systemd.tmpfiles.rules = [
      "d /etc/keel 0755 root root - -"
      "d /var/lib/keel 2770 root ${cfg.group} - -"
      "d /run/keel 2770 root ${cfg.group} - -"
    ];
  };
}
