# services.keel.mcp: MCP tool servers run once per host, shared by agents
# through one gateway (docs/mcp.md). Each server of `servers.<name>` is
# written as the JSON spec keel reads (inline in /etc/keel/mcp.json, the file
# `keel mcp serve` reads); a server with a `command` runs as its own unit,
# keel-mcp-<name>.service, rendered by agents.nix's renderer at the server's
# trust tier, with a socket unit holding the gateway's connection to it, and
# is supervised by keel watch like an agent.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib) mkOption types;

  keel = config.services.keel;
  cfg = keel.mcp;
  settingsFormat = pkgs.formats.json { };

  user = "keel-mcp";
  runDir = "/run/keel/mcp";
  listen = "/run/keel-mcp/mcp.sock";
  userPrefix = "keel-mcp-";
  maxNameLength = 31 - builtins.stringLength userPrefix; # NixOS refuses user names of 32 characters or more
  serverRole = {
    title = "MCP server";
    stateRoot = "keel-mcp";
  };

  anyOrList =
    itemType: description:
    mkOption {
      type = types.either (types.enum [ "*" ]) (types.listOf itemType);
      inherit description;
    };

  grantModule = {
    options = {
      agents = anyOrList types.str "`\"*\"` for every agent, or the agents' names; `[ ]` is nobody.";
      tools = anyOrList types.str "`\"*\"` for every tool of the server, or the tools' names; `[ ]` is none.";
      nodes = mkOption {
        type = types.nullOr (types.either (types.enum [ "*" ]) (types.listOf types.str));
        default = null;
        description = ''
          For agents on other nodes of the mesh: `"*"` or their node ids.
          null (the default) makes the grant one for this host's agents.
        '';
      };
      allowLowerTier = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Let agents of a stricter tier use this server although it runs
          under a looser sandbox than theirs (a tier-0 server and a tier-2
          agent): through it they act outside their own sandbox.
        '';
      };
    };
  };

  # Tools another node of the mesh hosts, offered to this host's agents as
  # LABEL.SERVER.TOOL; the hosting node's own `share` grants decide who may use them.
  remoteModule = {
    options = {
      node = mkOption {
        type = types.str;
        example = "czvbwutn4pvzuks5p3g4dajsdwwoqvdv";
        description = "The hosting node's mesh id, as `keel mesh id` prints it there.";
      };
      servers = anyOrList types.str "`\"*\"` for every server the node shares with this host's agents, or the servers' names." // {
        default = "*";
      };
    };
  };

  serverModule =
    { name, ... }:
    {
      options = {
        enable = mkOption {
          type = types.bool;
          default = true;
          description = "Whether to serve this server; false keeps its definition but removes it.";
        };
        command = mkOption {
          type = types.nullOr (types.nonEmptyListOf types.str);
          default = null;
          example = lib.literalExpression ''[ (lib.getExe pkgs.mcp-server-fetch) ]'';
          description = ''
            A stdio MCP server keel runs: its argv, the program an absolute
            path. With `url` too, the command serves Streamable HTTP at `url`.
          '';
        };
        url = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "http://127.0.0.1:8931/mcp";
          description = "A Streamable HTTP MCP endpoint (run by keel with `command`, or elsewhere).";
        };
        tier = mkOption {
          type = types.nullOr (
            types.enum [
              0
              1
              2
            ]
          );
          default = null;
          description = "The trust tier the server runs at (modules/tiers.json); required with `command`.";
        };
        user = mkOption {
          type = types.str;
          default = userPrefix + name;
          defaultText = lib.literalExpression ''"keel-mcp-''${name}"'';
          description = "The user the server runs as; the default one is created here.";
        };
        workingDirectory = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "Working directory; the server's state directory (/var/lib/keel-mcp/<name>) when null.";
        };
        environment = mkOption {
          type = types.attrsOf types.str;
          default = { };
          description = "Environment variables of the server.";
        };
        environmentFiles = mkOption {
          type = types.listOf types.str;
          default = [ ];
          description = "Files of KEY=value lines read at start: API keys stay out of the Nix store.";
        };
        readWritePaths = mkOption {
          type = types.listOf types.str;
          default = [ ];
          description = "Paths the server may write besides its state directory (tiers 1 and 2).";
        };
        egress.allow = mkOption {
          type = types.listOf types.str;
          default = [ ];
          description = "Domains the server may reach (tiers 1 and 2), as for agents.";
        };
        resources = {
          memoryMax = mkOption {
            type = types.nullOr types.str;
            default = null;
            example = "256M";
            description = "systemd's MemoryMax=.";
          };
          cpuQuota = mkOption {
            type = types.nullOr types.str;
            default = null;
            description = "systemd's CPUQuota=.";
          };
          tasksMax = mkOption {
            type = types.nullOr types.ints.positive;
            default = null;
            description = "systemd's TasksMax=.";
          };
        };
        share = mkOption {
          type = types.listOf (types.submodule grantModule);
          default = [ ];
          example = lib.literalExpression ''
            [
              { agents = [ "scout" ]; tools = [ "fetch" ]; }
              { agents = "*"; tools = [ "time" ]; }
            ]
          '';
          description = "Who may use which tools. Nothing is shared unless a grant says so.";
        };
        callTimeout = mkOption {
          type = types.number;
          default = 60;
          description = "Seconds a call may take before the gateway gives up on it.";
        };
      };
    };

  servers = lib.filterAttrs (_: server: server.enable) cfg.servers;
  # (A server without a tier fails an assertion; it gets no unit meanwhile.)
  runHere = lib.filterAttrs (_: server: server.command != null && server.tier != null) servers;
  stdioHere = lib.filterAttrs (_: server: server.url == null) runHere;

  # The spec of docs/mcp.md, in the normalised form keel's ServerSpec.to_json() gives back.
  # Name lists sorted and without repeats, as keel normalises them.
  names = value: if value == "*" then "*" else lib.sort lib.lessThan (lib.unique value);
  grantSpec =
    grant:
    {
      agents = names grant.agents;
      tools = names grant.tools;
    }
    // lib.optionalAttrs (grant.nodes != null) { nodes = names grant.nodes; }
    // lib.optionalAttrs grant.allowLowerTier { allowLowerTier = true; };
  specOf =
    name: server:
    {
      inherit name;
    }
    // lib.optionalAttrs (server.command != null) (
      {
        inherit (server)
          command
          tier
          user
          environment
          environmentFiles
          readWritePaths
          ;
        egress.allow = server.egress.allow;
        resources = lib.filterAttrs (_: value: value != null) server.resources;
      }
      // lib.optionalAttrs (server.workingDirectory != null) { inherit (server) workingDirectory; }
    )
    // lib.optionalAttrs (server.url != null) { inherit (server) url; }
    // {
      share = map grantSpec server.share;
      inherit (server) callTimeout;
    };

  launcher = [
    (lib.getExe cfg.package)
    "mcp"
    "exec"
    "--"
  ];

  # The declaration in the shape agents.nix's renderer reads.
  asUnitDeclaration = server: {
    inherit (server)
      tier
      user
      workingDirectory
      environment
      environmentFiles
      readWritePaths
      resources
      ;
    command = (if server.url == null then launcher else [ ]) ++ server.command;
    capabilities = [ ];
    health.watchdogSec = null;
  };

  serverUnit =
    name: server:
    let
      unit = keel.renderUnit serverRole name (asUnitDeclaration server);
      socket = "keel-mcp-${name}.socket";
    in
    unit
    // lib.optionalAttrs (server.url == null) {
      requires = [ socket ];
      after = [ socket ];
    };

  # agents the gateway tells apart: their uid is their user's, so root (a
  # tier-0 agent may run as root) is no agent to it.
  gatewayAgents = lib.mapAttrs (_: spec: { inherit (spec) user tier; }) (
    lib.filterAttrs (_: spec: spec.user != "root") keel.agentSpecs
  );

  # The gateway (user keel-mcp) appends to the ledger but never signs its
  # checkpoints: the key is root's (docs/ledger.md).
  gatewayConfig =
    { checkpoint_every = null; }
    // cfg.settings
    // {
      servers = lib.mapAttrs specOf servers;
      agents = gatewayAgents;
      remote = lib.mapAttrs remoteSpec cfg.remote;
    }
    // lib.optionalAttrs usesMesh {
      mesh = {
        socket = "/run/keel/mesh.sock"; # fixed by modules/mesh.nix
      }
      // cfg.mesh;
    };
  configFile = settingsFormat.generate "mcp.json" gatewayConfig;

  # The gateway reaches the mesh to call other nodes' tools (remote) and to
  # answer their calls (a grant with `nodes`).
  hostsForNodes = lib.any (server: lib.any (g: g.nodes != null) server.share) (
    builtins.attrValues servers
  );
  usesMesh = cfg.remote != { } || hostsForNodes;
  remoteSpec = _: remote: {
    inherit (remote) node;
    servers = names remote.servers;
  };

  nameOk = name: builtins.match "[a-z][a-z0-9_-]*" name != null && builtins.stringLength name <= maxNameLength;
  # modules/egress.nix governs the servers keel runs as it governs agents.
  egressEnabled = keel.egress.enable or false;
  agentNames = builtins.attrNames keel.agentSpecs;
  assertionsFor =
    name: server:
    let
      option = "services.keel.mcp.servers.${name}";
      namedAgents = lib.concatMap (g: if g.agents == "*" then [ ] else g.agents) server.share;
      tierOf = agent: keel.agentSpecs.${agent}.tier;
      looser = lib.filter (
        g:
        g.nodes == null
        && !g.allowLowerTier
        && g.agents != "*"
        && server.tier != null
        && lib.any (a: lib.elem a agentNames && tierOf a > server.tier) g.agents
      ) server.share;
    in
    [
      {
        assertion = nameOk name;
        message = "${option}: '${name}' is not a valid MCP server name: lowercase letters, digits, '-' and '_', starting with a letter, at most ${toString maxNameLength} characters";
      }
      {
        assertion = server.command != null || server.url != null;
        message = "${option}: give `command` (a stdio server keel runs) or `url` (a Streamable HTTP server)";
      }
      {
        assertion = server.command == null || server.tier != null;
        message = "${option}.tier: required for a server keel runs (0, 1 or 2)";
      }
      {
        assertion = server.command == null || lib.hasPrefix "/" (builtins.head server.command);
        message = "${option}.command: the program must be an absolute path (systemd does not search PATH)";
      }
      {
        assertion = server.user != "root" || server.tier == 0;
        message = "${option}.user: tier ${toString server.tier} servers run as their own user, not root";
      }
      {
        assertion = server.url == null || builtins.match "https?://[^/[:space:]]+.*" server.url != null;
        message = "${option}.url: expected an http:// or https:// URL";
      }
      {
        assertion = server.command == null || server.tier != 2 || egressEnabled;
        message = "${option}: tier 2 servers reach only their egress.allow, which keel egress enforces: set services.keel.egress.enable = true (with services.keel.egress.upstream), or use tier 1";
      }
      {
        assertion = server.command == null || server.tier != 1 || server.egress.allow == [ ] || egressEnabled;
        message = "${option}.egress.allow: an allowlist is enforced by keel egress: set services.keel.egress.enable = true (with services.keel.egress.upstream), or remove the allowlist";
      }
      {
        assertion = server.egress.allow == [ ] || server.tier != 0;
        message = "${option}.egress.allow: tier 0 servers have an open network; use tier 1 or 2 for an allowlist";
      }
      {
        assertion = !(lib.elem "*" namedAgents);
        message = "${option}.share: write agents = \"*\", not a list holding \"*\"";
      }
      {
        assertion = looser == [ ];
        message = "${option}.share: agents of a stricter tier than the server's (${toString server.tier}) are granted it; through it they would act outside their sandbox: run the server at their tier or set allowLowerTier";
      }
    ];
  remoteAssertions = lib.concatLists (
    lib.mapAttrsToList (
      label: remote:
      let
        option = "services.keel.mcp.remote.${label}";
      in
      [
        {
          assertion = builtins.match "[a-z][a-z0-9_-]{0,22}" label != null;
          message = "${option}: '${label}' is not a valid label: 1 to 23 lowercase letters, digits, '-' and '_', starting with a letter (agents see LABEL.SERVER.TOOL)";
        }
        {
          assertion = !(builtins.hasAttr label servers);
          message = "${option}: a local server is named '${label}' too; agents could not tell LABEL.SERVER.TOOL from SERVER.TOOL: choose another label";
        }
        {
          assertion = builtins.match "[a-z2-7]{32}" remote.node != null;
          message = "${option}.node: '${remote.node}' is not a mesh node id (32 characters a-z and 2-7; `keel mesh id` prints it on that node)";
        }
        {
          assertion = remote.servers == "*" || lib.all nameOk remote.servers;
          message = "${option}.servers: expected \"*\" or MCP server names";
        }
      ]
    ) cfg.remote
  );
  unknownAgentWarnings = lib.concatLists (
    lib.mapAttrsToList (
      name: server:
      map (agent: "services.keel.mcp.servers.${name}.share: no agent named '${agent}' on this host") (
        lib.filter (a: !(lib.elem a agentNames)) (
          lib.concatMap (g: if g.agents == "*" || g.nodes != null then [ ] else g.agents) server.share
        )
      )
    ) servers
  );
