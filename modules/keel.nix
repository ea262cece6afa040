# What every keel service module shares: the package, the `keel` group (the
# daemons and the operators allowed to use the `keel` CLI against their
# sockets and the shared ledger), keel's directories: /etc/keel (its
# presence is what tells keel it is on an installed host), /var/lib/keel
# (state and the ledger) and /run/keel (control sockets), and the ledger's
# signing key, root's, made before any daemon starts (keel-ledger-key).
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:
let
  cfg = config.services.keel;

  # The daemons that append to the ledger, by service. Those that run as root
  # (watch, egress, fleet) sign its checkpoints with the key; the others
  # (mesh, chat, mcp: their own users) only append (docs/ledger.md).
  daemonUnits = {
    watch = "keel-watch.service";
    egress = "keel-egress.service";
    mesh = "keel-mesh.service";
    fleet = "keel-fleet.service";
    chat = "keel-chat.service";
    mcp = "keel-mcp.service";
  };
  appending = lib.concatMap (
    service: lib.optional (daemonUnits ? ${service}) daemonUnits.${service}
  ) cfg.enabledServices;

  # keel is not in nixpkgs: `pkgs.keel` when an overlay (the flake's
  # overlays.default) provides it, else built here from this repository with
  # the host's own python3, its package set given the MCP SDK 2.x of
  # pkgs/python (docs/nix.md).
  pkgsWithKeel = pkgs // {
    keel =
      pkgs.keel or ((pkgs.callPackage ../pkgs/python { }).pkgs.callPackage ../pkgs/keel.nix { });
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

    # The ledger's signing key belongs to root, the owner of its directory, and
    # is made here once, before any daemon starts: whichever daemon started
    # first used to make it its own, and then the others could not sign. A key
    # an older keel let another user make is taken back (chown). Only daemons
    # that run as root sign checkpoints; the others default to
    # checkpoint_every = null and never try. A failure here stops no daemon
    # (Wants, not Requires): they append either way.
    systemd.services.keel-ledger-key = {
      description = "keel: the ledger's signing key, root's, made before keel's daemons start";
      wantedBy = [ "multi-user.target" ] ++ appending;
      before = appending;
      unitConfig.RequiresMountsFor = [ (dirOf cfg.ledger) ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = utils.escapeSystemdExecArgs [
          (lib.getExe cfg.package)
          "ledger"
          "key"
          "--provision"
          "--db"
          cfg.ledger
        ];
        # root, in the keel group (to read a ledger another daemon made), with
        # one capability: chown, to take a key back from the user that made it.
        Group = cfg.group;
        UMask = "0077";
        CapabilityBoundingSet = [ "CAP_CHOWN" ];
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ReadWritePaths = [ (dirOf cfg.ledger) ];
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        PrivateNetwork = true;
        RestrictAddressFamilies = [ "AF_UNIX" ];
        SystemCallArchitectures = "native";
      };
    };
  };
}
