# idna 3.21: httpx2 2.17.0 needs idna>=3.18, and nixpkgs has an older one
# (3.13 in the mid-2026 tree). keel's package set replaces idna for every
# package in it (./default.nix), so keel's closure holds one idna only.
# docs/nix.md, "The MCP SDK packages".
{
  lib,
  buildPythonPackage,
  fetchPypi,
  flit-core,
  pytestCheckHook,
}:

buildPythonPackage rec {
  pname = "idna";
  version = "3.21";
  pyproject = true;

  src = fetchPypi {
    inherit pname version;
    # The sha256 PyPI publishes for idna-3.21.tar.gz.
    hash = "sha256-E8ixSFPFwzbqq1JvM5CBfpyPzY+hdavdGnSApclPmcs=";
  };

  build-system = [ flit-core ];

  # The sdist's tests/ run offline (the IDNA and UTS #46 tables it ships).
  nativeCheckInputs = [ pytestCheckHook ];

  pythonImportsCheck = [ "idna" ];

  meta = {
    description = "Internationalized Domain Names in Applications (IDNA)";
    homepage = "https://github.com/kjd/idna";
    changelog = "https://github.com/kjd/idna/blob/v${version}/HISTORY.md";
    license = lib.licenses.bsd3;
  };
}
