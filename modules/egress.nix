# services.keel.egress: the per-agent, deny-by-default outbound firewall
# (docs/egress.md). Its options become /etc/keel/egress.json, the file
# `keel egress serve` reads. Which agents it governs, as which user, and what
# they may reach come from services.keel.agents and are never repeated here:
# every tier-2 agent, and every tier-1 agent with an `egress.allow`, gets its
# own proxy port (basePort + 1, + 2, ... in the order of their names). The MCP
# servers keel runs (services.keel.mcp.servers) are governed by the same rule,
# as `mcp.<name>`, with the ports after the agents'.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib) mkOption types;

  keel = config.services.keel;
  cfg = keel.egress;
  settingsFormat = pkgs.formats.json { };

  # The agents egress governs, by name (attribute names come sorted).
  governed = lib.filterAttrs (
    _: spec: spec.tier == 2 || (spec.tier == 1 && spec.egress.allow != [ ])
  ) keel.agentSpecs;
  names = builtins.attrNames governed;
  portOf = name: cfg.basePort + 1 + lib.lists.findFirstIndex (n: n == name) 0 names;

  # The MCP servers keel runs, governed as agents are (attribute names come sorted).
  needsEgress = tier: allow: tier == 2 || (tier == 1 && allow != [ ]);
  governedServers = lib.filterAttrs (
    _: server:
    server.enable && server.command != null && server.tier != null
    && needsEgress server.tier server.egress.allow
  ) (if keel.mcp.enable or false then keel.mcp.servers else { });
  serverNames = builtins.attrNames governedServers;
  serverPortOf =
    name: cfg.basePort + 1 + lib.length names + lib.lists.findFirstIndex (n: n == name) 0 serverNames;
  egressNameOf = name: "mcp.${name}";
  allNames = names ++ map egressNameOf serverNames;

  agentsJson = lib.mapAttrs (name: spec: {
    inherit (spec) user;
    port = portOf name;
    mode = if lib.elem name cfg.audit then "audit" else "enforce";
    allow = spec.egress.allow;
  }) governed;

  serversJson = lib.mapAttrs (name: server: {
    inherit (server) user;
    port = serverPortOf name;
    mode = if lib.elem (egressNameOf name) cfg.audit then "audit" else "enforce";
    allow = server.egress.allow;
  }) governedServers;

  configFile = settingsFormat.generate "egress.json" ({
    socket = "/run/keel/egress.sock";
    ledger = cfg.ledger;
    inherit (cfg) upstream min_ttl grace;
    on_stop = cfg.onStop;
    log_group = cfg.logGroup;
    agents = agentsJson;
  }
  // lib.optionalAttrs (serversJson != { }) { servers = serversJson; });

  # IP, IP:PORT or [IPv6]:PORT, as keel.egress.config.parse_upstream reads it.
  goodUpstream =
    text:
    builtins.match "[0-9]+\\.[0-9]+\\.[0-9]+\\.[0-9]+(:[0-9]+)?" text != null
    || builtins.match "[[][0-9A-Fa-f:.]+[]](:[0-9]+)?" text != null
    || builtins.match "[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*" text != null;
  badUpstreams = lib.filter (u: !goodUpstream u) cfg.upstream;
  unknownAudited = lib.subtractLists allNames cfg.audit;
  auditedTier2 =
    lib.filter (name: governed.${name}.tier == 2) (lib.intersectLists names cfg.audit)
    ++ map egressNameOf (
      lib.filter (name: governedServers.${name}.tier == 2) (
        lib.intersectLists serverNames (map (lib.removePrefix "mcp.") cfg.audit)
      )
    );
  lastPort = cfg.basePort + lib.length allNames;

  # What egress adds to the unit of an agent or server it governs.
  governedUnit = egressName: tier: {
    wants = [ "keel-egress.service" ];
    after = [ "keel-egress.service" ];
    serviceConfig = {
      # Fail closed: it starts only once its rules are in the kernel (as root,
      # outside its sandbox: "+").
      ExecStartPre = [
        "+${lib.getExe' pkgs.nftables "nft"} list chain inet keel agent_${egressName}"
      ];
    }
    // lib.optionalAttrs (tier == 1) {
      # Its DNS must leave under its own uid: nscd or systemd-resolved would
      # look names up for it as themselves (tier 2 has this from tiers.json).
      InaccessiblePaths = [
        "-/run/nscd"
        "-/run/systemd/resolve"
      ];
    };
  };
