# The NixOS options keel's modules set, declared with the types NixOS gives
# them (nixos/modules/system/boot/systemd.nix, config/users-groups.nix,
# system/etc/etc.nix, misc/assertions.nix), so that keel's modules evaluate
# with nixpkgs' `lib` alone and a wrong type, a misspelt option or a failing
# assertion shows up without building a system. Only the options keel uses
# are here; the module system rejects any other one a module sets.
{
  lib,
  pkgs,
  config,
  ...
}:
let
  inherit (lib) mkOption types;

  # systemd.services.<name>.serviceConfig values merge like NixOS' unitOption:
  # lists concatenate, anything else must agree.
  unitOption = lib.mkOptionType {
    name = "systemd option";
    check = v: lib.isList v || lib.isString v || lib.isBool v || lib.isInt v || lib.isPath v;
    merge =
      loc: defs:
      let
        defs' = lib.filterOverrides defs;
      in
      if lib.any (def: lib.isList def.value) defs' then
        lib.concatMap (def: lib.toList def.value) defs'
      else
        lib.mergeEqualOption loc defs';
  };

  enableOption =
    default:
    mkOption {
      type = types.bool;
      inherit default;
    };

  unitList = mkOption {
    type = types.listOf types.str;
    default = [ ];
  };

  serviceModule = {
    options = {
      enable = mkOption {
        type = types.bool;
        default = true;
      };
      description = mkOption {
        type = types.str;
        default = "";
      };
      wantedBy = unitList;
      requiredBy = unitList;
      after = unitList;
      before = unitList;
      wants = unitList;
      requires = unitList;
      bindsTo = unitList;
      partOf = unitList;
      conflicts = unitList;
      path = mkOption {
        type = types.listOf (types.either types.package types.str);
        default = [ ];
      };
      environment = mkOption {
        type = types.attrsOf (
          types.nullOr (
            types.oneOf [
              types.str
              types.path
              types.package
            ]
          )
        );
        default = { };
      };
      serviceConfig = mkOption {
        type = types.attrsOf unitOption;
        default = { };
      };
      unitConfig = mkOption {
        type = types.attrsOf unitOption;
        default = { };
      };
      script = mkOption {
        type = types.lines;
        default = "";
      };
      preStart = mkOption {
        type = types.lines;
        default = "";
      };
      restartTriggers = mkOption {
        type = types.listOf types.unspecified;
        default = [ ];
      };
      restartIfChanged = mkOption {
        type = types.bool;
        default = true;
      };
      stopIfChanged = mkOption {
        type = types.bool;
        default = true;
      };
      reloadIfChanged = mkOption {
        type = types.bool;
        default = false;
      };
      startAt = mkOption {
        type = types.either types.str (types.listOf types.str);
        default = [ ];
      };
    };
  };

  userModule =
    { name, config, ... }:
    {
      # As NixOS does for normal users (config/users-groups.nix).
      config = lib.mkIf config.isNormalUser {
        group = lib.mkDefault "users";
        home = lib.mkDefault "/home/${name}";
        createHome = lib.mkDefault true;
      };
      options = {
        name = mkOption {
          type = types.str;
          default = name;
        };
        isSystemUser = mkOption {
          type = types.bool;
          default = false;
        };
        isNormalUser = mkOption {
          type = types.bool;
          default = false;
        };
        group = mkOption {
          type = types.str;
          default = "";
        };
        extraGroups = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        description = mkOption {
          type = types.str;
          default = "";
        };
        home = mkOption {
          type = types.str;
          default = "/var/empty";
        };
        createHome = mkOption {
          type = types.bool;
          default = false;
        };
        homeMode = mkOption {
          type = types.strMatching "[0-7]{1,5}";
          default = "700";
        };
        uid = mkOption {
          type = types.nullOr types.int;
          default = null;
        };
      };
    };

  groupModule =
    { name, ... }:
    {
      options = {
        name = mkOption {
          type = types.str;
          default = name;
        };
        gid = mkOption {
          type = types.nullOr types.int;
          default = null;
        };
        members = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
      };
    };

  etcModule =
    { name, config, ... }:
    {
      options = {
        enable = mkOption {
          type = types.bool;
          default = true;
        };
        target = mkOption {
          type = types.str;
          default = name;
        };
        text = mkOption {
          type = types.nullOr types.lines;
          default = null;
        };
        source = mkOption { type = types.path; };
        mode = mkOption {
          type = types.str;
          default = "symlink";
        };
        user = mkOption {
          type = types.str;
          default = "+0";
        };
        group = mkOption {
          type = types.str;
          default = "+0";
        };
      };
      config.source = lib.mkIf (config.text != null) (
        lib.mkDefault (pkgs.writeText "etc-${baseNameOf name}" config.text)
      );
    };
