# services.keel.chat: a Telegram bot for this host's operators (docs/chat.md).
# Its settings become /etc/keel/chat.json, the file `keel chat serve` reads.
# The bot token never enters the Nix store: systemd hands the token file to
# the daemon as a credential (LoadCredential), and the daemon, which runs as
# its own unprivileged user, reads it from /run/credentials.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib) mkOption types;

  keel = config.services.keel;
  cfg = keel.chat;
  settingsFormat = pkgs.formats.json { };

  unitName = "keel-chat.service";
  credential = "telegram-token";
  # Where systemd puts LoadCredential= files for the unit (systemd >= 247).
  tokenPath = "/run/credentials/${unitName}/${credential}";

  # keel chat refuses unknown keys, and a key set to null is one: drop the
  # nulls of the typed options (ledger = null and fleet_socket = null are
  # meaningful and stay). keel-chat appends to the ledger but never signs its
  # checkpoints: the key is root's (docs/ledger.md), so checkpoint_every is null.
  settingsJson =
    { checkpoint_every = null; }
    // lib.filterAttrs (
      name: value: value != null || name == "ledger" || name == "fleet_socket"
    ) cfg.settings
    // {
      token_file = tokenPath;
      allowed_users = cfg.allowedUsers;
      commands = cfg.commands;
    };
  configFile = settingsFormat.generate "chat.json" settingsJson;

  mutating = lib.intersectLists [ "restart" "switch" ] cfg.commands;
  switching = lib.elem "switch" cfg.commands;
  inStore = lib.hasPrefix builtins.storeDir cfg.tokenFile;
