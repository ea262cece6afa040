# A stand-in for the attributes of nixpkgs' `pkgs` that keel's flake, its
# package, its modules and the real NixOS module files of nixos-modules.nix
# use, so that all of them evaluate with nixpkgs' `lib` alone (tier 4 without
# a Nix that can build). Nothing here is built: a "package" is a named marker
# whose store path is made up, and the writers (`runCommand`, `writeText`,
# `writeShellScriptBin`...) keep what they were given, so the tests can read
# the JSON a module writes to /etc/keel or the script a unit runs.
#
# With `nixpkgs` (a nixpkgs tree: KEEL_NIXPKGS), `formats` is nixpkgs' own
# pkgs/pkgs-lib (real option types, real generators running on the writers
# below); without it, a minimal `formats.json` for the flake's tests.
#
# The attribute names are the ones nixpkgs (nixos-26.05) really has; each was
# checked against nixpkgs' tree (docs/nix.md says how). A module or
# pkgs/keel.nix asking for anything else fails to evaluate here, as it would
# against nixpkgs.
{
  lib,
  nixpkgs ? null,
  system ? "x86_64-linux",
}:
let
  # The platform as nixpkgs describes it (lib.systems), which NixOS modules
  # ask about (`pkgs.stdenv.hostPlatform.is64bit`...).
  platform = lib.systems.elaborate system;

  storePath = name: "/nix/store/${lib.fixedWidthString 32 "0" ""}-${name}";

  # A package marker. Its outputs are itself, as a single-output package's
  # are (`pkg.out`, `pkg.bin` and `lib.getExe pkg` all work).
  package =
    name:
    let
      self = {
        type = "derivation";
        inherit name;
        pname = name;
        version = "0";
        outPath = storePath name;
        outputs = [ "out" ];
        # Every output is the package itself (cloud-utils.guest...).
        out = self;
        bin = self;
        lib = self;
        dev = self;
        man = self;
        guest = self;
        outputName = "out";
        meta.mainProgram = name;
        overrideAttrs = _: self;
        override = _: self;
        passthru = { };
      };
    in
    self;

  callPackageWith =
    scope: fn: overrides:
    let
      f = if builtins.isFunction fn then fn else import fn;
    in
    f (builtins.intersectAttrs (builtins.functionArgs f) scope // overrides);

  buildPython =
    attrs:
    attrs
    // {
      type = "derivation";
      name = "${attrs.pname}-${attrs.version}";
      outPath = storePath "${attrs.pname}-${attrs.version}";
      meta = attrs.meta or { };
    };

  # nixpkgs' python3Packages: markers for what keel's Nix takes from it, as a
  # fixed point like nixpkgs' package set, so that `python3.override {
  # packageOverrides = ...; }` (pkgs/python/default.nix) replaces an
  # attribute for every package of the set that takes it.
  pythonPackagesBase =
    self:
    lib.genAttrs [
      "setuptools"
      "hatchling"
      "cryptography"
      "jeepney"
      "mcp"
      "dnspython"
      "idna"
      "systemd-python"
      "liboqs-python"
      "pytestCheckHook"
      "hypothesis"
      # pkgs/python: the build systems and dependencies of the MCP SDK 2.x
      "flit-core"
      "hatch-fancy-pypi-readme"
      "uv-dynamic-versioning"
      "anyio"
      "h11"
      "h2"
      "httpcore2"
      "httpx2"
      "jsonschema"
      "opentelemetry-api"
      "pydantic"
      "python-multipart"
      "socksio"
      "sse-starlette"
      "starlette"
      "trio"
      "truststore"
      "typing-extensions"
      "typing-inspection"
      "uvicorn"
    ] package
    // {
      pyjwt = package "pyjwt" // {
        optional-dependencies.crypto = [ self.cryptography ];
      };
      buildPythonApplication = buildPython;
      buildPythonPackage = buildPython;
      fetchPypi = args: package "${args.pname}-${args.version}.tar.gz" // { inherit (args) hash; };
      # nixpkgs' python3 is 3.13 (python313) on 26.05 and later.
      pythonOlder = version: builtins.compareVersions "3.13" version < 0;
      callPackage = callPackageWith (self // { inherit lib; });
    };

  # A python3 whose package set has its `packageOverrides` applied, as
  # nixpkgs' interpreters do (passthrufun.nix): `.pkgs`, and `.override`
  # with makeOverridable's semantics (new arguments, or a function of the
  # ones given so far; nixpkgs' own python3 was given no packageOverrides).
  mkPython =
    args:
    let
      pkgs = lib.fix (lib.extends (args.packageOverrides or (_: _: { })) pythonPackagesBase);
    in
    package "python3"
    // {
      inherit pkgs;
      override = f: mkPython (args // (if builtins.isFunction f then f args else f));
      withPackages =
        select: package "python3-with-packages" // { keelPackages = select pkgs; };
    };

  python3 = mkPython { };
  python3Packages = python3.pkgs;

  # systemd's build flags that nixos/modules/system/boot/systemd.nix reads
  # (`cfg.package.withImportd`...), as nixpkgs' default systemd has them.
  systemd =
    package "systemd"
    // lib.genAttrs [
      "withBootloader"
      "withCryptsetup"
      "withEfi"
      "withFido2"
      "withHostnamed"
      "withImportd"
      "withLocaled"
      "withLogind"
      "withMachined"
      "withNspawn"
      "withPortabled"
      "withRepart"
      "withSysupdate"
      "withTimedated"
      "withTpm2Units"
      "withUtmp"
    ] (_: true)
    // {
      util-linux = package "util-linux";
    };

  # Without nixpkgs' tree: pkgs.formats.json's type is nixpkgs' JSON value
  # type (lib.types.json in newer lib, the same definition for older lib).
  minimalFormats.json =
    { }:
    {
      type =
        lib.types.json or (
          let
            valueType =
              with lib.types;
              nullOr (oneOf [
                bool
                int
                float
                str
                path
                (attrsOf valueType)
                (listOf valueType)
              ])
              // {
                description = "JSON value";
              };
          in
          valueType
        );
      generate =
        name: value:
        self.runCommand name {
          inherit value;
        } ''jq .value "$NIX_ATTRS_JSON_FILE" > $out'';
    };

  self = {
    inherit lib python3Packages systemd;
    callPackage = callPackageWith (self // python3Packages);
    buildPackages = self;
    stdenv = {
      mkDerivation = self.stdenvNoCC.mkDerivation;
      hostPlatform = platform;
      buildPlatform = platform;
      targetPlatform = platform;
      cc.libc = package "glibc";
    };
    # A derivation marker named as mkDerivation would name it.
    stdenvNoCC = {
      mkDerivation =
        arg:
        let
          attrs = if builtins.isFunction arg then arg attrs else arg;
        in
        package (attrs.name or "${attrs.pname}-${attrs.version}") // { keelDerivation = true; };
      hostPlatform = platform;
    };
    hostPlatform = platform;
    targetPlatform = platform;
    # The nixpkgs source, as pkgs.path is.
    path = if nixpkgs == null then storePath "nixpkgs" else nixpkgs;

    formats =
      if nixpkgs == null then
        minimalFormats
      else
        (import (nixpkgs + "/pkgs/pkgs-lib") {
          inherit lib;
          pkgs = self;
        }).formats;

    writeText = name: text: package name // { keelText = text; };
    runCommand =
      name: env: script:
      package name
      // {
        keelEnv = env;
        keelScript = script;
      };
    writeShellScriptBin = name: text: package name // { keelScript = text; };
    writeShellApplication =
      args:
      package args.name
      // {
        keelScript = args.text;
      };

    testers.runNixOSTest = module: { keelNixosTest = module; };

    # What nixos/lib/make-disk-image.nix (the image framework) builds with.
    vmTools.runInLinuxVM = drv: drv // { keelInVM = true; };
    closureInfo = { rootPaths }: package "closure-info" // { inherit rootPaths; };

    # What system/boot/kernel.nix reads of the default kernel (it extends
    # the package set with its own kernel override).
    linuxPackages = lib.makeExtensible (_: {
      kernel =
        let
          kernel = package "linux" // {
            version = "6.12.0";
            modDirVersion = "6.12.0";
            target = if platform.isAarch64 then "Image" else "bzImage";
            features = {
              efiBootStub = true;
            };
            config = {
              isEnabled = _: true;
              isYes = _: true;
              isSet = _: true;
            };
            override = _: kernel;
            overrideAttrs = _: kernel;
          };
        in
        kernel;
      stdenv = self.stdenv;
    });
  }
  // lib.genAttrs [
    # keel's flake and VM tests
    "nixfmt-tree"
    "python3"
    "curl"
    "jq"
    # read by the real NixOS modules of nixos-modules.nix when they evaluate
    # keel's units and users (default PATH of a unit, shells, sshd, nix-gc)
    "coreutils"
    "findutils"
    "gnugrep"
    "gnused"
    "tzdata"
    "openssh"
    "shadow"
    "kmod"
    "nix"
    "bash"
    "bashInteractive"
    "fish"
    "zsh"
    "xonsh"
    "cloud-utils"
    # keel-switch@.service's PATH (setpriv, for checks run as a user); polkit.nix's default
    "util-linux"
    "polkit"
  ] package
  // {
    # keel egress's VM test: the stand-in internet's Python and tools.
    inherit python3;
    iproute2 = package "iproute2" // {
      meta.mainProgram = "ip";
    };
    dig = package "dig";
    nftables = package "nftables" // {
      meta.mainProgram = "nft";
    };
  };
in
self
