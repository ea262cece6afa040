# Evaluates keel's flake outputs against a stand-in nixpkgs input made of
# nixpkgs' real `lib` and stub-pkgs.nix, and returns a JSON-able summary of
# their structure for python/tests/nix/test_flake.py.
#
# With `nixpkgs` (a nixpkgs tree: KEEL_NIXPKGS), `lib.nixosSystem` evaluates
# the flake's NixOS configurations against the real NixOS declarations
# (eval-modules.nix with nixos-host-modules.nix) and `systems` summarises the
# appliance, its images, its checks and apps per system; without it,
# `package` summarises the package, overlay and module outputs only.
{
  repo,
  nixpkgsLib,
  nixpkgs ? null,
}:
let
  realLib = import nixpkgsLib;
  systems = [
    "x86_64-linux"
    "aarch64-linux"
  ];

  # What nixpkgs' flake gives as lib.nixosSystem, evaluated here: the
  # modules with the real declarations, pkgs the stand-in of the platform
  # the modules choose (nixpkgs.hostPlatform).
  nixosSystem =
    { modules, ... }:
    let
      evalFor =
        system:
        import ./eval-modules.nix {
          inherit repo nixpkgs system;
          hostConfig.imports = modules;
          withKeel = false;
          extraNixosModules = import ./nixos-host-modules.nix;
          raw = "evaluation";
        };
      probe = evalFor "x86_64-linux";
      platform = probe.config.nixpkgs.hostPlatform;
    in
    evalFor (if builtins.isString platform then platform else platform.system);

  lib =
    realLib
    // {
      nixosSystem =
        if nixpkgs == null then
          throw "lib.nixosSystem needs a nixpkgs tree (KEEL_NIXPKGS)"
        else
          nixosSystem;
    };
  pkgsFor =
    system:
    import ./stub-pkgs.nix {
      inherit lib nixpkgs system;
    };
  pkgs = pkgsFor "x86_64-linux";
  flake = import (repo + "/flake.nix");
  nixpkgsInput = {
    inherit lib;
    legacyPackages = lib.genAttrs systems pkgsFor;
  };
  outputs = flake.outputs {
    self = outputs;
    nixpkgs = nixpkgsInput;
  };

  names = map (p: p.pname);
  summarise = p: {
    inherit (p)
      pname
      version
      pyproject
      enabledTestPaths
      pythonImportsCheck
      ;
    build-system = names p.build-system;
    dependencies = names p.dependencies;
    nativeCheckInputs = names p.nativeCheckInputs;
    mainProgram = p.meta.mainProgram;
    sourceRoot = p.sourceRoot;
  };

  keel = outputs.packages.x86_64-linux.keel;
  kyberPy = lib.findFirst (p: p.pname == "kyber-py") null keel.nativeCheckInputs;
  fromOverlay = (outputs.overlays.default pkgs pkgs).keel;

  # The package's source filter, asked about paths of a working tree.
  sourceKeeps =
    let
      root = toString repo;
      keeps = path: type: keel.src.filter "${root}/${path}" type;
    in
    {
      pyproject = keeps "python/pyproject.toml" "regular";
      module = keeps "python/src/keel/cli.py" "regular";
      unitTest = keeps "python/tests/unit/test_config.py" "regular";
      tiersJson = keeps "modules/tiers.json" "regular";
      examples = keeps "examples/agents" "directory";
      docs = keeps "docs/nix.md" "regular";
      pycache = keeps "python/src/keel/__pycache__" "directory";
      pyc = keeps "python/src/keel/cli.cpython-311.pyc" "regular";
      eggInfo = keeps "python/src/keel.egg-info" "directory";
      pytestCache = keeps "python/.pytest_cache" "directory";
      hypothesis = keeps "python/.hypothesis" "directory";
      build = keeps "python/build" "directory";
      venv = keeps ".venv" "directory";
      devState = keeps ".keel" "directory";
      flake = keeps "flake.nix" "regular";
      vmTests = keeps "vm-tests" "directory";
      packages = keeps "pkgs" "directory";
      hosts = keeps "hosts" "directory";
    };

  # The appliance of one system, as the flake's outputs expose it.
  applianceNames = {
    x86_64-linux = "appliance";
    aarch64-linux = "appliance-aarch64";
  };
  systemSummary =
    system:
    let
      nixos = outputs.nixosConfigurations.${applianceNames.${system}};
      inherit (nixos) config;
      packages = outputs.packages.${system};
      image = name: {
        inherit (packages.${name}.passthru) filePath;
        format = packages.${name}.passthru.config.image.format;
        efiSupport = packages.${name}.passthru.config.image.efiSupport;
        builtInVM = packages.${name}.keelInVM or false;
      };
      app = outputs.apps.${system}.vm;
    in
    {
      configuration = applianceNames.${system};
      platform = config.nixpkgs.hostPlatform;
      failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
      inherit (config) warnings;
      keelServices = builtins.filter (lib.hasPrefix "keel") (builtins.attrNames config.systemd.services);
      imageVariants = builtins.attrNames config.image.modules;
      packageNames = builtins.attrNames packages;
      images = {
        image-raw-efi = image "image-raw-efi";
        image-qcow2 = image "image-qcow2";
      };
      # (checks.appliance-toplevel, system.build.toplevel, is not forced:
      # it needs nearly all of NixOS and real packages.)
      checkNames = builtins.attrNames outputs.checks.${system};
      app = {
        inherit (app) type;
        description = app.meta.description;
      };
      vm = {
        seedDirectory = config.virtualisation.vmVariant.services.keel.appliance.seed.directory;
        share = config.virtualisation.vmVariant.virtualisation.sharedDirectories.keel-seed;
        systemName = config.virtualisation.vmVariant.system.name;
      };
      formatter = outputs.formatter.${system}.pname;
    };
in
{
  # For eval-template.nix: the stand-in nixpkgs input and keel's outputs.
  inherit nixpkgsInput outputs;

  package = {
    outputNames = builtins.attrNames outputs;
    packageNames = builtins.attrNames outputs.packages.x86_64-linux;
    keel = summarise keel;
    defaultIsKeel = outputs.packages.x86_64-linux.default == keel;
    overlayKeel = summarise fromOverlay;
    inherit sourceKeeps;
    kyberPy = {
      inherit (kyberPy)
        pname
        version
        pyproject
        pythonImportsCheck
        ;
      src = kyberPy.src.name;
      build-system = names kyberPy.build-system;
    };
    keelArgs = builtins.attrNames (builtins.functionArgs (import (repo + "/pkgs/keel.nix")));
    checkKeelIsPackage = outputs.checks.x86_64-linux.keel == keel;
    vmTests = lib.mapAttrs (
      name: check: builtins.baseNameOf (toString (builtins.head check.keelNixosTest.imports))
    ) (lib.filterAttrs (name: _: lib.hasPrefix "vm-" name) outputs.checks.x86_64-linux);
    nixosModules = lib.mapAttrs (_: toString) outputs.nixosModules;
    templates = lib.mapAttrs (_: t: {
      path = toString t.path;
      inherit (t) description;
    }) outputs.templates;
    formatter = outputs.formatter.x86_64-linux.pname;
  };
  systems = lib.genAttrs systems systemSummary;
}
