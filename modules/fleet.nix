# services.keel.fleet: this host's voice in the fleet (docs/fleet.md). The
# daemon answers other nodes over the local mesh node (status, its signed
# ledger head), witnesses and cosigns the other nodes' ledgers, and carries
# out commands from the nodes declared its operators. Its settings become
# /etc/keel/fleet.json, the file `keel fleet serve` reads.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib) mkOption types;

  keel = config.services.keel;
  cfg = keel.fleet;
  settingsFormat = pkgs.formats.json { };
  configFile = settingsFormat.generate "fleet.json" cfg.settings;

  nodeId = types.strMatching "[a-z2-7]{32}";
  # keel's daemons that answer `status` on /run/keel/<name>.sock (the mesh
  # through its own client); "agents" is no daemon, safeswitch has none.
  daemons = [
    "watch"
    "mesh"
    "egress"
    "mcp"
    "chat"
  ];

  seconds =
    default: description:
    mkOption {
      type = types.addCheck types.number (x: x > 0) // {
        description = "positive number";
      };
      inherit default description;
    };
in
{
  options.services.keel.fleet = {
    enable = lib.mkEnableOption "keel fleet: this host in the fleet view, the fleet audit (witnessing the other nodes' ledgers) and operators' commands across hosts";

    package = mkOption {
      type = types.package;
      default = keel.package;
      defaultText = lib.literalExpression "config.services.keel.package";
      description = "The keel package the fleet daemon runs from.";
    };

    operators = mkOption {
      type = types.listOf nodeId;
      default = [ ];
      example = [ "m5x2bq7hz4kcw3yd6rtp2vnq5jslf3ua" ];
      description = ''
        Mesh node ids (`keel mesh id` on that host) whose commands this host
        carries out: restarting or stopping its agents, switching its
        configuration. This host decides from this list alone, never from
        what another node says of itself. Empty: no other node may command
        this one (status and the audit stay open to every member).
      '';
    };

    watchdogSec = mkOption {
      type = types.ints.positive;
      default = 30;
      description = "systemd's WatchdogSec= for keel-fleet: a hung daemon is killed and restarted.";
    };

    settings = mkOption {
      default = { };
      description = ''
        /etc/keel/fleet.json as a Nix attribute set: every key of
        docs/fleet.md can be set; the main ones are typed here.
      '';
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = {
          socket = mkOption {
            type = types.str;
            default = "/run/keel/fleet.sock";
            description = "The control socket `keel fleet` talks to.";
          };
          ledger = mkOption {
            type = types.nullOr types.str;
            default = keel.ledger;
            defaultText = lib.literalExpression "config.services.keel.ledger";
            description = "The ledger this host's checkpoints are signed from, and commands recorded in; null: none (the host then witnesses others but has nothing to be witnessed).";
          };
          mesh = mkOption {
            type = types.str;
            default = "/run/keel/mesh.sock";
            description = "The mesh daemon's control socket (services.keel.mesh's).";
          };
          state = mkOption {
            type = types.str;
            default = "/var/lib/keel/fleet";
            description = "The fleet's state: what this node witnessed, its witness key, the last reports.";
          };
          watch = mkOption {
            type = types.nullOr types.str;
            default = if keel.watch.enable then keel.watch.settings.socket else null;
            defaultText = lib.literalExpression ''if config.services.keel.watch.enable then config.services.keel.watch.settings.socket else null'';
            description = "watch's control socket: this host's agents in its status, and where commands on agents go.";
          };
          services = mkOption {
            type = types.listOf (types.enum daemons);
            default = lib.filter (name: lib.elem name keel.enabledServices) daemons;
            defaultText = lib.literalExpression "the keel daemons this host enables";
            description = "The keel services whose `status` this host reports.";
          };
          operators = mkOption {
            type = types.listOf nodeId;
            default = cfg.operators;
            defaultText = lib.literalExpression "config.services.keel.fleet.operators";
            description = "Set through services.keel.fleet.operators.";
          };
          keel = mkOption {
            type = types.listOf types.str;
            default = [ (lib.getExe cfg.package) ];
            defaultText = lib.literalExpression ''[ (lib.getExe config.services.keel.fleet.package) ]'';
            description = "How a switch asked for by an operator runs keel (by its store path, never the new system's).";
          };
          switch_runner = mkOption {
            type = types.enum [
              "systemd"
              "process"
            ];
            default = "systemd";
            description = "`systemd`: an operator's switch runs in a transient unit of its own, which outlives keel-fleet (the new configuration may restart it).";
          };
          switch_timeout = seconds 3600 "Seconds a node's switch (build, activation, gate) may take before the rollout counts it lost.";
          witness_every = seconds 60 "Seconds between two rounds of witnessing the other nodes' ledgers.";
          status_timeout = seconds 1 "Seconds `keel fleet status` waits for the nodes' answers.";
          request_timeout = seconds 10 "Seconds a node has to answer a witnessing or audit request.";
          control_timeout = seconds 60 "Seconds an operator's command on an agent may take.";
          pinned = mkOption {
            type = types.attrsOf types.str;
            default = { };
            example = {
              m5x2bq7hz4kcw3yd6rtp2vnq5jslf3ua = "web1/keel/ledger+1a2b3c4d+AQ...";
            };
            description = ''
              Ledger verifier keys of other nodes (`keel ledger key` on that
              host), by node id: used instead of trusting the key a node
              presents the first time it is witnessed.
            '';
          };
        };
      };
    };
  };

  config = lib.mkIf cfg.enable {
    services.keel.enabledServices = [ "fleet" ];

    assertions = [
      {
        assertion = keel.mesh.enable;
        message = "services.keel.fleet: the fleet speaks over the mesh; enable services.keel.mesh too";
      }
      {
        assertion = cfg.settings.status_timeout < 2;
        message = "services.keel.fleet.settings.status_timeout: keep it under 2 s, the time `keel fleet status` is promised in (got ${toString cfg.settings.status_timeout})";
      }
    ];

    warnings = lib.optional (cfg.operators != [ ] && !keel.safeswitch.enable) ''
      services.keel.fleet.operators is set but services.keel.safeswitch is not enabled: the
      operators' rolling switches (keel fleet switch) of this host will run keel switch without
      the safeswitch module's checks, run directory and GC roots; enable services.keel.safeswitch.
    '';

    environment.etc."keel/fleet.json".source = configFile;

    systemd.services.keel-fleet = {
      description = "keel fleet: this host in the fleet view, the fleet audit, operators' commands";
      wantedBy = [ "multi-user.target" ];
      wants = [ "keel-mesh.service" ];
      after = [
        "keel-mesh.service"
        "keel-watch.service"
      ];
      # It runs commands over the mesh: a switch must not stop it before the
      # activation and start it after (the command that asked would lose its
      # answer); restart it in one step, as the mesh node is.
      stopIfChanged = false;
      restartTriggers = [ configFile ];
      serviceConfig = import ./lib/hardening.nix // {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${lib.getExe cfg.package} fleet serve --config ${configFile}";
        WatchdogSec = "${toString cfg.watchdogSec}s";
        Restart = "always";
        RestartSec = "1s";

        # root, for the mesh's and watch's sockets and the ledger key, but
        # with no capabilities and a read-only system but for keel's state
        # and sockets; no network of its own beyond the Unix sockets (the
        # mesh node carries everything between hosts).
        Group = keel.group;
        UMask = "0007";
        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        StateDirectory = "keel/fleet";
        StateDirectoryMode = "0750";
        ReadWritePaths = [
          "/var/lib/keel"
          "/run/keel"
        ];
        RestrictAddressFamilies = [ "AF_UNIX" ];
        IPAddressDeny = "any";
        ProtectProc = "invisible";
        ProcSubset = "pid";
      };
    };
  };
}
