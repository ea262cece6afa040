# Evaluates keel's NixOS modules (the flake's nixosModules.default) with
# nixpkgs' real `lib`, the NixOS option stand-ins of nixos-stubs.nix and the
# host configuration under test, and returns what the tests check: failed
# assertions, warnings, and the keel units, users and /etc/keel files the
# configuration produces (JSON files as the value the module wrote).
{
  repo,
  nixpkgsLib,
  hostConfig ? { },
  # Option paths (lists of attribute names) whose values to return as well.
  paths ? [ ],
  # false: the same without keel's modules, to compare against.
  withKeel ? true,
  # An overlay on the stand-in pkgs, as a host's nixpkgs.overlays would be.
  overlay ? final: prev: { },
}:
let
  lib = import nixpkgsLib;
  stubPkgs = import ./stub-pkgs.nix { inherit lib; };
  pkgs = stubPkgs // overlay pkgs stubPkgs;

  evaluated = lib.evalModules {
    modules = [
      ./nixos-stubs.nix
      { _module.args.pkgs = pkgs; }
      hostConfig
    ]
    ++ lib.optional withKeel (repo + "/modules");
  };
  inherit (evaluated) config;

  isKeel = name: lib.hasPrefix "keel" name;
  keelOnly = lib.filterAttrs (name: _: isKeel name);

  describeFile =
    file:
    if file.source ? keelJson then
      { json = file.source.keelJson; }
    else if file.source ? keelText then
      { text = file.source.keelText; }
    else
      { source = toString file.source; };
in
{
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  inherit (config) warnings;

  services = lib.mapAttrs (name: unit: {
    inherit (unit)
      enable
      description
      wantedBy
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
  systemPackages = map (p: p.name) config.environment.systemPackages;
  checks = map (p: {
    inherit (p) name;
    script = p.keelScript or null;
  }) config.system.checks;
  enabledServices = config.services.keel.enabledServices or [ ];
  # What modules/mesh.nix generates the node's config.json from.
  meshConfig = if config.services.keel.mesh.enable or false then config.services.keel.mesh.settings else null;
  values = map (path: lib.attrByPath path null config) paths;
}
