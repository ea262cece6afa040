# keel's Python: the host's python3 with ./overrides.nix applied to its
# package set (`python.pkgs`), after any packageOverrides the host already
# gave it. pkgs/keel.nix is built with `(callPackage ./pkgs/python { }).pkgs`
# (flake.nix, overlays.default, modules/keel.nix).
{
  lib,
  python3,
}:

let
  python = python3.override (old: {
    self = python;
    packageOverrides = lib.composeExtensions (old.packageOverrides or (_: _: { })) (
      import ./overrides.nix
    );
  });
in
python