in
{
  options = {
    assertions = mkOption {
      type = types.listOf types.unspecified;
      default = [ ];
    };
    warnings = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };

    systemd.services = mkOption {
      type = types.attrsOf (types.submodule serviceModule);
      default = { };
    };
    systemd.tmpfiles.rules = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };

    users.users = mkOption {
      type = types.attrsOf (types.submodule userModule);
      default = { };
    };
    users.groups = mkOption {
      type = types.attrsOf (types.submodule groupModule);
      default = { };
    };

    environment.etc = mkOption {
      type = types.attrsOf (types.submodule etcModule);
      default = { };
    };
    environment.systemPackages = mkOption {
      type = types.listOf types.package;
      default = [ ];
    };
    system.checks = mkOption {
      type = types.listOf types.package;
      default = [ ];
    };

    # The options the appliance profile sets (system/boot/systemd.nix,
    # system/boot/kernel.nix, system/boot/tmp.nix, system/boot/loader/*,
    # services/networking/firewall.nix, ssh/sshd.nix, config/nix.nix,
    # services/system/nix-gc.nix, config/locale.nix, misc/documentation.nix,
    # config/fonts/fontconfig.nix, programs/command-not-found).
    systemd.settings.Manager = mkOption {
      type = types.submodule { freeformType = types.attrsOf unitOption; };
      default = { };
    };
    systemd.enableEmergencyMode = enableOption true;
    boot.kernel.sysctl = mkOption {
      type = types.attrsOf (
        types.nullOr (
          types.oneOf [
            types.bool
            types.str
            types.int
          ]
        )
      );
      default = { };
    };
    boot.tmp.cleanOnBoot = enableOption false;
    boot.loader.grub.configurationLimit = mkOption {
      type = types.int;
      default = 100;
    };
    boot.loader.systemd-boot.configurationLimit = mkOption {
      type = types.nullOr types.int;
      default = null;
    };
    networking.firewall.enable = enableOption true;
    # Set by the NixOS test framework on every node (nixos/lib/testing).
    networking.primaryIPAddress = mkOption {
      type = types.str;
      default = "192.168.1.1";
    };
    networking.firewall.allowedTCPPorts = mkOption {
      type = types.listOf types.port;
      default = [ ];
    };
    services.openssh.enable = enableOption false;
    services.openssh.settings = mkOption {
      type = types.submodule {
        freeformType = types.attrsOf types.anything;
        options = {
          PasswordAuthentication = enableOption true;
          KbdInteractiveAuthentication = enableOption true;
          PermitRootLogin = mkOption {
            type = types.enum [
              "yes"
              "without-password"
              "prohibit-password"
              "forced-commands-only"
              "no"
            ];
            default = "prohibit-password";
          };
        };
      };
      default = { };
    };
    nix.settings = mkOption {
      type = types.submodule { freeformType = types.attrsOf types.anything; };
      default = { };
    };
    nix.gc.automatic = enableOption false;
    nix.gc.options = mkOption {
      type = types.str;
      default = "";
    };
    time.timeZone = mkOption {
      type = types.nullOr types.str;
      default = null;
    };
    documentation.enable = enableOption true;
    fonts.fontconfig.enable = enableOption true;
    programs.command-not-found.enable = enableOption true;

    # The options safeswitch's module reads and its VM test sets
    # (system/boot/loader/systemd-boot/systemd-boot.nix, loader/efi/efi.nix,
    # virtualisation/qemu-vm.nix, system/activation/specialisation.nix).
    boot.loader.systemd-boot.enable = enableOption false;
    boot.loader.systemd-boot.bootCounting.enable = enableOption false;
    boot.loader.efi.canTouchEfiVariables = enableOption false;
    virtualisation.useBootLoader = enableOption false;
    virtualisation.useEFIBoot = enableOption false;
    specialisation = mkOption {
      type = types.attrsOf (
        types.submodule {
          options = {
            inheritParentConfig = enableOption true;
            configuration = mkOption {
              type = types.deferredModule;
              default = { };
            };
          };
        }
      );
      default = { };
    };
  };

  # NixOS' own checks on users that a service module can trip: the assertions
  # of config/users-groups.nix, and the activation's refusal of a user whose
  # group is not declared (update-users-groups.pl).
  config.assertions = lib.concatLists (
    lib.mapAttrsToList (name: user: [
      {
        assertion = user.isSystemUser != user.isNormalUser;
        message = "users.users.${name}: exactly one of isSystemUser and isNormalUser must be set";
      }
      {
        assertion = user.group != "";
        message = "users.users.${name}.group is unset";
      }
      {
        assertion = user.group == "" || config.users.groups ? ${user.group} || lib.elem user.group [
            "nogroup"
            "users"
          ];
        message = "users.users.${name}.group = \"${user.group}\" is not a declared group";
      }
    ]) config.users.users
  );
}
