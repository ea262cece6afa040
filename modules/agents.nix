# services.keel.agents.<name>: every agent a systemd service at a trust tier
# (docs/agents.md). For each agent the module writes the JSON agent spec the
# Python side reads (/etc/keel/agents/<name>.json, the same file
# `keel agents install` writes on a plain systemd host) and builds its unit
# from modules/tiers.json the way `keel agents render-unit` does: tiers.json's
# common directives, then the tier's, then the agent's own, later keys
# replacing earlier ones.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:
let
  inherit (lib) mkOption types;

  cfg = config.services.keel;
  agents = lib.filterAttrs (_: agent: agent.enable) cfg.agents;
  # modules/egress.nix enforces allowlists; without it they would be words.
  egressEnabled = cfg.egress.enable or false;

  tiers = lib.importJSON ./tiers.json;
  tierOf = agent: tiers.tiers.${toString agent.tier};
  # "any", or the list of capabilities an agent of this tier may declare.
  allowedCapabilities = agent: (tierOf agent).capabilities or "any";

  settingsFormat = pkgs.formats.json { };

  userPrefix = "keel-agent-";
  # NixOS refuses user and group names of 32 characters or more
  # (config/users-groups.nix), one less than useradd on other systems.
  maxUserLength = 31;
  # keel's own state, sockets and configuration, which tier 2 cannot reach
  # (tiers.json's InaccessiblePaths): an agent cannot be given them either.
  keelDirectories = [
    "/run/keel"
    "/var/lib/keel"
    "/etc/keel"
  ];

  httpStatus = types.ints.between 100 599;

  # A probe in keel watch's own shape (docs/watch.md), with its defaults.
  probeModule = {
    options = {
      type = mkOption {
        type = types.enum [
          "http"
          "tcp"
          "exec"
        ];
        description = "`http` (GET a URL), `tcp` (connect) or `exec` (run a command, exit 0 is healthy).";
      };
      name = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "A name for the probe in status and alerts (watch names it after its type when null).";
      };
      url = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "http://127.0.0.1:8080/health";
        description = "For `http`: the URL to GET.";
      };
      expect_status = mkOption {
        type = types.nullOr (types.either httpStatus (types.nonEmptyListOf httpStatus));
        default = null;
        description = "For `http`: the status, or statuses, that mean healthy (any 2xx when null).";
      };
      expect_body = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "For `http`: a string the body must contain.";
      };
      host = mkOption {
        type = types.str;
        default = "127.0.0.1";
        description = "For `tcp`: the host to connect to.";
      };
      port = mkOption {
        type = types.nullOr types.port;
        default = null;
        description = "For `tcp`: the port to connect to.";
      };
      command = mkOption {
        type = types.nullOr (types.nonEmptyListOf types.str);
        default = null;
        description = "For `exec`: the command (argv) to run.";
      };
      interval = mkOption {
        type = types.number;
        default = 5;
        description = "Seconds between probes.";
      };
      timeout = mkOption {
        type = types.nullOr types.number;
        default = null;
        defaultText = lib.literalMD "the smaller of 2 and `interval`";
        description = "Seconds a probe may take; at most `interval`.";
      };
      failures = mkOption {
        type = types.ints.positive;
        default = 3;
        description = "Consecutive failures that make the agent unhealthy.";
      };
      grace = mkOption {
        type = types.number;
        default = 0;
        description = "Seconds after a start during which failures do not count.";
      };
    };
  };

  agentModule =
    { name, ... }:
    {
      options = {
        enable = mkOption {
          type = types.bool;
          default = true;
          description = "Whether to run this agent; false keeps its definition but removes it.";
        };

        command = mkOption {
          type = types.nonEmptyListOf types.str;
          example = lib.literalExpression ''[ (lib.getExe pkgs.my-agent) "--port" "8080" ]'';
          description = "The agent's argv. The program is an absolute path (systemd does not search PATH).";
        };

        tier = mkOption {
          type = types.enum [
            0
            1
            2
          ];
          description = ''
            The trust tier (modules/tiers.json): 0 for the operator's own
            automation, 1 for semi-trusted agents, 2 for untrusted input and
            third-party code (sandboxed, deny-by-default egress).
          '';
        };

        user = mkOption {
          type = types.str;
          default = userPrefix + name;
          defaultText = lib.literalExpression ''"keel-agent-''${name}"'';
          description = ''
            The user the agent runs as. The default user (and its group) is
            created here; any other user must exist. Only tier 0 may be root.
          '';
        };

        workingDirectory = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "Working directory; the agent's state directory (/var/lib/keel-agents/<name>) when null.";
        };

        environment = mkOption {
          type = types.attrsOf types.str;
          default = { };
          description = "Environment variables of the agent.";
        };

        environmentFiles = mkOption {
          type = types.listOf types.str;
          default = [ ];
          description = "Files of KEY=value lines read at start (secrets stay out of the Nix store).";
        };

        readWritePaths = mkOption {
          type = types.listOf types.str;
          default = [ ];
          description = ''
            Paths the agent may write besides its state directory (tiers 1
            and 2 see the rest of the file system read-only).
          '';
        };

        capabilities = mkOption {
          type = types.listOf (types.enum tiers.capabilities);
          default = [ ];
          example = [ "CAP_NET_BIND_SERVICE" ];
          description = ''
            Linux capabilities the agent needs. Tiers 1 and 2 get exactly
            these (bounding and ambient set) instead of none; tier 0 gets them
            as ambient capabilities. Tier 2 may declare only what
            modules/tiers.json allows it (CAP_NET_BIND_SERVICE).
          '';
        };

        egress.allow = mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [
            "api.example.com"
            "*.wikipedia.org"
          ];
          description = ''
            Domains (exact, or `*.` wildcards) the agent may reach. Tier 2
            reaches nothing else; tier 0 has an open network and takes none.
          '';
        };

        mesh = {
          sendTo = mkOption {
            type = types.nullOr (types.listOf types.str);
            default = null;
            example = [ "*" ];
            description = ''
              Whom the agent may send to on the mesh: `"*"` (every member and
              every agent), a node id (`keel mesh id`; the whole node, its
              agents too), `"*@NODE_ID"` (every agent on that node, not the
              node itself) or `"AGENT@NODE_ID"` (that agent only). null (the
              default) is the tier's default: everyone for tiers 0 and 1,
              nobody for tier 2.
            '';
          };
          receiveFrom = mkOption {
            type = types.nullOr (types.listOf types.str);
            default = null;
            example = [ "ops@abcdefghijklmnopqrstuvwxyz234567" ];
            description = ''
              Whose messages the agent may read, in the forms of `sendTo` (the
              agent being the one the sending node stamped; none: the node
              itself). A message from anyone else is not given to this agent:
              it stays for the node's other readers, and the refusal is a
              `mesh-refused` ledger entry. null (the default) is the tier's
              default: everyone for tiers 0 and 1, nobody for tier 2.
            '';
          };
          topics = mkOption {
            type = types.nullOr (types.listOf types.str);
            default = null;
            example = [
              "jobs"
              "reports.*"
            ];
            description = ''
              The mesh topics the agent may send on and read: a topic, a prefix
              ending in `*`, or `"*"` for all. null (the default) is the tier's
              default: every topic for tiers 0 and 1; a tier-2 agent has no
              mesh unless this is set. The mesh node tells the agent apart by
              its uid (docs/mesh.md, "Agents").
            '';
          };
        };

        health = {
          probes = mkOption {
            type = types.listOf (types.submodule probeModule);
            default = [ ];
            description = "Health probes keel watch runs against the agent.";
          };
          watchdogSec = mkOption {
            type = types.nullOr types.ints.positive;
            default = null;
            description = "systemd's WatchdogSec= (whole seconds) for agents that ping sd_notify.";
          };
        };

        resources = {
          memoryMax = mkOption {
            type = types.nullOr types.str;
            default = null;
            example = "512M";
            description = "systemd's MemoryMax=: bytes with K/M/G/T, a percentage or `infinity`.";
          };
          cpuQuota = mkOption {
            type = types.nullOr types.str;
            default = null;
            example = "50%";
            description = "systemd's CPUQuota=: a percentage of one CPU.";
          };
          tasksMax = mkOption {
            type = types.nullOr types.ints.positive;
            default = null;
            description = "systemd's TasksMax=.";
          };
        };
      };
    };

  # The agent spec of docs/agents.md, in the normalised form keel's
  # AgentSpec.to_json() gives back.
  timeoutOf = probe: if probe.timeout != null then probe.timeout else lib.min 2 probe.interval;

  probeSpec =
    probe:
    {
      inherit (probe) type;
    }
    // lib.optionalAttrs (probe.name != null) { inherit (probe) name; }
    // {
      http =
        {
          inherit (probe) url;
        }
        // lib.optionalAttrs (probe.expect_status != null) {
          expect_status = lib.toList probe.expect_status;
        }
        // lib.optionalAttrs (probe.expect_body != null) { inherit (probe) expect_body; };
      tcp = {
        inherit (probe) host port;
      };
      exec = {
        inherit (probe) command;
      };
    }
    .${probe.type}
    // {
      inherit (probe) interval failures grace;
      timeout = timeoutOf probe;
    };

  specOf = name: agent: {
    inherit name;
    inherit (agent)
      command
      tier
      user
      environment
      environmentFiles
      readWritePaths
      ;
    capabilities = lib.unique agent.capabilities;
    egress.allow = agent.egress.allow;
    health = {
      probes = map probeSpec agent.health.probes;
    }
    // lib.optionalAttrs (agent.health.watchdogSec != null) {
      inherit (agent.health) watchdogSec;
    };
    resources = lib.filterAttrs (_: value: value != null) agent.resources;
  }
  // lib.optionalAttrs (agent.workingDirectory != null) {
    inherit (agent) workingDirectory;
  }
  // lib.optionalAttrs (lib.any (value: value != null) (builtins.attrValues agent.mesh)) {
    mesh = lib.filterAttrs (_: value: value != null) agent.mesh;
  };

  specFile = name: agent: settingsFormat.generate "keel-agent-${name}.json" (specOf name agent);

  # --- what reaches the unit file, so that systemd reads back exactly the
  # value given (issue 8: a value must never become unit syntax) ---
  #
  # Command lines: NixOS' own quoting for Exec lines (nixos/lib/utils.nix):
  # every word JSON-quoted, which systemd unescapes, and `%` and `$`
  # doubled, so specifiers and variables stay literal.
  # Environment: NixOS writes `environment` as Environment="KEY=value" with
  # the value JSON-quoted (nixos/lib/systemd-lib.nix) but leaves `%`, which
  # systemd expands in Environment= (specifiers), so keel doubles it first.
  # Paths go into directives NixOS writes raw (ReadWritePaths=...): they are
  # checked to hold nothing systemd would read as syntax, and `%` is doubled.
  escapePercent = lib.replaceStrings [ "%" ] [ "%%" ];

  # What keel passes to a program at most, counted as the kernel counts
  # argv and envp (bytes, a NUL after each string, "=" in each variable): as
  # keel.launch.MAX_EXEC_BYTES, the limit the Python side holds a spec to.
  # Far below Linux's own limits (128 KiB per string, a quarter of the stack
  # for all), and it keeps the escaped ExecStart= and Environment= lines
  # under systemd's 1 MiB line limit.
  maxExecBytes = 131072;
  execBytes =
    agent:
    lib.foldl' (n: arg: n + builtins.stringLength arg + 1) 0 agent.command
    + lib.foldl' (n: key: n + builtins.stringLength key + builtins.stringLength agent.environment.${key} + 2) 0 (
      builtins.attrNames agent.environment
    );

  # Nix strings cannot hold NUL (Nix 2.8 cuts a string at it, newer Nix
  # refuses it); a string read from a file may hold bytes that are not UTF-8,
  # which systemd drops from Environment= and JSON cannot carry.
  utf8 = import ./lib/utf8.nix { inherit lib; };

  # tiers.json's [Unit] directives: systemd's dependency directives become
  # the NixOS options NixOS derives them from (`after`, `wants`...), so that
  # a host can add to them; others stay in unitConfig.
  dependencyOptions = {
    After = "after";
    Before = "before";
    Wants = "wants";
    Requires = "requires";
    BindsTo = "bindsTo";
    PartOf = "partOf";
    Conflicts = "conflicts";
  };
  words = value: lib.filter (word: word != "") (lib.splitString " " (toString value));
  tierUnitConfig = agent: tiers.common.unitConfig or { } // (tierOf agent).unitConfig or { };

  # What a unit runs (keel.agents.spec.Role): agents here, MCP servers in
  # mcp.nix, both rendered by unitOf below.
  agentRole = {
    title = "agent";
    stateRoot = "keel-agents";
  };

  agentDirectives =
    role: name: agent:
    {
      User = agent.user;
      ExecStart = utils.escapeSystemdExecArgs agent.command;
      StateDirectory = "${role.stateRoot}/${name}";
      WorkingDirectory = escapePercent (
        if agent.workingDirectory != null then agent.workingDirectory else "/var/lib/${role.stateRoot}/${name}"
      );
    }
    // lib.optionalAttrs (agent.environmentFiles != [ ]) {
      EnvironmentFile = map escapePercent agent.environmentFiles;
    }
    // lib.optionalAttrs (agent.readWritePaths != [ ]) {
      ReadWritePaths = map escapePercent agent.readWritePaths;
    }
    // lib.optionalAttrs (agent.capabilities != [ ]) (
      let
        declared = lib.concatStringsSep " " (lib.unique agent.capabilities);
      in
      if agent.tier == 0 then
        { AmbientCapabilities = declared; }
      else
        {
          CapabilityBoundingSet = declared;
          AmbientCapabilities = declared;
        }
    )
    // lib.optionalAttrs (agent.resources.memoryMax != null) {
      MemoryMax = agent.resources.memoryMax;
    }
    // lib.optionalAttrs (agent.resources.cpuQuota != null) {
      CPUQuota = agent.resources.cpuQuota;
    }
    // lib.optionalAttrs (agent.resources.tasksMax != null) {
      TasksMax = agent.resources.tasksMax;
    }
    // lib.optionalAttrs (agent.health.watchdogSec != null) {
      WatchdogSec = "${toString agent.health.watchdogSec}s";
    };

  unitOf =
    role: name: agent:
    let
      unitConfig = tierUnitConfig agent;
    in
    {
      description = "keel ${role.title} ${name} (tier ${toString agent.tier})";
      wantedBy = [ "multi-user.target" ];
      unitConfig = removeAttrs unitConfig (builtins.attrNames dependencyOptions);
      # `%` doubled: NixOS quotes the value but systemd still expands
      # specifiers in Environment=. An agent's PATH replaces the one NixOS
      # builds from the unit's `path` (a plain definition would conflict).
      environment = lib.mapAttrs (
        key: value: if key == "PATH" then lib.mkOverride 90 (escapePercent value) else escapePercent value
      ) agent.environment;
      serviceConfig =
        tiers.common.serviceConfig or { }
        // (tierOf agent).serviceConfig or { }
        // agentDirectives role name agent;
    }
    // lib.mapAttrs' (directive: option: lib.nameValuePair option (words unitConfig.${directive})) (
      lib.filterAttrs (directive: _: unitConfig ? ${directive}) dependencyOptions
    );

  # --- checks, as keel.agents.spec makes them, plus what only Nix can see ---

  isAbsolute = path: lib.hasPrefix "/" path;
  # Paths reach directives NixOS writes as they are (ReadWritePaths=...),
  # which systemd splits at whitespace and unquotes: no whitespace, control
  # characters, quotes or backslashes.
  badPath =
    path:
    !isAbsolute path
    || builtins.stringLength path >= 4096
    || path == "/"
    || lib.elem ".." (lib.splitString "/" path)
    || builtins.match ".*[[:space:][:cntrl:]\"'\\].*" path != null;
  under = directory: path: path == directory || lib.hasPrefix "${directory}/" path;
  # An egress.allow entry as keel egress reads it (keel.egress.allowlist):
  # case-insensitive, a trailing dot dropped. An entry with characters beyond
  # ASCII (an internationalised name) needs IDNA, which Nix does not have: it
  # is left to keel's own check of the spec at build time (system.checks below).
  domainLabel = "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?";
  internationalised =
    domain:
    builtins.match "[ -~]*" domain == null
    && builtins.match ".*[[:cntrl:][:space:]].*" domain == null;
  # A mesh grant's entries as keel.agents.meshgrant reads them.
  # sendTo and receiveFrom: "*", NODE_ID, "*@NODE_ID" or "AGENT@NODE_ID".
  goodNode = node: node == "*" || builtins.match "(([*]|[a-z][a-z0-9_-]{0,19})@)?[a-z2-7]{32}" node != null;
  goodTopic =
    topic:
    topic == "*"
    || builtins.stringLength topic <= 129
    && builtins.match "[A-Za-z0-9._:/@+=-]+[*]?" topic != null
    && builtins.stringLength (lib.removeSuffix "*" topic) <= 128;
  goodDomain =
    domain:
    internationalised domain
    || builtins.stringLength domain <= 256
    && builtins.match "(\\*\\.(${domainLabel}\\.)+${domainLabel}|(${domainLabel}\\.)*${domainLabel})\\.?" domain
      != null
    && builtins.match ".*\\.[0-9]+\\.?" ("." + domain) == null
    && builtins.stringLength (lib.removeSuffix "." (lib.removePrefix "*." domain)) <= 253;

  assertionsFor =
    name: agent:
    let
      option = "services.keel.agents.${name}";
      badNames = lib.filter (key: builtins.match "[A-Za-z_][A-Za-z0-9_]*" key == null) (
        builtins.attrNames agent.environment
      );
      notUtf8 = lib.filter (key: !utf8.valid agent.environment.${key}) (
        builtins.attrNames agent.environment
      );
      badWords = lib.filter (i: !utf8.valid (builtins.elemAt agent.command i)) (
        lib.range 0 (builtins.length agent.command - 1)
      );
      allPaths =
        agent.readWritePaths ++ agent.environmentFiles ++ lib.optional (agent.workingDirectory != null) agent.workingDirectory;
      probeProblems = lib.concatLists (
        lib.imap0 (
          i: probe:
          let
            at = "${option}.health.probes.${toString i}";
          in
          lib.optional (probe.type == "http" && probe.url == null) "${at}.url is required for an http probe"
          ++ lib.optional (probe.type == "tcp" && probe.port == null) "${at}.port is required for a tcp probe"
          ++ lib.optional (
            probe.type == "exec" && probe.command == null
          ) "${at}.command is required for an exec probe"
          ++ lib.optional (
            timeoutOf probe > probe.interval
          ) "${at}.timeout (${toString probe.timeout}) must not exceed interval (${toString probe.interval})"
        ) agent.health.probes
      );
    in
    [
      {
        assertion = builtins.match "[a-z][a-z0-9_-]*" name != null;
        message = "${option}: '${name}' is not a valid agent name: lowercase letters, digits, '-' and '_', starting with a letter (it becomes a unit and a user name)";
      }
      {
        assertion = builtins.stringLength (userPrefix + name) <= maxUserLength;
        message = "${option}: '${name}' is too long: '${userPrefix}${name}' must fit the ${toString maxUserLength}-character user name limit";
      }
      {
        assertion = builtins.match "[a-z_][a-z0-9_-]*" agent.user != null && builtins.stringLength agent.user <= maxUserLength;
        message = "${option}.user: '${agent.user}' is not a valid user name";
      }
      {
        assertion = isAbsolute (builtins.head agent.command);
        message = "${option}.command: '${builtins.head agent.command}' must be an absolute path (systemd does not search PATH); use lib.getExe or \"\${pkg}/bin/...\"";
      }
      {
        # systemd refuses an executable name with control characters, quotes
        # or backslashes; a `$` would be doubled by the quoting of Exec lines
        # and never undone in the program path (only in its arguments).
        assertion = builtins.match ".*[[:cntrl:]\"'\\$].*" (builtins.head agent.command) == null;
        message = "${option}.command: the program path ${builtins.toJSON (builtins.head agent.command)} holds a control character, a quote, a backslash or '$', which systemd cannot take in an executable name";
      }
      {
        assertion = agent.user != "root" || agent.tier == 0;
        message = "${option}.user: tier ${toString agent.tier} agents run as their own user, not root";
      }
      {
        assertion =
          allowedCapabilities agent == "any"
          || lib.all (c: lib.elem c (allowedCapabilities agent)) agent.capabilities;
        message = "${option}.capabilities: tier ${toString agent.tier} agents may declare only ${
          lib.concatStringsSep ", " (lib.toList (allowedCapabilities agent))
        } (modules/tiers.json); the others would let the agent out of its sandbox (use tier 1)";
      }
      {
        assertion = agent.egress.allow == [ ] || agent.tier != 0;
        message = "${option}.egress.allow: tier 0 agents have an open network; use tier 1 or 2 for an allowlist";
      }
      {
        assertion = agent.tier != 2 || egressEnabled;
        message = "${option}: tier 2 agents reach only their egress.allow, which keel egress enforces: set services.keel.egress.enable = true (with services.keel.egress.upstream), or use tier 1";
      }
      {
        assertion = agent.tier != 1 || agent.egress.allow == [ ] || egressEnabled;
        message = "${option}.egress.allow: an allowlist is enforced by keel egress: set services.keel.egress.enable = true (with services.keel.egress.upstream), or remove the allowlist";
      }
      {
        assertion = !lib.any badPath allPaths;
        message = "${option}: ${lib.concatStringsSep ", " (lib.filter badPath allPaths)}: paths must be absolute, shorter than 4096 bytes, without '..', whitespace, control characters, quotes or backslashes, and not '/'";
      }
      {
        assertion = lib.all goodNode (if agent.mesh.sendTo == null then [ ] else agent.mesh.sendTo);
        message = "${option}.mesh.sendTo: ${
          lib.concatStringsSep ", " (lib.filter (n: !goodNode n) agent.mesh.sendTo)
        }: expected \"*\", node ids (as `keel mesh id` prints them), \"*@NODE_ID\" or \"AGENT@NODE_ID\"";
      }
      {
        assertion = lib.all goodNode (if agent.mesh.receiveFrom == null then [ ] else agent.mesh.receiveFrom);
        message = "${option}.mesh.receiveFrom: ${
          lib.concatStringsSep ", " (lib.filter (n: !goodNode n) agent.mesh.receiveFrom)
        }: expected \"*\", node ids (as `keel mesh id` prints them), \"*@NODE_ID\" or \"AGENT@NODE_ID\"";
      }
      {
        assertion = lib.all goodTopic (if agent.mesh.topics == null then [ ] else agent.mesh.topics);
        message = "${option}.mesh.topics: ${
          lib.concatStringsSep ", " (lib.filter (t: !goodTopic t) agent.mesh.topics)
        }: expected topics (1 to 128 of [A-Za-z0-9._:/@+=-]), a prefix ending in '*', or \"*\"";
      }
      {
        assertion = lib.all goodDomain agent.egress.allow;
        message = "${option}.egress.allow: ${lib.concatStringsSep ", " (lib.filter (d: !goodDomain d) agent.egress.allow)}: expected domain names, '*.' only as the whole first label (docs/agents.md)";
      }
      {
        assertion = badNames == [ ];
        message = "${option}.environment: ${
          lib.concatMapStringsSep ", " (key: "'${key}'") badNames
        }: variable names are letters, digits and '_', not starting with a digit (systemd ignores any other)";
      }
      {
        assertion = execBytes agent <= maxExecBytes;
        message = "${option}: the command and environment take ${toString (execBytes agent)} bytes; keel passes at most ${toString maxExecBytes} to a program (put large data in a file the agent reads)";
      }
      {
        assertion = notUtf8 == [ ];
        message = "${option}.environment: ${lib.concatStringsSep ", " notUtf8}: not UTF-8 text (bytes that are not UTF-8, or a Unicode noncharacter): systemd would drop the variable";
      }
      {
        assertion = badWords == [ ];
        message = "${option}.command: ${
          lib.concatMapStringsSep ", " (i: "word ${toString i}") badWords
        }: not UTF-8 text (bytes that are not UTF-8, or a Unicode noncharacter), which systemd refuses";
      }
      {
        assertion =
          agent.resources.memoryMax == null
          || builtins.match "(infinity|[0-9]+[KMGT]?|[0-9]+(\\.[0-9]+)?%)" agent.resources.memoryMax != null;
        message = "${option}.resources.memoryMax: expected bytes with an optional K/M/G/T suffix ('512M'), a percentage or 'infinity'";
      }
      {
        assertion = agent.resources.cpuQuota == null || builtins.match "0*[1-9][0-9]*(\\.[0-9]+)?%|0+\\.[0-9]*[1-9][0-9]*%" agent.resources.cpuQuota != null;
        message = "${option}.resources.cpuQuota: expected a percentage of one CPU ('50%', '200%' for two)";
      }
      {
        assertion = agent.tier != 2 || !lib.any (path: lib.any (dir: under dir path) keelDirectories) agent.readWritePaths;
        message = "${option}.readWritePaths: tier 2 agents cannot reach keel's own ${lib.concatStringsSep ", " keelDirectories}";
      }
    ]
    ++ map (message: {
      assertion = false;
      inherit message;
    }) probeProblems;

  # One user per sandboxed agent: egress matches an agent by its user
  # (nftables `meta skuid`) and tier 1 and 2 keep agents out of each other's
  # files by it.
  sandboxedUsers = lib.mapAttrsToList (name: agent: {
    inherit name;
    inherit (agent) user;
  }) (lib.filterAttrs (_: agent: agent.tier > 0) agents);
  sharedUsers = lib.filter (u: lib.length (lib.filter (v: v.user == u.user) sandboxedUsers) > 1) sandboxedUsers;

  # Only valid names: NixOS aborts the evaluation on a name it refuses, before
  # keel's assertion could say which agent it is.
  defaultUsers = lib.filterAttrs (
    name: agent: agent.user == userPrefix + name && builtins.stringLength agent.user <= maxUserLength
  ) agents;
