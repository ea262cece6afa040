# kyber-py: a readable pure-Python ML-KEM (FIPS 203). keel's mesh tests
# cross-check both KEM backends (cryptography, liboqs) against it. It is not
# in nixpkgs, so keel packages it here, as a check input of pkgs/keel.nix
# only; keel never uses it at run time.
{
  lib,
  buildPythonPackage,
  fetchPypi,
  hatchling,
}:

buildPythonPackage rec {
  pname = "kyber-py";
  version = "1.2.0";
  pyproject = true;

  src = fetchPypi {
    pname = "kyber_py";
    inherit version;
    # The sha256 PyPI publishes for kyber_py-1.2.0.tar.gz.
    hash = "sha256-kGK3wwe0uEmA7Gt3UJFVjWDEiJhcToCB7rZv1Lspo1Q=";
  };

  build-system = [ hatchling ];

  # Its own suite replays the NIST KATs through pycryptodome's AES DRBG;
  # keel's tests exercise the ML-KEM part it relies on.
  doCheck = false;

  pythonImportsCheck = [ "kyber_py.ml_kem" ];

  meta = {
    description = "Pure-Python implementation of ML-KEM (FIPS 203)";
    homepage = "https://github.com/GiacomoPope/kyber-py";
    license = with lib.licenses; [
      mit
      asl20
    ];
  };
}
