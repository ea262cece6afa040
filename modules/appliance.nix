# The keel appliance profile: what a rented server that exists to run keel
# wants, in the manner of srvos' server role. Every setting is lib.mkDefault,
# so a host overrides any one of them by simply setting it.
{
  config,
  lib,
  utils,
  ...
}:
let
  keel = config.services.keel;
  cfg = keel.appliance;
  seed = cfg.seed;

  # `keel appliance seed` at boot (docs/install.md, "First boot"): each part
  # at its moment, root, with a system it cannot write but for the seed and
  # what it fills.
  seedUnit =
    {
      only,
      description,
      readWritePaths,
    }:
    {
      inherit description;
      wantedBy = [ "multi-user.target" ];
      unitConfig.RequiresMountsFor = [ seed.directory ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = utils.escapeSystemdExecArgs [
          (lib.getExe keel.package)
          "appliance"
          "seed"
          "--dir"
          seed.directory
          "--only"
          only
        ];
        ProtectSystem = "strict";
        ReadWritePaths = [ seed.directory ] ++ readWritePaths;
        PrivateTmp = true;
        NoNewPrivileges = true;
      };
    };
in
{
  options.services.keel.appliance = {
    enable = lib.mkEnableOption ''
      the keel appliance profile: headless-server defaults, systemd's hardware
      watchdog, key-only SSH, a firewall, a bounded number of boot entries and
      a garbage-collected store. Each setting is a default the host can override
    '';

    seed = {
      enable = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = ''
          Apply a seed directory at boot (docs/install.md): its
          `authorized_keys` become root's SSH keys before sshd starts, its
          `mesh-invite` is joined once the mesh node runs. Each is applied
          once; without a seed nothing happens. This is how one image serves
          every operator.
        '';
      };
      directory = lib.mkOption {
        type = lib.types.str;
        default = "/boot/keel-seed";
        description = ''
          The seed directory: on the image's EFI system partition by default,
          which a rescue system can mount and write after writing the image.
        '';
      };
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = lib.hasPrefix "/" seed.directory && builtins.match ".*[[:space:][:cntrl:]].*" seed.directory == null;
        message = "services.keel.appliance.seed.directory: expected an absolute path without whitespace, got ${builtins.toJSON seed.directory}";
      }
    ];

    warnings =
      lib.optional (seed.enable && !(config.services.openssh.authorizedKeysInHomedir or true))
        "services.keel.appliance.seed: services.openssh.authorizedKeysInHomedir is false, so sshd does not read the seed's keys (added to /root/.ssh/authorized_keys); set it to true or turn the seed off";

    # The seed needs keel's package, which the first keel service brings.
    services.keel.enabledServices = lib.mkIf seed.enable [ "appliance" ];

    systemd.services.keel-seed-keys = lib.mkIf seed.enable (
      lib.mkMerge [
        (seedUnit {
          only = "keys";
          description = "keel: the operator's SSH keys from the seed directory";
          readWritePaths = [ "/root" ];
        })
        {
          # Before sshd accepts its first login (a service, or socket-activated).
          before = [
            "sshd.service"
            "sshd.socket"
          ];
          unitConfig.ConditionPathExists = "${seed.directory}/authorized_keys";
        }
      ]
    );

    systemd.services.keel-seed-mesh = lib.mkIf (seed.enable && keel.mesh.enable) (
      lib.mkMerge [
        (seedUnit {
          only = "mesh";
          description = "keel: join the mesh of the seed directory's invite";
          readWritePaths = [ ];
        })
        {
          wants = [ "keel-mesh.service" ];
          after = [ "keel-mesh.service" ];
          unitConfig.ConditionPathExists = "${seed.directory}/mesh-invite";
          # The inviting node may not be reachable yet: try again.
          serviceConfig.Restart = "on-failure";
          serviceConfig.RestartSec = "30s";
        }
      ]
    );

    systemd = {
      # PID 1 pings the hardware watchdog every half interval; a host whose
      # systemd hangs for 15 s reboots, and so does a reboot stuck for 30 s.
      settings.Manager = {
        RuntimeWatchdogSec = lib.mkDefault "15s";
        RebootWatchdogSec = lib.mkDefault "30s";
      };
      # Nobody sits at the console of a rented server: boot on rather than
      # wait in emergency mode where no one can reach the host.
      enableEmergencyMode = lib.mkDefault false;
    };

    # A kernel panic reboots the host after 10 s instead of hanging it.
    boot.kernel.sysctl."kernel.panic" = lib.mkDefault 10;
    boot.tmp.cleanOnBoot = lib.mkDefault true;
    # safeswitch keeps the generation to fall back to; older ones only fill
    # /boot.
    boot.loader.grub.configurationLimit = lib.mkDefault 10;
    boot.loader.systemd-boot.configurationLimit = lib.mkDefault 10;

    networking.firewall.enable = lib.mkDefault true;

    services.openssh = {
      enable = lib.mkDefault true;
      settings = {
        PasswordAuthentication = lib.mkDefault false;
        KbdInteractiveAuthentication = lib.mkDefault false;
        PermitRootLogin = lib.mkDefault "prohibit-password";
      };
    };

    nix = {
      # safeswitch builds and activates closures with flakes.
      settings.experimental-features = lib.mkDefault [
        "nix-command"
        "flakes"
      ];
      gc = {
        automatic = lib.mkDefault true;
        options = lib.mkDefault "--delete-older-than 30d";
      };
    };

    time.timeZone = lib.mkDefault "UTC";

    # No manuals or desktop leftovers on a server.
    documentation.enable = lib.mkDefault false;
    fonts.fontconfig.enable = lib.mkDefault false;
    programs.command-not-found.enable = lib.mkDefault false;
  };
}