in
{
  options.services.keel.agents = mkOption {
    type = types.attrsOf (types.submodule agentModule);
    default = { };
    example = lib.literalExpression ''
      {
        scout = {
          command = [ (lib.getExe pkgs.my-scout) "--port" "8702" ];
          tier = 2;
          egress.allow = [ "example.org" "*.wikipedia.org" ];
          health.probes = [ { type = "http"; url = "http://127.0.0.1:8702/health"; } ];
          resources.memoryMax = "256M";
        };
      }
    '';
    description = ''
      keel agents, each the service `keel-agent-<name>` running as its own
      user at a trust tier, restarted whenever it exits.
    '';
  };

  options.services.keel.agentSpecs = mkOption {
    type = types.attrsOf settingsFormat.type;
    internal = true;
    readOnly = true;
    description = ''
      The agent specs (docs/agents.md) of the enabled agents, by name, as
      written to /etc/keel/agents/<name>.json: what keel watch supervises.
    '';
  };

  options.services.keel.renderUnit = mkOption {
    type = types.raw;
    internal = true;
    readOnly = true;
    description = ''
      The unit renderer of agents, `role -> name -> declaration -> unit`, for
      other modules whose services run at a trust tier (mcp.nix's servers):
      one renderer, as keel.agents.units is one on the Python side.
    '';
  };

  config = lib.mkMerge [
    {
      services.keel.agentSpecs = lib.mapAttrs specOf agents;
      services.keel.renderUnit = unitOf;
    }
    (lib.mkIf (agents != { }) {
      services.keel.enabledServices = [ "agents" ];

      assertions = [
        {
          assertion = tiers.version == 1;
          message = "modules/tiers.json: this keel reads version 1, got ${toString tiers.version}";
        }
        {
          assertion = sharedUsers == [ ];
          message = "services.keel.agents: ${
            lib.concatMapStringsSep ", " (u: "${u.name} (${u.user})") sharedUsers
          }: tier 1 and 2 agents need a user of their own";
        }
      ]
      ++ lib.concatLists (lib.mapAttrsToList assertionsFor agents);

      environment.etc = lib.mapAttrs' (
        name: agent: lib.nameValuePair "keel/agents/${name}.json" { source = specFile name agent; }
      ) agents;

      users.users = lib.mapAttrs' (
        name: agent:
        lib.nameValuePair agent.user {
          description = "keel agent ${name}";
          isSystemUser = true;
          group = agent.user;
        }
      ) defaultUsers;
      users.groups = lib.mapAttrs' (name: agent: lib.nameValuePair agent.user { }) defaultUsers;

      systemd.services = lib.mapAttrs' (
        name: agent: lib.nameValuePair "keel-agent-${name}" (unitOf agentRole name agent)
      ) agents;

      # keel's own validator has the last word: a spec it refuses fails the
      # system build with its message, so Nix and Python cannot drift apart.
      system.checks = [
        (pkgs.runCommand "keel-agents-valid" { nativeBuildInputs = [ cfg.package ]; } ''
          ${lib.concatStrings (
            lib.mapAttrsToList (name: agent: ''
              keel agents render-unit ${specFile name agent} > /dev/null
            '') agents
          )}
          touch $out
        '')
      ];
    })
  ];
}