in
{
  options.services.keel.mcp = {
    enable = lib.mkEnableOption "keel's MCP gateway: tool servers run once per host, each agent seeing only the tools it is granted";

    package = mkOption {
      type = types.package;
      default = keel.package;
      defaultText = lib.literalExpression "config.services.keel.package";
      description = "The keel package the gateway and the servers' launcher run from.";
    };

    servers = mkOption {
      type = types.attrsOf (types.submodule serverModule);
      default = { };
      example = lib.literalExpression ''
        {
          fetch = {
            command = [ (lib.getExe pkgs.mcp-server-fetch) ];
            tier = 2;
            egress.allow = [ "*.wikipedia.org" ];
            share = [ { agents = [ "scout" ]; tools = [ "fetch" ]; } ];
          };
        }
      '';
      description = "MCP servers by name; each with `command` runs as keel-mcp-<name>.service.";
    };

    remote = mkOption {
      type = types.attrsOf (types.submodule remoteModule);
      default = { };
      example = lib.literalExpression ''
        {
          b = { node = "czvbwutn4pvzuks5p3g4dajsdwwoqvdv"; servers = [ "notes" ]; };
        }
      '';
      description = ''
        Tools hosted by other nodes of the mesh, offered to this host's agents
        as `LABEL.SERVER.TOOL`. Calls travel as mesh messages between the two
        gateways, carrying the calling agent as the mesh authenticates it; the
        hosting node's `share` grants with `nodes` decide, and an agent's own
        `mesh.sendTo` must reach the node. Needs services.keel.mesh.
      '';
    };

    mesh = mkOption {
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = {
          deadline = mkOption {
            type = types.number;
            default = 10;
            description = "Seconds a call to another node may take before the agent gets an error.";
          };
          list_ttl = mkOption {
            type = types.number;
            default = 30;
            description = "Seconds another node's tool list is kept before it is asked again.";
          };
        };
      };
      default = { };
      description = "How the gateway uses the mesh (written to mcp.json's `mesh` when it does).";
    };

    watchdogSec = mkOption {
      type = types.ints.positive;
      default = 10;
      description = "systemd's WatchdogSec= for the gateway.";
    };

    settings = mkOption {
      default = { };
      description = "The rest of /etc/keel/mcp.json (docs/mcp.md): limits, Streamable HTTP.";
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = {
          socket = mkOption {
            type = types.str;
            default = "/run/keel/mcp.sock";
            description = "The control socket `keel mcp list|tools|call` talk to.";
          };
          listen = mkOption {
            type = types.str;
            default = listen;
            description = "Where agents connect (outside /run/keel, which tier 2 cannot see).";
          };
          sockets = mkOption {
            type = types.str;
            default = runDir;
            description = "Where the servers' socket units put their sockets.";
          };
          ledger = mkOption {
            type = types.nullOr types.str;
            default = keel.ledger;
            defaultText = lib.literalExpression "config.services.keel.ledger";
            description = "The ledger every call is recorded in (hashes, never content); null turns that off.";
          };
          http = mkOption {
            type = types.nullOr types.str;
            default = null;
            example = "/run/keel-mcp/http.sock";
            description = "A Unix socket for Streamable HTTP (POST /mcp); none when null.";
          };
        };
      };
    };
  };

  config = lib.mkIf cfg.enable {
    services.keel.enabledServices = [ "mcp" ];

    assertions = lib.concatLists (lib.mapAttrsToList assertionsFor servers) ++ remoteAssertions ++ [
      {
        assertion = cfg.mesh.deadline > 0 && cfg.mesh.deadline <= 3600;
        message = "services.keel.mcp.mesh.deadline: expected more than 0 and at most 3600 seconds";
      }
      {
        assertion = cfg.mesh.list_ttl >= 0 && cfg.mesh.list_ttl <= 86400;
        message = "services.keel.mcp.mesh.list_ttl: expected 0 to 86400 seconds";
      }
      {
        assertion = !usesMesh || (keel.mesh.enable or false);
        message = "services.keel.mcp: ${
          if cfg.remote != { } then "remote tools" else "grants with `nodes`"
        } travel over the mesh: enable services.keel.mesh too";
      }
      {
        assertion = (cfg.settings.checkpoint_every or null) == null;
        message = "services.keel.mcp.settings.checkpoint_every: the gateway runs as ${user} and cannot sign the ledger's checkpoints (the key is root's; root's daemons, watch, egress and fleet, sign them): leave it unset";
      }
    ];
    warnings = unknownAgentWarnings;

    environment.etc."keel/mcp.json".source = configFile;

    users.users =
      {
        ${user} = {
          description = "keel MCP gateway";
          isSystemUser = true;
          group = keel.group;
        };
      }
      // lib.mapAttrs' (
        name: server:
        lib.nameValuePair server.user {
          description = "keel MCP server ${name}";
          isSystemUser = true;
          group = server.user;
        }
      ) (lib.filterAttrs (name: server: server.user == userPrefix + name) runHere);
    users.groups = lib.mapAttrs' (name: server: lib.nameValuePair server.user { }) (
      lib.filterAttrs (name: server: server.user == userPrefix + name) runHere
    );

    # The servers' sockets live where only the gateway goes.
    systemd.tmpfiles.rules = [ "d ${runDir} 0750 ${user} ${keel.group} - -" ];

    systemd.sockets = lib.mapAttrs' (
      name: server:
      lib.nameValuePair "keel-mcp-${name}" {
        description = "keel MCP server ${name}: socket";
        wantedBy = [ "sockets.target" ];
        partOf = [ "keel-mcp-${name}.service" ];
        listenStreams = [ "${runDir}/${name}.sock" ];
        socketConfig = {
          Accept = false;
          SocketUser = user;
          SocketMode = "0600";
          DirectoryMode = "0750";
        };
      }
    ) stdioHere;

    systemd.services =
      lib.mapAttrs' (name: server: lib.nameValuePair "keel-mcp-${name}" (serverUnit name server)) runHere
      // {
        keel-mcp = {
          description = "keel mcp: the gateway between agents and MCP tool servers";
          wantedBy = [ "multi-user.target" ];
          after =
            map (name: "keel-mcp-${name}.socket") (builtins.attrNames stdioHere)
            ++ lib.optional usesMesh "keel-mesh.service";
          wants =
            map (name: "keel-mcp-${name}.socket") (builtins.attrNames stdioHere)
            ++ lib.optional usesMesh "keel-mesh.service";
          serviceConfig = import ./lib/hardening.nix // {
            Type = "notify";
            NotifyAccess = "main";
            ExecStart = "${lib.getExe cfg.package} mcp serve --config ${configFile}";
            WatchdogSec = "${toString cfg.watchdogSec}s";
            Restart = "always";
            RestartSec = "500ms";
            User = user;
            Group = keel.group;
            UMask = "0007";
            CapabilityBoundingSet = "";
            AmbientCapabilities = "";
            ProtectProc = "invisible";
            RuntimeDirectory = "keel-mcp";
            RuntimeDirectoryMode = "0755";
            ReadWritePaths = [
              "/var/lib/keel"
              "/run/keel"
            ];
          };
        };
      };

    # keel watch supervises each server the way it supervises agents.
    services.keel.watch.settings.agents = lib.mkIf keel.watch.enable (
      lib.mapAttrs' (
        name: _: lib.nameValuePair "keel-mcp-${name}" { unit = "keel-mcp-${name}.service"; }
      ) runHere
    );

    # keel's own validator has the last word on every spec, as for agents.
    system.checks = [
      (pkgs.runCommand "keel-mcp-valid" { nativeBuildInputs = [ cfg.package ]; } ''
        ${lib.concatStrings (
          lib.mapAttrsToList (name: server: ''
            keel mcp render-units ${settingsFormat.generate "keel-mcp-${name}.json" (specOf name server)} > /dev/null
          '') servers
        )}
        touch $out
      '')
    ];
  };
}