in
{
  options.services.keel.egress = {
    enable = lib.mkEnableOption ''
      keel egress: each tier-2 agent (and each tier-1 agent with an
      egress.allow) reaches exactly the domains of its allowlist, over IPv4
      and IPv6; the rest is dropped in the kernel (nftables table
      `inet keel`) and recorded in the ledger
    '';

    package = mkOption {
      type = types.package;
      default = keel.package;
      defaultText = lib.literalExpression "config.services.keel.package";
      description = "The keel package keel egress runs from.";
    };

    upstream = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "9.9.9.9"
        "[2620:fe::fe]:53"
      ];
      description = ''
        The resolvers keel's DNS proxy asks for allowed names, as IP,
        IP:PORT or [IPv6]:PORT (addresses, not names: a name would need a
        resolver to be found). Agents' own DNS never reaches them directly.
      '';
    };

    min_ttl = mkOption {
      type = types.ints.between 0 86400;
      default = 30;
      description = ''
        Seconds an address stays open at least, whatever the TTL of its
        answer: the timeout of a set element is max(TTL, min_ttl) + grace.
      '';
    };

    grace = mkOption {
      type = types.ints.between 0 86400;
      default = 30;
      description = "Seconds added to every element's timeout, for clients that connect a moment after their cache expired.";
    };

    onStop = mkOption {
      type = types.enum [
        "keep"
        "remove"
      ];
      default = "keep";
      description = ''
        What happens to the rules when keel egress stops: `keep` (agents keep
        the addresses they have and resolve nothing new: fail closed, and a
        restart causes no outage) or `remove` (the table goes; agents' network
        is open until egress starts again).
      '';
    };

    audit = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "scout" ];
      description = ''
        Agents in audit mode: everything is allowed and what enforce mode
        would block is recorded (`keel egress suggest AGENT` turns it into an
        allowlist). For building an allowlist, not for running untrusted code.
      '';
    };

    basePort = mkOption {
      type = types.port;
      default = 5300;
      description = "Agents' proxy ports are basePort + 1, + 2, ... on 127.0.0.1 and ::1.";
    };

    logGroup = mkOption {
      type = types.ints.between 0 65535;
      default = 17;
      description = "The NFLOG group dropped packets are logged to (rate-limited) for the ledger.";
    };

    ledger = mkOption {
      type = types.nullOr types.str;
      default = keel.ledger;
      defaultText = lib.literalExpression "config.services.keel.ledger";
      description = "The ledger denied names, blocked connections and rule changes are recorded in; null turns that off.";
    };

    watchdogSec = mkOption {
      type = types.ints.positive;
      default = 10;
      description = "systemd's WatchdogSec= for keel-egress: a hung proxy is killed and restarted (the rules stay).";
    };
  };

  config = lib.mkIf cfg.enable {
    services.keel.enabledServices = [ "egress" ];

    assertions = [
      {
        assertion = cfg.upstream != [ ];
        message = "services.keel.egress.upstream: name the resolvers keel asks for allowed names, e.g. [ \"9.9.9.9\" \"[2620:fe::fe]:53\" ]";
      }
      {
        assertion = badUpstreams == [ ];
        message = "services.keel.egress.upstream: ${lib.concatStringsSep ", " badUpstreams}: expected IP, IP:PORT or [IPv6]:PORT (an address: a name would need a resolver)";
      }
      {
        assertion = unknownAudited == [ ];
        message = "services.keel.egress.audit: ${lib.concatStringsSep ", " unknownAudited}: not an agent egress governs (tier 2, or tier 1 with an egress.allow), nor an MCP server as mcp.<name>";
      }
      {
        assertion = lastPort <= 65535;
        message = "services.keel.egress.basePort: ${toString cfg.basePort} leaves no room for ${toString (lib.length names)} agent ports${lib.optionalString (serverNames != [ ]) " and ${toString (lib.length serverNames)} MCP server ports"}";
      }
      {
        assertion = !(cfg.basePort < 53 && lastPort >= 53);
        message = "services.keel.egress.basePort: the agents' ports must not include 53";
      }
    ];

    warnings = map (
      name:
      "services.keel.egress.audit: ${name} is a tier 2 agent: in audit mode its network is open (only recorded); remove it from audit once its allowlist is built"
    ) auditedTier2;

    environment.etc."keel/egress.json".source = configFile;

    systemd.services = {
      keel-egress = {
        description = "keel egress: per-agent outbound firewall and DNS proxy";
        wantedBy = [ "multi-user.target" ];
        before =
          map (name: "keel-agent-${name}.service") names
          ++ map (name: "keel-mcp-${name}.service") serverNames;
        after = [ "network.target" ];
        # A switch restarts egress in one step; the rules stay in the kernel
        # meanwhile (onStop = "keep"), so agents lose nothing they resolved.
        stopIfChanged = false;
        path = [ pkgs.nftables ];
        serviceConfig = import ./lib/hardening.nix // {
          Type = "notify";
          NotifyAccess = "main";
          ExecStart = "${lib.getExe cfg.package} egress serve --config ${configFile}";
          WatchdogSec = "${toString cfg.watchdogSec}s";
          Restart = "always";
          RestartSec = "200ms";
          Group = keel.group;
          UMask = "0007";
          # root for nothing but this: its own nftables table and NFLOG group.
          CapabilityBoundingSet = "CAP_NET_ADMIN";
          AmbientCapabilities = "CAP_NET_ADMIN";
          # nftables and NFLOG speak netlink.
          RestrictAddressFamilies = [
            "AF_UNIX"
            "AF_INET"
            "AF_INET6"
            "AF_NETLINK"
          ];
          ProtectProc = "invisible";
          ReadWritePaths = [
            "/var/lib/keel"
            "/run/keel"
          ];
        };
      };
    }
    // lib.listToAttrs (
      map (name: lib.nameValuePair "keel-agent-${name}" (governedUnit name governed.${name}.tier)) names
      ++ map (
        name:
        lib.nameValuePair "keel-mcp-${name}" (
          governedUnit (egressNameOf name) governedServers.${name}.tier
        )
      ) serverNames
    );
  };
}
