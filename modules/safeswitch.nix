# services.keel.safeswitch: `keel switch` on this host (docs/safeswitch.md).
# Its options become /etc/keel/safeswitch.json, the defaults `keel switch`,
# `keel switch rollback` and `keel rebuild` read: the gate, the deadline and
# the checks, as typed options.
#
# There is no safeswitch daemon. A switch is a command; what must outlive it
# is created at switch time as *transient* units (`systemd-run`): the rollback
# timer and its service, and each activation. No generation declares them,
# so `switch-to-configuration` never stops or restarts them, whatever the new
# configuration does to keel's own units (keel-watch restarting mid-gate
# included); they survive `daemon-reload` and `daemon-reexec`. The timer runs
# the keel of this configuration by its store path (the `keel` key of the
# file), so a rollback never depends on the new system's keel.
#
# With systemd-boot's boot counting (boot.loader.systemd-boot.bootCounting,
# present in the pinned nixpkgs), a boot of a fresh generation is blessed
# only once keel's gate holds: keel-safeswitch-boot-check.service runs the
# same checks, RequiredBy boot-complete.target, on boots under assessment.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib) mkOption types;

  keel = config.services.keel;
  cfg = keel.safeswitch;
  watch = keel.watch;
  settingsFormat = pkgs.formats.json { };

  systemdBootCounting = lib.attrByPath [
    "boot"
    "loader"
    "systemd-boot"
    "bootCounting"
    "enable"
  ] false config;

  seconds =
    default: description:
    mkOption {
      type = types.addCheck types.number (x: x >= 0) // {
        description = "number of seconds (>= 0)";
      };
      inherit default description;
    };

  checkName = mkOption {
    type = types.nullOr types.str;
    default = null;
    description = "The name the check goes by in output, the state file and the ledger.";
  };
  checkTimeout =
    default:
    mkOption {
      type = types.ints.positive;
      inherit default;
      description = "Seconds one run of the check may take before it counts as failed.";
    };

  tcpModule = {
    options = {
      host = mkOption {
        type = types.str;
        default = "127.0.0.1";
        description = "The host to connect to.";
      };
      port = mkOption {
        type = types.port;
        example = 22;
        description = "The TCP port that must accept a connection.";
      };
      name = checkName;
      timeout = checkTimeout 5;
    };
  };

  httpModule = {
    options = {
      url = mkOption {
        type = types.strMatching "https?://.+";
        example = "http://127.0.0.1:8080/health";
        description = "The URL to GET.";
      };
      expectStatus = mkOption {
        type = types.listOf (types.ints.between 100 599);
        default = [ ];
        description = "Statuses that pass; empty: any 2xx or 3xx.";
      };
      name = checkName;
      timeout = checkTimeout 5;
    };
  };

  commandModule = {
    options = {
      command = mkOption {
        type = types.str;
        example = "curl -fsS http://127.0.0.1:8080/ready";
        description = "A shell command (`/bin/sh -c`) that must exit 0; it runs as root unless `user` says otherwise.";
      };
      user = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "nobody";
        description = ''
          The user the command runs as (its uid, gid and groups, with no new
          privileges: no `sudo` back to root). null: root, as the switcher.
          A check that only reads a health endpoint needs no root.
        '';
      };
      name = checkName;
      timeout = checkTimeout 30;
    };
  };

  withName = check: lib.optionalAttrs (check.name != null) { inherit (check) name; };

  checks =
    lib.optional cfg.checks.watch {
      type = "watch";
      socket = watch.settings.socket;
    }
    ++ lib.optional cfg.checks.system.enable {
      type = "system";
      allow_degraded = cfg.checks.system.allowDegraded;
    }
    ++ map (
      check:
      {
        type = "tcp";
        inherit (check) host port timeout;
      }
      // withName check
    ) cfg.checks.tcp
    ++ map (
      check:
      {
        type = "http";
        inherit (check) url timeout;
      }
      // lib.optionalAttrs (check.expectStatus != [ ]) { expect_status = check.expectStatus; }
      // withName check
    ) cfg.checks.http
    ++ map (
      check:
      {
        type = "command";
        inherit (check) command timeout;
      }
      // lib.optionalAttrs (check.user != null) { inherit (check) user; }
      // withName check
    ) cfg.checks.commands;

  checkUsers = lib.unique (lib.filter (user: user != null) (map (check: check.user) cfg.checks.commands));
  unknownCheckUsers = lib.filter (user: !(config.users.users ? ${user})) checkUsers;

  watchRoutes = if watch.enable then builtins.attrNames watch.settings.alerts else [ ];
  alertRoutes = if cfg.alerts.routes == null then watchRoutes else cfg.alerts.routes;
  unknownRoutes = lib.subtractLists watchRoutes alertRoutes;

  targetsJson = lib.mapAttrs (
    name: target:
    if target.specialisation != null then
      { inherit (target) specialisation; }
    else
      { inherit (target) system; }
  ) cfg.targets;
  badTargets = lib.filterAttrs (
    name: target:
    builtins.match "[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}" name == null
    || (target.specialisation == null) == (target.system == null)
  ) cfg.targets;
  unknownRequesters = lib.filter (user: !(config.users.users ? ${user})) cfg.requesters;

  # The same rule `keel switch install-units --allow` writes (keel.safeswitch.units):
  # the requesters may *start* keel-switch@INSTANCE.service, nothing else.
  polkitRule = ''
    // keel: the users below may *start* keel-switch@INSTANCE.service (a switch to a
    // target declared in safeswitch.json, checked again by root) and nothing else.
    // docs/safeswitch.md, 'Switching from elsewhere'.
    polkit.addRule(function (action, subject) {
      if (action.id === "org.freedesktop.systemd1.manage-units" &&
          ${builtins.toJSON (lib.sort lib.lessThan (lib.unique cfg.requesters))}.indexOf(subject.user) >= 0 &&
          action.lookup("verb") === "start" &&
          /^keel-switch@[A-Za-z0-9_.:\\]+\.service$/.test(action.lookup("unit"))) {
        return polkit.Result.YES;
      }
    });
  '';

  settings = {
    inherit (cfg) gate deadline timer;
    inherit checks;
    ledger = keel.ledger;
    keel = [ "${lib.getExe cfg.package}" ];
    alerts =
      if alertRoutes == [ ] then
        null
      else
        {
          watch_config = "/etc/keel/watch.json";
          routes = alertRoutes;
        };
  }
  // lib.optionalAttrs (cfg.targets != { }) { targets = targetsJson; };
  configFile = settingsFormat.generate "safeswitch.json" settings;

  # What the boot check needs beyond the checks' own time: systemd-boot gives
  # the gate this long to hold once the system is up.
  bootCheckDeadline = cfg.gate + cfg.bootCounting.settle;
