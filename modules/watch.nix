# services.keel.watch: the supervisor of keel's agents (docs/watch.md). Its
# settings become /etc/keel/watch.json, the file `keel watch serve` reads;
# every agent of services.keel.agents is supervised with the probes of its
# spec unless the host says otherwise.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib) mkOption types;

  keel = config.services.keel;
  cfg = keel.watch;
  settingsFormat = pkgs.formats.json { };
  agents = keel.agentSpecs;

  # keel watch refuses unknown keys, and a key set to null is one: drop the
  # nulls of the typed route options.
  routeJson = lib.mapAttrs (_: route: lib.filterAttrs (_: value: value != null) route);
  settingsJson = cfg.settings // {
    alerts = routeJson cfg.settings.alerts;
  };
  configFile = settingsFormat.generate "watch.json" settingsJson;

  routeModule = {
    freeformType = settingsFormat.type;
    options = {
      type = mkOption {
        type = types.enum [
          "telegram"
          "webhook"
        ];
        description = "`telegram` (the Bot API's sendMessage) or `webhook` (a JSON POST).";
      };
      token_file = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/run/secrets/telegram-bot-token";
        description = ''
          For `telegram`: a file holding the bot token, readable by root.
          The token itself never goes into the configuration (it would be
          world-readable in the Nix store).
        '';
      };
      chat_id = mkOption {
        type = types.nullOr (types.either types.int types.str);
        default = null;
        example = -1001234567890;
        description = "For `telegram`: the chat (a number, or \"@channel\").";
      };
      url = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "For `webhook`: the URL to POST to.";
      };
    };
  };

  agentModule = {
    freeformType = settingsFormat.type;
    options.probes = mkOption {
      type = types.listOf settingsFormat.type;
      default = [ ];
      description = "Health probes (docs/watch.md); for agents of services.keel.agents, those of its `health.probes`.";
    };
  };

  routeNames = builtins.attrNames cfg.settings.alerts;
  # The routes an agent names: `alerts = [ ... ]` or `alerts.routes = [ ... ]`.
  namedRoutes =
    agent:
    let
      alerts = agent.alerts or null;
    in
    if builtins.isList alerts then
      alerts
    else if builtins.isAttrs alerts then
      alerts.routes or [ ]
    else
      [ ];
  unknownRoutes = lib.concatLists (
    lib.mapAttrsToList (
      name: agent: map (route: "${name} -> ${route}") (lib.subtractLists routeNames (namedRoutes agent))
    ) cfg.settings.agents
  );
  telegramProblems = lib.concatLists (
    lib.mapAttrsToList (
      name: route:
      lib.optional (route.type == "telegram" && (route.token_file == null || route.chat_id == null)) name
    ) cfg.settings.alerts
  );
  inlineTokens = lib.attrNames (lib.filterAttrs (_: route: route ? token) cfg.settings.alerts);