in
{
  options.services.keel.chat = {
    enable = lib.mkEnableOption "keel chat, a Telegram bot that answers this host's operators (read-only unless commands say otherwise)";

    package = mkOption {
      type = types.package;
      default = keel.package;
      defaultText = lib.literalExpression "config.services.keel.package";
      description = "The keel package keel chat runs from.";
    };

    tokenFile = mkOption {
      # A string, not a path: a Nix path would be copied into the world-readable store.
      type = types.str;
      example = "/run/secrets/keel-chat-token";
      description = ''
        A file holding the bot token from @BotFather (one line), readable by
        root only. systemd passes it to the daemon as a credential
        (LoadCredential=), so the daemon's user never needs read access to
        it and the token never enters the Nix store. Use sops-nix, agenix or
        a file you copy to the host.
      '';
    };

    allowedUsers = mkOption {
      type = types.listOf types.ints.positive;
      example = [ 123456789 ];
      description = ''
        Telegram user ids of the people the bot answers (keel chat logs the
        id of everyone it ignores). People are authorized, never chats: a
        group the bot is in grants its members nothing.
      '';
    };

    commands = mkOption {
      type = types.listOf (
        types.enum [
          "status"
          "agents"
          "log"
          "fleet"
          "restart"
          "switch"
        ]
      );
      default = [
        "status"
        "agents"
        "log"
        "fleet"
      ];
      description = ''
        The commands the bot takes. Read-only by default (`fleet` answers
        that the bot speaks for this host only unless keel fleet is enabled
        here); `restart` and `switch` change things: they work only in a
        private chat, ask the person to confirm with a button only they can
        press, once, within 60 s, and record the approval in the ledger before
        anything is done. `switch` switches the host to one of
        services.keel.safeswitch.targets through `keel-switch@.service`
        (keel-chat may start that unit and nothing else:
        services.keel.safeswitch.requesters).
      '';
    };

    watchdogSec = mkOption {
      type = types.ints.positive;
      default = 30;
      description = "systemd's WatchdogSec= for keel-chat: a hung daemon is killed and restarted.";
    };

    settings = mkOption {
      default = { };
      description = ''
        The rest of /etc/keel/chat.json (docs/chat.md) as a Nix attribute
        set; the main keys are typed here with keel's defaults.
      '';
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = {
          host = mkOption {
            type = types.nullOr types.str;
            default = null;
            description = "The host's name in the bot's answers; null: the machine's host name.";
          };
          socket = mkOption {
            type = types.str;
            default = "/run/keel/chat.sock";
            description = "The control socket `keel chat status` talks to.";
          };
          watch_socket = mkOption {
            type = types.str;
            default = "/run/keel/watch.sock";
            description = "keel watch's control socket, which the bot asks about agents.";
          };
          fleet_socket = mkOption {
            type = types.nullOr types.str;
            default = if config.services.keel.fleet.enable then "/run/keel/fleet.sock" else null;
            defaultText = lib.literalExpression ''if config.services.keel.fleet.enable then "/run/keel/fleet.sock" else null'';
            description = "keel fleet's control socket, for `/fleet` and `/restart AGENT@NODE`; null: the bot speaks for this host only.";
          };
          ledger = mkOption {
            type = types.nullOr types.str;
            default = keel.ledger;
            defaultText = lib.literalExpression "config.services.keel.ledger";
            description = "The ledger commands, approvals and actions are recorded in; null (read-only commands only) turns that off.";
          };
          confirm_timeout = mkOption {
            type = types.ints.between 1 60;
            default = 60;
            description = "Seconds a confirmation stays valid (60 at most).";
          };
          max_age = mkOption {
            type = types.ints.positive;
            default = 300;
            description = "Seconds after which a command is too old to carry out (typed while the bot was down).";
          };
        };
      };
    };
  };

  config = lib.mkIf cfg.enable {
    services.keel.enabledServices = [ "chat" ];

    assertions = [
      {
        assertion = cfg.allowedUsers != [ ];
        message = "services.keel.chat.allowedUsers is empty, so nobody could use the bot: add your Telegram user id";
      }
      {
        assertion = lib.hasPrefix "/" cfg.tokenFile && !inStore;
        message = "services.keel.chat.tokenFile: expected an absolute path outside the Nix store (a file in the store is world-readable), got \"${cfg.tokenFile}\"";
      }
      {
        assertion = !(cfg.settings ? token_file || cfg.settings ? token);
        message = "services.keel.chat.settings: set the token through services.keel.chat.tokenFile (passed as a systemd credential), not in settings";
      }
      {
        assertion = (cfg.settings.checkpoint_every or null) == null;
        message = "services.keel.chat.settings.checkpoint_every: keel-chat cannot sign the ledger's checkpoints (the key is root's; root's daemons, watch, egress and fleet, sign them): leave it unset";
      }
      {
        assertion = switching -> (keel.safeswitch.enable && keel.safeswitch.targets != { });
        message = "services.keel.chat.commands: switch needs services.keel.safeswitch.enable and at least one services.keel.safeswitch.targets entry (the systems the chat may switch to)";
      }
      {
        assertion = mutating == [ ] || cfg.settings.ledger != null;
        message = "services.keel.chat.commands: ${lib.concatStringsSep ", " mutating} need a ledger (every approval is recorded before it is carried out), but services.keel.chat.settings.ledger is null";
      }
    ];

    warnings = lib.optional (!(keel.watch.enable or false)) "services.keel.chat is enabled without services.keel.watch: /status, /agents and /restart will answer that watch is not running";

    # /switch: keel-chat may start keel-switch@INSTANCE.service (polkit) and nothing else.
    services.keel.safeswitch.requesters = lib.mkIf switching [ "keel-chat" ];

    users.users.keel-chat = {
      description = "keel chat (Telegram bot)";
      isSystemUser = true;
      group = keel.group;
    };

    environment.etc."keel/chat.json".source = configFile;

    systemd.services.keel-chat = {
      description = "keel chat: a Telegram bot for this host's operators";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [
        "network-online.target"
        "keel-watch.service"
      ];
      # /switch reads the targets from safeswitch.json at start.
      restartTriggers = lib.optional (
        switching && keel.safeswitch.enable
      ) config.environment.etc."keel/safeswitch.json".source;

      serviceConfig = import ./lib/hardening.nix // {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${lib.getExe cfg.package} chat serve --config ${configFile}";
        WatchdogSec = "${toString cfg.watchdogSec}s";
        Restart = "always";
        RestartSec = "5s";

        LoadCredential = [ "${credential}:${cfg.tokenFile}" ];

        # Its own user in the keel group: watch's socket and the ledger, nothing more.
        User = "keel-chat";
        Group = keel.group;
        UMask = "0007";
        ReadWritePaths = [
          "/var/lib/keel"
          "/run/keel"
        ];
        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        ProtectProc = "invisible";
        ProcSubset = "pid";
        RemoveIPC = true;
      };
    };
  };
}
