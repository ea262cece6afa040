# The keel appliance profile: what a rented server that exists to run keel
# wants, in the manner of srvos' server role. Every setting is lib.mkDefault,
# so a host overrides any one of them by simply setting it.
{
  config,
  lib,
  ...
}:
let
  cfg = config.services.keel.appliance;
in
{
  options.services.keel.appliance.enable = lib.mkEnableOption ''
    the keel appliance profile: headless-server defaults, systemd's hardware
    watchdog, key-only SSH, a firewall, a bounded number of boot entries and
    a garbage-collected store. Each setting is a default the host can override
  '';

  config = lib.mkIf cfg.enable {
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
