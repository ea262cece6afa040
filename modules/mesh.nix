# services.keel.mesh: this host's node of the keel mesh (docs/mesh.md). Its
# options become /etc/keel/mesh.json, the file `keel mesh serve --config`
# reads; the node's identity and state live in /var/lib/keel/mesh, its
# control socket is /run/keel/mesh.sock (where the `keel mesh` commands look).
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:
let
  inherit (lib) mkOption types;

  keel = config.services.keel;
  cfg = keel.mesh;
  settingsFormat = pkgs.formats.json { };
  directory = "/var/lib/keel/mesh";
  # The daemon's whole config: the settings, and where the node lives and
  # listens (these four are the module's, not settings' to change).
  # The agents the node tells apart by uid on its control socket, with their
  # mesh grants (docs/mesh.md, "Agents"); an agent running as root is no
  # agent to it (it cannot be told apart from root).
  meshAgents = lib.mapAttrs (
    _: spec: { inherit (spec) user tier; } // lib.optionalAttrs (spec ? mesh) { inherit (spec) mesh; }
  ) (lib.filterAttrs (_: spec: spec.user != "root") keel.agentSpecs);
  configFile = settingsFormat.generate "mesh.json" (
    cfg.settings
    // {
      inherit directory;
      inherit (cfg) listen ledger;
      socket = "/run/keel/mesh.sock";
      # Tier-2 sandboxes hide /run/keel; agents connect here (docs/mesh.md, Agents).
      agent_socket = "/run/keel-mesh/agents.sock";
      agents = meshAgents;
    }
  );

  # "HOST:PORT" or "[V6]:PORT". The port is read as keel mesh reads it
  # (decimal, leading zeros allowed: "07400" is 7400); anything else fails
  # the assertions below instead of throwing during evaluation.
  listenMatch = builtins.match "([[][0-9A-Fa-f:.]+[]]|[0-9.]+):([0-9]{1,5})" cfg.listen;
  validListen = listenMatch != null;
  listenPort = if validListen then lib.toIntBase10 (lib.last listenMatch) else 0;
  validPort = validListen && listenPort >= 1 && listenPort <= 65535;

  seconds =
    default: description:
    mkOption {
      type = types.number;
      inherit default description;
    };
in
{
  options.services.keel.mesh = {
    enable = lib.mkEnableOption "the keel mesh node: post-quantum hybrid encrypted messaging between keel hosts";

    package = mkOption {
      type = types.package;
      default = keel.package;
      defaultText = lib.literalExpression "config.services.keel.package";
      description = "The keel package the mesh node runs from.";
    };

    listen = mkOption {
      type = types.str;
      example = "0.0.0.0:7400";
      description = ''
        The TCP address peers reach this node on, `IP:PORT` (`[IPv6]:PORT`);
        `0.0.0.0` or `[::]` advertise every interface's address in invites.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the port of `listen` in the firewall, for peers to dial.";
    };

    ledger = mkOption {
      type = types.nullOr types.str;
      default = keel.ledger;
      defaultText = lib.literalExpression "config.services.keel.ledger";
      description = "The ledger message metadata is recorded in (never payloads); null turns that off.";
    };

    watchdogSec = mkOption {
      type = types.ints.positive;
      default = 30;
      description = "systemd's WatchdogSec= for the node: a hung daemon is killed and restarted.";
    };

    settings = mkOption {
      default = { };
      description = ''
        /etc/keel/mesh.json (docs/mesh.md) as a Nix attribute set: every key
        can be set (keel refuses unknown ones); the main ones are typed here
        with keel's defaults. `listen` and `ledger` are options of their own;
        the node's directory and socket are fixed.
      '';
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = {
          handshake_timeout = seconds 10 "Seconds a handshake may take.";
          keepalive_interval = seconds 15 "Seconds of silence before a keepalive.";
          idle_timeout = seconds 60 "Seconds of silence before a connection is dropped; more than keepalive_interval.";
          rekey_interval = seconds 120 "Seconds between rekeys (also every 65536 records).";
          default_ttl = seconds 86400 "Seconds before an unacknowledged message becomes a dead letter.";
          durability = mkOption {
            type = types.enum [
              "normal"
              "full"
            ];
            default = "normal";
            description = "`normal` survives any crash of the daemon; `full` also a power loss (fsync per commit).";
          };
        };
      };
    };
  };

  config = lib.mkIf cfg.enable {
    services.keel.enabledServices = [ "mesh" ];

    assertions = [
      {
        assertion = validListen;
        message = "services.keel.mesh.listen: expected IP:PORT or [IPv6]:PORT (e.g. \"0.0.0.0:7400\"), got ${builtins.toJSON cfg.listen}";
      }
      {
        assertion = !validListen || validPort;
        message = "services.keel.mesh.listen: the port must be 1 to 65535 (0 picks a random one, which peers cannot follow)";
      }
      {
        assertion = cfg.settings.idle_timeout > cfg.settings.keepalive_interval;
        message = "services.keel.mesh.settings.idle_timeout (${toString cfg.settings.idle_timeout}) must exceed keepalive_interval (${toString cfg.settings.keepalive_interval})";
      }
    ];

    environment.etc."keel/mesh.json".source = configFile;
    # Before keel mesh read --config, this module linked the node's settings
    # to ${directory}/config.json; nothing reads that link any more.
    systemd.tmpfiles.rules = [ "r ${directory}/config.json - - - - -" ];

    users.users.keel-mesh = {
      description = "keel mesh node";
      isSystemUser = true;
      group = keel.group;
    };

    networking.firewall.allowedTCPPorts = lib.mkIf (cfg.openFirewall && validPort) [ listenPort ];

    systemd.services.keel-mesh = {
      description = "keel mesh: encrypted messaging between keel hosts";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      # A switch restarts the node in one step instead of stopping it before
      # the activation and starting it after (as tailscale.nix does): a
      # switch driven over the mesh does not cut the link it runs on.
      stopIfChanged = false;

      serviceConfig = import ./lib/hardening.nix // {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = utils.escapeSystemdExecArgs [
          (lib.getExe cfg.package)
          "mesh"
          "serve"
          "--config"
          "${configFile}"
        ];
        WatchdogSec = "${toString cfg.watchdogSec}s";
        Restart = "always";
        RestartSec = "1s";

        User = "keel-mesh";
        Group = keel.group;
        StateDirectory = "keel/mesh";
        # identity.key and state.db stay the node's own (0600); the keel
        # group reaches /run/keel/mesh.sock (mode 0660).
        StateDirectoryMode = "0750";
        UMask = "0007";
        # The agents' socket (mode 0666: the node judges each caller by its uid).
        RuntimeDirectory = "keel-mesh";
        RuntimeDirectoryMode = "0755";
        ReadWritePaths = [
          "/var/lib/keel"
          "/run/keel"
        ];

        CapabilityBoundingSet = if validPort && listenPort < 1024 then [ "CAP_NET_BIND_SERVICE" ] else "";
        AmbientCapabilities = if validPort && listenPort < 1024 then [ "CAP_NET_BIND_SERVICE" ] else "";
        ProtectProc = "invisible";
        RemoveIPC = true;
      };
    };
  };
}