in
{
  options.services.keel.safeswitch = {
    enable = lib.mkEnableOption "keel switch's defaults on this host: switches behind a health gate that roll back by themselves";

    package = mkOption {
      type = types.package;
      default = keel.package;
      defaultText = lib.literalExpression "config.services.keel.package";
      description = "The keel package `keel switch` and the rollback timer run from.";
    };

    gate = seconds 30 ''
      How long every check must pass, continuously, before a switch commits
      (the new generation enters the profile and becomes the boot default).
    '';

    deadline = seconds 300 ''
      Activation and gate together must end within this many seconds of
      arming, else the switch rolls back; the rollback timer fires then too
      (for a switcher that died). Must be longer than the gate.
    '';

    timer = mkOption {
      type = types.enum [
        "systemd"
        "process"
      ];
      default = "systemd";
      description = ''
        Where the rollback timer and activations run: transient systemd units
        (survive SSH loss, daemon-reload and the switcher's death) or
        detached processes (for hosts without systemd; not for NixOS).
      '';
    };

    checks = {
      watch = mkOption {
        type = types.bool;
        default = watch.enable;
        defaultText = lib.literalExpression "config.services.keel.watch.enable";
        description = ''
          Ask watch (its control socket's `status`): every agent healthy, none
          restarted during the gate. `starting` agents keep the gate waiting.
        '';
      };
      system = {
        enable = mkOption {
          type = types.bool;
          default = true;
          description = "`systemctl is-system-running` must say `running`.";
        };
        allowDegraded = mkOption {
          type = types.bool;
          default = false;
          description = ''
            Let `degraded` pass. Without it, `degraded` fails the gate only for
            units that failed since the switch began: a unit already failed
            before the switch does not block it.
          '';
        };
      };
      tcp = mkOption {
        type = types.listOf (types.submodule tcpModule);
        default = [ ];
        example = lib.literalExpression ''[ { port = 22; name = "ssh"; } ]'';
        description = "Ports that must accept connections (\"ssh answers on 22\").";
      };
      http = mkOption {
        type = types.listOf (types.submodule httpModule);
        default = [ ];
        description = "URLs whose GET must answer 2xx/3xx (or one of expectStatus).";
      };
      commands = mkOption {
        type = types.listOf (types.coercedTo types.str (command: { inherit command; }) (types.submodule commandModule));
        default = [ ];
        example = [ "curl -fsS http://127.0.0.1:8080/ready" ];
        description = "Shell commands that must exit 0 (a string, or { command, name, timeout }).";
      };
    };

    targets = mkOption {
      type = types.attrsOf (
        types.submodule {
          options = {
            specialisation = mkOption {
              type = types.nullOr types.str;
              default = null;
              example = "next";
              description = "A specialisation of the running system (/run/current-system/specialisation/NAME).";
            };
            system = mkOption {
              type = types.nullOr types.str;
              default = null;
              example = "/run/booted-system";
              description = "A path to a system, resolved when the switch is asked for (/run/booted-system: what the host booted).";
            };
          };
        }
      );
      default = { };
      example = lib.literalExpression ''
        {
          next = { specialisation = "next"; };
          booted = { system = "/run/booted-system"; };
        }
      '';
      description = ''
        Systems others may switch this host to, by name (1 to 32 letters,
        digits, `_`, `.`, `-`): `keel-switch@.service` switches only to
        these, and only when the running system and the target are still the
        store paths the asker confirmed (keel chat's `/switch NAME`). Each is
        exactly one of `specialisation` or `system`. Never a path the asker
        types, never a flake to build.
      '';
    };

    requesters = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "keel-chat" ];
      description = ''
        Users that may start `keel-switch@INSTANCE.service` (a switch to one of
        `targets`) through polkit, and nothing else. keel chat adds its user
        when its `switch` command is enabled.
      '';
    };

    alerts.routes = mkOption {
      type = types.nullOr (types.listOf types.str);
      default = null;
      description = ''
        The routes of services.keel.watch.settings.alerts that hear about a
        rollback or a failed rollback; null: all of them (none without watch).
      '';
    };

    bootCounting = {
      enable = mkOption {
        type = types.bool;
        default = systemdBootCounting;
        defaultText = lib.literalExpression "config.boot.loader.systemd-boot.bootCounting.enable";
        description = ''
          Make keel's gate part of boot assessment: a boot of a generation
          under assessment counts as good only once the checks hold for the
          gate (keel-safeswitch-boot-check.service, RequiredBy
          boot-complete.target). Needs systemd-boot's bootCounting.
        '';
      };
      settle = mkOption {
        type = types.ints.positive;
        default = 300;
        description = "Seconds after boot the checks have, beyond the gate, to start holding.";
      };
      rebootOnFailure = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Reboot when the boot check fails, so the failed try is counted at
          once and, once the tries are spent, systemd-boot falls back to the
          previous generation without anyone at the console. The check only
          runs on boots under assessment (an entry with a counter), so a
          blessed generation never reboot-loops. Off: the boot stays up,
          unblessed, and the next reboot counts the try.
        '';
      };
    };
  };

  config = lib.mkIf cfg.enable {
    services.keel.enabledServices = [ "safeswitch" ];

    assertions = [
      {
        assertion = cfg.deadline > cfg.gate;
        message = "services.keel.safeswitch.deadline (${toString cfg.deadline}) must be longer than gate (${toString cfg.gate}): it bounds activation and gate together";
      }
      {
        assertion = cfg.checks.watch -> watch.enable;
        message = "services.keel.safeswitch.checks.watch needs services.keel.watch.enable";
      }
      {
        assertion = unknownRoutes == [ ];
        message = "services.keel.safeswitch.alerts.routes: ${lib.concatStringsSep ", " unknownRoutes}: no such route in services.keel.watch.settings.alerts";
      }
      {
        assertion = badTargets == { };
        message = "services.keel.safeswitch.targets: ${lib.concatStringsSep ", " (builtins.attrNames badTargets)}: a target's name is 1 to 32 letters, digits, '_', '.' or '-' (not first), and it sets exactly one of specialisation or system";
      }
      {
        assertion = cfg.requesters != [ ] -> cfg.targets != { };
        message = "services.keel.safeswitch.requesters is set but no targets are declared: the requesters could switch to nothing";
      }
      {
        assertion = unknownRequesters == [ ];
        message = "services.keel.safeswitch.requesters: ${lib.concatStringsSep ", " unknownRequesters}: no such user in users.users";
      }
      {
        assertion = unknownCheckUsers == [ ];
        message = "services.keel.safeswitch.checks.commands: user ${lib.concatStringsSep ", " unknownCheckUsers}: no such user in users.users";
      }
      {
        assertion = cfg.bootCounting.enable -> systemdBootCounting;
        message = "services.keel.safeswitch.bootCounting.enable needs boot.loader.systemd-boot.bootCounting.enable";
      }
    ];

    environment.etc."keel/safeswitch.json".source = configFile;

    # GC roots of the systems of a switch in progress; the state file and the
    # lock, readable by the keel group (`keel switch status` without root).
    systemd.tmpfiles.rules = [
      "d /nix/var/nix/gcroots/keel-safeswitch 0755 root root - -"
      "d /run/keel/safeswitch 2750 root ${keel.group} - -"
      "d /var/lib/keel/safeswitch 0750 root root - -"
    ];

    # A switch asked for by someone who is not root (keel chat's /switch): root runs
    # `keel switch request INSTANCE`, which switches only to a declared target and
    # only from and to the store paths the instance names (docs/safeswitch.md).
    # A switch of the configuration never stops or restarts it (as
    # nixos-upgrade.service); safeswitch's deadline and rollback timer bound it.
    systemd.services."keel-switch@" = lib.mkIf (cfg.targets != { }) {
      description = "keel safeswitch: a switch to a declared target (request %i)";
      after = [ "keel-ledger-key.service" ];
      restartIfChanged = false;
      unitConfig."X-StopOnRemoval" = false;
      # nix-env adds the generation; setpriv runs checks with a `user`.
      path = [
        config.nix.package
        pkgs.util-linux
      ];
      serviceConfig = {
        Type = "oneshot";
        # Unconfined root, as `keel switch` by hand: it runs switch-to-configuration.
        ExecStart = "${lib.getExe cfg.package} switch request --config ${configFile} %i";
        TimeoutStartSec = "infinity";
      };
    };

    security.polkit = lib.mkIf (cfg.requesters != [ ]) {
      enable = true;
      extraConfig = polkitRule;
    };

    # A switch cut short by a reboot leaves its trace in /var/lib/keel/safeswitch
    # (the state file in /run is gone): recorded as `interrupted` in the ledger at
    # the next boot, with the system that booted; its GC roots are dropped.
    systemd.services.keel-safeswitch-reconcile = {
      description = "keel safeswitch: record the switches a reboot interrupted";
      wantedBy = [ "multi-user.target" ];
      after = [ "keel-ledger-key.service" ];
      unitConfig.RequiresMountsFor = [ "/var/lib/keel" ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = "${lib.getExe cfg.package} switch reconcile --config ${configFile}";
        # root: the traces, the GC roots and the ledger; nothing else is written.
        Group = keel.group;
        UMask = "0007";
        CapabilityBoundingSet = "";
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ReadWritePaths = lib.unique [
          "/var/lib/keel/safeswitch"
          (dirOf keel.ledger)
          "/nix/var/nix/gcroots/keel-safeswitch"
        ];
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        PrivateNetwork = true;
        RestrictAddressFamilies = [ "AF_UNIX" ];
        SystemCallArchitectures = "native";
      };
    };

    systemd.services.keel-safeswitch-boot-check = lib.mkIf cfg.bootCounting.enable {
      description = "keel safeswitch: bless this boot only once keel's health gate holds";
      requiredBy = [ "boot-complete.target" ];
      before = [ "boot-complete.target" ];
      # As systemd-boot-check-no-failures.service: after the system is up.
      after = [ "multi-user.target" ] ++ lib.optional watch.enable "keel-watch.service";
      unitConfig = {
        # Only boots under assessment (their entry has a boot counter): a blessed
        # generation is never rebooted away from.
        ConditionPathExists = "/sys/firmware/efi/efivars/LoaderBootCountPath-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";
      }
      // lib.optionalAttrs cfg.bootCounting.rebootOnFailure { FailureAction = "reboot"; };
      # Only checks run here (no switch-to-configuration): the daemons' sandbox fits.
      serviceConfig = import ./lib/hardening.nix // {
        Type = "oneshot";
        RemainAfterExit = true;
        # Not the system check: while this unit runs the boot is not over, so
        # systemd says "starting" (boot assessment sees failed units itself).
        ExecStart = "${lib.getExe cfg.package} switch check --config ${configFile} --deadline ${toString bootCheckDeadline}${lib.optionalString cfg.checks.system.enable " --skip-check system"}";
        TimeoutStartSec = "${toString (bootCheckDeadline + 60)}s";
        Group = keel.group;
        # Command checks with a `user` drop to it (setpriv): that takes setuid and setgid.
        CapabilityBoundingSet = if checkUsers == [ ] then "" else [ "CAP_SETUID" "CAP_SETGID" ];
        AmbientCapabilities = "";
      }
      // lib.optionalAttrs (checkUsers != [ ]) {
        SystemCallFilter = (import ./lib/hardening.nix).SystemCallFilter ++ [ "@setuid" ];
      };
    };
  };
}
