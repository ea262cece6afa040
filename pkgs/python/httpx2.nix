# httpx2: the HTTP client of the MCP SDK 2.x (mcp needs httpx2>=2.10.0).
# nixpkgs has an older httpx2 (2.3.0 in the mid-2026 tree), so keel's package
# set replaces it. docs/nix.md, "The MCP SDK packages".
{
  lib,
  buildPythonPackage,
  fetchPypi,
  pythonOlder,

  # build-system
  hatchling,
  hatch-fancy-pypi-readme,
  uv-dynamic-versioning,

  # dependencies
  anyio,
  httpcore2,
  idna,
  truststore,
  typing-extensions,

  # optional-dependencies
  h2,
  socksio,
}:

buildPythonPackage rec {
  pname = "httpx2";
  version = "2.17.0";
  pyproject = true;

  src = fetchPypi {
    inherit pname version;
    # The sha256 PyPI publishes for httpx2-2.17.0.tar.gz.
    hash = "sha256-gH2es5PI2MIKzPM6alljQ9/abHzby5cu1BY8kA3N+J8=";
  };

  # As httpcore2.nix: nixpkgs' uv-dynamic-versioning (0.13.0) builds the
  # same wheel as PyPI's once the version is given; its setup hook also
  # fills the `httpcore2=={{ version }}` pin of the dependency list.
  postPatch = ''
    substituteInPlace pyproject.toml \
      --replace-fail '"uv-dynamic-versioning>=0.14.1"' '"uv-dynamic-versioning"'
  '';

  build-system = [
    hatchling
    hatch-fancy-pypi-readme
    uv-dynamic-versioning
  ];

  # Its requirements on Linux.
  dependencies = [
    anyio
    httpcore2
    idna
    truststore
  ]
  ++ lib.optionals (pythonOlder "3.13") [ typing-extensions ];

  optional-dependencies = {
    http2 = [ h2 ];
    socks = [ socksio ];
  };

  # The sdist ships no tests (they live in the httpx2 repository).
  doCheck = false;

  pythonImportsCheck = [ "httpx2" ];

  meta = {
    description = "A next generation HTTP client for Python";
    homepage = "https://github.com/pydantic/httpx2";
    license = lib.licenses.bsd3;
  };
}