in
{
  options.services.keel.watch = {
    enable = lib.mkEnableOption "keel watch, which supervises every agent: health probes, restarts with back-off, alerts";

    package = mkOption {
      type = types.package;
      default = keel.package;
      defaultText = lib.literalExpression "config.services.keel.package";
      description = "The keel package keel watch runs from.";
    };

    superviseAgents = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Supervise every agent of services.keel.agents, with the probes of its
        spec. Set settings.agents.<name> to add restart or alert rules to
        one of them, or to supervise other units.
      '';
    };

    watchdogSec = mkOption {
      type = types.ints.positive;
      default = 10;
      description = "systemd's WatchdogSec= for keel-watch itself: a hung watch is killed and restarted.";
    };

    settings = mkOption {
      default = { };
      description = ''
        /etc/keel/watch.json as a Nix attribute set: every key of
        docs/watch.md can be set; the important ones are typed here.
      '';
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = {
          backend = mkOption {
            type = types.enum [
              "systemd"
              "process"
            ];
            default = "systemd";
            description = "`systemd` supervises units; `process` runs commands itself (dev mode, hosts without systemd).";
          };
          socket = mkOption {
            type = types.str;
            default = "/run/keel/watch.sock";
            description = "The control socket `keel status` talks to.";
          };
          ledger = mkOption {
            type = types.nullOr types.str;
            default = keel.ledger;
            defaultText = lib.literalExpression "config.services.keel.ledger";
            description = "The ledger restarts, probe changes and alerts are recorded in; null turns that off.";
          };
          metrics = mkOption {
            type = types.nullOr types.str;
            default = null;
            example = "127.0.0.1:9101";
            description = "HOST:PORT for Prometheus metrics; none when null.";
          };
          systemd_bus = mkOption {
            type = types.enum [
              "auto"
              "private"
              "system"
            ];
            default = "auto";
            description = "How watch reaches systemd: its private socket (root), the system bus, or the first that works.";
          };
          alerts = mkOption {
            type = types.attrsOf (types.submodule routeModule);
            default = { };
            description = "Alert routes by name.";
          };
          agents = mkOption {
            type = types.attrsOf (types.submodule agentModule);
            default = { };
            description = "The agents watch supervises, by name (the unit defaults to keel-agent-<name>.service).";
          };
        };
      };
    };
  };

  config = lib.mkIf cfg.enable {
    services.keel.enabledServices = [ "watch" ];

    services.keel.watch.settings.agents = lib.mkIf cfg.superviseAgents (
      lib.mapAttrs (_: spec: {
        probes = lib.mkDefault spec.health.probes;
      }) keel.agentSpecs
    );

    assertions = [
      {
        assertion = !(cfg.settings.backend == "process" && cfg.superviseAgents && agents != { });
        message = "services.keel.watch.settings.backend: the process backend runs agents as its own children from `command`; the agents of services.keel.agents are systemd units, so use the systemd backend (the default) or set services.keel.watch.superviseAgents = false";
      }
      {
        assertion = unknownRoutes == [ ];
        message = "services.keel.watch.settings.agents: ${lib.concatStringsSep ", " unknownRoutes}: no such alert route in services.keel.watch.settings.alerts";
      }
      {
        assertion = telegramProblems == [ ];
        message = "services.keel.watch.settings.alerts: ${lib.concatStringsSep ", " telegramProblems}: a telegram route needs token_file and chat_id";
      }
      {
        assertion = inlineTokens == [ ];
        message = "services.keel.watch.settings.alerts: ${lib.concatStringsSep ", " inlineTokens}: put the bot token in a file and name it in token_file; a token in the settings would be world-readable in the Nix store";
      }
      {
        assertion = cfg.settings.metrics == null || builtins.match ".+:[0-9]+" cfg.settings.metrics != null;
        message = "services.keel.watch.settings.metrics: expected \"HOST:PORT\" (e.g. \"127.0.0.1:9101\")";
      }
    ];

    environment.etc."keel/watch.json".source = configFile;

    systemd.services.keel-watch = {
      description = "keel watch: supervision of keel's agents";
      wantedBy = [ "multi-user.target" ];
      after = [ "dbus.service" ];
      # Agents do not depend on watch: it adopts running agents when it
      # starts and leaves them running when it stops.
      serviceConfig = import ./lib/hardening.nix // {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${lib.getExe cfg.package} watch serve --config ${configFile}";
        WatchdogSec = "${toString cfg.watchdogSec}s";
        Restart = "always";
        RestartSec = "500ms";

        # root, for systemd's private socket (no polkit round trip), but
        # with no capabilities and a read-only system. No ProtectProc: a
        # root without capabilities would no longer see the agents' processes.
        Group = keel.group;
        UMask = "0007";
        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        ReadWritePaths = [
          "/var/lib/keel"
          "/run/keel"
        ];
      }
      // lib.optionalAttrs (cfg.settings.backend == "process") {
        # The process backend runs each agent in a cgroup of its own, under
        # watch's: that subtree is watch's to write (docs/watch.md, Backends).
        Delegate = true;
        ProtectControlGroups = false;
      };
    };
  };
}
