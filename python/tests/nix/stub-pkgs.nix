# A stand-in for the few attributes of nixpkgs' `pkgs` that keel's flake,
# package and modules use, so that they evaluate with nixpkgs' `lib` alone
# (tier 4 without a Nix that can build). Nothing here is built: a "package" is
# a named marker, and `formats.json`'s `generate` keeps the value it was given
# so the tests can read the JSON a module would write to /etc/keel.
#
# The attribute names are the ones nixpkgs (nixos-26.05) really has; each was
# checked against nixpkgs' tree (docs/nix.md says how). A module or
# pkgs/keel.nix asking for anything else fails to evaluate here, as it would
# against nixpkgs.
{ lib }:
let
  package = name: {
    type = "derivation";
    inherit name;
    pname = name;
    outPath = "/nix/store/${lib.fixedWidthString 32 "0" ""}-${name}";
    meta.mainProgram = name;
  };

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
      outPath = "/nix/store/${lib.fixedWidthString 32 "0" ""}-${attrs.pname}-${attrs.version}";
    };

  python3Packages =
    lib.genAttrs [
      "setuptools"
      "hatchling"
      "cryptography"
      "jeepney"
      "dnspython"
      "idna"
      "systemd-python"
      "liboqs-python"
      "pytestCheckHook"
      "hypothesis"
    ] package
    // {
      buildPythonApplication = buildPython;
      buildPythonPackage = buildPython;
      fetchPypi = args: package "${args.pname}-${args.version}.tar.gz" // { inherit (args) hash; };
      callPackage = callPackageWith (python3Packages // { inherit lib; });
    };

  # pkgs.formats.json's option type is nixpkgs' JSON value type; newer lib
  # has it as lib.types.json, older lib is given the same definition.
  jsonType =
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

  self = {
    inherit lib python3Packages;
    callPackage = callPackageWith (self // python3Packages);

    formats.json =
      { }:
      {
        type = jsonType;
        generate = name: value: package name // { keelJson = value; };
      };

    writeText = name: text: package name // { keelText = text; };
    runCommand =
      name: env: script:
      package name // { keelScript = script; };

    testers.runNixOSTest = module: { keelNixosTest = module; };

    nixfmt-tree = package "nixfmt-tree";
    python3 = package "python3" // {
      withPackages = select: package "python3-with-packages" // { keelPackages = select python3Packages; };
    };
    coreutils = package "coreutils";
    iproute2 = package "iproute2" // {
      meta.mainProgram = "ip";
    };
    dig = package "dig";
    curl = package "curl";
    jq = package "jq";
    nftables = package "nftables" // {
      meta.mainProgram = "nft";
    };
  };
in
self
