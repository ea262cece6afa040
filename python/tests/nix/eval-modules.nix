# Evaluates keel's NixOS modules (the flake's nixosModules.default) with
# `lib.evalModules`, together with the real NixOS module files that declare
# what they set (nixos-modules.nix, from the nixpkgs tree `nixpkgs`), the
# stand-ins of nixos-stubs.nix for what those files read from the rest of
# NixOS, a stand-in `pkgs` (stub-pkgs.nix) and the host configuration under
# test. Returns what the tests check: failed assertions, warnings, the keel
# units (options and the unit file text NixOS generates), users, /etc/keel
# files (JSON files as the value the module wrote) and any option values
# asked for.
{
  repo,
  # A nixpkgs tree (KEEL_NIXPKGS): its lib, nixos/ and pkgs/pkgs-lib are used.
  nixpkgs,
  hostConfig ? { },
  # Option paths (lists of attribute names) whose values to return as well.
  paths ? [ ],
  # false: the same without keel's modules, to compare against.
  withKeel ? true,
  # An overlay on the stand-in pkgs, as a host's nixpkgs.overlays would be.
  overlay ? final: prev: { },
  # More real NixOS module files, relative to nixos/modules
  # ("services/networking/foo.nix"), and more modules (paths or attribute
  # sets), for tests of modules that set options the default set lacks.
  extraNixosModules ? [ ],
  extraModules ? [ ],
  # Unit names (keel-... only) whose generated text to return; all keel
  # units when null.
  units ? null,
  # The platform of the stand-in pkgs (pkgs.stdenv.hostPlatform).
  system ? "x86_64-linux",
  # true: the evaluated configuration itself; "evaluation": the whole
  # result of lib.evalModules (for other Nix files here).
  raw ? false,
}:
let
  lib = import (nixpkgs + "/lib");
  stubPkgs = import ./stub-pkgs.nix { inherit lib nixpkgs system; };
  pkgs = stubPkgs // overlay pkgs stubPkgs;

  # What any real host has and a test's host snippet need not repeat.
  baseHost = {
    system.stateVersion = lib.mkDefault "26.05";
    # Test hosts are not booted; a real host sets its boot loader.
    boot.loader.grub.enable = lib.mkDefault false;
    # The stand-in pkgs has no coreutils-full, perl... (system-path.nix's
    # packages of every system); the tests look at keel's own.
    environment.corePackages = lib.mkForce [ ];
    environment.defaultPackages = lib.mkDefault [ ];
  };

  real = import ./nixos-modules.nix ++ extraNixosModules;
  evaluated = lib.evalModules {
    specialArgs.modulesPath = nixpkgs + "/nixos/modules";
    modules =
      map (file: nixpkgs + "/nixos/modules/${file}") real
      ++ [
        (import ./nixos-stubs.nix real)
        { _module.args.pkgs = pkgs; }
        baseHost
        hostConfig
      ]
      ++ extraModules
      ++ lib.optional withKeel (repo + "/modules");
  };
  inherit (evaluated) config options;

  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  isKeel = name: lib.hasPrefix "keel" name;
  keelOnly = lib.filterAttrs (name: _: isKeel name);

  describeFile =
    file:
    let
      source = file.source;
    in
    if source ? keelEnv && lib.hasInfix "jq .value" source.keelScript then
      { json = source.keelEnv.value; }
    else if source ? keelText then
      { text = source.keelText; }
    else
      { source = toString source; };
in
if raw == "evaluation" then
  evaluated
else if raw then
  config
else
{
  inherit failedAssertions;
  inherit (config) warnings;

  services = lib.mapAttrs (name: unit: {
    inherit (unit)
      enable
      description
      wantedBy
      requiredBy
      after
      before
      wants
      requires
      bindsTo
      partOf
      environment
      serviceConfig
      unitConfig
      script
      preStart
      restartIfChanged
      stopIfChanged
      ;
    path = map toString unit.path;
    restartTriggers = map toString unit.restartTriggers;
  }) (keelOnly config.systemd.services);

  # The unit files NixOS writes (nixos/lib/systemd-lib.nix), by unit name;
  # none when an assertion failed, as NixOS builds nothing then (and a value
  # an assertion refused may make NixOS throw while writing the unit).
  units =
    if failedAssertions != [ ] then
      null
    else if units == [ ] then
      { }
    else
      lib.mapAttrs (name: unit: unit.text) (
    lib.filterAttrs (
      name: unit: isKeel name && (units == null || lib.elem name units) && unit.enable
    ) config.systemd.units
  );

  sockets = lib.mapAttrs (name: unit: {
    inherit (unit)
      description
      wantedBy
      listenStreams
      socketConfig
      ;
  }) (keelOnly config.systemd.sockets);

  users = lib.mapAttrs (name: user: {
    inherit (user)
      isSystemUser
      isNormalUser
      group
      home
      createHome
      extraGroups
      ;
  }) (keelOnly config.users.users);
  groups = builtins.attrNames (keelOnly config.users.groups);

  etc = lib.mapAttrs (name: file: describeFile file // { inherit (file) mode; }) (
    lib.filterAttrs (name: _: lib.hasPrefix "keel/" name) config.environment.etc
  );

  tmpfiles = lib.filter (rule: lib.hasInfix "keel" rule) config.systemd.tmpfiles.rules;
  # The packages keel's own modules add (all of them would need nixpkgs'
  # real packages: the NixOS manual, fontconfig...).
  systemPackages = map (p: p.name) (
    lib.concatMap (def: def.value) (
      lib.filter (def: lib.hasPrefix (toString repo + "/") def.file) options.environment.systemPackages.definitionsWithLocations
    )
  );
  checks = map (p: {
    inherit (p) name;
    script = p.keelScript or null;
  }) config.system.checks;
  enabledServices = config.services.keel.enabledServices or [ ];
  # The TCP endpoints ("HOST:PORT") keel's daemons listen on, by unit: what
  # a VM test may wait for (test_vm_tests.py checks it waits at the right
  # address).
  listeners =
    let
      keel = config.services.keel or { };
    in
    lib.optionalAttrs (keel.mesh.enable or false) { keel-mesh = [ keel.mesh.listen ]; }
    // lib.optionalAttrs ((keel.watch.enable or false) && keel.watch.settings.metrics != null) {
      keel-watch = [ keel.watch.settings.metrics ];
    };
  values = map (path: lib.attrByPath path null config) paths;
}
